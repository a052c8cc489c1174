"""One `Store` over any fsspec URI (a local path, s3://, gs://, memory://): atomic writes, JSON and parquet
helpers, and URI joins that keep the scheme (pathlib would turn `s3://b/run` into `s3:/b/run`)."""
from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
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


# environment a Ray worker needs to reach the same stores as the driver (endpoints, regions, profiles)
STORAGE_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE",
               "GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT")


def use_storage_options(options: dict) -> None:
    """The config's per-protocol fsspec options, for every store this process opens from now on."""
    for proto, opts in options.items():
        fsspec.config.conf.setdefault(proto, {}).update(opts)


def storage_env() -> dict[str, str]:
    """What Ray workers get so that their stores open like the driver's: fsspec's settings (from FSSPEC_*
    variables and the config's storage_options) and the cloud SDKs' non-secret settings. Keys and secrets
    are left to each node's own environment, ~/.aws or role, unless the config names them."""
    env = {k: v for k, v in os.environ.items() if k in STORAGE_ENV}
    env.update({f"FSSPEC_{proto.upper()}": json.dumps(opts) for proto, opts in fsspec.config.conf.items()
                if isinstance(opts, dict) and opts})
    return env


def open_checked(root: str, probe: bool = True) -> Store:
    """The store at `root`, its access tried once (a small object written, read and removed when `probe`):
    wrong credentials, a missing bucket or an unreachable endpoint fail here, in one line that names the
    bucket and the cause, never a secret."""
    try:
        store = Store(root)
        if probe and not store.local:
            name = f"_probe-{uuid.uuid4().hex[:8]}"
            store.write_bytes(name, b"ok")
            store.read_bytes(name)
            store.rm(name)
        return store
    except StageError:
        raise
    except Exception as e:  # the SDKs raise many kinds: PermissionError, NoCredentialsError, ClientError, ...
        raise StoreError(access_error(str(root), e)) from None


def access_error(root: str, e: BaseException) -> str:
    scheme, _, rest = str(root).partition("://")
    where = f"bucket {rest.split('/', 1)[0]!r} of {root}" if rest else root
    if isinstance(e, (FileExistsError, NotADirectoryError)) and not rest:  # a file given where a folder goes
        return f"cannot use {root}: {getattr(e, 'filename', None) or root} is a file, not a folder"
    cause = redact(" ".join(str(e).split()) or type(e).__name__)  # before it is cut: no half secret shown
    return f"cannot use {redact(where)}: {type(e).__name__}: {cause[:300]}"


SECRET_WORDS = ("secret", "key", "token", "password", "credential")  # storage options never shown


class DamagedFile(StoreError):
    """A JSON file of a run's own that cannot be read back (cut short, overwritten)."""


def split_uri(uri: str) -> tuple[str, str]:
    """(folder, file name) of a local path or a URI, the scheme kept on the folder."""
    return tuple(str(uri).rstrip("/").rsplit("/", 1)) if "/" in str(uri) else (".", str(uri))


# secrets a URI may carry: a password in its user part, a signature or token in its query (presigned S3, GCS
# and Azure SAS URLs, `?token=`): never printed or written (a URL list or a checkpoint given as such a URL)
_URI_PASSWORD = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^/\s:@'\"]*):([^/\s@'\"]+)@")
_URI_SECRET_PARAM = re.compile(r"(?i)([?&;][^=&\s'\"#?]*(?:sig|token|secret|key|credential|password|auth)[^=&\s'\"#?]*=)"
                               r"[^&\s'\"#]+")


def redact(text: str) -> str:
    """`text` with the secrets of any URI in it (and the environment's storage secrets) replaced by ***."""
    text = _URI_SECRET_PARAM.sub(r"\1***", _URI_PASSWORD.sub(r"\1:***@", text))
    for secret in _secrets():
        text = text.replace(secret, "***")
    return text


