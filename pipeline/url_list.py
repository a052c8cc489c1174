"""The input URL list: the files `data.urls` names (parquet; csv or tsv with a header row; JSON lines: the formats
img2dataset reads), their columns checked from footers or header rows, read as a stream of bounded batches,
and its text columns made plain UTF-8 strings (categorical columns, binary captions, over-long captions,
carried values a json cannot hold: each counted)."""
from __future__ import annotations

import json
import os
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq

from cidistill.core.errors import StageError


# the formats img2dataset reads a URL list in (with a header row), each optionally compressed (.gz, .zst, …)
FORMATS = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "json", ".json": "json"}
COMPRESSED = (".gz", ".bz2", ".xz", ".zst")


def _named_format(f: str) -> str | None:
    """The format a file's name says (a compression suffix aside), or None."""
    name = f.lower()
    for c in COMPRESSED:
        name = name.removesuffix(c)
    return next((k for ext, k in FORMATS.items() if name.endswith(ext)), None)


def _format(f: str) -> str:
    """A file's format by its name; a name we do not know is read as parquet (its check says if it is not)."""
    return _named_format(f) or "parquet"


def url_files(urls: str):
    """(filesystem, the files data.urls names: a file, a folder (its files of the formats above) or a glob)."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(urls)
        if fs.isfile(path):  # a name that only looks like a pattern (`urls[2024].csv`) is that file
            files = [path]
        elif fs.isdir(path):
            files = sorted(e["name"] for e in fs.ls(path, detail=True)
                           if e["type"] == "file" and _named_format(e["name"]))
        elif any(c in path for c in "*?["):
            files = sorted(fs.glob(path))
        else:
            files = []
    except Exception as e:  # a host that does not answer, a bucket without access, an unknown protocol
        cause = " ".join(str(e).split()) or type(e).__name__
        raise StageError(f"data.urls: cannot read {urls!r}: {type(e).__name__}: {cause[:300]}") from None
    if not files:
        where = "" if "://" in urls or os.path.isabs(urls) else f" (relative paths start at the current folder, {os.getcwd()})"
        raise StageError(f"data.urls: no URL list (parquet, csv, tsv or jsonl) found at {urls!r}{where}")
    return fs, files


URL_BATCH = 65536   # rows of the URL list read at a time (repeated URLs are rejected within a batch)
TEXT_BLOCK = 8 << 20  # bytes of a csv/tsv/jsonl file parsed at a time


def _unreadable(f: str, kind: str, e: Exception) -> StageError:
    what = "a parquet file" if kind == "parquet" else f"readable as {kind} with a header row" if kind != "json" \
        else "readable as JSON lines"
    return StageError(f"data.urls: {f} is not {what} ({str(e).splitlines()[0][:160]})")


def _open(fs, f: str):
    return fs.open(f, "rb", compression=None if _format(f) == "parquet" else "infer")


def _text_reader(fh, f: str, kind: str, types: dict[str, pa.DataType] | None = None, block: int = TEXT_BLOCK):
    """A streaming reader of a csv/tsv/jsonl file; `types`: columns read as those types, the others (csv: none
    read; jsonl: inferred) as they come."""
    import pyarrow.csv as pcsv
    import pyarrow.json as pjson

    if kind == "json":
        schema = pa.schema(list(types.items())) if types else None
        return pjson.open_json(fh, read_options=pjson.ReadOptions(block_size=block),
                               parse_options=pjson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="infer"))
    # quoted values may hold newlines and delimiters, as pandas writes them (img2dataset reads with pandas)
    parse = pcsv.ParseOptions(delimiter="\t" if kind == "tsv" else ",", newlines_in_values=True)
    convert = pcsv.ConvertOptions(column_types=types or {}, include_columns=list(types or {}))
    return pcsv.open_csv(fh, read_options=pcsv.ReadOptions(block_size=block), parse_options=parse, convert_options=convert)


def _schema(fs, f: str) -> pa.Schema:
    """A file's columns: a parquet file's from its footer; a text file's from its header row (csv, tsv: every
    value is text) or its first block of lines (jsonl)."""
    kind = _format(f)
    with _open(fs, f) as fh:
        try:
            if kind == "parquet":
                return pq.ParquetFile(fh).schema_arrow
            names = _text_reader(fh, f, kind, block=1 << 20).schema
            return names if kind == "json" else pa.schema([(n, pa.string()) for n in names.names])
        except (pa.ArrowInvalid, OSError, EOFError, UnicodeDecodeError) as e:
            raise _unreadable(f, kind, e) from None


def _batches(fs, f: str, columns: list[str], text: list[str]):
    """The file's rows of `columns` as tables of at most URL_BATCH rows. A csv/tsv file's URLs (text[0]) are read
    as text and its other columns as bytes, which clean_text_columns decodes (invalid UTF-8 replaced and
    counted, as in parquet); a JSON file's `text` columns as text, the others as their JSON types."""
    kind = _format(f)
    with _open(fs, f) as fh:
        try:
            if kind == "parquet":
                for b in pq.ParquetFile(fh).iter_batches(batch_size=URL_BATCH, columns=columns):
                    yield pa.Table.from_batches([b])
                return
            types = {c: pa.string() for c in text} if kind == "json" else \
                {c: pa.string() if c == text[0] else pa.binary() for c in columns}
            reader = _text_reader(fh, f, kind, types)
            pending, rows = [], 0
            for b in reader:
                pending.append(b.select(columns))
                rows += b.num_rows
                while rows >= URL_BATCH:  # the same batches as a parquet list: repeats are caught within one
                    t = pa.Table.from_batches(pending).combine_chunks()
                    yield t.slice(0, URL_BATCH)
                    pending, rows = t.slice(URL_BATCH).to_batches(), rows - URL_BATCH
            if rows:
                yield pa.Table.from_batches(pending).combine_chunks()
        except (pa.ArrowInvalid, OSError, EOFError, UnicodeDecodeError) as e:
            raise _unreadable(f, kind, e) from None


