"""The image semantic balance rules (CLIP-CID §3.1) on arrays, in the order they apply:
  bad_embedding  NaN/inf/zero teacher image embeddings
  no_caption     no English caption embedding
  exact_dup      same decoded-pixel hash: the first key (sorted) of each hash group survives
  near_dup       cosine >= near_dup_cos to an earlier item of its k-means cluster
  semantic_dup   cosine >  1 - eps to an earlier item of its cluster (SemDeDup's rule)
  cluster_cap    beyond the per-cluster cap (optional)
"Earlier" is the keep policy's order inside the cluster: hard (farthest from the centroid first, as
SemDeDup), easy (nearest first) or random. A cluster above `max_cluster_size` is split with a seeded
sub-k-means first (bounds memory and the pairwise work). `decide_cluster` is the unit the balance stage
runs per cluster on the Ray cluster; `balance_decisions` is the whole rule on in-memory arrays, the
reference the out-of-core stage is tested against."""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from cidistill.core.config import BalanceConfig
from cidistill.core.schema import BALANCE_SCHEMA, DROP_REASONS
from .cluster import assign, l2n, spherical_kmeans
from .semdedup import keep_order, screened_earlier_max

KMEANS_POINTS_PER_CENTROID = 256   # the balance k-means trains on at most k x this many points (faiss's bound)


def balance_k(bc: BalanceConfig, live: int) -> int:
    return min(bc.kmeans_k or max(1, int(round(math.sqrt(live)))), live)


def rule_matrix(image: np.ndarray, text: np.ndarray | None, bc: BalanceConfig) -> np.ndarray:
    """What the near/semantic rules compare: the unit image embedding, or [image, caption] / sqrt(2) (joint),
    row by row (a row's vector does not depend on which other rows are in the batch)."""
    xs = l2n(image)
    if bc.semantic_on == "joint":
        if text is None:
            raise ValueError("balance.semantic_on=joint needs the caption embeddings")
        # a cosine is then the mean of the two (no caption: at most 1/sqrt(2), never a dup)
        xs = l2n(np.concatenate([xs, l2n(np.nan_to_num(text))], axis=1))
    return xs


def bad_embedding(x: np.ndarray) -> np.ndarray:
    return ~np.isfinite(x).all(1) | (np.linalg.norm(x, axis=1) < 1e-6)


