"""The DALI backend (its CPU twin: the same graph without a GPU) against the torch backend, op by op.

DALI reads the images as PNG files (lossless: it decodes the very pixels the torch backend holds
resident). Both draw their parameters with draw.sharded_params on a CPU generator, so for images of
one size the same seed gives identical parameters: where the semantics coincide the outputs must
agree to float rounding, and where they differ (documented: fixed jitter order, reflect-101 blur
borders, DALI's downscaling filter) the difference is measured against a reference of DALI's own
semantics or bounded. The patch distributions (channel statistics, same and independent seeds) are the
check's augment case, run by tests/check/test_cases.py.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("nvidia.dali")

from augment_helpers import assert_ops_change_exactly_the_drawn_patches, aug_off, gate_image, ref_blur  # noqa: E402

from fastemp.check import augment as check_augment  # noqa: E402
from fastemp.check.augment import png_folder  # noqa: E402
from fastemp.check.core import Context  # noqa: E402
from fastemp.patches import torch_backend as pt  # noqa: E402
from fastemp.patches.dali_images import DaliImagePatches  # noqa: E402


def smooth_images(count, size=32):
    """The check's natural-ish images (smooth colour fields, some saturated), drawn from seed 0 on the CPU."""
    return check_augment.smooth_images(
        Context(torch.device("cpu"), False, torch.Generator().manual_seed(0)), count, size
    )


@pytest.fixture(scope="module")
def smooth(tmp_path_factory):
    """(the images, the same images as PNG files)."""
    images = smooth_images(8)
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
