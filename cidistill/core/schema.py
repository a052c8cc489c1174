"""Parquet schemas of every stage's per-shard output, written down once. Every stage imports these.

Shard ids flow unchanged from download to cluster: shard `0000N` of every stage holds the same keys."""
from __future__ import annotations

import pyarrow as pa

# why a sample is not kept; `held_out` = the evaluation split (data.holdout), never a training sample
# no_caption: no usable English caption (empty or null), so no teacher text embedding to learn from
DROP_REASONS = ("bad_embedding", "no_caption", "exact_dup", "near_dup", "semantic_dup", "cluster_cap", "held_out")


def emb_type(dim: int) -> pa.DataType:
    return pa.list_(pa.float16(), dim)


def embed_schema(dim: int) -> pa.Schema:
    """embed/0000N.parquet: the teacher's view of each decodable pair (L2-normalised, float16)."""
    fields = [
        pa.field("key", pa.string(), nullable=False),
        pa.field("image_emb", emb_type(dim)),
        pa.field("text_emb", emb_type(dim)),
        pa.field("text_emb_zh", emb_type(dim)),        # null when the pair has no Chinese caption
        pa.field("image_hash", pa.string()),            # sha256 of the decoded RGB pixels
    ]
    return pa.schema(fields, metadata={b"dim": str(dim).encode()})


BALANCE_SCHEMA = pa.schema([
    pa.field("key", pa.string(), nullable=False),
    pa.field("kept", pa.bool_(), nullable=False),
    pa.field("drop_reason", pa.string()),               # one of DROP_REASONS, null when kept
    pa.field("dup_of", pa.string()),                    # the kept key this one duplicates
    pa.field("balance_cluster", pa.int32()),
])

CLUSTER_SCHEMA = pa.schema([
    pa.field("key", pa.string(), nullable=False),
    pa.field("cluster_id", pa.int32(), nullable=False),
    pa.field("cluster_sim", pa.float32()),              # cosine to the assigned centroid
])

# download/0000N.parquet is img2dataset's own table; the columns later stages read from it:
DOWNLOAD_COLUMNS = ("key", "status", "error_message", "caption", "url")
# what img2dataset adds beside the URL list's columns (sha256: the hash it computes)
DOWNLOADER_COLUMNS = ("key", "status", "error_message", "width", "height", "original_width", "original_height",
                      "exif", "sha256")


def reserved_columns() -> set[str]:
    """Column names the stages write themselves: a URL-list column of that name (beside url, caption and
    caption_zh, which are renamed to these) would be overwritten or doubled on the way."""
    return ({"url", "caption", "caption_zh"} | set(DOWNLOADER_COLUMNS) | set(embed_schema(1).names)
            | set(BALANCE_SCHEMA.names) | set(CLUSTER_SCHEMA.names))

OOM_SHARD = 5  # shard names 00000 … 99999


def shard_name(i: int) -> str:
    return f"{i:0{OOM_SHARD}d}"


def shard_stats_name(shard: str) -> str:
    """A unit's stats file, written after its outputs: the unit's done-marker."""
    return f"{shard}_stats.json"


def stage_shards(store, ext: str = "parquet") -> list[str]:
    """The shard ids (`0000N.<ext>`) of a finished stage's folder, all that its stats.json counts: a shard
    removed or moved since would otherwise be skipped in silence by every stage after it."""
    from .errors import StageError

    names = [n[:-len(ext) - 1] for n in store.glob(f"[0-9]*.{ext}")]
    want = store.read_json("stats.json").get("shards") if store.exists("stats.json") else None
    if isinstance(want, int) and len(names) != want:
        raise StageError(f"{store.uri} holds {len(names)} shard files (0000N.{ext}) where its stats.json counts {want}: "
                         "files were removed, moved or added since the stage finished; restore them, or redo that "
                         "stage with --force")
    return names


def download_shards(store) -> list[str]:
    """The shard ids of a download folder (every later stage keeps them)."""
    return stage_shards(store, "tar")


