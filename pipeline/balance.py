"""balance: image semantic balance (CLIP-CID §3.1). Removes, in this order,
  bad_embedding  NaN/inf/zero teacher image embeddings
  exact_dup      same decoded-pixel hash
  near_dup       cosine >= near_dup_cos to an earlier item of its k-means cluster
  semantic_dup   cosine >  1 - eps to an earlier item of its cluster (SemDeDup's rule)
  cluster_cap    beyond the per-cluster cap (optional)
and marks `held_out` the evaluation split (data.holdout), which takes no part in any rule: an evaluation
image is never a duplicate's surviving representative, so holding it out costs training no sample.
"Earlier" is the keep policy's order inside the cluster: hard (farthest from the centroid first, as
SemDeDup), easy (nearest first) or random. Memory is bounded by the largest cluster: oversized clusters are
split, and similarities are computed in row blocks (int8-screened, exact where it decides: semdedup.py).
Decisions are saved once, then written per shard."""
from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cidistill.core.config import BalanceConfig, Config
from cidistill.core.errors import StageError
from cidistill.core.schema import (BALANCE_SCHEMA, DROP_REASONS, HOLDOUT_FIELDS, emb_matrix, has_holdout,
                                   holdout_mask, join_on_key, shard_stats_name)
from cidistill.core.stage import Stage
from .cluster import assign, l2n, spherical_kmeans
from .semdedup import gather, keep_order, screened_earlier_max

def split_oversized(x: np.ndarray, labels: np.ndarray, centroids: np.ndarray, max_size: int, seed: int):
    """Split clusters above max_size with a sub-k-means so that no cluster exceeds it (bounds memory)."""
    labels = labels.copy()
    cents = [c for c in centroids]
    for _ in range(8):
        sizes = np.bincount(labels, minlength=len(cents))
        big = np.flatnonzero(sizes > max_size)
        if not len(big):
            break
        for c in big:
            idx = np.flatnonzero(labels == c)
            parts = math.ceil(len(idx) / max_size) + 1
            sub, _ = spherical_kmeans(x[idx], parts, niter=10, seed=seed)
            sub_ids, _ = assign(x[idx], sub)
            base = len(cents)
            cents.extend(sub[1:])
            cents[c] = sub[0]
            labels[idx] = np.where(sub_ids == 0, c, base + sub_ids - 1)
    return labels, np.stack(cents)


def mark_bad_and_exact(keys: np.ndarray, x: np.ndarray, hashes: np.ndarray, reason: np.ndarray,
                       dup_of: np.ndarray, no_caption: np.ndarray | None = None) -> None:
    """bad_embedding (NaN/inf/zero), no_caption, then exact_dup: the first key (sorted) of each pixel-hash
    group survives."""
    norms = np.linalg.norm(x, axis=1)
    bad = (~np.isfinite(x).all(1) | (norms < 1e-6)) & (reason == None)  # noqa: E711
    reason[bad] = "bad_embedding"
    if no_caption is not None:
        reason[no_caption & (reason == None)] = "no_caption"  # noqa: E711
    first_of: dict[str, int] = {}
    for i in np.argsort(keys, kind="stable"):
        if reason[i] is not None or not hashes[i]:
            continue
        j = first_of.setdefault(hashes[i], i)
        if j != i:
            reason[i], dup_of[i] = "exact_dup", keys[j]


def rule_vectors(x: np.ndarray, text: np.ndarray | None, live: np.ndarray, bc: BalanceConfig) -> np.ndarray:
    """What the near/semantic rules compare: the image embedding, or [image, caption] / sqrt(2) (joint)."""
    xs = l2n(x[live])
    if bc.semantic_on == "joint":
        if text is None:
            raise ValueError("balance.semantic_on=joint needs the caption embeddings")
        # a cosine is then the mean of the two (no caption: at most 1/sqrt(2), never a dup)
        xs = l2n(np.concatenate([xs, l2n(np.nan_to_num(text[live]))], axis=1))
    return xs


