"""Parquet schemas of every stage's per-shard output, written down once. Every stage imports these.

Shard ids flow unchanged from download to cluster: shard `0000N` of every stage holds the same keys."""
from __future__ import annotations

import pyarrow as pa

# why a sample is not kept; `held_out` = the evaluation split (data.holdout), never a training sample
DROP_REASONS = ("bad_embedding", "exact_dup", "near_dup", "semantic_dup", "cluster_cap", "held_out")


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
