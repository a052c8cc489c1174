"""cluster: FAISS k-means pseudo-labels on the kept samples' teacher embeddings (image, or image+text joint
as UNICOM does). The k-means trains on a seeded hash sample of k x max_points_per_centroid rows streamed
from the shards (faiss would subsample to that many anyway; large k trains two-level), and reports its
objective on a held-aside sample; then assignment runs per shard as Ray tasks. Memory is bounded by the
sample and one shard, never by N. Centroids are saved first (with the config that made them)."""
from __future__ import annotations

import math
import time

import numpy as np
import pyarrow as pa

from cidistill.core.config import Config
from cidistill.core.errors import StageError
from cidistill.core.schema import CLUSTER_SCHEMA, as_float32, emb_matrix, join_on_key, shard_stats_name
from cidistill.core.stage import Stage, run_tasks
from cidistill.core.store import Store
from .parts import hash_sample, load_npy, load_sample, raise_failed, sample_cuts, save_npy


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


def objective(x: np.ndarray, cents: np.ndarray, gpu: bool, name: str) -> dict:
    """The k-means objective on rows: their mean cosine to the nearest centroid."""
    return {f"{name}_mean_cos": round(float(assign(x, cents, gpu)[1].mean()), 5)} if len(x) else {}


ASIDE = 10_000          # held-aside rows on which the k-means objective is reported
WORK = "_work"


def kept_embeddings(cfg: Config, shard: str, joint: bool) -> tuple[list[str], np.ndarray]:
    """A shard's kept keys and their (image or joint) teacher embeddings; with `cluster.use_balanced` off,
    the duplicates too (never held-out or bad embeddings)."""
    import pyarrow.compute as pc

    cols = ["key", "image_emb"] + (["text_emb"] if joint else [])  # a list column costs its decode: only what is used
    e = Store(cfg.stage_dir("embed")).read_table(f"{shard}.parquet", columns=cols)
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
    shard_input = ("balance", "parquet")
    reads = ("cluster",)

    def __init__(self, cfg: Config, use_ray: bool = True):
        super().__init__(cfg, use_ray)
        self.cc = cfg.cluster
        self.timings: dict[str, float] = {}      # seconds per step in this run (stats: step_seconds)
        self.on_ray = use_ray

    def units(self) -> list[str]:
        return self.input_shards()

    def centroids(self) -> np.ndarray:
        """Fit on the seeded sample. The one read of each shard also keeps its rows (raw, float16 when exact)
        in `_work/` for the assignment."""
        if self.out.exists("centroids.npy"):
            return load_npy(self.out, "centroids.npy")
        shards = self.units()
        n = self.rows_to_cluster(shards)
        cut, aside_hi = sample_cuts(n, self.cc.k * self.cc.max_points_per_centroid, ASIDE)
        cfg, joint, seed, out = self.cfg, self.cc.joint, self.cc.seed, self.out

        def sample(s: str) -> None:
            keys, x = kept_embeddings(cfg, s, joint)
            save_npy(out, f"{WORK}/{s}.keys.npy", np.array(keys, dtype=str) if keys else np.zeros(0, "<U1"))
            save_npy(out, f"{WORK}/{s}.npy", x if joint else x.astype(np.float16))  # float16 in embed: exact
            hash_sample(out, f"{WORK}/{s}.sample", keys, x, lambda rows: rows, seed, cut, aside_hi)

        t0 = time.time()
        raise_failed("cluster: sample", run_tasks(sample, [s for s in shards if not out.exists(f"{WORK}/{s}.sample.npz")],
                                                  use_ray=self.on_ray, desc="cluster: sample"))
        self.timings["sample"] = round(time.time() - t0, 1)
        t0 = time.time()
        x, aside = load_sample(out, [f"{WORK}/{s}.sample" for s in shards])
        cent, info = spherical_kmeans(x, self.cc.k, niter=self.cc.niter, seed=seed, gpu=self.cc.gpu,
                                      max_points_per_centroid=self.cc.max_points_per_centroid,
                                      two_level_above=self.cc.two_level_above)
        info.update(sample=len(x), sample_of=n)
        if len(aside):
            info.update(objective(aside, cent, self.cc.gpu, "aside"), aside=len(aside))
        self.out.write_json("centroids.json", {"config": vars(self.cc), "train": info, "dim": int(cent.shape[1])})
        save_npy(self.out, "centroids.npy", cent.astype(np.float32))  # after its config: the npy marks training done
        self.timings["fit"] = round(time.time() - t0, 1)
        return cent

    def rows_to_cluster(self, shards: list[str]) -> int:
        """How many rows the k-means sees, from balance's per-shard counts."""
        bal = self.input_store("balance")
        n = 0
        for s in shards:
            st = bal.read_json(shard_stats_name(s))
            n += st["kept_samples"]
            if not self.cc.use_balanced:
                n += sum(st["dropped"].get(r, 0) for r in DEDUP_REASONS)
        return n

    def run_units(self, pending: list[str]) -> dict[str, str]:
        # when the sample is all the rows, the fit holds them in the driver anyway: run the per-shard tasks
        # here too, without Ray's per-task cost (the small demo's cluster took 7 s as Ray tasks for 176 rows)
        n = self.rows_to_cluster(self.units())
        if self.cc.k > n:
            raise StageError(f"cluster.k={self.cc.k} is larger than the {n} samples to cluster (kept by balance): "
                             f"set cluster.k to at most {n}")
        self.on_ray = self.use_ray and n > self.cc.k * self.cc.max_points_per_centroid
        self.centroids()
        cfg, out = self.cfg, self.out

        def assign_one(s: str) -> None:
            cent = load_npy(out, "centroids.npy")
            keys = load_npy(out, f"{WORK}/{s}.keys.npy").tolist()
            x = as_float32(load_npy(out, f"{WORK}/{s}.npy"))
            ids, sim = assign(x, cent, cfg.cluster.gpu) if keys else (np.zeros(0, np.int32), np.zeros(0, np.float32))
            out.write_table(f"{s}.parquet", pa.table({"key": keys, "cluster_id": ids, "cluster_sim": sim},
                                                     schema=CLUSTER_SCHEMA))
            out.write_json(shard_stats_name(s), {"assigned": len(keys), "sizes": np.bincount(ids, minlength=len(cent)).tolist()})

        t0 = time.time()
        raise_failed("cluster: assign", run_tasks(assign_one, pending, use_ray=self.on_ray, desc="cluster: assign"))
        self.timings["assign"] = round(time.time() - t0, 1)
        return {}

    def finish(self, stats: dict) -> dict:
        self.out.rm(WORK)
        sizes = np.zeros(self.cc.k, np.int64)
        for s in self.units():
            sizes += np.asarray(self.out.read_json(shard_stats_name(s))["sizes"], np.int64)
        stats.pop("sizes", None)
        info = self.out.read_json("centroids.json")["train"]
        stats.update(k=self.cc.k, empty_clusters=int((sizes == 0).sum()),
                     tiny_clusters=int(((sizes > 0) & (sizes < self.cc.min_cluster_size)).sum()),
                     largest_cluster=int(sizes.max()), median_cluster=float(np.median(sizes)), kmeans=info,
                     step_seconds=self.timings)
        self.out.write_json("cluster_sizes.json", sizes.tolist())
        return stats

    def summary(self, stats: dict) -> str:
        return (f"{stats.get('assigned', 0)} kept samples in k={stats['k']} clusters "
                f"({stats['empty_clusters']} empty, {stats['tiny_clusters']} tiny)")

