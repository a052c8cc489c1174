"""pack: the curated dataset, written once. The kept training pairs (and, apart, the held-out evaluation
pairs) as webdataset shards that carry each pair's image bytes, both captions, metadata, pseudo-label and
the teacher's embeddings (format: cidistill.core.packed), globally shuffled out of core:

1. scatter (one task per download shard): the shard's rows of each split joined by key with what embed,
   balance and cluster say of them, each given h = hash(pack.seed, key), written to `_parts/` sorted by
   (split, h) in small row groups;
2. the driver sums the counts and cuts [0, 2^64) into as many equal h-ranges per split as there are
   output shards of about `pack.samples_per_shard` pairs (ordering by a hash is a seeded permutation);
3. gather (one task per output shard): the rows of its h-range read from every part (row-group statistics
   skip the rest), ordered by h, written as a tar + its index parquet, then its stats file (its done-marker);
4. each split's manifest.parquet, then `_parts/` is removed.
Memory is bounded by one input shard (1) or one output shard (3), never by the dataset."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cidistill.core.config import Config
from cidistill.core.errors import StageError
from cidistill.core.images import decode_rgb, read_tar_images
from cidistill.core.packed import SPLITS, npy_bytes, shard_file, split_shards, tar_bytes
from cidistill.core.schema import HOLDOUT_FIELDS, download_shards, emb_matrix, has_holdout, holdout_mask, join_on_key
from cidistill.core.stage import Stage, run_tasks
from cidistill.core.store import Store
from .parts import H_SPAN, in_range, key_hash, raise_failed, read_parts, write_part

PARTS = "_parts"
EMB_COLUMNS = {"image_emb": "teacher_image_emb.npy", "text_emb": "teacher_text_emb.npy",
               "text_emb_zh": "teacher_text_zh_emb.npy"}
PART_SCHEMA = pa.schema([("split", pa.string()), ("h", pa.uint64()), ("key", pa.string()),
                         ("caption", pa.string()), ("caption_zh", pa.string()),
                         ("members", pa.map_(pa.string(), pa.binary()))])


def has_text(col: pa.ChunkedArray) -> pa.Array:
    return pc.fill_null(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(col)), 0), False)


class Sources:
    """The stage folders a pack reads: download always; embed, balance and cluster when asked for."""

    def __init__(self, cfg: Config, teacher: bool = True, balanced: bool = True, clusters: bool = True):
        self.dl = Store(cfg.stage_dir("download"), create=False)
        self.emb = Store(cfg.stage_dir("embed"), create=False) if teacher else None
        self.bal = Store(cfg.stage_dir("balance"), create=False) if balanced else None
        self.clu = Store(cfg.stage_dir("cluster"), create=False) if clusters else None


def split_tables(cfg: Config, src: Sources, shard: str, stats: dict) -> dict[str, pa.Table]:
    """One download shard's rows of each split, joined by key with what the later stages say of them.
    Without a held-out split the evaluation split is every pair (and says so in eval's results)."""
    t = src.dl.read_table(f"{shard}.parquet")
    t = t.filter(pc.equal(t.column("status"), "success"))
    stats["rows"] += t.num_rows
    held = holdout_mask(cfg, t) if has_holdout(cfg) else None
    out = {"eval": t.filter(held) if held is not None else t,
           "train": t.filter(pc.invert(held)) if held is not None else t}
    train = out["train"]
    ok = has_text(train.column("caption"))  # no English caption: no teacher text target to learn
    stats["no_caption"] += train.num_rows - (pc.sum(ok).as_py() or 0)
    train = train.filter(ok)
    if src.bal is not None:
        b = src.bal.read_table(f"{shard}.parquet", columns=["key", "kept", "balance_cluster"])
        before = train.num_rows
        train = join_on_key(train, b.filter(b.column("kept")).drop(["kept"]))
        stats["not_kept"] += before - train.num_rows
    if src.clu is not None:
        train = join_on_key(train, src.clu.read_table(f"{shard}.parquet", columns=["key", "cluster_id", "cluster_sim"]))
    out["train"] = train
    if src.emb is not None:
        emb = src.emb.read_table(f"{shard}.parquet", columns=["key"] + list(EMB_COLUMNS))
        for split in SPLITS:
            before = out[split].num_rows
            out[split] = join_on_key(out[split], emb)  # embed holds every decodable pair
            stats[f"{split}_no_embedding"] += before - out[split].num_rows
    return out


META_SKIP = {"status", "error_message", "caption", "caption_zh", "width", "height", "original_width",
             "original_height", "exif", "sha256", "md5", "image_emb", "text_emb", "text_emb_zh"}


def sample_members(row: dict, image: bytes, ext: str, embs: dict[str, np.ndarray]) -> dict[str, bytes]:
    meta = {k: v for k, v in row.items() if k not in META_SKIP}
    members = {ext: image, "txt": (row.get("caption") or "").encode(),
               "zh.txt": (row.get("caption_zh") or "").encode(),
               "json": json.dumps(meta, ensure_ascii=False, sort_keys=True, default=str).encode()}
    for col, member in EMB_COLUMNS.items():
        v = embs.get(col)
        if v is not None and not np.isnan(v).any():
            members[member] = npy_bytes(v)
    return members


def scatter(cfg: Config, src: Sources, out: Store, shard: str) -> dict:
    """Step 1 for one download shard: its samples of both splits as one part, sorted by (split, h)."""
    stats = {k: 0 for k in ("rows", "no_caption", "not_kept", "train_no_embedding", "eval_no_embedding",
                            "undecodable", "train", "eval")}
    tables = split_tables(cfg, src, shard, stats)
    raw = read_tar_images(src.dl, f"{shard}.tar")
    ext = cfg.data.encode_format
    rows: list[dict] = []
    for split, t in tables.items():
        embs = {c: emb_matrix(t.column(c)) for c in EMB_COLUMNS if c in t.column_names}
        for i, row in enumerate(t.drop([c for c in EMB_COLUMNS if c in t.column_names]).to_pylist()):
            image = raw.get(row["key"])
            if image is None or (src.emb is None and not _decodes(image)):
                stats["undecodable"] += 1  # with embed, a pair it could not decode has no embedding
                continue
            members = sample_members(row, image, ext, {c: m[i] for c, m in embs.items()})
            rows.append({"split": split, "h": key_hash(cfg.pack.seed, row["key"]), "key": row["key"],
                         "caption": row.get("caption") or "", "caption_zh": row.get("caption_zh") or "",
                         "members": list(members.items())})
            stats[split] += 1
    write_part(out, f"{PARTS}/{shard}.parquet", pa.Table.from_pylist(rows, schema=PART_SCHEMA),
               [("split", "ascending"), ("h", "ascending")], row_group_size=256)
    return stats


def _decodes(image: bytes) -> bool:
    try:
        decode_rgb(image, 0)
        return True
    except Exception:
        return False


def h_range(j: int, n: int) -> tuple[int, int]:
    return j * H_SPAN // n, (j + 1) * H_SPAN // n


def gather(out: Store, parts: list[str], split: str, j: int, n: int) -> dict:
    """Step 3 for one output shard: its h-range of every part, in h order, as a tar and its index."""
    lo, hi = h_range(j, n)
    flt = (pc.field("split") == split) & in_range("h", lo, hi if hi < H_SPAN else None, pa.uint64())
    t = read_parts(out, parts, flt, schema=PART_SCHEMA).sort_by("h")
    name = f"{split}/{shard_file(j)}"
    samples = [{"__key__": k, **dict(m)} for k, m in zip(t.column("key").to_pylist(), t.column("members").to_pylist())]
    data = tar_bytes(samples)
    out.write_bytes(f"{name}.tar", data)
    out.write_table(f"{name}.parquet", pa.table({
        "key": t.column("key"), "row": pa.array(np.arange(t.num_rows, dtype=np.int64)),
        "caption": t.column("caption"), "caption_zh": t.column("caption_zh")}))
    stats = {"samples": t.num_rows, "bytes": len(data), "has_zh": int(pc.sum(has_text(t.column("caption_zh"))).as_py() or 0)}
    out.write_json(f"{name}_stats.json", stats)
    return stats


def write_manifest(out: Store, split: str) -> None:
    """`split/manifest.parquet`: every shard's index with its shard name, streamed one shard at a time."""
    with out.open_atomic(f"{split}/manifest.parquet") as f:
        writer = None
        for tar, _ in split_shards(out, split):
            t = out.read_table(tar.removesuffix(".tar") + ".parquet")
            t = t.add_column(0, "shard", pa.array([tar.rsplit("/", 1)[-1]] * t.num_rows, pa.string()))
            writer = writer or pq.ParquetWriter(f, t.schema, compression="zstd")
            writer.write_table(t)
        if writer:
            writer.close()


def pack_dataset(cfg: Config, out: Store, src: Sources, use_ray: bool = True) -> dict:
    """Steps 1-4 into `out`, each resumable: parts, layout.json and shard stats files mark what is done."""
    shards = download_shards(src.dl)
    todo = [s for s in shards if not out.exists(f"{PARTS}/{s}_stats.json")]

    def scatter_one(shard: str) -> dict:
        st = scatter(cfg, src, out, shard)
        out.write_json(f"{PARTS}/{shard}_stats.json", st)
        return st

    raise_failed("pack", run_tasks(scatter_one, todo, use_ray=use_ray, desc="pack: scatter"))
    counts: dict = {}
    for s in shards:
        for k, v in out.read_json(f"{PARTS}/{s}_stats.json").items():
            counts[k] = counts.get(k, 0) + v
    if not counts.get("train"):
        raise StageError(f"pack: no training pairs ({counts}): are download, embed, balance and cluster done?")
    if not out.exists("layout.json"):  # fixed once: a resumed run cuts the same ranges
        out.write_json("layout.json", {s: max(1, round(counts[s] / cfg.pack.samples_per_shard)) for s in SPLITS})
    layout = out.read_json("layout.json")
    parts = [f"{PARTS}/{s}.parquet" for s in shards]
    jobs = [(s, j) for s in SPLITS for j in range(layout[s]) if counts[s]
            and not out.exists(f"{s}/{shard_file(j)}_stats.json")]
    raise_failed("pack", run_tasks(lambda sj: gather(out, parts, sj[0], sj[1], layout[sj[0]]), jobs, use_ray=use_ray,
                            desc="pack: gather"))
    result = {"input_shards": len(shards), **counts}
    for split in SPLITS:
        shard_stats = [out.read_json(n) for n in out.glob(f"{split}/shard-*_stats.json")]  # read once each
        sizes = [st["samples"] for st in shard_stats]
        if sizes:
            write_manifest(out, split)
        result[f"{split}_shards"] = len(sizes)
        result[f"{split}_samples_per_shard"] = [min(sizes), max(sizes)] if sizes else [0, 0]
        result[f"{split}_bytes"] = sum(st["bytes"] for st in shard_stats)
        result[f"{split}_has_zh"] = sum(st["has_zh"] for st in shard_stats)
    out.rm(PARTS)
    return result


class PackStage(Stage):
    name = "pack"
    inputs = ("download", "embed", "balance", "cluster")
    shard_input = ("download", "tar")
    reads = ("pack", "data.extra_cols", "data.encode_format", "train.use_balanced") + HOLDOUT_FIELDS

    def run_unit(self, unit: str) -> dict:
        for s in ("download", "embed", "cluster"):
            self.require(s)
        balanced = self.cfg.train.use_balanced
        if balanced:
            self.require("balance")
        result = pack_dataset(self.cfg, self.out, Sources(self.cfg, balanced=balanced), use_ray=self.use_ray)
        d = self.cfg.data
        if has_holdout(self.cfg) and not result["eval"]:  # caught here, before a training that could not be scored
            asked = f"data.holdout={d.holdout!r} matched" if d.holdout else f"data.holdout_fraction={d.holdout_fraction} held out"
            raise StageError(f"{asked} none of the {result['rows']} downloaded pairs: no evaluation split "
                             "(data.holdout_fraction=0 evaluates on training pairs)")
        return result

    def summary(self, stats: dict) -> str:
        return (f"{stats['train']} training pairs in {stats['train_shards']} shards "
                f"({stats['train_bytes'] / 1e6:.1f} MB), {stats['eval']} evaluation pairs in {stats['eval_shards']}")
