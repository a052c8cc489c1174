"""Matplotlib figures for the card, each returned as PNG bytes."""
from __future__ import annotations

import io
import re
import warnings

import numpy as np

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():  # a caption's emoji or script the font lacks is drawn as a box: no warning
        warnings.filterwarnings("ignore", message="Glyph .* missing from font", category=UserWarning)
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()


def funnel(steps: list[tuple[str, int]]) -> bytes:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 2.8))
    names, vals = zip(*steps)
    ax.barh(range(len(vals))[::-1], vals, color=["#4c72b0", "#55a868", "#8172b2", "#c44e52"][: len(vals)])
    ax.set_yticks(range(len(vals))[::-1], names)
    for i, v in zip(range(len(vals))[::-1], vals):
        ax.text(v, i, f" {v:,}", va="center")
    ax.set_xlabel("samples")
    ax.set_title("URLs → downloaded → decodable → kept")
    return _png(fig)


def drops(by_rule: dict[str, int], sweep: dict[str, int]) -> bytes:
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 2.8))
    a.bar(list(by_rule), list(by_rule.values()), color="#c44e52")
    a.set_title("removed per rule")
    a.tick_params(axis="x", rotation=30)
    b.plot([float(e) for e in sweep], list(sweep.values()), "o-")
    b.set_xlabel("ε (drop when cos > 1 − ε)")
    b.set_title("what each ε would remove")
    return _png(fig)


def cluster_sizes(before: list[int], after: list[int], labels: list[int] | None) -> bytes:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3))
    for name, s in (("before balance", before), ("after balance", after), ("pseudo-labels", labels or [])):
        if len(s):
            ax.plot(np.sort(np.asarray(s))[::-1], label=name)
    ax.set_yscale("log")
    ax.set_xlabel("cluster rank")
    ax.set_ylabel("size (log)")
    ax.legend()
    ax.set_title("cluster sizes")
    return _png(fig)


def caption_lengths(en: list[int], zh: list[int], width: int) -> bytes:
    """Histograms given as counts per `width`-character bin (the last bin holds every longer caption)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 2.6))
    used = max([i for i, v in enumerate(en) if v] + [i for i, v in enumerate(zh) if v] + [0]) + 1
    edges = np.arange(used + 1) * width
    ax.stairs(en[:used], edges, fill=True, alpha=0.6, label="English")
    ax.stairs(zh[:used], edges, fill=True, alpha=0.6, label="Chinese")
    ax.set_xlabel(f"characters (last bin: {width * (len(en) - 1)} or more)" if used == len(en) else "characters")
    ax.legend()
    ax.set_title("caption length")
    return _png(fig)


def embedding_map(xy: list, cluster: list[int]) -> bytes:
    plt = _plt()
    xy = np.asarray(xy)
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.scatter(xy[:, 0], xy[:, 1], c=np.asarray(cluster) % 20, cmap="tab20", s=4)
    ax.set_title("teacher image embeddings (PCA), coloured by balance cluster")
    ax.set_xticks([])
    ax.set_yticks([])
    return _png(fig)


def image_grid(rows: list[list[tuple[bytes, str]]], title: str = "") -> bytes:
    """rows of (encoded image, label); the first image of a row is the kept one (green frame)."""
    from PIL import Image

    plt = _plt()
    ncol = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), ncol, figsize=(1.3 * ncol, 1.55 * len(rows)), squeeze=False)
    for i, r in enumerate(rows):
        for j in range(ncol):
            ax = axes[i][j]
            ax.axis("off")
            if j < len(r):
                data, label = r[j]
                ax.imshow(Image.open(io.BytesIO(data)).convert("RGBA"))
                # captions are data: "$" is no mathtext, and control characters (NUL, newlines) are spaces
                ax.set_title(_CONTROL.sub(" ", label)[:18], fontsize=6, parse_math=False)
                if j == 0:
                    ax.patch.set_edgecolor("green")
                    ax.axis("on")
                    ax.set_xticks([])
                    ax.set_yticks([])
                    for s in ax.spines.values():
                        s.set_color("green")
                        s.set_linewidth(2)
    if title:
        fig.suptitle(title, fontsize=9, parse_math=False)
    return _png(fig)
