"""The balance and cluster stages end to end on N x 512 planted teacher embeddings written as embed-stage
parquet (float16, per shard): wall time and peak RSS, what "the stage handles 10^6 x 512 on a 24 GiB, 2-core
box" means. The anchor, measured in the same run: reading those inputs alone (what any stage must do).

    python bench/bench_balance_stage.py --n 1000000 --shards 100
"""
import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import balance, cluster
from cidistill.core.config import load_config
from cidistill.core.schema import embed_schema
from cidistill.core.store import Store
from cidistill.core.schema import emb_matrix
from bench_balance import planted  # the same planted data (run from the repository root: bench/ is on sys.path)


def write_embed(folder: Path, n: int, d: int, shards: int, rng: np.random.Generator) -> None:
    x = planted(n, d, rng)[rng.permutation(n)]
    store = Store(str(folder))
    per = -(-n // shards)

    def col(a):
        return pa.FixedSizeListArray.from_arrays(pa.array(a.astype(np.float16).reshape(-1), pa.float16()), d)

    for s in range(shards):
        rows = slice(s * per, min(n, (s + 1) * per))
        m = rows.stop - rows.start
        keys = [f"{s:05d}{i:06d}" for i in range(m)]
        t = pa.table({"key": keys, "image_emb": col(x[rows]), "text_emb": col(x[rows]),
                      "text_emb_zh": pa.nulls(m, embed_schema(d).field("text_emb_zh").type),
                      "image_hash": [f"h{s}-{i}" for i in range(m)]}, schema=embed_schema(d))
        store.write_table(f"{s:05d}.parquet", t)
    store.write_json("_DONE", {"bench": True})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--shards", type=int, default=20)
    ap.add_argument("--cluster-k", type=int, default=1000)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    try:
        t = time.perf_counter()
        write_embed(tmp / "embed", a.n, a.d, a.shards, np.random.default_rng(0))
        print(f"wrote {a.n} x {a.d} planted embeddings in {a.shards} shards: {time.perf_counter() - t:.1f}s")
        t = time.perf_counter()
        rows = sum(len(emb_matrix(pq.read_table(p, columns=["image_emb"]).column("image_emb")))
                   for p in sorted((tmp / "embed").glob("*.parquet")))
        t_read = time.perf_counter() - t
        cfg = load_config(None, [f"workdir={tmp}", f"cluster.k={a.cluster_k}"])  # no holdout: every sample is balanced
        t = time.perf_counter()
        st = balance.BalanceStage(cfg, use_ray=False).run()
        t_bal = time.perf_counter() - t
        t = time.perf_counter()
        cl = cluster.ClusterStage(cfg, use_ray=False).run()
        t_clu = time.perf_counter() - t
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        print(f"read the inputs alone: {rows} rows in {t_read:.1f}s (anchor)")
        print(f"balance stage: {t_bal:.1f}s = {t_bal / t_read:.1f}x the read; kept {st['kept']}/{st['input']} "
              f"({st['removed_by_rule']}), {st['clusters']} clusters, largest {st['cluster_size_max_before']}")
        print(f"cluster stage (k={a.cluster_k} on the kept): {t_clu:.1f}s = {t_clu / t_read:.1f}x the read; "
              f"{cl.get('empty_clusters', '?')} empty")
        print(f"peak RSS {rss:.2f} GB (inputs as float32: {a.n * a.d * 4 / 1e9:.2f} GB)")
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
