"""Facts for a data card, read from the stage folders alone (nothing heavy is recomputed)."""
from __future__ import annotations

import hashlib
import importlib.metadata
import random
import time
from collections import Counter, defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cidistill.core.config import STAGES, Config, to_dict
from cidistill.core.images import read_tar_images
from cidistill.core.schema import download_shards, emb_matrix
from cidistill.core.store import Store

PACKAGES = ("cidistill", "torch", "open_clip_torch", "img2dataset", "ray", "faiss-cpu", "pyarrow", "scikit-learn")


def _store(cfg: Config, stage: str) -> Store | None:
    st = Store(cfg.stage_dir(stage))
    return st if st.exists("stats.json") or st.exists("_DONE") else None


def why(cfg: Config, key: str) -> dict:
    """Lineage of one sample: key -> shard, caption, drop_reason, dup_of, cluster_id."""
    shard = key[:5]
    out = {"key": key, "shard": shard}
    for stage, cols in (("download", ["key", "caption", "url", "status", "error_message"]),
                        ("balance", ["key", "kept", "drop_reason", "dup_of", "balance_cluster"]),
                        ("cluster", ["key", "cluster_id", "cluster_sim"])):
        st = Store(cfg.stage_dir(stage))
        if st.exists(f"{shard}.parquet"):
            t = st.read_table(f"{shard}.parquet")
            t = t.filter(pc.equal(t.column("key"), key)).select([c for c in cols if c in t.column_names])
            if t.num_rows:
                out.update({k: v for k, v in t.to_pylist()[0].items() if k != "key"})
    return out


