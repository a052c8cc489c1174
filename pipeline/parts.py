"""Global work done on disk in buckets (pack's shuffle, balance's hash and cluster partitions): every input
shard writes one *part*, its rows sorted by a bucket column in small row groups; a later task reads one
bucket range from every part, and the row-group statistics let it skip the rest of each file. Memory is
bounded by one shard (scatter) or one bucket range (gather), never by the dataset."""
from __future__ import annotations

import hashlib

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cidistill.core.errors import StageError
from cidistill.core.stage import TaskResult
from cidistill.core.store import Store

H_SPAN = 1 << 64       # key hashes are uint64


def key_hash(seed: int, key: str) -> int:
    """A seeded uint64 hash of a key: ordering or cutting by it is a seeded permutation or sample."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest(), "big")


def write_part(store: Store, name: str, table: pa.Table, sort_by: list[tuple[str, str]],
               row_group_size: int = 1024) -> None:
    """One part: `table` sorted by `sort_by`, written atomically in row groups of `row_group_size`."""
    sink = pa.BufferOutputStream()
    pq.write_table(table.sort_by(sort_by), sink, row_group_size=row_group_size, compression="zstd")
    store.write_bytes(name, sink.getvalue().to_pybytes())


def in_range(column: str, lo: int, hi: int | None, typ: pa.DataType) -> pc.Expression:
    """lo <= column < hi (hi None: no upper bound), as a filter the row-group statistics can prune by."""
    flt = pc.field(column) >= pa.scalar(lo, typ)
    return flt if hi is None else flt & (pc.field(column) < pa.scalar(hi, typ))


def read_parts(store: Store, names: list[str], flt: pc.Expression, columns: list[str] | None = None,
               schema: pa.Schema | None = None) -> pa.Table:
    """The rows of every part that pass `flt`, concatenated in the order of `names`."""
    tables = []
    for n in names:
        with store.fs.open(store.path(n), "rb") as f:
            tables.append(pq.read_table(f, filters=flt, columns=columns, schema=schema))
    return pa.concat_tables(tables) if tables else pa.table({})


def cut_ranges(total: int, per: int, span: int = H_SPAN) -> list[tuple[int, int]]:
    """[0, span) cut into equal ranges holding about `per` of `total` uniformly spread rows each."""
    n = max(1, round(total / max(1, per)))
    return [(j * span // n, (j + 1) * span // n) for j in range(n)]


def raise_failed(stage: str, results: list[TaskResult]) -> None:
    bad = [r for r in results if not r.ok]
    if bad:
        raise StageError(f"{stage}: {len(bad)} task(s) failed: {bad[0].item}: {bad[0].error.splitlines()[0]}")


def sample_cuts(total: int, want: int, aside: int) -> tuple[int, int]:
    """Hash cuts for a seeded sample of about `want` of `total` rows (key_hash < cut; every row when want >=
    total) and a held-aside sample of about `aside` more (cut <= key_hash < aside_hi)."""
    if total <= 0 or want >= total:
        return H_SPAN, H_SPAN
    cut = want * H_SPAN // total
    return cut, min(H_SPAN, cut + aside * H_SPAN // total)