def decide_cluster(order: np.ndarray, best: np.ndarray, arg: np.ndarray, live: np.ndarray, keys: np.ndarray,
                   reason: np.ndarray, dup_of: np.ndarray, bc: BalanceConfig) -> int:
    """One cluster's rows in keep order: near_dup / semantic_dup by the earlier max, then the cap. Returns
    how many it keeps."""
    kept_in_cluster = 0
    for pos, row in enumerate(order):
        g = live[row]
        if best[pos] >= bc.near_dup_cos or best[pos] > 1 - bc.apply_eps:
            reason[g] = "near_dup" if best[pos] >= bc.near_dup_cos else "semantic_dup"
            near = live[order[arg[pos]]]
            dup_of[g] = keys[near] if reason[near] is None else dup_of[near]  # its surviving representative
        elif bc.cluster_cap and kept_in_cluster >= bc.cluster_cap:
            reason[g] = "cluster_cap"
        else:
            kept_in_cluster += 1
    return kept_in_cluster


def semantic_rules(xs: np.ndarray, live: np.ndarray, keys: np.ndarray, reason: np.ndarray, dup_of: np.ndarray,
                   cluster: np.ndarray, bc: BalanceConfig, stats: dict) -> tuple[Counter, np.ndarray, np.ndarray]:
    """k-means over the live rows, then the rules cluster by cluster. Returns (ε sweep, sizes before, after)."""
    eps_sorted = sorted(bc.semantic_eps)
    thresholds = [1 - e for e in eps_sorted] + [1 - bc.apply_eps, bc.near_dup_cos]
    k = min(bc.kmeans_k or max(1, int(round(math.sqrt(len(live))))), len(live))
    cents, info = spherical_kmeans(xs, k, seed=bc.seed, gpu=bc.gpu)
    labels, _ = assign(xs, cents, bc.gpu)
    labels, cents = split_oversized(xs, labels, cents, bc.max_cluster_size, bc.seed)
    stats["kmeans"] = dict(info, clusters_after_split=len(cents))
    cluster[live] = labels
    rng = np.random.default_rng(bc.seed)
    sweep: Counter = Counter()
    sizes_before, sizes_after = np.bincount(labels, minlength=len(cents)), np.zeros(len(cents), np.int64)
    members = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[members], np.arange(len(cents) + 1))
    for c in range(len(cents)):
        idx = members[bounds[c]:bounds[c + 1]]
        if not len(idx):
            continue
        order = idx[keep_order(gather(xs, idx).numpy(), cents[c], bc.keep, rng)]
        best, arg = screened_earlier_max(xs, thresholds, rows=order)
        for e in eps_sorted:
            sweep[e] += int((best > 1 - e).sum())
        sizes_after[c] = decide_cluster(order, best, arg, live, keys, reason, dup_of, bc)
    return sweep, sizes_before, sizes_after


def balance_decisions(keys: np.ndarray, x: np.ndarray, hashes: np.ndarray, bc: BalanceConfig,
                      held_out: np.ndarray | None = None, text: np.ndarray | None = None,
                      no_caption: np.ndarray | None = None) -> tuple[pa.Table, dict]:
    """The whole rule on in-memory arrays. Returns a table key/kept/drop_reason/dup_of/balance_cluster
    and the stats. `text`: the caption embeddings, needed with `semantic_on: joint`; `no_caption`: rows
    without an English caption embedding."""
    n = len(keys)
    reason = np.full(n, None, dtype=object)
    if held_out is not None:
        reason[held_out] = "held_out"
    dup_of = np.full(n, None, dtype=object)
    cluster = np.full(n, -1, np.int32)
    mark_bad_and_exact(keys, x, hashes, reason, dup_of, no_caption)
    live = np.flatnonzero(reason == None)  # noqa: E711 (object array)
    xs = rule_vectors(x, text, live, bc)
    stats: dict = {"input": n, "semantic_on": bc.semantic_on}
    sweep, sizes_before, sizes_after = Counter(), np.zeros(0, np.int64), np.zeros(0, np.int64)
    if len(live):
        sweep, sizes_before, sizes_after = semantic_rules(xs, live, keys, reason, dup_of, cluster, bc, stats)
    kept = np.array([r is None for r in reason])
    counts = Counter(r for r in reason if r is not None)
    stats.update(kept=int(kept.sum()), removed=int((~kept).sum()),
                 removed_by_rule={r: int(counts.get(r, 0)) for r in DROP_REASONS if r != "held_out"},
                 held_out=int(counts.get("held_out", 0)),
                 eps_sweep={str(e): sweep[e] for e in sorted(bc.semantic_eps)}, apply_eps=bc.apply_eps,
                 clusters=int(len(sizes_before)),
                 cluster_size_max_before=int(sizes_before.max()) if len(sizes_before) else 0,
                 cluster_size_max_after=int(sizes_after.max()) if len(sizes_after) else 0)
    table = pa.table({"key": pa.array(keys.tolist(), pa.string()), "kept": kept,
                      "drop_reason": pa.array(reason.tolist(), pa.string()),
                      "dup_of": pa.array(dup_of.tolist(), pa.string()), "balance_cluster": cluster},
                     schema=BALANCE_SCHEMA)
    return table, {"stats": stats, "sizes_before": sizes_before.tolist(), "sizes_after": sizes_after.tolist()}


