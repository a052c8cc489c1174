"""card: `card.md`, a self-contained `card.html` (every image embedded) and the PNG plots."""
from __future__ import annotations

import base64
import html
import json
import re
import time

from cidistill.core.config import Config
from cidistill.core.schema import HOLDOUT_FIELDS
from cidistill.core.stage import Stage
from cidistill.core.store import redact
from . import plots
from .collect import CURATION, collect


def funnel_numbers(facts: dict) -> list[tuple[str, int]]:
    st = facts["stages"]
    d = st.get("download", {}).get("stats", {})
    steps = [("URLs", d.get("urls_total", 0)), ("downloaded", d.get("successes", 0))]
    if "embed" in st:
        steps.append(("decodable", st["embed"]["stats"].get("embedded", 0)))
    if "balance" in st:
        b = st["balance"]["stats"]
        if b.get("held_out"):  # the evaluation split (data.holdout) never enters balance or training
            steps.append(("training split", b.get("input", 0) - b["held_out"]))
        steps.append(("kept", b.get("kept", 0)))
    return steps


def md_text(value) -> str:
    """A string from the data (caption, column value, error message) made inert in markdown: HTML and table
    characters are backslash-escaped, newlines flattened. `to_html` undoes the escapes and HTML-escapes."""
    text = " ".join(str(value).split())
    return re.sub(r"([\\`*_<>|&\[\]])", r"\\\1", text)


def _inline(text: str) -> str:
    """Markdown inline text to safe HTML: escapes undone, then every character HTML-escaped; code ticks dropped."""
    return html.escape(re.sub(r"\\(.)|`", lambda m: m.group(1) or "", text))


def _funnel_section(f: dict, figs: dict) -> list[str]:
    steps = funnel_numbers(f)
    figs["funnel.png"] = plots.funnel(steps)
    md = ["## Funnel", "", "![funnel](funnel.png)", "", "| step | samples |", "|---|---|"]
    md += [f"| {n} | {v:,} |" for n, v in steps]
    d = f["stages"].get("download", {}).get("stats", {})
    fails = {k: v for k, v in d.get("status_dict", {}).items() if k != "success"}
    return md + ["", f"Download failures by reason: {md_text(json.dumps(fails)) if fails else 'none'}; "
                 f"URLs rejected before download: {md_text(json.dumps(d.get('urls_rejected', {}))) or 'none'}.", ""]


def _balance_section(cfg: Config, f: dict, figs: dict) -> list[str]:
    st, b = f["stages"], f["stages"]["balance"]["stats"]
    figs["drops.png"] = plots.drops(b.get("removed_by_rule", {}), b.get("eps_sweep", {}))
    md = ["## Image semantic balance", "", "![drops](drops.png)", "", "| rule | removed |", "|---|---|"]
    md += [f"| {k} | {v:,} |" for k, v in b.get("removed_by_rule", {}).items()]
    if b.get("held_out"):
        rule = f"data.holdout = {md_text(cfg.data.holdout)}" if cfg.data.holdout else \
            f"data.holdout_fraction = {cfg.data.holdout_fraction}"
        md += ["", f"Held out for evaluation (`{rule}`): {b['held_out']:,} samples; "
               "they take part in no rule and are never a duplicate's surviving copy."]
    md += ["", f"Applied ε = {b.get('apply_eps')}; the sweep (what each ε would remove): "
           + ", ".join(f"ε={e}: {v:,}" for e, v in b.get("eps_sweep", {}).items()) + ".", ""]
    cs = f.get("cluster_sizes", {})
    figs["clusters.png"] = plots.cluster_sizes(cs.get("sizes_before", []), cs.get("sizes_after", []),
                                               f.get("pseudo_label_sizes"))
    md += ["## Clusters", "", "![clusters](clusters.png)", "",
           f"- balance clusters: {b.get('clusters', 0)}; largest before {b.get('cluster_size_max_before')}, "
           f"after {b.get('cluster_size_max_after')}"]
    if "cluster" in st:
        c = st["cluster"]["stats"]
        md += [f"- pseudo-labels: k = {c.get('k')}, {c.get('empty_clusters')} empty, {c.get('tiny_clusters')} tiny, "
               f"largest {c.get('largest_cluster')}, median {c.get('median_cluster')}"]
    return md + [""] + _examples_section(f, figs)


