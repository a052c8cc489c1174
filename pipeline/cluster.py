"""cluster: FAISS k-means pseudo-labels on the kept samples' teacher embeddings (image, or image+text joint
as UNICOM does). Large k trains on a sample and with two-level clustering; assignment streams shard by
shard, so memory does not grow with N. Centroids are saved first (with the config that made them)."""
from __future__ import annotations

import math
import time

import numpy as np
import pyarrow as pa

from cidistill.core.config import Config
from cidistill.core.errors import StageError
from cidistill.core.schema import CLUSTER_SCHEMA, emb_matrix, join_on_key, shard_stats_name
from cidistill.core.stage import Stage
from cidistill.core.store import Store


def faiss_module(gpu: bool):
    try:
        import faiss
    except ImportError as e:
        raise StageError("FAISS is missing: pip install 'cidistill[cpu]' (faiss-cpu) or 'cidistill[gpu]'") from e
    if gpu and not hasattr(faiss, "StandardGpuResources"):
        raise StageError("gpu=True but this FAISS has no GPU support: install the `gpu` extra (faiss-gpu)")
    return faiss


def l2n(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)


def spherical_kmeans(x: np.ndarray, k: int, *, niter: int = 20, seed: int = 0, gpu: bool = False,
                     max_points_per_centroid: int = 256, two_level_above: int = 4096, verbose: bool = False):
    """Returns (centroids (k, d) unit rows, info). k > N is an error; large k uses two-level training."""
    faiss = faiss_module(gpu)
    n, d = x.shape
    if k > n:
        raise StageError(f"k-means: k={k} is larger than the number of samples ({n})")
    x = l2n(x)
    info = {"k": k, "n": n, "train_points": min(n, k * max_points_per_centroid)}
    t0 = time.time()
    if k > two_level_above:
        from faiss.contrib.clustering import two_level_clustering

        rng = np.random.default_rng(seed)
        sample = x[rng.choice(n, info["train_points"], replace=False)] if info["train_points"] < n else x
        nc1 = int(math.sqrt(k))
        # few points per centre is expected at large k (reported in info): min_points_per_centroid=1 stops
        # faiss from warning once per sub-clustering
        out = two_level_clustering(sample, nc1, k, rebalance=True, clustering_niter=niter, spherical=True,
                                   seed=seed, min_points_per_centroid=1) if _two_level_takes_kwargs() \
            else two_level_clustering(sample, nc1, k)
        centroids = l2n(out[0] if isinstance(out, tuple) else out)  # newer faiss also returns iteration stats
        info["method"] = f"two-level ({nc1} x {k // nc1})"
    else:
        km = faiss.Kmeans(d, k, niter=niter, seed=seed, spherical=True, gpu=gpu, verbose=verbose,
                          max_points_per_centroid=max_points_per_centroid, min_points_per_centroid=1)
        km.train(x)
        centroids = l2n(km.centroids)
        info["method"] = "flat"
    info["train_points_per_centroid"] = info["train_points"] / k
    info["seconds"] = round(time.time() - t0, 3)
    return centroids, info


def _two_level_takes_kwargs() -> bool:
    import inspect

    from faiss.contrib.clustering import two_level_clustering

    return "args" in str(inspect.signature(two_level_clustering))


