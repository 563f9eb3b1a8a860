"""The torch patch backend against independent float64 per-sample references (torchvision's
formulas re-derived here with plain torch / colorsys), plus order, frequencies and determinism."""

from __future__ import annotations

import colorsys
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from augment_helpers import (
    assert_ops_change_exactly_the_drawn_patches,
    aug_off,
    binomial_ok,
    gate_image,
    random_images,
    ref_blur,
)

from fastemp.config import AugmentConfig, load_config
from fastemp.patches import draw, make_patch_backend
from fastemp.patches import torch_backend as pt
from fastemp.runtime import resolve


def rand01(shape, seed=0):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- float64 per-sample references


def ref_crop_resize(img_u8, box, flip, size):
    top, left, h, w = (int(v) for v in box)
    x = img_u8[top : top + h, left : left + w].permute(2, 0, 1)[None].double() / 255
    out = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    return out.flip(-1) if flip else out


def ref_gray(x):  # x: (3, H, W) float64
    return 0.2989 * x[0] + 0.587 * x[1] + 0.114 * x[2]


def ref_brightness(x, f):
    return (f * x).clamp(0, 1)


def ref_contrast(x, f):
    return (f * x + (1 - f) * ref_gray(x).mean()).clamp(0, 1)


def ref_saturation(x, f):
    return (f * x + (1 - f) * ref_gray(x)[None]).clamp(0, 1)


def ref_hue(x, shift):
    """Hue rotation through Python's colorsys, pixel by pixel (an independent HSV implementation)."""
    out = torch.empty_like(x)
    for i in range(x.shape[1]):
        for j in range(x.shape[2]):
            h, s, v = colorsys.rgb_to_hsv(*x[:, i, j].tolist())
            out[:, i, j] = torch.tensor(colorsys.hsv_to_rgb((h + shift) % 1.0, s, v), dtype=x.dtype)
    return out


REF_OPS = [ref_brightness, ref_contrast, ref_saturation, ref_hue]


# ---------------------------------------------------------------- shape, layout, order


def test_output_shape_dtype_layout_and_range():
    images = random_images(10)
    aug = AugmentConfig()
    out = pt.TorchPatches(images, aug)(torch.tensor([3, 1, 4, 1, 5]), 4, seed=0)
    assert out.shape == (20, 3, 32, 32) and out.dtype == torch.float32 and out.device == images.device
    assert out.is_contiguous(memory_format=torch.channels_last)
    lo = min((0 - m) / s for m, s in zip(aug.mean, aug.std))
    hi = max((1 - m) / s for m, s in zip(aug.mean, aug.std))
    assert out.min() >= lo and out.max() <= hi
    assert out.min() < lo + 0.2 and out.max() > hi - 0.2  # uses the range, not a constant


def test_factory_builds_torch_backend():
    backend = make_patch_backend("torch", random_images(4), AugmentConfig())
    assert backend.name == "torch"


