"""Global work done on disk in buckets (pack's shuffle, balance's hash and cluster partitions): every input
shard writes one *part*, its rows sorted by a bucket column in small row groups; a later task reads one
bucket range from every part, and the row-group statistics let it skip the rest of each file. Memory is
bounded by one shard (scatter) or one bucket range (gather), never by the dataset."""
from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cidistill.core.errors import StageError
from cidistill.core.schema import H_SPAN, key_hash  # noqa: F401 (re-exported for the stages)
from cidistill.core.stage import TaskResult
from cidistill.core.store import Store

def write_part(store: Store, name: str, table: pa.Table, sort_by: list[tuple[str, str]],
               row_group_size: int = 1024, compression: str = "zstd") -> None:
    """One part: `table` sorted by `sort_by`, written atomically in row groups of `row_group_size`."""
    store.write_table(name, table.sort_by(sort_by), row_group_size=row_group_size, compression=compression)


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
    # an empty part's untyped (null) column takes the others' type
    return pa.concat_tables(tables, promote_options="default") if tables else pa.table({})


def cut_ranges(total: int, per: int, span: int = H_SPAN, slots: int = 1) -> list[tuple[int, int]]:
    """[0, span) cut into equal ranges holding at most about `per` of `total` uniformly spread rows each, as
    many as a multiple of `slots` (the tasks that run at once: the last wave then fills every core)."""
    n = full_waves(-(-total // max(1, per)), slots)
    return [(j * span // n, (j + 1) * span // n) for j in range(n)]


def full_waves(n: int, slots: int) -> int:
    """n tasks rounded up to a multiple of `slots`."""
    return -(-max(1, n) // max(1, slots)) * max(1, slots)


def raise_failed(stage: str, results: list[TaskResult]) -> None:
    bad = [r for r in results if not r.ok]
    if bad and isinstance(bad[0].exc, OSError) and not isinstance(bad[0].exc, StageError):
        raise bad[0].exc  # a store that cannot be written (disk full): the CLI names it as such
    if bad:
        raise StageError(f"{stage}: {len(bad)} task(s) failed: {bad[0].item}: {bad[0].error.splitlines()[0]}")


def sample_cuts(total: int, want: int, aside: int) -> tuple[int, int]:
    """Hash cuts for a seeded sample of about `want` of `total` rows (key_hash < cut; every row when want >=
    total) and a held-aside sample of about `aside` more (cut <= key_hash < aside_hi)."""
    if total <= 0 or want >= total:
        return H_SPAN, H_SPAN
    cut = want * H_SPAN // total
    return cut, min(H_SPAN, cut + aside * H_SPAN // total)


def save_npy(store: Store, name: str, a: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, a)
    store.write_bytes(name, buf.getvalue())


def load_npy(store: Store, name: str) -> np.ndarray:
    return store.read_npy(name)


def hash_sample(store: Store, name: str, keys: list[str], x: np.ndarray, prepare, seed: int, cut: int,
                aside_hi: int) -> None:
    """A shard's rows of a seeded hash sample (key_hash < cut) and of the held-aside sample (cut <= key_hash <
    aside_hi), `prepare`d (row by row: only the sampled rows are), as `name`.npz: `sample`, `sample_keys`,
    `aside`, `aside_keys` (plain arrays, no pickle)."""
    h = [key_hash(seed, k) for k in keys]  # Python ints: a cut may be 2**64 (everything sampled)
    s = np.array([v < cut for v in h], bool)
    a = np.array([cut <= v < aside_hi for v in h], bool)
    k = np.array(keys, dtype=str) if keys else np.zeros(0, "<U1")
    rows = prepare(x[s | a])
    picked = np.flatnonzero(s | a)
    in_s = s[picked]
    buf = io.BytesIO()
    np.savez(buf, sample=rows[in_s].reshape(-1, rows.shape[1]), sample_keys=k[s],
             aside=rows[~in_s].reshape(-1, rows.shape[1]), aside_keys=k[a])
    store.write_bytes(f"{name}.npz", buf.getvalue())


def load_sample(store: Store, names: list[str], drop: set[str] = frozenset()) -> tuple[np.ndarray, np.ndarray]:
    """(sample, aside) rows of every `name`.npz, in the order of `names`, minus rows whose key is in `drop`."""
    out: dict[str, list] = {"sample": [], "aside": []}
    for n in names:
        with store.fs.open(store.path(f"{n}.npz"), "rb") as f:
            z = np.load(io.BytesIO(f.read()), allow_pickle=False)
            for part in out:
                keep = np.array([k not in drop for k in z[f"{part}_keys"]], bool) if drop else slice(None)
                out[part].append(z[part][keep])
    return tuple(np.concatenate(v) if v else np.zeros((0, 1), np.float32) for v in out.values())


def f16_blob(x: np.ndarray) -> pa.Array:
    """float16 rows as fixed-size binary (parquet moves them as raw bytes, several times faster than a
    float16 list column, and they come back bit for bit)."""
    x = np.ascontiguousarray(x, np.float16)
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(2 * x.shape[1]), len(x), [None, pa.py_buffer(x.tobytes())])


def f16_rows(col, width: int) -> np.ndarray:
    """`f16_blob` back to an (N, width) float16 array."""
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if not len(col):
        return np.zeros((0, width), np.float16)
    buf = col.buffers()[1]
    return np.frombuffer(buf, np.float16, count=len(col) * width, offset=col.offset * 2 * width).reshape(len(col), width)
