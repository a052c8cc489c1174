"""One `Store` over any fsspec URI (a local path, s3://, gs://, memory://): atomic writes, JSON and parquet
helpers, and URI joins that keep the scheme (pathlib would turn `s3://b/run` into `s3:/b/run`)."""
from __future__ import annotations

import json
import os
import uuid
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from . import faults
from .errors import StageError


class StoreError(StageError):
    """A store's file cannot be read as what it should be (raised with the file's URI in the message)."""


def join(root: str, *parts: str) -> str:
    """`root/part/...` for a local path or a URI; the scheme and its `//` stay as they are."""
    out = str(root).rstrip("/")
    for p in parts:
        out = f"{out}/{str(p).strip('/')}"
    return out


class Store:
    """A folder on a local path or any fsspec URI (s3://, gs://, memory://)."""

    def __init__(self, root: str):
        self.fs, self.root = fsspec.core.url_to_fs(str(root))
        self.uri = str(root)
        self.fs.makedirs(self.root, exist_ok=True)

    def path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def url(self, name: str) -> str:
        """Path usable by other libraries (pyarrow, img2dataset): the URI form for remote stores."""
        return self.path(name) if self.local else f"{self.fs.unstrip_protocol(self.path(name))}"

    @property
    def local(self) -> bool:
        return "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))

    def exists(self, name: str) -> bool:
        return self.fs.exists(self.path(name))

    def glob(self, pattern: str) -> list[str]:
        """Names (relative to the folder) matching pattern, sorted."""
        root = self.root.rstrip("/")
        return sorted(p[len(root) + 1:] for p in self.fs.glob(f"{root}/{pattern}"))

    def write_bytes(self, name: str, data: bytes) -> None:
        """Atomic: write under a temporary name in the same folder, then rename into place."""
        final = self.path(name)
        tmp = f"{final}.tmp-{uuid.uuid4().hex[:8]}"
        self.fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)  # `--force` may have removed the folder
        try:
            with self.fs.open(tmp, "wb") as f:
                f.write(data)
                if self.local:
                    f.flush()
                    os.fsync(f.fileno())
            faults.point()  # a crash here leaves only the temp file, which the next run removes
            self.fs.mv(tmp, final)
        except BaseException:
            if self.fs.exists(tmp):
                self.fs.rm(tmp)
            raise

    def write_json(self, name: str, obj: Any) -> None:
        self.write_bytes(name, json.dumps(obj, indent=1, sort_keys=True, default=_json_default).encode())

    def read_json(self, name: str) -> Any:
        with self.fs.open(self.path(name), "rb") as f:
            return json.load(f)

    def write_table(self, name: str, table: pa.Table) -> None:
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        self.write_bytes(name, sink.getvalue().to_pybytes())

    def read_table(self, name: str, columns: list[str] | None = None) -> pa.Table:
        try:
            with self.fs.open(self.path(name), "rb") as f:
                return pq.read_table(f, columns=columns)
        except (pa.ArrowInvalid, OSError) as e:
            raise StoreError(f"{self.url(name)}: not a readable parquet file ({e})") from e

    def num_rows(self, name: str) -> int:
        """A parquet file's row count, from its footer alone."""
        try:
            with self.fs.open(self.path(name), "rb") as f:
                return pq.ParquetFile(f).metadata.num_rows
        except (pa.ArrowInvalid, OSError) as e:
            raise StoreError(f"{self.url(name)}: not a readable parquet file ({e})") from e

    def rm(self, name: str) -> None:
        if self.exists(name):
            self.fs.rm(self.path(name), recursive=True)

    def clear(self) -> None:
        """Remove everything in the folder (a stage redone from scratch)."""
        for n in self.glob("*"):
            self.rm(n)

    def clean_temps(self) -> int:
        """Remove temp files a killed run left behind."""
        tmps = sorted(set(self.glob("*.tmp-*")) | set(self.glob("**/*.tmp-*")))  # in sub-folders too
        for t in tmps:
            if self.fs.exists(self.path(t)):  # not inside a temp folder removed just before
                self.fs.rm(self.path(t), recursive=True)  # a folder too (a checkpoint being written)
        return len(tmps)


def _json_default(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
