"""balance: image semantic balance (the rules: balance_rules.py), out of core and spread over the Ray cluster.
Every step is a set of tasks whose outputs land in `_work/` on the store, each resumable by its marker:

1. scan    (per embed shard)  held_out / bad_embedding / no_caption per row; the live rows' float16 vectors
                              kept as raw rows (one read of the embed shard in the whole stage), their
                              seeded hash sample for the k-means (k x 256 rows, faiss's own bound) and a
                              held-aside one; the rows with a pixel hash scattered into a part sorted by
                              a hash of the pixel hash;
2. exact   (per hash range)   exact_dup: each range of pixel hashes read from every part, decided alone;
   fit     (the driver)       k-means on the sample minus its exact duplicates (bounded by k);
3. assign  (per embed shard)  each live row's cluster; rows scattered into a part sorted by cluster;
4. rules   (per cluster group, about `balance.rows_per_task` rows) the clusters' rows read from every part
                              in dataset order, oversized clusters split, near/ε/cap rules (exact kernels);
5. write   (per embed shard, the stage's units) the decisions gathered back into `0000N.parquet` with
                              the lineage (drop_reason, dup_of, balance_cluster), then its stats file.
The driver holds counts and the k-means sample, never rows of the dataset. Held-out rows take no part in any
rule: an evaluation image is never a duplicate's surviving representative."""
from __future__ import annotations

import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cidistill.core import faults
from cidistill.core.config import Config
from cidistill.core.errors import StageError
from cidistill.core.schema import (BALANCE_SCHEMA, HOLDOUT_FIELDS, as_float32, emb_matrix, has_holdout, holdout_mask,
                                   join_on_key, require_holdout_column, shard_stats_name)
from cidistill.core.stage import Stage, run_tasks, sum_counters, task_slots
from cidistill.core.store import Store, join, null_free
from .balance_rules import (KMEANS_POINTS_PER_CENTROID, balance_k, bad_embedding, decide_cluster, rule_matrix,
                            summarise)
from .cluster import assign, objective, spherical_kmeans
from .parts import (H_SPAN, cut_ranges, f16_blob, f16_rows, full_waves, hash_sample, in_range, key_hash, load_npy,
                    load_sample, raise_failed, read_parts, sample_cuts, save_npy, write_part)

WORK = "_work"
ASIDE = 10_000          # held-aside rows on which the k-means objective is reported