def _examples_section(f: dict, figs: dict) -> list[str]:
    """Image grids: the biggest duplicate groups, random pseudo-label clusters, the embedding map."""
    imgs, md = f.get("images", {}), []
    if f.get("dup_groups"):
        rows = []
        for g in f["dup_groups"]:
            row = [(imgs[g["kept"]], f"KEPT {g['kept_vendor'] or ''}")] if g["kept"] in imgs else []
            row += [(imgs[m["key"]], f"{m['reason']} {m['vendor'] or ''}") for m in g["members"] if m["key"] in imgs]
            if row:
                rows.append(row)
        if rows:
            figs["duplicates.png"] = plots.image_grid(rows, "duplicate groups: kept image (green) beside what was dropped")
        md += ["## Duplicate groups", "", "![duplicates](duplicates.png)", "",
               "| kept key | kept caption | dropped | reasons | styles |", "|---|---|---|---|---|"]
        for g in f["dup_groups"]:
            reasons = sorted({m["reason"] for m in g["members"]})
            vendors = sorted({str(m["vendor"]) for m in g["members"]} | {str(g["kept_vendor"])})
            md.append(f"| {md_text(g['kept'])} | {md_text(g['kept_caption'] or '')} | {g['size']} | "
                      f"{', '.join(reasons)} | {md_text(', '.join(vendors))} |")
        md += [""]
    if f.get("random_clusters"):
        rows = [[(imgs[m["key"]], m["caption"] or "") for m in ms if m["key"] in imgs]
                for ms in f["random_clusters"].values()]
        figs["random_clusters.png"] = plots.image_grid([r for r in rows if r], "random pseudo-label clusters")
        md += ["## Random clusters", "", "![random clusters](random_clusters.png)", ""]
    if f.get("map"):
        figs["map.png"] = plots.embedding_map(f["map"]["xy"], f["map"]["cluster"])
        md += ["## Embedding map", "", "![map](map.png)", ""]
    return md


def _caption_section(f: dict, figs: dict) -> list[str]:
    c = f["captions"]
    figs["captions.png"] = plots.caption_lengths(c["en_hist"], c["zh_hist"], c["len_bin"])
    md = ["## Captions", "", "![captions](captions.png)", "",
          f"- {c['n']:,} downloaded pairs: English caption {c['en_present']:,}, Chinese {c['zh_present']:,}, "
          f"both {c['both']:,}; empty English captions {c['n'] - c['en_present']:,}"]
    if f.get("vendors"):
        md += ["- artist styles: " + ", ".join(f"{md_text(k)} {v:,}" for k, v in sorted(f["vendors"].items(), key=str))]
    return md + [""]


def _pack_section(cfg: Config, f: dict) -> list[str]:
    """Where the curated dataset lies, its size, and how to read it without this project."""
    p = f["stages"]["pack"]["stats"]
    folder = cfg.stage_dir("pack")
    return ["## The curated dataset", "",
            f"- `{md_text(folder)}/train/`: {p.get('train', 0):,} kept training pairs in {p.get('train_shards', 0)} "
            f"webdataset shards ({p.get('train_bytes', 0) / 1e6:,.1f} MB), each with its image, English (`txt`) and "
            f"Chinese (`zh.txt`) captions, metadata (`json`: cluster_id, balance_cluster, …) and the teacher's "
            f"embeddings (`teacher_*_emb.npy`, float16); `manifest.parquet` lists shard, key and row",
            f"- `{md_text(folder)}/eval/`: {p.get('eval', 0):,} evaluation pairs in {p.get('eval_shards', 0)} shards "
            f"({p.get('eval_bytes', 0) / 1e6:,.1f} MB)",
            "- read with plain webdataset: `webdataset.WebDataset(sorted(glob.glob('.../train/shard-*.tar')))`", ""]


