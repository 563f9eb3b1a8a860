"""The DALI backend (its CPU twin: the same graph without a GPU) against the torch backend, op by op.

DALI reads the images as PNG files (lossless: it decodes the very pixels the torch backend holds
resident). Both draw their parameters with draw.sharded_params on a CPU generator, so for images of
one size the same seed gives identical parameters: where the semantics coincide the outputs must
agree to float rounding, and where they differ (documented: fixed jitter order, reflect-101 blur
borders, DALI's downscaling filter) the difference is measured against a reference of DALI's own
semantics or bounded. A statistical test with independent seeds checks the patch distributions agree.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("nvidia.dali")

from augment_helpers import assert_ops_change_exactly_the_drawn_patches, aug_off, gate_image, ref_blur  # noqa: E402

from fastemp.check.augment import png_folder  # noqa: E402
from fastemp.config import AugmentConfig  # noqa: E402
from fastemp.patches import torch_backend as pt  # noqa: E402
from fastemp.patches.dali_images import DaliImagePatches  # noqa: E402


def smooth_images(n=8, size=32, seed=0):
    """Natural-ish images (smooth colour fields, some saturated) rather than i.i.d. noise."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 6, 6, generator=g) * 1.2 - 0.1
    img = torch.nn.functional.interpolate(low, size=size, mode="bilinear", align_corners=False)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


@pytest.fixture(scope="module")
def smooth(tmp_path_factory):
    """(the images, the same images as PNG files)."""
    images = smooth_images()
    return images, png_folder(images, tmp_path_factory.mktemp("smooth"), "cpu")


def both(smooth, aug, n, seed):
    """(DALI output, torch output, the shared parameters) for one request over every image."""
    images, files = smooth
    index = torch.arange(len(images))
    dali, torch_backend = DaliImagePatches(files, aug), pt.TorchPatches(images, aug)
    params = torch_backend.params(index, n, seed)
    assert torch.equal(dali.params(index, n, seed).box, params.box)  # the same draw
    return dali(index, n, seed), torch_backend(index, n, seed), params


@pytest.mark.parametrize(
    "name,kw",
    [
        ("crop+flip", dict(flip_p=0.5)),
        ("crop ranges, upsampling", dict(flip_p=0.5, crop_scale=(0.1, 0.6), crop_ratio=(0.5, 2.0))),
        ("grayscale", dict(grayscale_p=0.5)),
        ("solarize", dict(solarize_p=0.5, solarize_threshold=100)),
        ("brightness", dict(jitter_p=0.8, contrast=0.0, saturation=0.0, hue=0.0)),
        ("contrast", dict(jitter_p=0.8, brightness=0.0, saturation=0.0, hue=0.0)),
        ("saturation", dict(jitter_p=0.8, brightness=0.0, contrast=0.0, hue=0.0)),
        ("hue (exact HSV)", dict(jitter_p=0.8, brightness=0.0, contrast=0.0, saturation=0.0)),
        ("normalize", dict(mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.25))),
    ],
)
def test_matches_torch_where_semantics_coincide(smooth, name, kw):
    d, t, _ = both(smooth, aug_off(**kw), 6, seed=3)
    assert d.shape == (48, 3, 32, 32) and d.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(d, t, rtol=0, atol=2e-6, msg=name)


def test_jitter_in_fixed_order_matches_torch_for_patches_drawing_that_order(smooth):
    """DALI applies brightness, contrast, saturation (then hue) in that fixed order; patches whose
    random torch order happens to be b, c, s agree exactly, the others differ only by clamping."""
    d, t, prm = both(smooth, aug_off(jitter_p=1.0, hue=0.0), 12, seed=4)
    position = torch.argsort(prm.order, dim=1)
    in_order = (position[:, 0] < position[:, 1]) & (position[:, 1] < position[:, 2])
    assert 0 < in_order.sum() < 96
    torch.testing.assert_close(d[in_order], t[in_order], rtol=0, atol=2e-6)
    assert (d[~in_order] - t[~in_order]).abs().mean() < 0.01


def test_blur_matches_reflect_101_reference(smooth):
    d, unblurred, _ = both(smooth, aug_off(blur_p=0.5), 4, seed=5)
    prm = pt.TorchPatches(smooth[0], aug_off(blur_p=0.5)).params(torch.arange(8), 4, seed=5)
    unblurred = pt.TorchPatches(smooth[0], aug_off())(torch.arange(8), 4, seed=5)  # same crops: same uniforms
    assert 0 < prm.blur.sum() < 32
    for p in range(32):
        x = unblurred[p].double()
        ref = ref_blur(x, float(prm.sigma[p]), mode="reflect") if prm.blur[p] else x
        torch.testing.assert_close(d[p].double(), ref, rtol=0, atol=1e-5)


def test_downscaling_filter_is_close_to_torch(tmp_path):
    """Crop windows larger than the output: DALI's antialiasing filter differs from torch's
    (PIL's), by a little on average."""
    images = smooth_images(6, size=64)
    aug = aug_off(crop_size=24, crop_scale=(0.3, 1.0), crop_ratio=(0.75, 4 / 3), flip_p=0.5)
    d, t, _ = both((images, png_folder(images, tmp_path, "cpu")), aug, 6, seed=6)
    assert (d - t).abs().mean() < 0.01 and (d - t).abs().max() < 0.2


def test_ops_are_applied_exactly_where_drawn(tmp_path):
    files = png_folder(gate_image().expand(2, -1, -1, -1), tmp_path, "cpu")
    assert_ops_change_exactly_the_drawn_patches(lambda aug: DaliImagePatches(files, aug), images_count=25)


def test_patch_statistics_agree_with_torch(tmp_path):
    """Per-channel mean and mean square (hence std) over 1600 patches of the same 16 images.

    Independent seeds: the difference must be within 5 standard errors (each SE estimated from
    the per-patch values, patches being independent draws) plus 0.01 for the documented semantic
    differences. Same seed (identical parameters, a paired comparison without sampling noise): the
    documented differences (fixed jitter order, reflect-101 blur borders) move these moments by
    about 0.002 (mean) and 0.005 (mean square) on the [-1, 1] scale, so the tolerance is 0.01.
    """
    images = smooth_images(16)
    aug = AugmentConfig()
    index = torch.arange(16)

    def moments(x):
        per_patch = torch.stack([x.mean((2, 3)), (x * x).mean((2, 3))], 0).double()  # (2, P, 3)
        return per_patch.mean(1), per_patch.std(1) / math.sqrt(x.shape[0])

    dali, se_dali = moments(DaliImagePatches(png_folder(images, tmp_path, "cpu"), aug)(index, 100, seed=1))
    torch_other_seed, se_torch = moments(pt.TorchPatches(images, aug)(index, 100, seed=2))
    tolerance = 5 * torch.sqrt(se_dali**2 + se_torch**2) + 0.01
    assert ((dali - torch_other_seed).abs() <= tolerance).all(), (dali - torch_other_seed, tolerance)
    torch_same_seed, _ = moments(pt.TorchPatches(images, aug)(index, 100, seed=1))
    assert ((dali - torch_same_seed).abs() <= 0.01).all(), dali - torch_same_seed
