"""The random draw every patch backend shares: one row of 18 uniforms per patch becomes its `PatchParams`.

A patch's randomness depends only on (seed, global image position, patch index), never on the backend
or on how a batch is split over ranks (docs/augmentation.md, docs/many-gpus.md).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from ..config import AugmentConfig
from .prefetch import PatchRequest

# torchvision's rgb_to_grayscale weights (ITU-R 601-2 luma, as written in torchvision).
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)

# Columns of the single uniform draw that parameterises a patch.
_SCALE, _RATIO, _TOP, _LEFT, _FLIP, _JITTER = 0, 1, 2, 3, 4, 5
_FACTORS = slice(6, 10)  # brightness, contrast, saturation, hue
_ORDER = slice(10, 14)  # sort keys of a random permutation of the four jitter ops
_GRAY, _BLUR, _SIGMA, _SOLARIZE = 14, 15, 16, 17
N_UNIFORMS = 18

BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3


@functools.cache
def device_constant(values: tuple, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A small constant tensor on `device`, copied there once (a host->device copy can block)."""
    return torch.tensor(values, dtype=dtype, device=device)


@dataclass
class PatchParams:
    """Every random choice of one call, one row per patch (P = n*B rows, on the images' device)."""

    image: torch.Tensor  # (P,) int64: dataset index of the patch's image
    box: torch.Tensor  # (P, 4) int64: top, left, height, width of the crop window
    flip: torch.Tensor  # (P,) bool: horizontal flip
    jitter: torch.Tensor  # (P,) bool: colour jitter applied
    factors: torch.Tensor  # (P, 4) float32: brightness, contrast, saturation factors, hue shift (turns)
    order: torch.Tensor  # (P, 4) int64: the jitter ops (0 b, 1 c, 2 s, 3 h) in the order applied
    gray: torch.Tensor  # (P,) bool: random grayscale applied
    blur: torch.Tensor  # (P,) bool: Gaussian blur applied
    sigma: torch.Tensor  # (P,) float32: blur sigma (drawn for every patch, used where blur)
    solarize: torch.Tensor  # (P,) bool: solarize applied


# ----------------------------------------------------------------------------- random parameters


def crop_boxes(u: torch.Tensor, height: int, width: int, scale, ratio) -> torch.Tensor:
    """Crop windows (P, 4: top, left, h, w) from four uniforms per patch, as torchvision's RandomResizedCrop
    with w and h clamped to the image instead of redrawn; height, width: ints, or (P,) per-patch image sizes."""
    u = u.double()
    s = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    area = height * width * s
    # clamp_min then minimum: height and width may be per-patch tensors (streamed images differ in size)
    w = torch.minimum(torch.round(torch.sqrt(area * torch.exp(log_r))).clamp_min(1), torch.as_tensor(width).double())
    h = torch.minimum(torch.round(torch.sqrt(area / torch.exp(log_r))).clamp_min(1), torch.as_tensor(height).double())
    top = torch.minimum(torch.floor(u[:, 2] * (height - h + 1)), height - h)
    left = torch.minimum(torch.floor(u[:, 3] * (width - w + 1)), width - w)
    return torch.stack([top, left, h, w], dim=1).long()


def sharded_params(request: PatchRequest, height, width, aug: AugmentConfig, device="cpu") -> PatchParams:
    """The parameters of the request's patches (those of images index[shard]) on `device`."""
    index = request.index.to(device)[request.shard].repeat(request.n)
    return params_from_uniforms(sharded_uniforms(request, device), index, height, width, aug)


def sharded_uniforms(request: PatchRequest, device="cpu") -> torch.Tensor:
    """The shard's rows (n*b, 18) of the global batch's draw from request.seed: every rank draws the global batch's
    rows (row i*B + b, the single-process draw) and keeps its own. Before any image size is known (streamed
    backends turn a row into a crop once they have read the image's size)."""
    batch, n = request.index.shape[0], request.n
    u = torch.rand(n * batch, N_UNIFORMS, generator=torch.Generator(device).manual_seed(request.seed), device=device)
    return u.view(n, batch, N_UNIFORMS)[:, request.shard].reshape(-1, N_UNIFORMS)


def params_from_uniforms(
    u: torch.Tensor, image: torch.Tensor, height: int, width: int, aug: AugmentConfig
) -> PatchParams:
    """Every patch's parameters from its row of uniforms (`image`: each patch's dataset index); gates are `u < p`,
    factors and the jitter order as torchvision's ColorJitter.get_params."""
    device = u.device
    lo = device_constant(
        (max(0.0, 1 - aug.brightness), max(0.0, 1 - aug.contrast), max(0.0, 1 - aug.saturation), -aug.hue),
        device,
        torch.float32,
    )
    hi = device_constant((1 + aug.brightness, 1 + aug.contrast, 1 + aug.saturation, aug.hue), device, torch.float32)
    s0, s1 = aug.blur_sigma
    # columns by slice, not by list: a list index becomes a host tensor copied to the device (a sync)
    return PatchParams(
        image=image,
        box=crop_boxes(u[:, _SCALE : _LEFT + 1], height, width, aug.crop_scale, aug.crop_ratio),
        flip=u[:, _FLIP] < aug.flip_p,
        jitter=u[:, _JITTER] < aug.jitter_p,
        factors=lo + (hi - lo) * u[:, _FACTORS],
        order=torch.argsort(u[:, _ORDER], dim=1, stable=True),
        gray=u[:, _GRAY] < aug.grayscale_p,
        blur=u[:, _BLUR] < aug.blur_p,
        sigma=s0 + (s1 - s0) * u[:, _SIGMA],
        solarize=u[:, _SOLARIZE] < aug.solarize_p,
    )


def jitter_enabled(aug: AugmentConfig) -> tuple[bool, bool, bool, bool]:
    """Which jitter ops exist (brightness, contrast, saturation, hue): an amount of 0 skips the op."""
    return aug.brightness > 0, aug.contrast > 0, aug.saturation > 0, aug.hue > 0