def _provenance_section(cfg: Config, f: dict) -> list[str]:
    md = ["## Lineage", "", "Why was a sample dropped?", "", "```python",
          "from cidistill.core.config import load_config", "from data_cards.collect import why",
          "why(load_config('CONFIG'), '0000042')  # -> drop_reason, dup_of, cluster_id, caption, url", "```", ""]
    md += ["## Provenance", "", f"- URL list: `{md_text(f.get('urls', {}).get('path', redact(cfg.data.urls)))}` "
           f"sha256 `{f.get('urls', {}).get('sha256', '?')}`"]
    for s, v in f["stages"].items():
        if v.get("finished"):
            md.append(f"- {s}: finished {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(v['finished']))}")
    return md + ["- packages: " + ", ".join(f"{k} {v}" for k, v in f["versions"].items()), "",
                 "<details><summary>config</summary>", "", "```json", json.dumps(f["config"], indent=1), "```",
                 "</details>", ""]


def build(cfg: Config) -> dict:
    """Compute the card's text and figures; returns {"md": str, "figures": {name: png}, "facts": ...}."""
    f = collect(cfg)
    figs: dict[str, bytes] = {}
    md = ["# Data card", "", f"Generated {f['generated']} by cidistill from the stage folders of `{cfg.workdir}`.", ""]
    md += _funnel_section(f, figs)
    if "balance" in f["stages"]:
        md += _balance_section(cfg, f, figs)
    if "captions" in f:
        md += _caption_section(f, figs)
    if f["stages"].get("pack", {}).get("stats", {}).get("train"):
        md += _pack_section(cfg, f)
    md += _provenance_section(cfg, f)
    return {"md": "\n".join(md), "figures": figs, "facts": f}


RAW_HTML = ("<details><summary>config</summary>", "</details>")  # the only HTML the card's markdown carries


def to_html(md_text: str, figures: dict[str, bytes]) -> str:
    """A small markdown subset to HTML with every PNG inlined as a data URI (one self-contained file)."""
    out, in_code, in_table = [], False, False
    for line in md_text.splitlines():
        if line.startswith("```"):
            out.append("</pre>" if in_code else "<pre>")
            in_code = not in_code
            continue
        if in_code:
            out.append(html.escape(line))
            continue
        if line.startswith("|"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])]
            if set("".join(cells)) <= set("-"):
                continue
            if not in_table:
                out.append("<table>")
                in_table = True
                out.append("<tr>" + "".join(f"<th>{_inline(c)}</th>" for c in cells) + "</tr>")
            else:
                out.append("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in cells) + "</tr>")
            continue
        if in_table:
            out.append("</table>")
            in_table = False
        if line.startswith("!["):
            alt, name = line[2:].split("](")
            data = base64.b64encode(figures[name.rstrip(")")]).decode()
            out.append(f'<p><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></p>')
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{_inline(line[level:].strip())}</h{level}>")
        elif line.startswith("- "):
            out.append(f"<li>{_inline(line[2:])}</li>")
        elif line in RAW_HTML:
            out.append(line)
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
    style = ("body{font-family:sans-serif;max-width:980px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}"
             "img{max-width:100%}pre{background:#f6f6f6;padding:8px;overflow:auto}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>cidistill data card</title><style>{style}</style></head><body>\n" \
           + "\n".join(out) + "\n</body></html>\n"


class CardStage(Stage):
    """card.md, a self-contained card.html and the figures, from the curation stages' folders."""
    name = "card"
    inputs = CURATION
    reads = ("data.urls",) + HOLDOUT_FIELDS

    def check_inputs(self) -> None:
        self.require("download")  # the later stages are described when done; a card of nothing is no card

    def run_unit(self, unit: str) -> dict:
        card = build(self.cfg)
        for name, png in card["figures"].items():
            self.out.write_bytes(name, png)
        self.out.write_bytes("card.md", card["md"].encode())
        self.out.write_bytes("card.html", to_html(card["md"], card["figures"]).encode())
        return {"figures": sorted(card["figures"]), "funnel": dict(funnel_numbers(card["facts"]))}

    def summary(self, stats: dict) -> str:
        return f"{self.out.uri}/card.html ({len(stats['figures'])} figures)"