def test_patch_major_order():
    n_img = 6
    colours = torch.arange(n_img, dtype=torch.uint8) * 40 + 10  # image k is solid colour 40k+10
    images = colours.view(-1, 1, 1, 1).expand(n_img, 32, 32, 3).contiguous()
    index = torch.tensor([4, 0, 5, 2])
    out = pt.TorchPatches(images, aug_off())(index, 3, seed=1)
    expected = (colours[index.repeat(3)].float() / 255).view(-1, 1, 1, 1).expand_as(out)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_normalize_images():
    images = random_images(3, 8, 9)
    out = pt.normalize_images(images, (0.5, 0.4, 0.3), (0.2, 0.25, 0.5))
    assert out.shape == (3, 3, 8, 9) and out.is_contiguous(memory_format=torch.channels_last)
    ref = (images.permute(0, 3, 1, 2).double() / 255 - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / torch.tensor(
        [0.2, 0.25, 0.5]
    ).view(1, 3, 1, 1)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- crop, resize, flip


def coordinate_image(h=32, w=32):
    """R encodes x, G encodes y (8 levels per pixel), B = 0."""
    y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([x * 8, y * 8, torch.zeros_like(x)], -1).to(torch.uint8)[None]


def test_default_crop_is_a_16_pixel_window_upsampled_bilinearly():
    images = coordinate_image()
    backend = pt.TorchPatches(images, aug_off())
    index = torch.zeros(1, dtype=torch.long)
    out = backend(index, 64, seed=3)
    params = backend.params(index, 64, seed=3)
    assert (params.box[:, 2:] == 16).all()
    assert params.box[:, :2].min() >= 0 and params.box[:, :2].max() <= 16
    assert len(set(params.box[:, 1].tolist())) > 8  # offsets vary
    x_code, y_code = out[:, 0] * 255, out[:, 1] * 255
    # the window's edge pixels are reached exactly (clamped to the window), nothing outside it
    torch.testing.assert_close(x_code.amin((1, 2)), params.box[:, 1].float() * 8, rtol=0, atol=1e-3)
    torch.testing.assert_close(
        x_code.amax((1, 2)) - x_code.amin((1, 2)), torch.full((64,), 15 * 8.0), rtol=0, atol=1e-3
    )
    torch.testing.assert_close(y_code.amin((1, 2)), params.box[:, 0].float() * 8, rtol=0, atol=1e-3)
    for p in range(64):
        ref = ref_crop_resize(images[0], params.box[p], False, 32)
        torch.testing.assert_close(out[p].double(), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "shape,size,scale,ratio",
    [
        ((32, 32), 32, (0.25, 0.25), (1.0, 1.0)),  # the default: upsampling
        ((40, 48), 24, (0.08, 1.0), (0.75, 4 / 3)),  # ranges, downsampling and mixed, non-square image
        ((20, 28), 32, (0.3, 0.9), (0.5, 2.0)),
    ],
)
def test_crop_resize_flip_match_reference(shape, size, scale, ratio):
    images = random_images(5, *shape)
    aug = aug_off(crop_size=size, crop_scale=scale, crop_ratio=ratio, flip_p=0.5)
    backend = pt.TorchPatches(images, aug)
    index = torch.tensor([0, 3, 4, 1])
    out = backend(index, 12, seed=7)
    params = backend.params(index, 12, seed=7)
    assert out.shape == (48, 3, size, size)
    h, w = params.box[:, 2], params.box[:, 3]
    assert (params.box[:, 0] >= 0).all() and (params.box[:, 0] + h <= shape[0]).all()
    assert (params.box[:, 1] >= 0).all() and (params.box[:, 1] + w <= shape[1]).all()
    assert 0 < params.flip.sum() < 48
    for p in range(48):
        ref = ref_crop_resize(images[params.image[p]], params.box[p], bool(params.flip[p]), size)
        torch.testing.assert_close(out[p].double(), ref, rtol=0, atol=2e-5)


def test_crop_size_formula_matches_torchvision_get_params():
    """w = round(sqrt(A*s*r)), h = round(sqrt(A*s/r)) for draws that fit (torchvision's first try)."""
    u = rand01((2000, 4), seed=5)
    scale, ratio = (0.1, 0.6), (0.5, 2.0)
    boxes = draw.crop_boxes(u, 30, 40, scale, ratio)
    for row, (top, left, h, w) in zip(u.tolist(), boxes.tolist()):
        s = scale[0] + (scale[1] - scale[0]) * row[0]
        r = math.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * row[1])
        ew, eh = round(math.sqrt(1200 * s * r)), round(math.sqrt(1200 * s / r))
        assert (h, w) == (min(eh, 30), min(ew, 40))
        assert 0 <= top <= 30 - h and 0 <= left <= 40 - w


def test_flip_mirrors_exactly():
    images = random_images(4)
    index = torch.arange(4)
    plain = pt.TorchPatches(images, aug_off(flip_p=0.0))(index, 5, seed=11)
    flipped = pt.TorchPatches(images, aug_off(flip_p=1.0))(index, 5, seed=11)
    assert torch.equal(flipped, plain.flip(-1))


# ---------------------------------------------------------------- colour ops with explicit factors


def small_batch(p=6, h=7, w=5, seed=0):
    x = rand01((p, 3, h, w), seed)
    x[0] = x[0, :1]  # a gray patch (s = 0) and saturated / clipped pixels exercise the edge cases
    x[1, :, 0, 0] = torch.tensor([1.0, 0.0, 0.0])
    x[1, :, 0, 1] = torch.tensor([0.0, 1.0, 1.0])
    return x