def redacted(value: Any) -> Any:
    """A config value (a string, or lists and mappings of them) with redact() applied to every string."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, list):
        return [redacted(v) for v in value]
    if isinstance(value, dict):
        return {k: redacted(v) for k, v in value.items()}
    return value


def _secrets() -> list[str]:
    vals = [os.environ.get(k, "") for k in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")]
    for opts in fsspec.config.conf.values():
        if isinstance(opts, dict):
            vals += [str(v) for k, v in opts.items() if any(w in k.lower() for w in SECRET_WORDS if w != "key")]
    return [v for v in vals if len(v) >= 4]


def absolute(root: str) -> str:
    """A local path made absolute (Ray workers run elsewhere); a URI as it is."""
    return root if "://" in str(root) else str(Path(root).resolve())


def dictionary_columns(schema: pa.Schema) -> list[str]:
    """The columns parquet should dictionary-encode: all but vectors (floating point, or raw fixed-size
    bytes). An embedding's float16 values fill a dictionary without shrinking the file, and decode 7x slower
    through it (0.235 vs 0.032 s for 10,000 x 512)."""
    def vector(t: pa.DataType) -> bool:
        while pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
            t = t.value_type
        return pa.types.is_floating(t) or pa.types.is_fixed_size_binary(t)

    return [n for f in schema if not vector(f.type) for n in (f.name, f"{f.name}.list.element")]


def null_free(md: pq.FileMetaData, column: str) -> bool:
    """True when a footer's statistics prove `column` holds no null (every row group counted, none found);
    False when it has some or the writer left no counts."""
    leaves = [i for i in range(md.num_columns) if md.schema.column(i).path.split(".")[0] == column]
    stats = [md.row_group(g).column(i).statistics for g in range(md.num_row_groups) for i in leaves]
    return bool(leaves) and all(st is not None and st.has_null_count and st.null_count == 0 for st in stats)


class Store:
    """A folder on a local path or any fsspec URI (s3://, gs://, memory://)."""

    def __init__(self, root: str, create: bool = True):
        """`create=False`: the folder is made by the first write into it, not here (a stage that is only
        planned or checked, or an input read, leaves no empty folder behind)."""
        # no cached listings: other processes (Ray workers, other nodes) write into the same folders, and a
        # stale listing makes an object they wrote look missing
        self.fs, self.root = fsspec.core.url_to_fs(str(root), **({} if "://" not in str(root) or str(root).startswith(
            "file://") else {"use_listings_cache": False}))
        self.uri = str(root)
        if create:
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
        """Names (relative to the folder) matching pattern, sorted. The folder's own path is taken as it is
        (a work folder named `exp[1]` or `what?` holds what it holds; unescaped, fsspec read them as a pattern)."""
        root = self.root.rstrip("/")
        return sorted(p[len(root) + 1:] for p in self.fs.glob(f"{glob.escape(root)}/{pattern}"))

    def write_bytes(self, name: str, data: bytes) -> None:
        """Atomic. A local folder: write under a temporary name beside it, then rename into place. An object
        store: one PUT (an object appears whole or not at all; a rename there would be a copy)."""
        final = self.path(name)
        if not self.local:
            faults.point()
            self.fs.pipe_file(final, data)
            return
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

    @contextlib.contextmanager
    def open_atomic(self, name: str):
        """A file to stream into, published whole when the block ends: locally under a temporary name then
        renamed; on an object store the upload itself (the object appears only once it completes)."""
        final = self.path(name)
        if not self.local:
            f = self.fs.open(final, "wb")
            try:
                yield f
            except BaseException:
                f.discard()  # abort the upload: closing would publish what was written so far
                f.closed = True  # nothing left to flush, now or when the file object is collected
                raise
            f.close()
            return
        tmp = f"{final}.tmp-{uuid.uuid4().hex[:8]}"
        self.fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
        try:
            with self.fs.open(tmp, "wb") as f:
                yield f
            self.fs.mv(tmp, final)
        finally:
            if self.fs.exists(tmp):
                self.fs.rm(tmp)

    def write_json(self, name: str, obj: Any) -> None:
        self.write_bytes(name, json.dumps(obj, indent=1, sort_keys=True, default=_json_default).encode())

    def read_bytes(self, name: str) -> bytes:
        return self.fs.cat_file(self.path(name))

    def put_folder(self, src: Path, name: str, last: str = "") -> None:
        """Publish local folder `src` as `name`. A local store: copied under a temporary name, renamed into
        place (whole or not at all). An object store: file by file, `last` (the file that makes it usable)
        after every other."""
        files = sorted(p for p in Path(src).rglob("*") if p.is_file())
        if self.local:
            final = Path(self.path(name))
            tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
            try:
                tmp.mkdir(parents=True)
                for p in files:  # file by file: the first error raised as itself (copytree gathers them all
                    dest = tmp / p.relative_to(src)  # into one shutil.Error, a page of text on a full disk)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(p, dest)
                faults.point()
                if final.exists():
                    shutil.rmtree(final)
                tmp.rename(final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            return
        self.rm(name)
        for p in sorted(files, key=lambda p: p.name == last):
            self.write_bytes(f"{name}/{p.relative_to(src).as_posix()}", p.read_bytes())

    def local_copy(self, name: str) -> Path:
        """A local path to file or folder `name`: itself on a local store; else a copy in this node's cache,
        keyed by the objects' names, sizes and versions (a rewritten object is fetched again)."""
        if self.local:
            return Path(self.path(name))
        src = self.path(name)
        listing = self.fs.find(src, detail=True) or {src: self.fs.info(src)}
        digest = hashlib.sha256(self.url(name).encode())
        for k in sorted(listing):
            v = listing[k]
            digest.update(f"{k}|{v.get('size')}|{v.get('ETag') or v.get('etag') or v.get('mtime') or ''}".encode())
        from .runtime import cache_dir

        dest = cache_dir() / "store" / digest.hexdigest()[:20] / name.rstrip("/").rsplit("/", 1)[-1]
        if not dest.exists():
            tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
            tmp.parent.mkdir(parents=True, exist_ok=True)
            if self.fs.isdir(src):
                for k in listing:
                    target = tmp / k[len(src.rstrip("/")) + 1:]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(self.fs.cat_file(k))
            else:
                tmp.write_bytes(self.fs.cat_file(src))
            try:
                tmp.rename(dest)
            except OSError:  # another process of this node fetched the same copy first
                shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        return dest

    def read_json(self, name: str) -> Any:
        """A JSON file; one cut short or overwritten (a copy of the work folder that stopped) is a StageError
        naming it, not a JSONDecodeError traceback."""
        with self.fs.open(self.path(name), "rb") as f:
            try:
                return json.load(f)
            except ValueError as e:
                raise DamagedFile(f"{self.url(name)} is damaged (not readable JSON: {e}): remove it and rerun "
                                  "(what it marked is redone), or rerun the stage with --force") from None

    def write_table(self, name: str, table: pa.Table, row_group_size: int | None = None,
                    compression: str = "zstd") -> None:
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, row_group_size=row_group_size, compression=compression,
                       use_dictionary=dictionary_columns(table.schema))
        self.write_bytes(name, sink.getvalue().to_pybytes())

    def read_npy(self, name: str) -> np.ndarray:
        """A .npy array (no pickle); one cut short is a StoreError naming it."""
        data = self.read_bytes(name)
        try:
            return np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, EOFError, OSError) as e:
            raise StoreError(f"{self.url(name)}: not a readable .npy array ({e})") from None

    def read_table(self, name: str, columns: list[str] | None = None) -> pa.Table:
        try:
            with self.fs.open(self.path(name), "rb") as f:
                return pq.read_table(f, columns=columns)
        except (pa.ArrowInvalid, OSError) as e:
            raise StoreError(f"{self.url(name)}: not a readable parquet file ({e})") from e

    def num_rows(self, name: str) -> int:
        """A parquet file's row count, from its footer alone."""
        with self.parquet(name) as pf:
            return pf.metadata.num_rows

    @contextlib.contextmanager
    def parquet(self, name: str):
        """A parquet file of this folder opened once (its footer read): read its metadata, then its columns."""
        try:
            with self.fs.open(self.path(name), "rb") as f:
                yield pq.ParquetFile(f)
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
