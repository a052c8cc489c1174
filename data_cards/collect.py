"""Facts for a data card, read from the stage folders alone (nothing heavy is recomputed), one shard at a
time: per-shard counts and histograms added up, seeded hash samples for the grids and the embedding map;
nothing is held per pair of the dataset."""
from __future__ import annotations

import hashlib
import importlib.metadata
import random
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cidistill.core.config import Config, public_dict
from cidistill.core.images import read_tar_images
from cidistill.core.schema import H_SPAN, download_shards, emb_matrix, join_on_key, key_hash
from cidistill.core.store import Store, redact, split_uri

PACKAGES = ("cidistill", "torch", "open_clip_torch", "img2dataset", "ray", "faiss-cpu", "pyarrow", "scikit-learn")


def _store(cfg: Config, stage: str) -> Store | None:
    st = Store(cfg.stage_dir(stage), create=False)
    return st if st.exists("stats.json") or st.exists("_DONE") else None


def why(cfg: Config, key: str) -> dict:
    """Lineage of one sample: key -> shard, caption, drop_reason, dup_of, cluster_id."""
    shard = key[:5]
    out = {"key": key, "shard": shard}
    for stage, cols in (("download", ["key", "caption", "url", "status", "error_message"]),
                        ("balance", ["key", "kept", "drop_reason", "dup_of", "balance_cluster"]),
                        ("cluster", ["key", "cluster_id", "cluster_sim"])):
        st = Store(cfg.stage_dir(stage), create=False)
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


# what the card describes: the curated data, as the curation stages made it. The training, evaluation and
# export are left out (a retrained student does not redo the card, so they would go stale in it).
CURATION = ("download", "embed", "balance", "cluster", "pack")
CURATION_CONFIG = ("workdir", "dirs", "storage_options", "seed", "data", "teacher", "balance", "cluster", "pack")


def _stage_facts(cfg: Config) -> dict:
    out = {}
    for s in CURATION:
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
    folder, name = split_uri(urls)
    return {"path": redact(urls), "sha256": _sha256_file(Store(folder, create=False), name)}


LEN_BIN, LEN_MAX = 4, 400      # caption-length histogram: 4-character bins, the last one open-ended
TRACKED_GROUPS = 10_000        # duplicate groups followed (a seeded hash sample of them when there are more)
MAP_POINTS = 3000