def assign(x: np.ndarray, centroids: np.ndarray, gpu: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid by cosine: (cluster ids int32, similarity float32)."""
    faiss = faiss_module(gpu)
    index = faiss.IndexFlatIP(centroids.shape[1])
    if gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(l2n(centroids))
    sim, ids = index.search(l2n(x), 1)
    return ids[:, 0].astype(np.int32), sim[:, 0].astype(np.float32)


DEDUP_REASONS = ("exact_dup", "near_dup", "semantic_dup", "cluster_cap")


def kept_embeddings(cfg: Config, shard: str, joint: bool) -> tuple[list[str], np.ndarray]:
    """A shard's kept keys and their (image or joint) teacher embeddings; with `cluster.use_balanced` off,
    the duplicates too (never held-out or bad embeddings)."""
    import pyarrow.compute as pc

    e = Store(cfg.stage_dir("embed")).read_table(f"{shard}.parquet", columns=["key", "image_emb", "text_emb"])
    b = Store(cfg.stage_dir("balance")).read_table(f"{shard}.parquet", columns=["key", "kept", "drop_reason"])
    t = join_on_key(e, b)
    use = t.column("kept")
    if not cfg.cluster.use_balanced:
        use = pc.or_(use, pc.fill_null(pc.is_in(t.column("drop_reason"), pa.array(DEDUP_REASONS)), False))
    t = t.filter(use).sort_by("key")
    x = emb_matrix(t.column("image_emb"))
    if joint:
        txt = emb_matrix(t.column("text_emb"))
        x = l2n(x) + np.nan_to_num(l2n(np.nan_to_num(txt)))
    return t.column("key").to_pylist(), x


class ClusterStage(Stage):
    name = "cluster"
    inputs = ("embed", "balance")
    reads = ("cluster",)

    def __init__(self, cfg: Config, use_ray: bool = True):
        super().__init__(cfg, use_ray)
        self.cc = cfg.cluster

    def units(self) -> list[str]:
        return [n[:-len(".parquet")] for n in self.require("balance").glob("[0-9]*.parquet")]

    def centroids(self) -> np.ndarray:
        if self.out.exists("centroids.npy"):
            with self.out.fs.open(self.out.path("centroids.npy"), "rb") as f:
                return np.load(f)
        xs = [kept_embeddings(self.cfg, s, self.cc.joint)[1] for s in self.units()]
        x = np.concatenate(xs) if xs else np.zeros((0, 1), np.float32)
        cent, info = spherical_kmeans(x, self.cc.k, niter=self.cc.niter, seed=self.cc.seed, gpu=self.cc.gpu,
                                      max_points_per_centroid=self.cc.max_points_per_centroid,
                                      two_level_above=self.cc.two_level_above)
        import io

        buf = io.BytesIO()
        np.save(buf, cent.astype(np.float32))
        self.out.write_json("centroids.json", {"config": vars(self.cc), "train": info, "dim": int(cent.shape[1])})
        self.out.write_bytes("centroids.npy", buf.getvalue())  # after its config: the npy marks training done
        return cent

    def run_units(self, pending: list[str]) -> dict[str, str]:
        cent = self.centroids()
        for s in pending:
            keys, x = kept_embeddings(self.cfg, s, self.cc.joint)
            ids, sim = assign(x, cent, self.cc.gpu) if keys else (np.zeros(0, np.int32), np.zeros(0, np.float32))
            self.out.write_table(f"{s}.parquet", pa.table({"key": keys, "cluster_id": ids, "cluster_sim": sim},
                                                          schema=CLUSTER_SCHEMA))
            sizes = np.bincount(ids, minlength=len(cent))
            self.out.write_json(shard_stats_name(s), {"assigned": len(keys), "sizes": sizes.tolist()})
        return {}

    def finish(self, stats: dict) -> dict:
        sizes = np.zeros(self.cc.k, np.int64)
        for s in self.units():
            sizes += np.asarray(self.out.read_json(shard_stats_name(s))["sizes"], np.int64)
        stats.pop("sizes", None)
        info = self.out.read_json("centroids.json")["train"]
        stats.update(k=self.cc.k, empty_clusters=int((sizes == 0).sum()),
                     tiny_clusters=int(((sizes > 0) & (sizes < self.cc.min_cluster_size)).sum()),
                     largest_cluster=int(sizes.max()), median_cluster=float(np.median(sizes)), kmeans=info)
        self.out.write_json("cluster_sizes.json", sizes.tolist())
        return stats

    def summary(self, stats: dict) -> str:
        return (f"{stats.get('assigned', 0)} kept samples in k={stats['k']} clusters "
                f"({stats['empty_clusters']} empty, {stats['tiny_clusters']} tiny)")