class BalanceStage(Stage):
    name = "balance"
    inputs = ("download", "embed")
    reads = ("balance",) + HOLDOUT_FIELDS

    def __init__(self, cfg: Config, use_ray: bool = True):
        super().__init__(cfg, use_ray)
        self.bc = cfg.balance
        self.emb = self.input_store("embed")

    def units(self) -> list[str]:
        self.require("embed")
        return [n[:-len(".parquet")] for n in self.emb.glob("[0-9]*.parquet")]

    def _decide(self) -> pa.Table:
        """Global decisions, saved before any shard output so a resumed run writes the same shards."""
        if self.out.exists("_decisions.parquet"):
            return self.out.read_table("_decisions.parquet")
        keys, xs, txt, hashes, shard_of, held, nocap = [], [], [], [], [], [], []
        joint = self.bc.semantic_on == "joint"
        dl = self.input_store("download")
        for s in self.units():
            t = self.emb.read_table(f"{s}.parquet", columns=["key", "image_emb", "image_hash", "text_emb"])
            if self.cfg.data.holdout:
                col = self.cfg.data.holdout.partition("=")[0]
                d = dl.read_table(f"{s}.parquet", columns=["key", col])
                t = join_on_key(t, d.filter(pc.is_valid(d.column("key"))))
            if has_holdout(self.cfg):
                held.append(holdout_mask(self.cfg, t).to_numpy(zero_copy_only=False))
            keys += t.column("key").to_pylist()
            xs.append(emb_matrix(t.column("image_emb")))
            if joint:
                txt.append(emb_matrix(t.column("text_emb")))
            nocap.append(t.column("text_emb").is_null().to_numpy(zero_copy_only=False))  # embed writes null for no caption
            hashes += [h or "" for h in t.column("image_hash").to_pylist()]
            shard_of += [s] * t.num_rows
        dup = [k for k, c in Counter(keys).items() if c > 1]
        if dup:
            raise StageError(f"duplicate keys across embed shards (e.g. {dup[:3]}): the embed folder mixes runs")
        x = np.concatenate(xs) if xs else np.zeros((0, 1), np.float32)
        table, extra = balance_decisions(np.array(keys, dtype=object), x, np.array(hashes, dtype=object), self.bc,
                                         np.concatenate(held) if held else None, np.concatenate(txt) if txt else None,
                                         np.concatenate(nocap) if nocap else None)
        table = table.append_column("shard", pa.array(shard_of, pa.string()))
        self.out.write_json("cluster_sizes.json", {k: extra[k] for k in ("sizes_before", "sizes_after")})
        self.out.write_json("_global_stats.json", extra["stats"])
        self.out.write_table("_decisions.parquet", table)
        return table

    def run_units(self, pending: list[str]) -> dict[str, str]:
        table = self._decide()
        for s in pending:
            part = table.filter(pc.equal(table.column("shard"), s)).drop(["shard"]).sort_by("key")
            self.out.write_table(f"{s}.parquet", part)
            reasons = Counter(r for r in part.column("drop_reason").to_pylist() if r)
            self.out.write_json(shard_stats_name(s), {"samples": part.num_rows,
                                                      "kept_samples": int(pc.sum(part.column("kept")).as_py() or 0),
                                                      "dropped": dict(reasons)})
        return {}

    def finish(self, stats: dict) -> dict:
        stats.update(self.out.read_json("_global_stats.json"))
        return stats

    def summary(self, stats: dict) -> str:
        r = stats.get("removed_by_rule", {})
        return (f"kept {stats.get('kept', 0)}/{stats.get('input', 0)}; removed " +
                ", ".join(f"{k} {v}" for k, v in r.items() if v) + f"; {stats.get('clusters', 0)} clusters")