def _len_hist(lengths: list[int]) -> np.ndarray:
    return np.bincount(np.minimum(np.asarray(lengths, np.int64), LEN_MAX) // LEN_BIN, minlength=LEN_MAX // LEN_BIN + 1)


def _caption_facts(dl: Store, shards: list[str], facts: dict) -> None:
    """Per-shard counts and caption-length histograms, added up (nothing held per pair)."""
    c = {"n": 0, "en_present": 0, "zh_present": 0, "both": 0, "len_bin": LEN_BIN,
         "en_hist": _len_hist([]), "zh_hist": _len_hist([])}
    vendors: Counter = Counter()
    for s in shards:
        t = dl.read_table(f"{s}.parquet")
        ok = t.filter(pc.equal(t.column("status"), "success"))
        cap = [x or "" for x in ok.column("caption").to_pylist()]
        zh = [x or "" for x in ok.column("caption_zh").to_pylist()] if "caption_zh" in ok.column_names else [""] * len(cap)
        c["n"] += len(cap)
        c["en_present"] += sum(bool(x.strip()) for x in cap)
        c["zh_present"] += sum(bool(x.strip()) for x in zh)
        c["both"] += sum(bool(a.strip()) and bool(b.strip()) for a, b in zip(cap, zh))
        c["en_hist"] = c["en_hist"] + _len_hist([len(x) for x in cap])
        c["zh_hist"] = c["zh_hist"] + _len_hist([len(x) for x in zh if x])
        if "vendor" in ok.column_names:
            vendors.update(ok.column("vendor").to_pylist())
    facts["captions"] = dict(c, en_hist=c["en_hist"].tolist(), zh_hist=c["zh_hist"].tolist())
    if vendors:
        facts["vendors"] = dict(vendors)


def _meta(dl: Store, shards: list[str], keys: set[str]) -> dict[str, tuple]:
    """(caption, Chinese caption, vendor) of the given keys, read from their download shards only."""
    out = {}
    for s in shards:
        want = {k for k in keys if k.startswith(s)}
        if not want:
            continue
        t = dl.read_table(f"{s}.parquet")
        t = t.filter(pc.is_in(t.column("key"), pa.array(sorted(want))))
        col = {n: t.column(n).to_pylist() if n in t.column_names else [None] * t.num_rows
               for n in ("key", "caption", "caption_zh", "vendor")}
        out.update({k: (c, z, v) for k, c, z, v in zip(col["key"], col["caption"], col["caption_zh"], col["vendor"])})
    return out


def _dup_groups(bal: Store, shards: list[str], max_groups: int, seed: int, n_dups: int) -> dict[str, list]:
    """The biggest duplicate groups, counted per shard: survivor -> [size, first 7 (member, reason)]. With more
    than TRACKED_GROUPS duplicates, only a seeded hash sample of survivors is followed (bounded memory)."""
    cut = H_SPAN if n_dups <= TRACKED_GROUPS else TRACKED_GROUPS * H_SPAN // n_dups
    groups: dict[str, list] = {}
    for s in shards:
        b = bal.read_table(f"{s}.parquet", columns=["key", "drop_reason", "dup_of"])
        b = b.filter(pc.is_valid(b.column("dup_of")))
        for k, r, d in zip(b.column("key").to_pylist(), b.column("drop_reason").to_pylist(), b.column("dup_of").to_pylist()):
            if d in groups or key_hash(seed, d) < cut:
                g = groups.setdefault(d, [0, []])
                g[0] += 1
                if len(g[1]) < 7:
                    g[1].append((k, r))
    ranked = sorted(groups.items(), key=lambda kv: (-kv[1][0], kv[0]))
    return dict(ranked[:max(256, 4 * max_groups)])


def _choose_groups(groups: dict[str, list], meta: dict, max_groups: int) -> list:
    """Half of the shown groups span artist styles (cross-vendor copies) where there are such."""
    vendor = {k: v[2] for k, v in meta.items()}
    ranked = list(groups.items())
    cross = [g for g in ranked if len({vendor.get(k) for k, _ in g[1][1]} | {vendor.get(g[0])}) > 1]
    return (cross[:max_groups // 2] + [g for g in ranked if g not in cross[:max_groups // 2]])[:max_groups]


def _random_clusters(cfg: Config, shards: list[str], seed: int, facts: dict) -> dict:
    """Four pseudo-label clusters of at least 3 members drawn with `seed`, their first 8 keys."""
    clu = Store(cfg.stage_dir("cluster"), create=False)
    if not clu.exists("_DONE"):
        return {}
    sizes = clu.read_json("cluster_sizes.json")
    facts["pseudo_label_sizes"] = sizes
    eligible = [cid for cid, n in enumerate(sizes) if n >= 3]
    chosen = random.Random(seed).sample(eligible, min(4, len(eligible)))
    by: dict[int, list[str]] = {cid: [] for cid in chosen}
    for s in shards:
        c = clu.read_table(f"{s}.parquet", columns=["key", "cluster_id"])
        for k, cid in zip(c.column("key").to_pylist(), c.column("cluster_id").to_pylist()):
            if cid in by and len(by[cid]) < 8:
                by[cid].append(k)
    return by


def _embedding_map(cfg: Config, bal: Store, shards: list[str], seed: int) -> dict:
    """2-D map (PCA) of the teacher's image embeddings of a seeded hash sample of MAP_POINTS pairs, coloured by
    balance cluster; the sample is kept while streaming the shards."""
    emb = Store(cfg.stage_dir("embed"), create=False)
    h, xs, cl = np.zeros(0, np.uint64), np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    for s in shards:
        e = join_on_key(emb.read_table(f"{s}.parquet", columns=["key", "image_emb"]),
                        bal.read_table(f"{s}.parquet", columns=["key", "balance_cluster"]))
        hs = np.array([key_hash(seed, k) for k in e.column("key").to_pylist()], np.uint64)
        x = np.nan_to_num(emb_matrix(e.column("image_emb")))
        h, xs = np.concatenate([h, hs]), np.concatenate([xs.reshape(-1, x.shape[1]), x])
        cl = np.concatenate([cl, e.column("balance_cluster").to_numpy(zero_copy_only=False)])
        keep = np.argsort(h, kind="stable")[:MAP_POINTS]
        h, xs, cl = h[keep], xs[keep], cl[keep]
    if not len(xs):
        return {}
    xc = xs - xs.mean(0)
    _, _, vt = np.linalg.svd(xc, full_matrices=False)
    return {"xy": (xc @ vt[:2].T).tolist(), "cluster": cl.tolist()}


def _balance_facts(cfg: Config, shards: list[str], dl: Store, bal: Store, max_groups: int, seed: int,
                   facts: dict) -> None:
    facts["cluster_sizes"] = bal.read_json("cluster_sizes.json")
    rules = bal.read_json("stats.json").get("removed_by_rule", {}) if bal.exists("stats.json") else {}
    groups = _dup_groups(bal, shards, max_groups, seed, sum(rules.get(r, 0) for r in ("exact_dup", "near_dup", "semantic_dup")))
    random_clusters = _random_clusters(cfg, shards, seed, facts)
    meta = _meta(dl, shards, set(groups) | {m for _, ms in groups.values() for m, _ in ms}
                 | {k for ks in random_clusters.values() for k in ks})
    chosen = _choose_groups(groups, meta, max_groups)
    keys_needed = {k for kept, (_, members) in chosen for k in [kept] + [m for m, _ in members]}
    keys_needed |= {k for ks in random_clusters.values() for k in ks}
    images = {}
    for s in shards:
        want = {k for k in keys_needed if k.startswith(s)}
        if want:
            raw = read_tar_images(dl, f"{s}.tar")
            images.update({k: raw[k] for k in want if k in raw})
    none = ("", None, None)
    facts["dup_groups"] = [{"kept": kept, "kept_caption": meta.get(kept, none)[0], "kept_vendor": meta.get(kept, none)[2],
                            "members": [{"key": m, "reason": r, "caption": meta.get(m, none)[0],
                                         "vendor": meta.get(m, none)[2]} for m, r in members],
                            "size": size} for kept, (size, members) in chosen]
    facts["random_clusters"] = {int(cid): [{"key": k, "caption": meta.get(k, none)[0]} for k in ks]
                                for cid, ks in random_clusters.items()}
    facts["images"] = images
    facts["map"] = _embedding_map(cfg, bal, shards, seed)


def collect(cfg: Config, max_groups: int = 8, seed: int = 0) -> dict:
    config = {k: v for k, v in public_dict(cfg).items() if k in CURATION_CONFIG}
    facts: dict = {"generated": time.strftime("%Y-%m-%d %H:%M:%S"), "config": config,
                   "stages": _stage_facts(cfg), "versions": _versions()}
    if cfg.data.urls and (urls := _url_facts(cfg.data.urls)):
        facts["urls"] = urls
    dl = Store(cfg.stage_dir("download"), create=False)
    shards = download_shards(dl)
    if shards:
        _caption_facts(dl, shards, facts)
    bal = Store(cfg.stage_dir("balance"), create=False)
    if bal.exists("_DONE") and shards:
        _balance_facts(cfg, shards, dl, bal, max_groups, seed, facts)
    return facts
