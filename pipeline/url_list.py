"""The input URL list: the parquet files `data.urls` names, their schema checked from the footers, read as a
stream of bounded batches, and its text columns made plain UTF-8 strings (categorical columns, binary
captions, over-long captions, carried values a json cannot hold: each counted)."""
from __future__ import annotations

import json
import os
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq

from cidistill.core.errors import StageError


def url_files(urls: str):
    """(filesystem, the parquet files data.urls names: a file, a folder or a glob)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(urls)
    if fs.isdir(path):
        files = sorted(fs.glob(path.rstrip("/") + "/*.parquet"))
    elif any(c in path for c in "*?["):
        files = sorted(fs.glob(path))
    else:
        files = [path] if fs.exists(path) else []
    if not files:
        where = "" if "://" in urls or os.path.isabs(urls) else f" (relative paths start at the current folder, {os.getcwd()})"
        raise StageError(f"data.urls: no parquet file found at {urls!r}{where}")
    return fs, files


URL_BATCH = 65536   # rows of the URL list read at a time (repeated URLs are rejected within a batch)


def _parquet(fh, f: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(fh)
    except (pa.ArrowInvalid, OSError) as e:
        raise StageError(f"data.urls: {f} is not a parquet file ({str(e).splitlines()[0][:120]})") from None


def first_columns(urls: str) -> list[str]:
    """The column names of the URL list's first file."""
    fs, files = url_files(urls)
    with fs.open(files[0], "rb") as fh:
        return _parquet(fh, files[0]).schema_arrow.names


def _is_text(tp: pa.DataType) -> bool:
    if pa.types.is_dictionary(tp):  # a categorical column (pandas, polars) of text
        return _is_text(tp.value_type)
    return any(f(tp) for f in (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary,
                               pa.types.is_large_binary, pa.types.is_null))


def read_url_batches(urls: str, columns: list[str], text: dict[str, str]):
    """Each file of the URL list as a stream of tables of at most URL_BATCH rows (bounded memory). `text`:
    the columns that must hold text (the setting naming each)."""
    fs, files = url_files(urls)
    for f in files:
        with fs.open(f, "rb") as fh:
            pf = _parquet(fh, f)
            _check_schema(f, pf.schema_arrow, columns, text)
            yield f, (pa.Table.from_batches([b]) for b in pf.iter_batches(batch_size=URL_BATCH, columns=columns))


def _check_schema(f: str, schema: pa.Schema, columns: list[str], text: dict[str, str]) -> None:
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise StageError(f"{f}: missing column(s) {missing}; has {schema.names}")
    for col, key in text.items():
        if col in schema.names and not _is_text(schema.field(col).type):
            raise StageError(f"{f}: {key} {col!r} holds {schema.field(col).type} values, not text")


def check_url_list(urls: str, columns: list[str], text: dict[str, str]) -> None:
    """Every file of the URL list is parquet with the columns a shard carries (footers only, no rows read)."""
    fs, files = url_files(urls)
    for f in files:
        with fs.open(f, "rb") as fh:
            _check_schema(f, _parquet(fh, f).schema_arrow, columns, text)


def _json_native(tp: pa.DataType) -> bool:
    """A type whose values json.dumps can write as they come out of arrow: img2dataset puts every carried
    column into each sample's json and drops the sample (only printing why) when it cannot."""
    if pa.types.is_dictionary(tp):
        return _json_native(tp.value_type)
    if pa.types.is_map(tp):
        return _json_native(tp.key_type) and _json_native(tp.item_type)
    if pa.types.is_list(tp) or pa.types.is_large_list(tp) or pa.types.is_fixed_size_list(tp):
        return _json_native(tp.value_type)
    if pa.types.is_struct(tp):
        return all(_json_native(tp.field(i).type) for i in range(tp.num_fields))
    return any(f(tp) for f in (pa.types.is_string, pa.types.is_large_string, pa.types.is_integer,
                               pa.types.is_floating, pa.types.is_boolean, pa.types.is_null))


def _as_text(v) -> str | None:
    if v is None or isinstance(v, str):
        return v
    if hasattr(v, "isoformat"):
        return v.isoformat()
    return json.dumps(v, default=str, ensure_ascii=False) if isinstance(v, (list, dict, tuple)) else str(v)


def carry_as_text(table: pa.Table, columns: list[str], as_text: dict[str, str]) -> pa.Table:
    """Carried columns of types a json cannot hold (timestamps, dates, decimals, durations, or lists of them)
    become their text (ISO 8601 for times); `as_text` records each one's original type."""
    for name in columns:
        tp = table.schema.field(name).type
        if not _json_native(tp):
            as_text[name] = str(tp)
            values = [_as_text(v) for v in table.column(name).to_pylist()]
            table = table.set_column(table.column_names.index(name), name, pa.array(values, pa.string()))
    return table


def plain_text(table: pa.Table, name: str) -> pa.Table:
    """A categorical (dictionary-encoded) text column as plain text."""
    col = table.column(name)
    if pa.types.is_dictionary(col.type) and _is_text(col.type):
        table = table.set_column(table.column_names.index(name), name, col.cast(col.type.value_type))
    return table


def clean_text_columns(table: pa.Table, columns: list[str], max_chars: int, fixed: Counter) -> pa.Table:
    """Captions as valid UTF-8 strings of bounded length: binary columns (the only way a parquet file holds
    non-UTF-8 text) are decoded with replacement characters, over-long ones cut; both counted in `fixed`."""
    for name in columns:
        table = plain_text(table, name)
        col = table.column(name)
        if not (pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type) or pa.types.is_string(col.type)
                or pa.types.is_large_string(col.type)):
            continue
        values = col.to_pylist()
        if pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
            out = []
            for v in values:
                if v is None:
                    out.append(None)
                    continue
                try:
                    out.append(v.decode("utf-8"))
                except UnicodeDecodeError:
                    out.append(v.decode("utf-8", errors="replace"))
                    fixed[f"{name}_not_utf8"] += 1
            values = out
        long = sum(1 for v in values if v is not None and len(v) > max_chars)
        if long or not pa.types.is_string(col.type):
            fixed[f"{name}_truncated"] += long
            values = [v[:max_chars] if v is not None else None for v in values]
            table = table.set_column(table.column_names.index(name), name, pa.array(values, pa.string()))
    return table