@pytest.mark.parametrize("op", [0, 1, 2])  # brightness, contrast, saturation
def test_blend_ops_match_reference(op):
    x = small_batch()
    factors = 2.5 * rand01((x.shape[0], 4), seed=1)
    only = tuple(k == op for k in range(4))
    out = pt.color_jitter(x, factors, torch.arange(4).expand(x.shape[0], 4), enabled=only)
    for p in range(x.shape[0]):
        ref = REF_OPS[op](x[p].double(), float(factors[p, op]))
        torch.testing.assert_close(out[p].double(), ref, rtol=0, atol=2e-6)


def test_hue_matches_colorsys():
    x = small_batch()
    shift = torch.tensor([0.0, 0.2, -0.2, 0.5, 0.07, -0.13])
    out = pt.adjust_hue(x, shift.view(-1, 1, 1))
    for p in range(x.shape[0]):
        torch.testing.assert_close(out[p].double(), ref_hue(x[p].double(), float(shift[p])), rtol=0, atol=3e-6)
    assert not torch.allclose(out[2:], x[2:], atol=1e-2)


def test_color_jitter_applies_each_patch_in_its_own_order():
    perms = [[0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1], [3, 0, 1, 2], [0, 2, 1, 3]]
    x = small_batch(len(perms))
    factors = torch.tensor(
        [
            [1.3, 0.7, 1.4, 0.15],
            [0.6, 1.35, 0.65, -0.2],
            [1.2, 1.1, 0.0, 0.05],
            [0.8, 0.6, 1.2, -0.1],
            [1.39, 0.61, 1.0, 0.2],
            [0.9, 1.3, 0.7, 0.0],
        ]
    )
    order = torch.tensor(perms)
    out = pt.color_jitter(x, factors, order, (True,) * 4)
    for p, perm in enumerate(perms):
        ref = x[p].double()
        for op in perm:
            ref = REF_OPS[op](ref, float(factors[p, op]))
        torch.testing.assert_close(out[p].double(), ref, rtol=0, atol=1e-5)
    # the order matters (so the test above can tell orders apart): reversed order differs
    rev = pt.color_jitter(x, factors, order.flip(1), (True,) * 4)
    assert (rev - out).abs().amax() > 1e-3
    # an op disabled (jitter amount 0) is skipped for every patch
    no_hue = pt.color_jitter(x, factors, order, enabled=(True, True, True, False))
    ref = x[0].double()
    for op in perms[0][:3]:
        ref = REF_OPS[op](ref, float(factors[0, op]))
    torch.testing.assert_close(no_hue[0].double(), ref, rtol=0, atol=1e-5)


def test_grayscale_and_solarize_match_reference():
    x = small_batch()
    g = pt.grayscale(x)
    assert g.shape == (6, 1, 7, 5)
    for p in range(6):
        torch.testing.assert_close(g[p, 0].double(), ref_gray(x[p].double()), rtol=0, atol=1e-6)
    t = 128 / 255
    x[2, 0, 0, 0] = t  # exactly on the threshold: inverted (PIL: pixels >= threshold)
    out = pt.solarize(x, t)
    assert out[2, 0, 0, 0] == 1 - x[2, 0, 0, 0]
    assert torch.equal(out, torch.where(x >= t, 1 - x, x))


def test_gaussian_blur_matches_reference():
    x = rand01((4, 3, 12, 10), seed=3)
    sigma = torch.tensor([0.1, 0.7, 1.3, 2.0])
    out = pt.gaussian_blur(x, sigma, radius=6)
    for p in range(4):
        torch.testing.assert_close(out[p].double(), ref_blur(x[p].double(), float(sigma[p])), rtol=0, atol=1e-6)
    assert torch.allclose(out[0], x[0], atol=1e-6)  # sigma 0.1: (numerically) the identity
    assert (out[3] - x[3]).abs().amax() > 0.1


# ---------------------------------------------------------------- the whole pipeline