class BalanceStage(Stage):
    name = "balance"
    inputs = ("download", "embed")
    shard_input = ("embed", "parquet")
    reads = ("balance",) + HOLDOUT_FIELDS

    def __init__(self, cfg: Config, use_ray: bool = True):
        super().__init__(cfg, use_ray)
        self.bc = cfg.balance
        self.emb = self.input_store("embed")
        self.work = Store(join(self.out.uri, WORK), create=False)
        self.joint = self.bc.semantic_on == "joint"
        self.timings: dict[str, float] = {}      # seconds per step in this run (stats: step_seconds)

    def units(self) -> list[str]:
        return self.input_shards()

    def check_inputs(self) -> None:
        """A `data.holdout` value that no downloaded pair has fails here, before a changed config clears the last
        balance (hours of work at web scale): the held-out column is read shard by shard until a pair matches."""
        shards = self.input_shards()
        d = self.cfg.data
        if not d.holdout:
            return
        col, pairs = d.holdout.partition("=")[0], 0
        download = self.input_store("download")
        for s in shards:
            with download.parquet(f"{s}.parquet") as pf:
                names = pf.schema_arrow.names
                require_holdout_column(col, names)
                t = pf.read(columns=[c for c in ("key", "status", col) if c in names])
            if "status" in t.column_names:
                t = t.filter(pc.equal(t.column("status"), "success"))
            if pc.any(holdout_mask(self.cfg, t)).as_py():
                return
            pairs += t.num_rows
        raise StageError(f"data.holdout={d.holdout!r} matched none of the {pairs} downloaded pairs: no evaluation "
                         "split (data.holdout_fraction=0 evaluates on training pairs)")

    # -- the steps' driver: run the missing tasks of a step, return every task's stats
    def step(self, name: str, items: list[str], fn) -> dict[str, dict]:
        def task(item: str) -> dict:
            st = fn(item)
            self.work.write_json(f"{name}/{item}_stats.json", st)  # the task's marker, last
            return st

        todo = [i for i in items if not self.work.exists(f"{name}/{i}_stats.json")]
        faults.set_phase(name)
        t0 = time.time()
        raise_failed(f"balance: {name}", run_tasks(task, todo, use_ray=self.on_ray, desc=f"balance: {name}"))
        self.timings[name] = round(time.time() - t0, 1)
        return {i: self.work.read_json(f"{name}/{i}_stats.json") for i in items}

    def fixed(self, name: str, make):
        """A value decided once per run (a resumed run reuses it)."""
        if not self.work.exists(name):
            self.work.write_json(name, make())
        return self.work.read_json(name)

    def run_units(self, pending: list[str]) -> dict[str, str]:
        try:
            self.run_steps(pending)
        finally:
            faults.set_phase("")
        return {}

    def run_steps(self, pending: list[str]) -> None:
        shards = self.shards = self.units()   # listed once; the tasks name every shard's part from it
        # data that fits one task runs its tasks here: the same bound per task, without Ray's per-task cost
        # (the small demo's balance took 7.6 s as Ray tasks for 300 rows)
        total = sum(self.emb.num_rows(f"{sh}.parquet") for sh in shards)
        if not total:
            raise StageError(f"balance: the embed stage's {len(shards)} shard(s) hold no pair (see "
                             f"{self.emb.url('stats.json')} and the download's)")
        self.on_ray = self.use_ray and total > self.bc.rows_per_task
        self.slots = task_slots(self.on_ray)
        cut, aside_hi = self.fixed("sample_cuts.json", lambda: self.sample_cuts(total))
        scans = self.step("scan", shards, lambda s: self.scan(s, cut, aside_hi))
        check_key_ranges(scans)
        counts = sum_counters(scans.values())
        ranges = self.fixed("exact_ranges.json", lambda: cut_ranges(counts["hashed"], self.bc.rows_per_task,
                                                                    slots=self.slots))
        exact = self.step("exact", [str(j) for j in range(len(ranges))], lambda j: self.exact(ranges[int(j)], j, aside_hi))
        live = counts["live"] - sum(e["exact_dup"] for e in exact.values())
        self.exact_names = [f"exact/{j}.parquet" for j in range(len(ranges))]
        groups, rules = [], {}
        if live:
            cents = self.centroids(shards, live, {k for e in exact.values() for k in e["sampled_dups"]})
            assigned = self.step("assign", shards, self.assign)
            sizes = np.sum([assigned[s]["sizes"] for s in shards], axis=0)
            groups = self.fixed("groups.json", lambda: cluster_groups(sizes, self.bc.rows_per_task, self.slots))
            rules = self.step("rules", [str(g) for g in range(len(groups))], lambda g: self.rules(groups[int(g)], g, cents))
        extra = {int(c): n for r in rules.values() for c, n in r["parts"].items()}
        k = len(cents) if live else 0
        offsets = np.concatenate([[0], np.cumsum([extra.get(c, 1) - 1 for c in range(k)])]).astype(np.int64)
        self.rule_names = [f"rules/{g}.parquet" for g in range(len(groups))]
        faults.set_phase("write")
        t0 = time.time()
        raise_failed("balance: write", run_tasks(lambda s: self.write_shard(s, k, offsets), pending,
                                                 use_ray=self.on_ray, desc="balance: write"))
        self.timings["write"] = round(time.time() - t0, 1)

    # -- 1. scan
    def sample_cuts(self, total: int) -> list[int]:
        """The k-means sample's hash cuts, fixed before the scan from the row count in the shards' footers:
        k x 256 rows of the k the whole data would give (faiss's own bound), and ASIDE more held aside."""
        return list(sample_cuts(total, balance_k(self.bc, max(1, total)) * KMEANS_POINTS_PER_CENTROID, ASIDE))

    def rule_vectors(self, vec16: np.ndarray) -> np.ndarray:
        """The rule vectors from the stored float16 rows ([image | caption] when joint)."""
        d = vec16.shape[1] // 2 if self.joint else vec16.shape[1]
        x = as_float32(vec16)
        return rule_matrix(x[:, :d], x[:, d:] if self.joint else None, self.bc)

    def scan(self, s: str, cut: int, aside_hi: int) -> dict:
        with self.emb.parquet(f"{s}.parquet") as pf:
            # the caption vectors are read only when used, or when the footer cannot rule out a missing one
            text = self.joint or not null_free(pf.metadata, "text_emb")
            t = pf.read(columns=["key", "image_emb", "image_hash"] + (["text_emb"] if text else []))
        keys = t.column("key").to_pylist()
        if len(set(keys)) != len(keys):
            dup = [k for k, c in Counter(keys).items() if c > 1]
            raise StageError(f"duplicate keys in embed shard {s} (e.g. {dup[:3]}): the embed folder mixes runs")
        if self.cfg.data.holdout:
            col = self.cfg.data.holdout.partition("=")[0]
            d = self.input_store("download").read_table(f"{s}.parquet", columns=["key", col])
            t = join_on_key(t, d.filter(pc.is_valid(d.column("key"))))
            keys = t.column("key").to_pylist()
        reason = np.full(len(keys), None, dtype=object)
        if has_holdout(self.cfg):
            reason[holdout_mask(self.cfg, t).to_numpy(zero_copy_only=False)] = "held_out"
        image16 = emb_matrix(t.column("image_emb"), np.float16)                # the stored values, as stored
        reason[bad_embedding(as_float32(image16)) & (reason == None)] = "bad_embedding"  # noqa: E711
        if text:
            reason[t.column("text_emb").is_null().to_numpy(zero_copy_only=False) & (reason == None)] = "no_caption"  # noqa: E711
        live = reason == None  # noqa: E711
        vec16 = image16[live]
        if self.joint:
            vec16 = np.concatenate([vec16, emb_matrix(t.column("text_emb"), np.float16)[live]], axis=1)
        save_npy(self.work, f"vec/{s}.npy", vec16)
        hash_sample(self.work, f"sample/{s}", [k for k, ok in zip(keys, live) if ok], vec16, self.rule_vectors,
                    self.bc.seed, cut, aside_hi)
        self.work.write_table(f"scan/{s}.parquet", pa.table({"key": pa.array(keys, pa.string()),
                                                             "reason": pa.array(reason.tolist(), pa.string())}))
        hashes = [h or "" for h in t.column("image_hash").to_pylist()]
        rows = [i for i in range(len(keys)) if reason[i] is None and hashes[i]]
        # typed columns: a shard with no row to hash writes an empty part that the others' still concatenate with
        part = pa.table({"hb": pa.array([key_hash(0, hashes[i]) for i in rows], pa.uint64()),
                         "image_hash": pa.array([hashes[i] for i in rows], pa.string()),
                         "key": pa.array([keys[i] for i in rows], pa.string()), "shard": pa.array([s] * len(rows), pa.string())})
        write_part(self.work, f"hash/{s}.parquet", part, [("hb", "ascending")], row_group_size=4096)
        return {"rows": len(keys), "live": int((reason == None).sum()), "hashed": len(rows),  # noqa: E711
                "key_range": [min(keys), max(keys)] if keys else []}

    # -- 2. exact duplicates, one range of pixel hashes
    def exact(self, rng: list[int], j: str, aside_hi: int) -> dict:
        lo, hi = rng
        names = [f"hash/{s}.parquet" for s in self.shards]
        t = read_parts(self.work, names, in_range("hb", lo, hi if hi < H_SPAN else None, pa.uint64()),
                       columns=["image_hash", "key", "shard"])
        t = t.sort_by([("image_hash", "ascending"), ("key", "ascending")])
        h = np.array(t.column("image_hash").to_pylist(), dtype=object)
        keys = np.array(t.column("key").to_pylist(), dtype=object)
        first = np.r_[True, h[1:] != h[:-1]] if len(h) else np.zeros(0, bool)
        survivor = keys[np.flatnonzero(first)][np.cumsum(first) - 1]
        dup = ~first
        out = pa.table({"shard": t.column("shard").filter(pa.array(dup)), "key": pa.array(keys[dup].tolist(), pa.string()),
                        "dup_of": pa.array(survivor[dup].tolist(), pa.string())})
        write_part(self.work, f"exact/{j}.parquet", out, [("shard", "ascending"), ("key", "ascending")], 4096)
        sampled = [k for k in keys[dup].tolist() if key_hash(self.bc.seed, k) < aside_hi]  # to leave out of the k-means
        return {"exact_dup": int(dup.sum()), "sampled_dups": sampled}

    def live_vectors(self, s: str) -> tuple[list[str], np.ndarray, np.ndarray]:
        """A shard's rows that reach the k-means (no reason so far): keys, row numbers in the scan's order,
        float16 vectors."""
        scan = self.work.read_table(f"scan/{s}.parquet")
        keys = np.array(scan.column("key").to_pylist(), dtype=object)
        rows = np.flatnonzero(np.array([r is None for r in scan.column("reason").to_pylist()], bool))
        gone = set(read_parts(self.work, self.exact_names, pc.field("shard") == s, columns=["key"]).column("key").to_pylist())
        keep = np.array([k not in gone for k in keys[rows]], bool)
        return keys[rows][keep].tolist(), rows[keep].astype(np.int32), load_npy(self.work, f"vec/{s}.npy")[keep]

    # -- the k-means, fitted on the seeded sample
    def centroids(self, shards: list[str], live: int, exact_dups: set[str]) -> np.ndarray:
        if self.work.exists("centroids.npy"):
            return load_npy(self.work, "centroids.npy")
        t0 = time.time()
        x, aside = load_sample(self.work, [f"sample/{s}" for s in shards], exact_dups)
        cents, info = spherical_kmeans(x, min(balance_k(self.bc, live), len(x)), seed=self.bc.seed, gpu=self.bc.gpu)
        info.update(sample=len(x), sample_of=live)
        if len(aside):
            info.update(objective(aside, cents, self.bc.gpu, "aside"), aside=len(aside))
        self.work.write_json("kmeans.json", info)
        save_npy(self.work, "centroids.npy", cents)  # after its info: the npy marks the fit done
        self.timings["fit"] = round(time.time() - t0, 1)
        return cents

    # -- 3. assign and scatter by cluster
    def assign(self, s: str) -> dict:
        cents = load_npy(self.work, "centroids.npy")
        keys, rows, vec16 = self.live_vectors(s)
        ids = assign(self.rule_vectors(vec16), cents, self.bc.gpu)[0] if keys else np.zeros(0, np.int32)
        part = pa.table({"cluster": ids, "shard": pa.array([s] * len(keys), pa.string()), "row": rows,
                         "key": pa.array(keys, pa.string()),
                         "vec": f16_blob(vec16)})
        write_part(self.work, f"assign/{s}.parquet", part, [("cluster", "ascending"), ("row", "ascending")], 1024,
                   compression="none")
        return {"sizes": np.bincount(ids, minlength=len(cents)).tolist()}

    # -- 4. the rules, one group of clusters
    def rules(self, group: list[int], g: str, cents: np.ndarray) -> dict:
        c0, c1 = group
        names = [f"assign/{s}.parquet" for s in self.shards]
        t = read_parts(self.work, names, in_range("cluster", c0, c1, pa.int32()))
        t = t.sort_by([("cluster", "ascending"), ("shard", "ascending"), ("row", "ascending")])  # dataset order
        xs = self.rule_vectors(f16_rows(t.column("vec"), t.schema.field("vec").type.byte_width // 2))
        labels = t.column("cluster").to_numpy()
        keys = np.array(t.column("key").to_pylist(), dtype=object)
        reason, dup_of = np.full(len(keys), None, object), np.full(len(keys), None, object)
        sub = np.zeros(len(keys), np.int32)
        stats = {"parts": {}, "sizes_before": {}, "sizes_after": {}, "sweep": Counter()}
        bounds = np.searchsorted(labels, np.arange(c0, c1 + 1))
        for c in range(c0, c1):
            a, b = bounds[c - c0], bounds[c - c0 + 1]
            if a == b:
                continue
            d = decide_cluster(xs[a:b], cents[c], keys[a:b], c, self.bc)
            reason[a:b], dup_of[a:b], sub[a:b] = d.reason, d.dup_of, d.sub
            stats["sweep"].update({str(e): v for e, v in d.sweep.items()})
            stats["sizes_before"][str(c)], stats["sizes_after"][str(c)] = d.sizes_before, d.sizes_after
            if len(d.sizes_before) > 1:
                stats["parts"][str(c)] = len(d.sizes_before)
        out = pa.table({"shard": t.column("shard"), "key": t.column("key"),
                        "reason": pa.array(reason.tolist(), pa.string()), "dup_of": pa.array(dup_of.tolist(), pa.string()),
                        "cluster": labels, "sub": sub})
        write_part(self.work, f"rules/{g}.parquet", out, [("shard", "ascending")], 4096)
        return stats

    # -- 5. the decisions gathered back per shard
    def write_shard(self, s: str, k: int, offsets: np.ndarray) -> None:
        scan = self.work.read_table(f"scan/{s}.parquet")
        keys = scan.column("key").to_pylist()
        reason = dict(zip(keys, scan.column("reason").to_pylist()))
        dup_of: dict = {}
        cluster = dict.fromkeys(keys, -1)
        ex = read_parts(self.work, self.exact_names, pc.field("shard") == s)
        for key, d in zip(ex.column("key").to_pylist(), ex.column("dup_of").to_pylist()):
            reason[key], dup_of[key] = "exact_dup", d
        r = read_parts(self.work, self.rule_names, pc.field("shard") == s)
        cl, sb = r.column("cluster").to_numpy(), r.column("sub").to_numpy()
        ids = np.where(sb == 0, cl, k + offsets[cl] + sb - 1) if len(cl) else cl
        for key, why, d, c in zip(r.column("key").to_pylist(), r.column("reason").to_pylist(),
                                  r.column("dup_of").to_pylist(), ids.tolist()):
            reason[key], dup_of[key], cluster[key] = why, d, c
        keys.sort()
        part = pa.table({"key": keys, "kept": [reason[x] is None for x in keys],
                         "drop_reason": [reason[x] for x in keys], "dup_of": [dup_of.get(x) for x in keys],
                         "balance_cluster": [cluster[x] for x in keys]}, schema=BALANCE_SCHEMA)
        self.out.write_table(f"{s}.parquet", part)
        self.out.write_json(shard_stats_name(s), {"samples": len(keys), "kept_samples": sum(v is None for v in reason.values()),
                                                  "dropped": dict(Counter(v for v in reason.values() if v))})

    # -- stage-level facts, then the work folder goes
    def finish(self, stats: dict) -> dict:
        if not self.out.exists("_global_stats.json"):
            self.out.write_json("_global_stats.json", self.global_stats(stats))
        self.out.rm(WORK)
        stats.update(self.out.read_json("_global_stats.json"), step_seconds=self.timings)
        return stats

    def global_stats(self, rolled: dict) -> dict:
        groups = self.work.read_json("groups.json") if self.work.exists("groups.json") else []
        rules = [self.work.read_json(f"rules/{g}_stats.json") for g in range(len(groups))]
        k = groups[-1][1] if groups else 0
        before, after, extra_b, extra_a, sweep = [0] * k, [0] * k, [], [], Counter()
        for r in rules:
            sweep.update({float(e): v for e, v in r["sweep"].items()})
            for c, sizes in r["sizes_before"].items():
                before[int(c)], after[int(c)] = sizes[0], r["sizes_after"][c][0]
        for c in range(k):  # the extra parts of split clusters, numbered in cluster order
            for r in rules:
                if str(c) in r["parts"]:
                    extra_b += r["sizes_before"][str(c)][1:]
                    extra_a += r["sizes_after"][str(c)][1:]
        stats = {"input": rolled.get("samples", 0), "semantic_on": self.bc.semantic_on}
        if self.work.exists("kmeans.json"):
            stats["kmeans"] = dict(self.work.read_json("kmeans.json"), clusters_after_split=k + len(extra_b))
        summarise(stats, Counter(rolled.get("dropped", {})), sweep, before + extra_b, after + extra_a, self.bc)
        self.out.write_json("cluster_sizes.json", {"sizes_before": before + extra_b, "sizes_after": after + extra_a})
        return stats

    def summary(self, stats: dict) -> str:
        removed = ", ".join(f"{k} {v}" for k, v in stats.get("removed_by_rule", {}).items() if v) or "none"
        held = f", {stats['held_out']} held out for evaluation" if stats.get("held_out") else ""
        return f"kept {stats.get('kept', 0)}/{stats.get('input', 0)}{held}; removed {removed}; {stats.get('clusters', 0)} clusters"


def cluster_groups(sizes: np.ndarray, rows: int, slots: int = 1) -> list[list[int]]:
    """Contiguous cluster ranges [c0, c1) of about `rows` rows each (at most `rows` plus one cluster), as many
    as a multiple of `slots` when the clusters allow: a group takes the clusters that start within its
    equal share of the rows."""
    sizes = np.asarray(sizes, np.int64)
    total = int(sizes.sum())
    n = full_waves(-(-total // max(1, rows)), slots)
    starts = np.cumsum(sizes) - sizes
    bounds = np.searchsorted(starts, [total * j / n for j in range(1, n)], side="left").tolist()
    edges = sorted({0, len(sizes), *bounds})
    return [[a, b] for a, b in zip(edges, edges[1:])]


def check_key_ranges(scans: dict[str, dict]) -> None:
    """Shards of one download hold disjoint key ranges (a key begins with its shard's name): overlapping
    ranges mean the embed folder mixes runs, and keys would repeat."""
    spans = sorted((v["key_range"][0], v["key_range"][1], s) for s, v in scans.items() if v["key_range"])
    for (a0, a1, sa), (b0, b1, sb) in zip(spans, spans[1:]):
        if b0 <= a1:
            raise StageError(f"duplicate keys across embed shards {sa} and {sb} (keys {b0}..{min(a1, b1)} in "
                             "both ranges): the embed folder mixes runs")
