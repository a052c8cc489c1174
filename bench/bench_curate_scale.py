"""Balance and cluster out of core at N and 4N: wall time and peak RSS of the whole process tree (driver, Ray's
own processes and its workers), each size in a fresh child process that starts its own Ray (num_cpus=2).
Anchor, measured in the same run at N: the in-driver way these stages worked before (every embedding read
into the driver, the rules on in-memory arrays, k-means on the concatenated kept rows).

Planted embed-stage parquet (float16, 512-d, `--shards-per-million` shards per 10^6 rows), every row a slot:
  50%  groups of 4 re-encoded copies: one embedding, four pixel hashes  -> 3 near_dup each
  10%  groups of 4 pixel copies: one embedding, one pixel hash          -> 3 exact_dup each
  20%  groups of 4 perturbed copies (cosine ~0.9975)                     -> near_dup, unless k-means puts a
       copy on the other side of a cluster boundary (SemDeDup's own limit: reported apart)
  20%  singles (random directions)                                       -> kept
Copies are spread over shards by a seeded permutation.

    python bench/bench_curate_scale.py --sizes 1000000 4000000
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
D = 512
KINDS = ("reencoded", "pixel", "perturbed", "single")


def layout(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Each slot's kind (index into KINDS) and group; slot of row i = perm[i]."""
    cuts = [0, n // 8 * 4, n // 8 * 4 + n // 40 * 4, n // 8 * 4 + n // 40 * 4 + n // 20 * 4, n]
    kind = np.zeros(n, np.int8)
    group = np.arange(n, dtype=np.int64)
    for i in range(4):
        kind[cuts[i]:cuts[i + 1]] = i
        if i < 3:
            group[cuts[i]:cuts[i + 1]] = cuts[i] + np.arange(cuts[i + 1] - cuts[i]) // 4 * 4  # group = first slot
    return kind, group


def planted(folder: Path, n: int, shards: int, seed: int = 0) -> None:
    from cidistill.core.schema import embed_schema
    from cidistill.core.store import Store

    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    kind, group = layout(n)
    grouped = np.flatnonzero(kind < 3)[::4]                       # each group's first slot
    base = rng.standard_normal((len(grouped), D), dtype=np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    per = -(-n // shards)
    folder.mkdir(parents=True)
    out = Store(str(folder))
    for s in range(shards):
        rows = np.arange(s * per, min(n, (s + 1) * per))
        slots = perm[rows]
        k, g = kind[slots], group[slots]
        x = rng.standard_normal((len(rows), D), dtype=np.float32)
        in_group = k < 3
        b = base[np.searchsorted(grouped, g[in_group])]
        pert = k[in_group] == 2
        x[in_group] = b + np.where(pert[:, None], 0.05 / np.sqrt(D) * x[in_group], 0)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        hashes = [f"p{gg}" if kk == 1 else f"h{ss}" for kk, gg, ss in zip(k.tolist(), g.tolist(), slots.tolist())]
        col = pa.FixedSizeListArray.from_arrays(pa.array(x.astype(np.float16).reshape(-1), pa.float16()), D)
        t = pa.table({"key": [f"{s:05d}{i:06d}" for i in range(len(rows))], "image_emb": col, "text_emb": col,
                      "text_emb_zh": pa.nulls(len(rows), embed_schema(D).field("text_emb_zh").type),
                      "image_hash": hashes}, schema=embed_schema(D))
        out.write_table(f"{s:05d}.parquet", t)  # the embed stage's writer: its encodings, its compression
    (folder / "_DONE").write_text(json.dumps({"fingerprint": f"planted-{n}"}))


def removal_quality(work: Path, n: int, shards: int, seed: int = 0) -> dict:
    """Precision and recall of removal against the planted groups, per kind of copy."""
    perm = np.random.default_rng(seed).permutation(n)
    kind, group = layout(n)
    per = -(-n // shards)
    removed = np.zeros(n, bool)
    for s in range(shards):
        t = pq.read_table(work / "balance" / f"{s:05d}.parquet", columns=["key", "kept"])
        rows = np.array([int(k[5:]) for k in t.column("key").to_pylist()]) + s * per
        removed[perm[rows]] = ~np.asarray(t.column("kept").to_pylist())
    out = {}
    for i, name in enumerate(KINDS):
        sel = kind == i
        if name == "single":
            out["singles_removed"] = int(removed[sel].sum())
            continue
        kept_per_group = np.bincount(group[sel], weights=~removed[sel], minlength=n)[group[sel][::4]]
        tp = int(np.minimum(removed[sel].reshape(-1, 4).sum(1), 3).sum())
        fp = int((kept_per_group == 0).sum())                                 # a group left with no member
        out[name] = {"recall": round(tp / (sel.sum() // 4 * 3), 6), "groups_emptied": fp}
    fp_all = out["singles_removed"] + sum(out[k]["groups_emptied"] for k in KINDS[:3])
    out["precision"] = round(1 - fp_all / max(1, removed.sum()), 6)
    return out


def child(mode: str, work: Path, cluster_k: int, balance_k: int, max_cluster: int) -> None:
    from cidistill.core.config import load_config

    cfg = load_config(None, [f"workdir={work}", "data.holdout_fraction=0", f"cluster.k={cluster_k}",
                             f"balance.kmeans_k={balance_k}", f"balance.max_cluster_size={max_cluster}"])
    t0 = time.perf_counter()
    if mode == "driver":
        t_bal, t_clu = in_driver(cfg)
    else:
        from cidistill.core.runtime import init_ray
        from pipeline.balance import BalanceStage
        from pipeline.cluster import ClusterStage

        init_ray(num_cpus=2)
        t = time.perf_counter()
        BalanceStage(cfg).run()
        t_bal = time.perf_counter() - t
        t = time.perf_counter()
        ClusterStage(cfg).run()
        t_clu = time.perf_counter() - t
    steps = {s: json.loads((work / s / "stats.json").read_text()).get("step_seconds", {})
             for s in ("balance", "cluster") if mode == "ooc"}
    print(json.dumps({"balance_s": round(t_bal, 1), "cluster_s": round(t_clu, 1),
                      "total_s": round(time.perf_counter() - t0, 1), "steps": steps}))


def in_driver(cfg) -> tuple[float, float]:
    """The stages as they were before they went out of core (two separate stages, each reading its inputs
    from disk and writing its per-shard outputs): balance reads every embedding of every shard into this
    process and decides on the in-memory arrays; cluster reads every kept row back, fits k-means on the
    concatenation and assigns it. Today's kernels and readers, so only the layout differs."""
    from cidistill.core.schema import CLUSTER_SCHEMA, emb_matrix
    from cidistill.core.store import Store
    from pipeline.balance_rules import balance_decisions
    from pipeline.cluster import assign, kept_embeddings, spherical_kmeans

    t = time.perf_counter()
    emb, bal, clu = Store(cfg.stage_dir("embed")), Store(cfg.stage_dir("balance")), Store(cfg.stage_dir("cluster"))
    shards = [n[:-len(".parquet")] for n in emb.glob("[0-9]*.parquet")]
    keys, xs, hashes, nocap, sizes = [], [], [], [], []
    for s in shards:
        tb = emb.read_table(f"{s}.parquet", columns=["key", "image_emb", "image_hash", "text_emb"])
        keys += tb.column("key").to_pylist()
        xs.append(emb_matrix(tb.column("image_emb")))
        hashes += tb.column("image_hash").to_pylist()
        nocap.append(tb.column("text_emb").is_null().to_numpy(zero_copy_only=False))
        sizes.append(tb.num_rows)
    x = np.concatenate(xs)
    del xs
    table, _ = balance_decisions(np.array(keys, dtype=object), x, np.array(hashes, dtype=object), cfg.balance,
                                 no_caption=np.concatenate(nocap))
    del x
    for s, a, n in zip(shards, np.cumsum([0] + sizes), sizes):
        bal.write_table(f"{s}.parquet", table.slice(a, n).sort_by("key"))
    t_bal = time.perf_counter() - t
    t = time.perf_counter()
    parts = [kept_embeddings(cfg, s, False) for s in shards]
    cents, _ = spherical_kmeans(np.concatenate([p[1] for p in parts]), cfg.cluster.k, seed=cfg.cluster.seed)
    for s, (k, xk) in zip(shards, parts):
        ids, sim = assign(xk, cents)
        clu.write_table(f"{s}.parquet", pa.table({"key": k, "cluster_id": ids, "cluster_sim": sim}, schema=CLUSTER_SCHEMA))
    return t_bal, time.perf_counter() - t


def measure(args: list[str]) -> tuple[dict, float]:
    """Run a child; its result and the peak RSS of its process tree (GB), sampled every 0.2 s."""
    p = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    peak, proc = 0, psutil.Process(p.pid)

    def poll():
        nonlocal peak
        while p.poll() is None:
            try:
                tree = [proc] + proc.children(recursive=True)
                peak = max(peak, sum(q.memory_info().rss for q in tree if q.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.2)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    out, _ = p.communicate()
    th.join()
    if p.returncode:
        raise SystemExit(f"child {args} failed ({p.returncode}):\n{out[-3000:]}")
    return json.loads(out.strip().splitlines()[-1]), peak / 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 4_000_000])
    ap.add_argument("--shards-per-million", type=int, default=100)
    ap.add_argument("--cluster-k", type=int, default=1000)
    ap.add_argument("--balance-k", type=int, default=1000)
    ap.add_argument("--max-cluster", type=int, default=2000)
    ap.add_argument("--no-anchor", action="store_true")
    ap.add_argument("--child", choices=["ooc", "driver"])
    ap.add_argument("--work")
    a = ap.parse_args()
    ks = [str(a.cluster_k), str(a.balance_k), str(a.max_cluster)]
    if a.child:
        return child(a.child, Path(a.work), *map(int, ks))
    res = {}
    for n in a.sizes:
        tmp = Path(tempfile.mkdtemp(prefix="curate-"))
        shards = max(1, n * a.shards_per_million // 1_000_000)
        try:
            t = time.perf_counter()
            planted(tmp / "embed", n, shards)
            print(f"N={n}: wrote {shards} planted embed shards in {time.perf_counter() - t:.0f}s", flush=True)
            common = ["--cluster-k", ks[0], "--balance-k", ks[1], "--max-cluster", ks[2]]
            if n == a.sizes[0] and not a.no_anchor:
                (tmp / "anchor").mkdir()
                (tmp / "anchor" / "embed").symlink_to(tmp / "embed")  # its own stage folders, the same inputs
                r, rss = measure(["--child", "driver", *common, "--work", str(tmp / "anchor")])
                print(f"N={n} in-driver (anchor): balance {r['balance_s']}s + cluster {r['cluster_s']}s, "
                      f"peak RSS {rss:.2f} GB; total {r['total_s']}s", flush=True)
                res["anchor"] = dict(r, rss_gb=rss)
            r, rss = measure(["--child", "ooc", *common, "--work", str(tmp)])
            q = removal_quality(tmp, n, shards)
            st = json.loads((tmp / "balance" / "stats.json").read_text())
            res[n] = dict(r, rss_gb=rss, quality=q)
            print(f"N={n} out of core (Ray, 2 CPUs): balance {r['balance_s']}s + cluster {r['cluster_s']}s, "
                  f"peak RSS of the process tree {rss:.2f} GB; kept {st['kept']}/{st['input']} "
                  f"{st['removed_by_rule']}, {st['clusters']} clusters (largest {st['cluster_size_max_before']}); "
                  f"k-means sample {st['kmeans']['sample']}/{st['kmeans']['sample_of']}; total {r['total_s']}s; "
                  f"steps {r['steps']}", flush=True)
            print(f"  removal: precision {q['precision']}, recall re-encoded copies {q['reencoded']['recall']}, "
                  f"pixel copies {q['pixel']['recall']}, perturbed copies {q['perturbed']['recall']}; "
                  f"singles removed {q['singles_removed']}", flush=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    n0, n1 = a.sizes[0], a.sizes[-1]
    if n1 != n0:
        r0, r1 = res[n0], res[n1]
        print(f"ratios {n1}/{n0}: RSS {r1['rss_gb'] / r0['rss_gb']:.2f} (goal <= 1.3), "
              f"time {r1['total_s'] / r0['total_s']:.2f} (goal <= 4.5)")
    if "anchor" in res:
        an, r0 = res["anchor"], res[n0]
        print(f"at N={n0}: out of core {r0['total_s']}s vs in-driver {an['total_s']}s = "
              f"{r0['total_s'] / an['total_s']:.2f}x (goal <= 1.0); RSS {r0['rss_gb']:.2f} vs {an['rss_gb']:.2f} GB")


if __name__ == "__main__":
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    main()