def as_float32(a):
    """float16 -> float32, the same values as numpy's astype (every float16 is a float32) in about a third of
    its time: torch's conversion is vectorised, numpy's goes value by value."""
    import warnings

    import numpy as np

    if a.dtype != np.float16 or not a.size:
        return a.astype(np.float32)
    import torch

    with warnings.catch_warnings():  # a read-only array (Arrow's buffers): read, never written
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.ascontiguousarray(a)).float().numpy()


def emb_matrix(col: pa.ChunkedArray | pa.Array, dtype=None):
    """A fixed-size-list float16 column to an (N, D) float32 array (`dtype` float16: the stored values as they
    are); null rows become NaN."""
    import numpy as np

    dtype = np.dtype(dtype or np.float32)
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    d = col.type.list_size
    flat = col.flatten().to_numpy(zero_copy_only=False)
    flat = as_float32(flat) if dtype == np.float32 else flat.astype(dtype, copy=False)
    if col.null_count:
        out = np.full((len(col), d), np.nan, dtype)
        valid = ~col.is_null().to_numpy(zero_copy_only=False)
        out[valid] = flat.reshape(-1, d) if len(flat) == valid.sum() * d else flat.reshape(len(col), d)[valid]
        return out
    return flat.reshape(len(col), d)


def join_on_key(left: pa.Table, right: pa.Table, key: str = "key") -> pa.Table:
    """Inner join by key that keeps left's order (Arrow's hash join cannot carry fixed-size-list columns)."""
    pos = {k: i for i, k in enumerate(right.column(key).to_pylist())}
    li, ri = [], []
    for i, k in enumerate(left.column(key).to_pylist()):
        j = pos.get(k)
        if j is not None:
            li.append(i)
            ri.append(j)
    lt = left.take(pa.array(li, pa.int64()))
    rt = right.take(pa.array(ri, pa.int64())).drop([key])
    for name in rt.column_names:
        lt = lt.append_column(rt.schema.field(name), rt.column(name))
    return lt


HOLDOUT_FIELDS = ("data.holdout", "data.holdout_fraction", "seed")  # what decides the evaluation split


def has_holdout(cfg) -> bool:
    return bool(cfg.data.holdout) or cfg.data.holdout_fraction > 0


def require_holdout_column(col: str, names: list[str]) -> None:
    from .errors import StageError

    if col not in names:
        raise StageError(f"data.holdout: column {col!r} is not in the download table (columns: {names}); add it "
                         "to data.extra_cols")


def holdout_mask(cfg, table: pa.Table) -> pa.Array:
    """Which rows of a table (with `key`, and the `data.holdout` column when set) are the held-out evaluation
    split: `data.holdout` = COL=VALUE, else a `data.holdout_fraction` of keys chosen by a seeded hash (the same
    keys in every stage and every run)."""

    import pyarrow.compute as pc

    from .errors import StageError

    holdout, fraction = cfg.data.holdout, cfg.data.holdout_fraction
    if holdout:
        col, _, value = holdout.partition("=")
        require_holdout_column(col, table.column_names)
        values = table.column(col)
        if not pa.types.is_string(values.type):  # `group=1` on an integer column compares its text
            try:
                values = pc.cast(values, pa.string())
            except (pa.ArrowNotImplementedError, pa.ArrowInvalid):
                raise StageError(f"data.holdout: column {col!r} holds {values.type} values, not single values "
                                 f"to compare with {value!r}") from None
        return pc.fill_null(pc.equal(values, value), False)
    if fraction <= 0:
        return pa.array([False] * table.num_rows, pa.bool_())
    cut = int(fraction * 2 ** 64)
    return pa.array([key_hash(cfg.seed, k) < cut
                     for k in table.column("key").to_pylist()], pa.bool_())


H_SPAN = 1 << 64       # key hashes are uint64


def key_hash(seed: int, key: str) -> int:
    """A seeded uint64 hash of a key: ordering or cutting by it is a seeded permutation or sample."""
    import hashlib

    return int.from_bytes(hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest(), "big")
