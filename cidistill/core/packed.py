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

from .images import IMAGE_EXTS
from .tar import read_exact, tar_members

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
                cur[ext] = read_exact(f, size, name)
    if cur is not None and seen >= skip:
        yield cur


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