def exact_dup_of(hashes: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """For rows of live samples: the surviving key of each pixel-hash group (None for survivors and rows
    without a hash). The first key in sorted order survives."""
    dup_of = np.full(len(keys), None, dtype=object)
    first_of: dict[str, str] = {}
    for i in np.argsort(keys, kind="stable"):
        if not hashes[i]:
            continue
        k = first_of.setdefault(hashes[i], keys[i])
        if k != keys[i]:
            dup_of[i] = k
    return dup_of


def split_cluster(xs: np.ndarray, centroid: np.ndarray, max_size: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """A cluster's rows (ascending) as [(rows, centroid)], split with sub-k-means until none exceeds max_size;
    the first entry keeps the cluster's own id."""
    parts = [(np.arange(len(xs)), centroid)]
    for _ in range(8):
        big = [i for i, (rows, _) in enumerate(parts) if len(rows) > max_size]
        if not big:
            break
        for i in big:
            rows = parts[i][0]
            sub, _ = spherical_kmeans(xs[rows], math.ceil(len(rows) / max_size) + 1, niter=10, seed=seed)
            sub_ids, _ = assign(xs[rows], sub)
            parts[i] = (rows[sub_ids == 0], sub[0])
            parts.extend((rows[sub_ids == j], sub[j]) for j in range(1, len(sub)))
    return parts


@dataclass
class ClusterDecision:
    """One k-means cluster decided: per row a reason (None = kept), dup_of and sub-cluster (0 = itself)."""
    reason: np.ndarray
    dup_of: np.ndarray
    sub: np.ndarray
    sizes_before: list[int] = field(default_factory=list)   # per sub-cluster
    sizes_after: list[int] = field(default_factory=list)
    sweep: Counter = field(default_factory=Counter)         # eps -> rows above 1 - eps


def decide_cluster(xs: np.ndarray, centroid: np.ndarray, keys: np.ndarray, c: int, bc: BalanceConfig) -> ClusterDecision:
    """The near/semantic/cap rules for one cluster's rows, given in the dataset's order (xs: rule vectors)."""
    n = len(xs)
    out = ClusterDecision(np.full(n, None, dtype=object), np.full(n, None, dtype=object), np.zeros(n, np.int32))
    eps_sorted = sorted(bc.semantic_eps)
    thresholds = [1 - e for e in eps_sorted] + [1 - bc.apply_eps, bc.near_dup_cos]
    for j, (rows, cent) in enumerate(split_cluster(xs, centroid, bc.max_cluster_size, bc.seed)):
        out.sub[rows] = j
        out.sizes_before.append(len(rows))
        if not len(rows):
            out.sizes_after.append(0)
            continue
        rng = np.random.default_rng([bc.seed, c, j])  # per cluster: the same wherever the cluster is decided
        order = rows[keep_order(xs[rows], cent, bc.keep, rng)]
        best, arg = screened_earlier_max(xs, thresholds, rows=order)
        for e in eps_sorted:
            out.sweep[e] += int((best > 1 - e).sum())
        kept = 0
        for pos, row in enumerate(order):
            if best[pos] >= bc.near_dup_cos or best[pos] > 1 - bc.apply_eps:
                out.reason[row] = "near_dup" if best[pos] >= bc.near_dup_cos else "semantic_dup"
                near = order[arg[pos]]
                out.dup_of[row] = keys[near] if out.reason[near] is None else out.dup_of[near]  # its survivor
            elif bc.cluster_cap and kept >= bc.cluster_cap:
                out.reason[row] = "cluster_cap"
            else:
                kept += 1
        out.sizes_after.append(kept)
    return out


def sub_cluster_ids(c: int, sub: np.ndarray, k: int, offset: int) -> np.ndarray:
    """Final ids: a cluster keeps its id for its first part; its other parts are numbered after the k
    top-level clusters, at `offset` (the count of extra parts of the clusters before it)."""
    return np.where(sub == 0, c, k + offset + sub - 1).astype(np.int32)


def balance_decisions(keys: np.ndarray, x: np.ndarray, hashes: np.ndarray, bc: BalanceConfig,
                      held_out: np.ndarray | None = None, text: np.ndarray | None = None,
                      no_caption: np.ndarray | None = None) -> tuple[pa.Table, dict]:
    """The whole rule on in-memory arrays (the reference): a table key/kept/drop_reason/dup_of/balance_cluster
    and the stats. `text`: caption embeddings (needed with `semantic_on: joint`); `no_caption`: rows without
    an English caption embedding."""
    n = len(keys)
    reason = np.full(n, None, dtype=object)
    if held_out is not None:
        reason[held_out] = "held_out"
    reason[bad_embedding(x) & (reason == None)] = "bad_embedding"  # noqa: E711 (object array)
    if no_caption is not None:
        reason[no_caption & (reason == None)] = "no_caption"  # noqa: E711
    dup_of = np.full(n, None, dtype=object)
    live = np.flatnonzero(reason == None)  # noqa: E711
    ex = exact_dup_of(hashes[live], keys[live])
    reason[live[ex != None]], dup_of[live] = "exact_dup", ex  # noqa: E711
    live = np.flatnonzero(reason == None)  # noqa: E711
    cluster = np.full(n, -1, np.int32)
    stats: dict = {"input": n, "semantic_on": bc.semantic_on}
    sweep, before, after = Counter(), [], []
    if len(live):
        xs = rule_matrix(x[live], text[live] if text is not None else None, bc)
        k = balance_k(bc, len(live))
        cents, info = spherical_kmeans(xs, k, seed=bc.seed, gpu=bc.gpu)
        labels, _ = assign(xs, cents, bc.gpu)
        extra_before, extra_after, offset = [], [], 0
        for c in range(k):
            idx = np.flatnonzero(labels == c)
            d = decide_cluster(xs[idx], cents[c], keys[live[idx]], c, bc) if len(idx) else \
                ClusterDecision(np.zeros(0, object), np.zeros(0, object), np.zeros(0, np.int32), [0], [0])
            g = live[idx]
            reason[g], dup_of[g] = d.reason, d.dup_of
            cluster[g] = sub_cluster_ids(c, d.sub, k, offset)
            offset += len(d.sizes_before) - 1
            before.append(d.sizes_before[0])
            after.append(d.sizes_after[0])
            extra_before += d.sizes_before[1:]
            extra_after += d.sizes_after[1:]
            sweep.update(d.sweep)
        before, after = before + extra_before, after + extra_after
        stats["kmeans"] = dict(info, clusters_after_split=len(before))
    summarise(stats, Counter(r for r in reason if r is not None), sweep, before, after, bc)
    kept = np.array([r is None for r in reason], bool)
    table = pa.table({"key": pa.array(keys.tolist(), pa.string()), "kept": kept,
                      "drop_reason": pa.array(reason.tolist(), pa.string()),
                      "dup_of": pa.array(dup_of.tolist(), pa.string()), "balance_cluster": cluster},
                     schema=BALANCE_SCHEMA)
    return table, {"stats": stats, "sizes_before": before, "sizes_after": after}


def summarise(stats: dict, counts: Counter, sweep: Counter, before: list[int], after: list[int],
              bc: BalanceConfig) -> dict:
    """The stage-level stats from the drop-reason counts, the ε sweep and the cluster sizes."""
    stats.update(kept=stats["input"] - sum(counts.values()), removed=sum(counts.values()),
                 removed_by_rule={r: int(counts.get(r, 0)) for r in DROP_REASONS if r != "held_out"},
                 held_out=int(counts.get("held_out", 0)),
                 eps_sweep={str(e): int(sweep[e]) for e in sorted(bc.semantic_eps)}, apply_eps=bc.apply_eps,
                 clusters=len(before), cluster_size_max_before=max(before, default=0),
                 cluster_size_max_after=max(after, default=0))
    return stats
