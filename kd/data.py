"""Image transforms of training and evaluation (standardise, the batched augmentation) and the packed
dataset's captions streamed from its manifest (the student's vocabulary is cut from them)."""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

from cidistill.core.store import Store


def manifest_texts(root: str, split: str, chinese: bool) -> Iterator[str]:
    """Every English caption of a packed split, then every Chinese one: one streamed pass over its manifest."""
    store = Store(root)
    for col in ("caption", "caption_zh") if chinese else ("caption",):
        with store.parquet(f"{split}/manifest.parquet") as pf:  # a damaged one: an error naming it
            for b in pf.iter_batches(columns=[col], batch_size=8192):
                yield from (c for c in b.column(0).to_pylist() if c)


def normalise(images_u8: torch.Tensor, mean, std) -> torch.Tensor:
    return standardise(images_u8.float().div_(255), mean, std)


def standardise(x01: torch.Tensor, mean, std) -> torch.Tensor:
    """(x - mean) / std per channel, in place (every caller hands over a batch of its own)."""
    m = torch.tensor(mean, dtype=x01.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x01.dtype).view(1, 3, 1, 1)
    return x01.sub_(m).div_(s)


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
    x = F.grid_sample(x, affine_grid(theta, x.shape[-2], x.shape[-1]), mode="bilinear", padding_mode="border",
                      align_corners=False)
    if not style:
        return x
    blur, sat, con, bri = draw(0, 1), draw(0.6, 1.4), draw(0.7, 1.3), draw(-0.1, 0.1)
    x = torch.lerp(x, soft_copy(x), blur.view(n, 1, 1, 1))
    gray = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    x.sub_(gray).mul_(sat.view(n, 1, 1, 1)).add_(gray)  # gray + sat * (x - gray), in place
    mu = x.mean((1, 2, 3), keepdim=True)
    x.sub_(mu).mul_(con.view(n, 1, 1, 1)).add_(mu).add_(bri.view(n, 1, 1, 1))
    return x.clamp_(0, 1)


def affine_grid(theta: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """F.affine_grid(theta, (n, c, h, w), align_corners=False) by broadcasting: the same sample points (to
    float rounding), 2x cheaper on CPU than its batched matrix product with three-wide rows."""
    xs = (torch.arange(w, dtype=theta.dtype) * 2 + 1) / w - 1
    ys = ((torch.arange(h, dtype=theta.dtype) * 2 + 1) / h - 1).view(h, 1)
    t = theta.view(-1, 2, 3, 1, 1)
    return torch.stack([t[:, 0, 0] * xs + t[:, 0, 1] * ys + t[:, 0, 2],
                        t[:, 1, 0] * xs + t[:, 1, 1] * ys + t[:, 1, 2]], -1)


def soft_copy(x: torch.Tensor) -> torch.Tensor:
    """x at half resolution, bilinearly upsampled back: the blur of the style augmentation."""
    h, w = x.shape[-2:]
    if h % 2 or w % 2:
        return F.interpolate(F.avg_pool2d(x, 2), size=(h, w), mode="bilinear", align_corners=False)
    return upsample2(upsample2(F.avg_pool2d(x, 2), 3), 2)


def upsample2(p: torch.Tensor, dim: int) -> torch.Tensor:
    """Bilinear 2x upsampling along one dim as F.interpolate(align_corners=False) does it (each output is
    0.75 of its nearest input and 0.25 of the next one out, clamped at the edges), written in place into the
    even and odd rows: 2x cheaper than F.interpolate's CPU kernel on small channels-first batches."""
    m = p.shape[dim]
    shape = list(p.shape)
    shape[dim] = 2 * m
    out = p.new_empty(shape)
    pairs = out.unflatten(dim, (m, 2))
    even, odd = pairs.select(dim + 1, 0), pairs.select(dim + 1, 1)
    torch.mul(p, 0.75, out=even)
    torch.mul(p, 0.75, out=odd)
    even.narrow(dim, 1, m - 1).add_(p.narrow(dim, 0, m - 1), alpha=0.25)
    even.narrow(dim, 0, 1).add_(p.narrow(dim, 0, 1), alpha=0.25)
    odd.narrow(dim, 0, m - 1).add_(p.narrow(dim, 1, m - 1), alpha=0.25)
    odd.narrow(dim, m - 1, 1).add_(p.narrow(dim, m - 1, 1), alpha=0.25)
    return out