def _sha256_file(store: Store, name: str) -> str:
    h = hashlib.sha256()
    with store.fs.open(store.path(name), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _versions() -> dict:
    versions = {}
    for p in PACKAGES:
        try:
            versions[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def _stage_facts(cfg: Config) -> dict:
    out = {}
    for s in STAGES:
        st = _store(cfg, s)
        if st is None:
            continue
        stats = st.read_json("stats.json") if st.exists("stats.json") else {}
        done = st.read_json("_DONE") if st.exists("_DONE") else {}
        out[s] = {"stats": stats, "finished": done.get("finished")}
    return out


def _url_facts(urls: str) -> dict | None:
    import fsspec

    fs, p = fsspec.core.url_to_fs(urls)
    if not fs.isfile(p):
        return None
    st = Store(p.rsplit("/", 1)[0] if "/" in p else ".")
    return {"path": urls, "sha256": _sha256_file(st, p.rsplit("/", 1)[-1])}


def _caption_facts(t: pa.Table, facts: dict) -> None:
    ok = t.filter(pc.equal(t.column("status"), "success"))
    cap = [c or "" for c in ok.column("caption").to_pylist()]
    zh = [c or "" for c in ok.column("caption_zh").to_pylist()] if "caption_zh" in ok.column_names else [""] * len(cap)
    facts["captions"] = {"n": len(cap), "en_present": sum(bool(c.strip()) for c in cap),
                         "zh_present": sum(bool(c.strip()) for c in zh),
                         "both": sum(bool(a.strip()) and bool(b.strip()) for a, b in zip(cap, zh)),
                         "en_len": [len(c) for c in cap], "zh_len": [len(c) for c in zh if c]}
    if "vendor" in ok.column_names:
        facts["vendors"] = dict(Counter(ok.column("vendor").to_pylist()))


def _dup_groups(b: pa.Table, meta: dict, max_groups: int) -> list:
    """The biggest duplicate groups, preferring ones that span artist styles (cross-vendor copies)."""
    groups: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for k, r, d in zip(b.column("key").to_pylist(), b.column("drop_reason").to_pylist(), b.column("dup_of").to_pylist()):
        if d:
            groups[d].append((k, r))
    ranked = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    cross = [g for g in ranked if len({meta.get(k, (0, 0, None))[2] for k, _ in g[1]} | {meta.get(g[0], (0, 0, None))[2]}) > 1]
    return (cross[:max_groups // 2] + [g for g in ranked if g not in cross[:max_groups // 2]])[:max_groups]


def _random_clusters(cfg: Config, shards: list[str], seed: int, facts: dict) -> dict:
    clu = Store(cfg.stage_dir("cluster"))
    if not clu.exists("_DONE"):
        return {}
    c = pa.concat_tables([clu.read_table(f"{s}.parquet") for s in shards])
    facts["pseudo_label_sizes"] = clu.read_json("cluster_sizes.json")
    by = defaultdict(list)
    for k, cid in zip(c.column("key").to_pylist(), c.column("cluster_id").to_pylist()):
        by[cid].append(k)
    rng = random.Random(seed)
    eligible = sorted(cid for cid in by if len(by[cid]) >= 3)
    return {cid: by[cid][:8] for cid in rng.sample(eligible, min(4, len(eligible)))}


def _embedding_map(cfg: Config, bal: Store, shards: list[str], seed: int) -> dict:
    """2-D map of the teacher's image embeddings (PCA), coloured by balance cluster."""
    emb = Store(cfg.stage_dir("embed"))
    xs, cl = [], []
    for s in shards:
        e = emb.read_table(f"{s}.parquet", columns=["key", "image_emb"])
        bb = bal.read_table(f"{s}.parquet", columns=["key", "balance_cluster"])
        xs.append(emb_matrix(e.column("image_emb")))
        cl += bb.column("balance_cluster").to_pylist()
    x = np.nan_to_num(np.concatenate(xs))
    idx = np.random.default_rng(seed).permutation(len(x))[:3000]
    xc = x[idx] - x[idx].mean(0)
    _, _, vt = np.linalg.svd(xc, full_matrices=False)
    return {"xy": (xc @ vt[:2].T).tolist(), "cluster": [cl[i] for i in idx]}


def _balance_facts(cfg: Config, t: pa.Table, shards: list[str], dl: Store, bal: Store, max_groups: int,
                   seed: int, facts: dict) -> None:
    b = pa.concat_tables([bal.read_table(f"{s}.parquet") for s in shards])
    facts["cluster_sizes"] = bal.read_json("cluster_sizes.json")
    meta = {k: (c, z, v) for k, c, z, v in zip(
        t.column("key").to_pylist(), t.column("caption").to_pylist(),
        t.column("caption_zh").to_pylist() if "caption_zh" in t.column_names else [None] * t.num_rows,
        t.column("vendor").to_pylist() if "vendor" in t.column_names else [None] * t.num_rows)}
    chosen = _dup_groups(b, meta, max_groups)
    random_clusters = _random_clusters(cfg, shards, seed, facts)
    keys_needed = {k for kept, members in chosen for k in [kept] + [m for m, _ in members[:7]]}
    keys_needed |= {k for ks in random_clusters.values() for k in ks}
    images = {}
    for s in shards:
        want = {k for k in keys_needed if k.startswith(s)}
        if want:
            raw = read_tar_images(dl, f"{s}.tar")
            images.update({k: raw[k] for k in want if k in raw})
    facts["dup_groups"] = [{"kept": kept, "kept_caption": meta.get(kept, ("",))[0], "kept_vendor": meta.get(kept, (0, 0, None))[2],
                            "members": [{"key": m, "reason": r, "caption": meta.get(m, ("",))[0],
                                         "vendor": meta.get(m, (0, 0, None))[2]} for m, r in members[:7]],
                            "size": len(members)} for kept, members in chosen]
    facts["random_clusters"] = {int(cid): [{"key": k, "caption": meta.get(k, ("",))[0]} for k in ks]
                                for cid, ks in random_clusters.items()}
    facts["images"] = images
    facts["map"] = _embedding_map(cfg, bal, shards, seed)


def collect(cfg: Config, max_groups: int = 8, seed: int = 0) -> dict:
    facts: dict = {"generated": time.strftime("%Y-%m-%d %H:%M:%S"), "config": to_dict(cfg),
                   "stages": _stage_facts(cfg), "versions": _versions()}
    if cfg.data.urls and (urls := _url_facts(cfg.data.urls)):
        facts["urls"] = urls
    dl = Store(cfg.stage_dir("download"))
    shards = download_shards(dl)
    tables = [dl.read_table(f"{s}.parquet") for s in shards]
    t = pa.concat_tables(tables, promote_options="default") if tables else None
    if t is not None:
        _caption_facts(t, facts)
    bal = Store(cfg.stage_dir("balance"))
    if bal.exists("_DONE") and t is not None:
        _balance_facts(cfg, t, shards, dl, bal, max_groups, seed, facts)
    return facts
