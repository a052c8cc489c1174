"""The curated dataset's format (the pack stage writes it, training and evaluation stream it): plain
webdataset shards, so `webdataset.WebDataset(urls)` or open_clip's trainer read them without this project.

One sample = the tar members `KEY.<ext>` sharing a key:
  png|jpg|webp               the image bytes as downloaded
  txt / zh.txt               the English caption (open_clip's caption key) / the Chinese one ("" when absent)
  json                       key, url, cluster_id, cluster_sim, balance_cluster and the kept extra columns
  teacher_image_emb.npy      the teacher's image embedding (float16, L2-normalised)
  teacher_text_emb.npy       … of the English caption
  teacher_text_zh_emb.npy    … of the Chinese caption (absent when there is none)
Beside each `shard-NNNNN.tar` its index `shard-NNNNN.parquet` (key, row, caption, caption_zh) and, for the
whole split, `manifest.parquet` (shard, key, row, caption, caption_zh)."""
from __future__ import annotations

import ast
import functools
import io
import json
import tarfile
from typing import Iterator

import numpy as np

from .errors import StageError
from .images import IMAGE_EXTS

SPLITS = ("train", "eval")
EMB_MEMBERS = {"teacher_image_emb.npy": "t_img", "teacher_text_emb.npy": "t_txt", "teacher_text_zh_emb.npy": "t_txt_zh"}


def shard_file(i: int) -> str:
    return f"shard-{i:05d}"


def npy_bytes(v: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(v, np.float16), allow_pickle=False)
    return buf.getvalue()


def npy_array(b: bytes) -> np.ndarray:
    """An .npy member; a 1-d version-1 array read through its header's cached parse (the loader reads three
    per sample, and np.load parses every header with ast.literal_eval)."""
    if b[:8] == b"\x93NUMPY\x01\x00":
        end = 10 + int.from_bytes(b[8:10], "little")
        parsed = _npy_header(b[10:end])
        if parsed is not None:
            dtype, n = parsed
            return np.frombuffer(b, dtype, count=n, offset=end).copy()
    return np.load(io.BytesIO(b), allow_pickle=False)


@functools.lru_cache(maxsize=64)
def _npy_header(header: bytes) -> tuple[np.dtype, int] | None:
    """(dtype, length) of a 1-d C-order header; None for anything else (np.load then reads it)."""
    try:
        d = ast.literal_eval(header.decode("latin1"))
    except (ValueError, SyntaxError):
        return None
    if not isinstance(d, dict) or d.get("fortran_order") or len(d.get("shape", ())) != 1:
        return None
    dtype = np.dtype(d["descr"])
    return None if dtype.hasobject else (dtype, int(d["shape"][0]))


def tar_bytes(samples: list[dict[str, bytes]]) -> bytes:
    """A tar of samples ({"__key__": key, ext: bytes, …}), members in sample order; headers fixed (mtime 0,
    uid 0) so that the same samples always give the same bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for s in samples:
            key = s["__key__"]
            for ext, data in s.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def iter_tar_samples(store, name: str, skip: int = 0) -> Iterator[dict[str, bytes]]:
    """Samples of one shard in order, streamed (one sample in memory); the first `skip` are passed over
    without being read. Member names are split at their first dot (webdataset's rule), never used as paths."""
    cur: dict[str, bytes] | None = None
    seen = 0
    with store.fs.open(store.path(name), "rb") as f:
        for path, size in tar_members(f, name):
            key, _, ext = path.rsplit("/", 1)[-1].partition(".")
            if cur is None or cur["__key__"] != key:
                if cur is not None:
                    if seen >= skip:
                        yield cur
                    seen += 1
                cur = {"__key__": key}
            if seen >= skip:
                cur[ext] = _read_exact(f, size, name)
            else:
                f.seek(size, 1)
            f.seek(-size % 512, 1)
    if cur is not None and seen >= skip:
        yield cur


def tar_members(f, name: str) -> Iterator[tuple[str, int]]:
    """(path, size) of each regular file of a tar (ustar, GNU long names, pax paths), the file positioned at
    its data: the caller reads or seeks over `size` bytes and the padding. Headers are parsed here rather than
    by `tarfile`, whose per-member Python cost was a third of the training loader's time; checksums are
    verified as tarfile does."""
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
            data = _read_exact(f, size, name)
            f.seek(-size % 512, 1)
            long_name = data.rstrip(b"\0").decode("utf-8", "replace") if kind == b"L" else _pax_path(data, name) or long_name
            continue
        path = long_name or _ustar_path(hdr)
        long_name = None
        if kind in (b"0", b"\0") and not path.endswith("/"):
            yield path, size
        else:  # directories, links, pax globals, GNU long link names: no sample data
            f.seek(size + (-size % 512), 1)


def _read_exact(f, size: int, name: str) -> bytes:
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


def image_member(sample: dict[str, bytes]) -> bytes:
    for ext in IMAGE_EXTS:
        if ext[1:] in sample:
            return sample[ext[1:]]
    raise KeyError(f"sample {sample.get('__key__')!r} has no image")


def sample_fields(sample: dict[str, bytes]) -> dict:
    """Captions, metadata and teacher embeddings of one sample (not its image)."""
    out = {"key": sample["__key__"], "caption": sample.get("txt", b"").decode(),
           "caption_zh": sample.get("zh.txt", b"").decode(), "meta": json.loads(sample.get("json", b"{}"))}
    for member, name in EMB_MEMBERS.items():
        if member in sample:
            out[name] = npy_array(sample[member])
    return out


def split_shards(store, split: str) -> list[tuple[str, int]]:
    """(shard tar name, samples) of one packed split, in shard order, from the split's stats files."""
    names = store.glob(f"{split}/shard-*_stats.json")
    return [(n.removesuffix("_stats.json") + ".tar", store.read_json(n)["samples"]) for n in names]
