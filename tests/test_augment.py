"""Augmentations are functions of (seed, step) and of a row's place in the global batch, so any number of
workers sees the same images; style jitter stays an image and keeps what names an emoji (no hue shift)."""
import torch
import torch.nn.functional as F

from kd.data import affine_grid, augment, soft_copy


def _images(n=8, size=32):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, size, size, generator=g)


def test_split_batch_equals_global_batch():
    x = _images()
    for style in (False, True):
        whole = augment(x, torch.Generator().manual_seed(5), style=style)
        halves = [augment(x[i:i + 4], torch.Generator().manual_seed(5), offset=i, total=8, style=style) for i in (0, 4)]
        assert torch.allclose(torch.cat(halves), whole, atol=1e-6)


def test_style_jitter_changes_images_but_keeps_range_and_hue_order():
    x = torch.zeros(64, 3, 16, 16)
    x[:, 0] = 0.9  # a red image stays red: channels keep their order under saturation/contrast/brightness
    x[:, 1:] = 0.2
    y = augment(x, torch.Generator().manual_seed(1), style=True)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    assert not torch.allclose(y, augment(x, torch.Generator().manual_seed(1), style=False))
    centre = y[:, :, 6:10, 6:10].mean((2, 3))
    assert (centre[:, 0] > centre[:, 1]).all() and (centre[:, 0] > centre[:, 2]).all()


def test_same_seed_same_images_different_seed_different():
    x = _images()
    a = augment(x, torch.Generator().manual_seed(3), style=True)
    assert torch.equal(a, augment(x, torch.Generator().manual_seed(3), style=True))
    assert not torch.allclose(a, augment(x, torch.Generator().manual_seed(4), style=True))


def test_the_warp_and_the_blur_sample_what_torchs_kernels_sample():
    """The broadcast grid and the in-place 2x upsampling are cheaper forms of F.affine_grid and
    F.interpolate (bilinear, align_corners=False): the same points and weights, to float rounding."""
    g = torch.Generator().manual_seed(2)
    theta = torch.randn(5, 2, 3, generator=g)
    for h, w in ((64, 64), (16, 24)):
        ref = F.affine_grid(theta, [5, 3, h, w], align_corners=False)
        assert torch.allclose(affine_grid(theta, h, w), ref, atol=2e-6)
    for h, w in ((64, 64), (16, 24), (15, 15)):
        x = torch.rand(4, 3, h, w, generator=g)
        ref = F.interpolate(F.avg_pool2d(x, 2), size=(h, w), mode="bilinear", align_corners=False)
        assert torch.allclose(soft_copy(x), ref, atol=1e-6)
