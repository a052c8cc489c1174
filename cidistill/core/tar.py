"""A tar reader for webdataset shards (the download stage's and the curated dataset's): each regular member's
path and size, the file positioned at its data. Parsed here rather than by `tarfile`, whose per-member Python
cost was a third of the training loader's time; a corrupt or cut-off shard is a one-line StageError naming it."""
from __future__ import annotations

from typing import Iterator

from .errors import StageError


def tar_members(f, name: str) -> Iterator[tuple[str, int]]:
    """(path, size) of each regular file of a tar (ustar, GNU long names, pax paths), the file positioned at
    its data: the caller may read its `size` bytes (read_exact) or nothing. Checksums are verified as tarfile does."""
    long_name = None
    while True:
        hdr = f.read(512)
        if len(hdr) < 512 or hdr.count(0) == 512:
            if hdr and hdr.count(0) != len(hdr):
                raise StageError(f"{name}: truncated tar header")
            return
        stored = _octal(hdr[148:156], name)
        unsigned = 256 + sum(hdr[:148]) + sum(hdr[156:])
        if stored != unsigned and stored != unsigned - 256 * sum(b > 127 for b in hdr[:148] + hdr[156:]):
            raise StageError(f"{name}: bad checksum in a tar header (the shard is corrupt)")
        size, kind = _tar_size(hdr[124:136], name), hdr[156:157]
        if kind in (b"L", b"x"):
            data = read_exact(f, size, name)
            f.seek(-size % 512, 1)
            long_name = data.rstrip(b"\0").decode("utf-8", "replace") if kind == b"L" else _pax_path(data, name) or long_name
            continue
        path = long_name or _ustar_path(hdr)
        long_name = None
        if kind in (b"0", b"\0") and not path.endswith("/"):
            start = f.tell()
            yield path, size
            f.seek(start + size + (-size % 512))  # the next header, whatever the caller read
        else:  # directories, links, pax globals, GNU long link names: no sample data
            f.seek(size + (-size % 512), 1)


def read_exact(f, size: int, name: str) -> bytes:
    data = f.read(size)
    if len(data) != size:
        raise StageError(f"{name}: unexpected end of the tar (truncated shard)")
    return data


def _octal(field: bytes, name: str) -> int:
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text or b"0", 8)
    except ValueError:
        raise StageError(f"{name}: invalid number in a tar header (the shard is corrupt)") from None


def _tar_size(field: bytes, name: str) -> int:
    if field[0] in (0o200, 0o377):  # GNU base-256 for sizes of 8 GiB and more
        n = int.from_bytes(field[1:], "big")
        return n - (256 ** 11) if field[0] == 0o377 else n
    return _octal(field, name)


def _ustar_path(hdr: bytes) -> str:
    path = hdr[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
    prefix = hdr[345:500].split(b"\0", 1)[0] if hdr[257:263] == b"ustar\0" else b""
    return f"{prefix.decode('utf-8', 'replace')}/{path}" if prefix else path


def _pax_path(data: bytes, name: str) -> str | None:
    """The `path` record of a pax extended header ("LEN path=VALUE\n" records)."""
    pos, path = 0, None
    while pos < len(data) and data[pos:pos + 1] != b"\0":
        try:
            space = data.index(b" ", pos)
            length = int(data[pos:space])
        except ValueError:
            raise StageError(f"{name}: malformed pax header in the tar (the shard is corrupt)") from None
        if length <= space - pos:
            raise StageError(f"{name}: malformed pax header in the tar (the shard is corrupt)")
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        if key == b"path":
            path = value.decode("utf-8", "replace")
        pos += length
    return path