def first_columns(urls: str) -> list[str]:
    """The column names of the URL list's first file."""
    fs, files = url_files(urls)
    return _schema(fs, files[0]).names


def _is_text(tp: pa.DataType) -> bool:
    if pa.types.is_dictionary(tp):  # a categorical column (pandas, polars) of text
        return _is_text(tp.value_type)
    return any(f(tp) for f in (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary,
                               pa.types.is_large_binary, pa.types.is_null))


def read_url_batches(urls: str, columns: list[str], text: dict[str, str]):
    """Each file of the URL list as a stream of tables of at most URL_BATCH rows (bounded memory). `text`:
    the columns that must hold text (the setting naming each; the first is the URL's)."""
    fs, files = url_files(urls)
    for f in files:
        _check_schema(f, _schema(fs, f), columns, text)
        yield f, _batches(fs, f, columns, list(text))


def _check_schema(f: str, schema: pa.Schema, columns: list[str], text: dict[str, str]) -> None:
    missing = [c for c in columns if c not in schema.names]
    if missing:  # CC3M's tsv, for one, ships without a header: its first row would be read as one
        hint = " (a csv or tsv list needs a header row naming its columns)" if _format(f) in ("csv", "tsv") else ""
        raise StageError(f"{f}: missing column(s) {missing}; has {schema.names}{hint}")
    for col, key in text.items():
        if col in schema.names and not _is_text(schema.field(col).type):
            raise StageError(f"{f}: {key} {col!r} holds {schema.field(col).type} values, not text")


def check_url_list(urls: str, columns: list[str], text: dict[str, str]) -> None:
    """Every file of the URL list is readable with the columns a shard carries (parquet footers, text files'
    header rows: no rows read)."""
    fs, files = url_files(urls)
    for f in files:
        _check_schema(f, _schema(fs, f), columns, text)


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
            if long:
                fixed[f"{name}_truncated"] += long
            values = [v[:max_chars] if v is not None else None for v in values]
            table = table.set_column(table.column_names.index(name), name, pa.array(values, pa.string()))
    return table