def test_augment_matches_composed_reference():
    """Every op on, its parameters from the backend, re-applied per patch by the references."""
    images = random_images(4, 16, 16)
    aug = dataclasses.replace(
        AugmentConfig(),
        crop_size=16,
        jitter_p=0.6,
        grayscale_p=0.3,
        blur_p=0.5,
        solarize_p=0.5,
        mean=(0.4, 0.5, 0.6),
        std=(0.2, 0.3, 0.25),
    )
    backend = pt.TorchPatches(images, aug)
    index = torch.tensor([2, 0, 3])
    out = backend(index, 8, seed=5)
    prm = backend.params(index, 8, seed=5)
    for flag in (prm.jitter, prm.gray, prm.blur, prm.solarize):
        assert 0 < flag.sum() < 24
    mean, std = torch.tensor(aug.mean).double().view(3, 1, 1), torch.tensor(aug.std).double().view(3, 1, 1)
    for p in range(24):
        x = ref_crop_resize(images[prm.image[p]], prm.box[p], bool(prm.flip[p]), 16)
        if prm.jitter[p]:
            for op in prm.order[p].tolist():
                x = REF_OPS[op](x, float(prm.factors[p, op]))
        if prm.gray[p]:
            x = ref_gray(x).expand(3, -1, -1)
        if prm.blur[p]:
            x = ref_blur(x, float(prm.sigma[p]))
        if prm.solarize[p]:
            x = torch.where(x >= 128 / 255, 1 - x, x)
        torch.testing.assert_close(out[p].double(), (x - mean) / std, rtol=0, atol=1e-4)


def test_parameter_frequencies_and_ranges():
    aug = AugmentConfig()
    prm = pt.TorchPatches(random_images(2), aug).params(torch.tensor([0, 1] * 50), 200, seed=0)
    n = 20000
    for flag, p in (
        (prm.flip, aug.flip_p),
        (prm.jitter, aug.jitter_p),
        (prm.gray, aug.grayscale_p),
        (prm.blur, aug.blur_p),
        (prm.solarize, aug.solarize_p),
    ):
        assert binomial_ok(int(flag.sum()), n, p), (int(flag.sum()), p)
    lo = torch.tensor([0.6, 0.6, 0.6, -0.2])
    hi = torch.tensor([1.4, 1.4, 1.4, 0.2])
    assert (prm.factors >= lo).all() and (prm.factors <= hi).all()
    torch.testing.assert_close(prm.factors.mean(0), (lo + hi) / 2, rtol=0, atol=0.01)
    assert prm.sigma.min() >= 0.1 and prm.sigma.max() <= 2.0 and abs(prm.sigma.mean() - 1.05) < 0.02
    assert torch.equal(prm.order.sort(1).values, torch.arange(4).expand(n, 4))  # permutations
    for pos in range(4):  # each op equally likely in each position
        counts = torch.bincount(prm.order[:, pos], minlength=4)
        assert all(binomial_ok(int(c), n, 0.25) for c in counts), counts
    offsets = torch.bincount(prm.box[:, 0], minlength=17)  # 17 equally likely offsets 0..16
    assert offsets.numel() == 17 and all(binomial_ok(int(c), n, 1 / 17) for c in offsets), offsets


def test_ops_are_applied_exactly_where_drawn():
    assert_ops_change_exactly_the_drawn_patches(lambda aug: pt.TorchPatches(gate_image(), aug), images_count=50)


def test_determinism():
    images = random_images(6)
    backend = pt.TorchPatches(images, AugmentConfig())
    index = torch.tensor([5, 2, 2, 0])
    a = backend(index, 6, seed=123)
    assert torch.equal(a, backend(index, 6, seed=123))
    assert torch.equal(a, pt.TorchPatches(images.clone(), AugmentConfig())(index, 6, seed=123))
    assert not torch.equal(a, backend(index, 6, seed=124))
    # patches of one call draw independently: two copies of the same image differ
    assert not torch.equal(a[1], a[2])


def test_patch_compile_resolves_on_cuda_with_a_compiled_model_only():
    def compiled(device: str, setting: str, model_compile: str) -> bool:
        cfg = load_config("quickstart", [f"data.patch_compile={setting}", f"model.compile={model_compile}"])
        return resolve(cfg, torch.device(device)).patch_compile

    assert compiled("cuda", "auto", "default") and not compiled("cuda", "auto", "none")
    assert not compiled("cpu", "auto", "default") and compiled("cpu", "on", "none")
    assert not compiled("cuda", "off", "default")
