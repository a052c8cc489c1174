"""Images as the download stage stores them: webdataset tars read by key, decoded to RGB."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from .tar import read_exact, tar_members

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")


def read_tar_images(store, name: str) -> dict[str, bytes]:
    """key -> encoded image bytes from one webdataset shard (member names are never used as paths)."""
    out = {}
    with store.fs.open(store.path(name), "rb") as f:
        for path, size in tar_members(f, name):
            if path.lower().endswith(IMAGE_EXTS):
                out[path.rsplit("/", 1)[-1].rsplit(".", 1)[0]] = read_exact(f, size, name)
    return out


def decode_rgb(data: bytes, size: int) -> np.ndarray:
    """Decode to RGB (alpha composited on white: emoji are transparent PNGs), resized to size×size."""
    im = Image.open(io.BytesIO(data))
    im.load()
    if im.mode in ("RGBA", "LA", "P", "PA"):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im)
    im = im.convert("RGB")
    if size and im.size != (size, size):
        im = im.resize((size, size), Image.BICUBIC)
    return np.asarray(im, dtype=np.uint8)
