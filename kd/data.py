"""Training and evaluation data: the download stage's images and captions joined by `key` with the teacher's
embeddings (embed/), the kept set (balance/) and the pseudo-labels (cluster/). Images are decoded once into
a uint8 tensor; batches are a pure function of (seed, step), so a resumed run sees the same batches."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F

from cidistill.core.config import Config
from cidistill.core.errors import StageError
from cidistill.core.images import decode_rgb, read_tar_images
from cidistill.core.schema import download_shards, emb_matrix, holdout_mask, join_on_key
from cidistill.core.store import Store

@dataclass
class Pairs:
    keys: list[str]
    images: torch.Tensor                 # (N, 3, S, S) uint8
    captions: list[str]
    captions_zh: list[str]
    meta: pa.Table                       # extra columns (vendor, base, subgroup, …) for eval
    t_img: torch.Tensor | None = None    # teacher embeddings (N, D) float32
    t_txt: torch.Tensor | None = None
    cluster_id: torch.Tensor | None = None
    stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys)


def _shard_table(cfg: Config, shard: str, split: str, dl: Store, emb, bal, clu, stats: dict) -> pa.Table:
    """One shard's download rows of the split, joined by key with what the later stages say of them."""
    t = dl.read_table(f"{shard}.parquet")
    t = t.filter(pc.equal(t.column("status"), "success"))
    stats["rows"] += t.num_rows
    if split != "all":
        held = holdout_mask(cfg, t)
        mask = held if split == "eval" else pc.invert(held)
        stats["other_split"] += t.num_rows - (pc.sum(mask).as_py() or 0)
        t = t.filter(mask)
    if split == "train":  # no English caption: nothing for a text loss to learn (and a NaN teacher target)
        has = pc.fill_null(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(t.column("caption"))), 0), False)
        stats["no_caption"] += t.num_rows - (pc.sum(has).as_py() or 0)
        t = t.filter(has)
    if bal is not None:
        b = bal.read_table(f"{shard}.parquet", columns=["key", "kept"])
        before = t.num_rows
        t = t.filter(pc.is_in(t.column("key"), b.filter(b.column("kept")).column("key")))
        stats["not_kept"] += before - t.num_rows
    if emb is not None:
        before = t.num_rows
        t = join_on_key(t, emb.read_table(f"{shard}.parquet", columns=["key", "image_emb", "text_emb"]))
        stats["no_embedding"] += before - t.num_rows
    if clu is not None:
        t = join_on_key(t, clu.read_table(f"{shard}.parquet", columns=["key", "cluster_id"]))
    return t.sort_by("key")


def load_pairs(cfg: Config, *, image_size: int, teacher: bool = False, clusters: bool = False,
               balanced: bool = False, split: str = "train") -> Pairs:
    """Join every stage's per-shard table by key. `split`: "train" (everything but `data.holdout`), "eval"
    (only the held-out pairs) or "all"."""
    if split not in ("train", "eval", "all"):
        raise ValueError(f"split must be train, eval or all, got {split!r}")
    dl = Store(cfg.stage_dir("download"))
    emb = Store(cfg.stage_dir("embed")) if teacher else None
    bal = Store(cfg.stage_dir("balance")) if balanced else None
    clu = Store(cfg.stage_dir("cluster")) if clusters else None
    keys, imgs, caps, zhs, metas, t_img, t_txt, cids = [], [], [], [], [], [], [], []
    stats = {"rows": 0, "not_kept": 0, "no_embedding": 0, "undecodable": 0, "other_split": 0, "no_caption": 0}
    for shard in download_shards(dl):
        t = _shard_table(cfg, shard, split, dl, emb, bal, clu, stats)
        raw = read_tar_images(dl, f"{shard}.tar")
        good = []
        for i, k in enumerate(t.column("key").to_pylist()):
            try:
                imgs.append(decode_rgb(raw[k], image_size))
                good.append(i)
            except Exception:
                stats["undecodable"] += 1
        t = t.take(pa.array(good, pa.int64()))
        keys += t.column("key").to_pylist()
        caps += [c or "" for c in t.column("caption").to_pylist()]
        zhs += [c or "" for c in t.column("caption_zh").to_pylist()] if "caption_zh" in t.column_names else [""] * t.num_rows
        metas.append(t.select([c for c in ("key", "vendor", "base", "base_name", "base_name_zh", "group",
                                           "subgroup", "emoji") if c in t.column_names]))
        if emb is not None:
            t_img.append(emb_matrix(t.column("image_emb")))
            t_txt.append(emb_matrix(t.column("text_emb")))
        if clu is not None:
            cids.append(t.column("cluster_id").to_numpy())
    if not keys:
        raise StageError(f"no {split} pairs: are the earlier stages done, and does data.holdout match anything?")
    images = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()
    return Pairs(keys, images, caps, zhs, pa.concat_tables(metas),
                 torch.from_numpy(np.concatenate(t_img)) if t_img else None,
                 torch.from_numpy(np.concatenate(t_txt)) if t_txt else None,
                 torch.from_numpy(np.concatenate(cids)).long() if cids else None, stats)


def normalise(images_u8: torch.Tensor, mean, std) -> torch.Tensor:
    return standardise(images_u8.float().div_(255), mean, std)


def standardise(x01: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x01.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x01.dtype).view(1, 3, 1, 1)
    return (x01 - m) / s


def augment(x: torch.Tensor, gen: torch.Generator, scale=(0.8, 1.0), shift: float = 0.1, offset: int = 0,
            total: int = 0, style: bool = False) -> torch.Tensor:
    """Random resized crop as one batched affine warp (no flips: an emoji's direction is meaning) on [0, 1]
    images. `style` adds what differs between artists' renderings of one emoji: a small rotation, blur,
    saturation, contrast and brightness (no hue shift: a heart's colour is its name). Draws are made for a
    global batch of `total` rows and this worker's rows `offset…` are used."""
    n = x.shape[0]
    total = max(total, offset + n)

    def draw(lo, hi):
        return torch.empty(total).uniform_(lo, hi, generator=gen)[offset:offset + n]

    s, tx, ty = draw(*scale), draw(-shift, shift), draw(-shift, shift)
    rot = draw(-0.2, 0.2) if style else torch.zeros(n)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = s * torch.cos(rot), -s * torch.sin(rot)
    theta[:, 1, 0], theta[:, 1, 1] = s * torch.sin(rot), s * torch.cos(rot)
    theta[:, 0, 2], theta[:, 1, 2] = tx, ty
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if not style:
        return x
    blur, sat, con, bri = draw(0, 1), draw(0.6, 1.4), draw(0.7, 1.3), draw(-0.1, 0.1)
    size = x.shape[-1]
    soft = F.interpolate(F.avg_pool2d(x, 2), size=(size, size), mode="bilinear", align_corners=False)
    x = torch.lerp(x, soft, blur.view(n, 1, 1, 1))
    gray = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    x = gray + sat.view(n, 1, 1, 1) * (x - gray)
    mu = x.mean((1, 2, 3), keepdim=True)
    x = mu + con.view(n, 1, 1, 1) * (x - mu) + bri.view(n, 1, 1, 1)
    return x.clamp_(0, 1)


def batch_indices(n: int, batch_size: int, step: int, seed: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """Rows of global batch `step` (epochs are seeded permutations), this rank's contiguous slice."""
    per_epoch = max(1, n // batch_size)
    epoch, b = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    rows = perm[b * batch_size:(b + 1) * batch_size]
    local = math.ceil(batch_size / world)
    return rows[rank * local:(rank + 1) * local]
