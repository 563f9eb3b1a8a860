"""The torch patch backend: the EMP-SSL recipe as one batched pass over all n*B patches on the device, in
float32, following torchvision's tensor semantics op by op (docs/augmentation.md). No `.item()` and no boolean
indexing (no host-device sync), no matmul or convolution (TF32, autocast and cuDNN settings cannot change the
result); an op a patch does not draw is skipped with `torch.where`.
"""

from __future__ import annotations

import math
import warnings

import torch

from ..config import AugmentConfig
from .draw import (
    BRIGHTNESS,
    GRAY_WEIGHTS,
    HUE,
    SATURATION,
    PatchParams,
    device_constant,
    jitter_enabled,
    sharded_params,
)
from .prefetch import PatchBackend, PatchRequest

# ----------------------------------------------------------------------------- the ops


def resample_taps(start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int):
    """Separable taps resizing the window [start, start+length) of an axis to out_size with torch's antialiased
    bilinear filter (PIL's BILINEAR), only pixels inside the window weighted: (index, weight), both (P, out_size, K).
    """
    taps = max(2, math.ceil(2 * in_size / out_size))  # covers the widest possible filter support
    length_f = length.float()[:, None, None]
    scale = length_f / out_size
    support = scale.clamp(min=1.0)
    center = scale * (torch.arange(out_size, device=start.device).float()[None, :, None] + 0.5)
    first = torch.floor(center - support + 0.5).clamp(min=0)
    k = first + torch.arange(taps, device=start.device).float()  # window-relative pixel of each tap
    weight = (1 - ((k - center + 0.5) / support).abs()).clamp(min=0) * (k < length_f)
    weight = weight / weight.sum(-1, keepdim=True)
    index = start[:, None, None] + torch.minimum(k, length_f - 1).long()
    return index, weight


def crop_resize(
    images: torch.Tensor, image: torch.Tensor, box: torch.Tensor, flip: torch.Tensor, size: int
) -> torch.Tensor:
    """torchvision's `resized_crop` (bilinear, antialias) then `hflip` where `flip`, as two gathers (rows, then
    columns, reversed to flip) from images (N, H, W, 3) uint8: (P, 3, size, size) float32 in [0, 1], channels_last.
    """
    _, height, width, _ = images.shape
    row_idx, row_w = resample_taps(box[:, 0], box[:, 2], height, size)  # (P, S, Ky)
    col_idx, col_w = resample_taps(box[:, 1], box[:, 3], width, size)  # (P, S, Kx)
    flip = flip[:, None, None]
    col_idx = torch.where(flip, col_idx.flip(1), col_idx)
    col_w = torch.where(flip, col_w.flip(1), col_w)
    rows = images[image[:, None, None], row_idx].float()  # (P, S, Ky, W, 3)
    rows = (rows * row_w[..., None, None]).sum(2)  # (P, S, W, 3)
    p, s, kx = col_idx.shape
    cols = rows.gather(2, col_idx.reshape(p, 1, s * kx, 1).expand(p, s, s * kx, 3)).view(p, s, s, kx, 3)
    out = (cols * col_w[:, None, :, :, None]).sum(3)  # (P, S, S, 3): NHWC memory
    return out.div_(255).permute(0, 3, 1, 2)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """torchvision's rgb_to_grayscale for float images: 0.2989 R + 0.587 G + 0.114 B, (P, 1, H, W)."""
    r, g, b = x.unbind(dim=-3)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(-3)


# For each hue sector i (0..5), which of (v, q, p, t) becomes R, G and B (torchvision's _hsv2rgb).
_SECTOR_SOURCES = ((0, 1, 2, 2, 3, 0), (3, 0, 0, 1, 2, 2), (2, 2, 3, 0, 0, 1))


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of (P, 3, H, W) RGB in [0, 1] by `shift` (P, 1, 1) turns, as torchvision's adjust_hue:
    _rgb2hsv, then _hsv2rgb with its one-hot einsum replaced by the equivalent (exact) gather."""
    r, g, b = x.unbind(dim=-3)
    v = torch.max(x, dim=-3).values
    minc = torch.min(x, dim=-3).values
    eqc = v == minc
    cr = v - minc
    ones = torch.ones_like(v)
    s = cr / torch.where(eqc, ones, v)
    cr_divisor = torch.where(eqc, ones, cr)
    rc = (v - r) / cr_divisor
    gc = (v - g) / cr_divisor
    bc = (v - b) / cr_divisor
    hr = (v == r) * (bc - gc)
    hg = ((v == g) & (v != r)) * (2.0 + rc - bc)
    hb = ((v != g) & (v != r)) * (4.0 + gc - rc)
    h = (torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0) + shift) % 1.0
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int64) % 6
    p = torch.clamp(v * (1.0 - s), 0.0, 1.0)
    q = torch.clamp(v * (1.0 - s * f), 0.0, 1.0)
    t = torch.clamp(v * (1.0 - s * (1.0 - f)), 0.0, 1.0)
    sources = device_constant(_SECTOR_SOURCES, x.device, torch.int64)[:, i].movedim(0, -3)  # (..., 3, H, W)
    return torch.stack((v, q, p, t), dim=-3).gather(-3, sources)


def _gate(mask: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.view(-1, 1, 1, 1), new, old)


def _blend_op(x: torch.Tensor, op: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast or saturation (op 0, 1, 2 per patch) as one blend with that op's target, as
    torchvision's adjust_*: black, the mean of the patch's grayscale, the per-pixel grayscale."""
    gray = grayscale(x)
    op = op.view(-1, 1, 1, 1)
    target = torch.where(op == SATURATION, gray, gray.mean(dim=(-3, -2, -1), keepdim=True))
    target = torch.where(op == BRIGHTNESS, torch.zeros_like(target), target)
    ratio = factors.gather(1, op.view(-1, 1)).view(-1, 1, 1, 1)
    return (ratio * x + (1.0 - ratio) * target).clamp(0.0, 1.0)  # torchvision's _blend


def color_jitter(
    x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor, enabled: tuple[bool, ...]
) -> torch.Tensor:
    """torchvision's ColorJitter with per-patch factors and order (PatchParams); `enabled[k]` False skips op k.
    The hue, the one expensive op, runs once: each patch applies its blend ops before its hue in the first three
    slots, then the hue, then the rest; a slot a patch does not use leaves it unchanged.
    """
    position = torch.argsort(order, dim=1)  # position[:, op] = when op is applied
    blend_order = torch.argsort(position[:, :3], dim=1)  # the three blend ops, in the order applied
    hue_position = position[:, HUE]
    on = device_constant(tuple(enabled[:3]), x.device, torch.bool)
    for after_hue in (False, True):
        for k in range(3):
            op = blend_order[:, k]
            use = ((k >= hue_position) if after_hue else (k < hue_position)) & on[op]
            x = _gate(use, _blend_op(x, op, factors), x)
        if not after_hue and enabled[HUE]:
            x = adjust_hue(x, factors[:, HUE].view(-1, 1, 1))
    return x


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Separable Gaussian blur with a per-patch sigma and replicated edges (as PIL), as a sum of shifted views
    (no convolution: cuDNN and TF32 settings cannot change it). x: (P, C, H, W)."""
    # sampled Gaussians, each truncated at its own ceil(3 sigma) as DALI and OpenCV do, radius covering the widest
    taps = torch.arange(-radius, radius + 1, device=sigma.device, dtype=torch.float32)
    pdf = torch.exp(-0.5 * (taps / sigma[:, None]).pow(2)) * (taps.abs() <= torch.ceil(3 * sigma[:, None]))
    kernel = (pdf / pdf.sum(dim=1, keepdim=True))[:, None, None, None, :]  # (P, 1, 1, 1, K)
    for dim in (-1, -2):
        size = x.shape[dim]
        pad = (radius, radius, 0, 0) if dim == -1 else (0, 0, radius, radius)
        padded = torch.nn.functional.pad(x, pad, mode="replicate")
        out = torch.zeros_like(x)
        for j in range(2 * radius + 1):
            out.addcmul_(kernel[..., j], padded.narrow(dim, j, size))
        x = out
    return x


def solarize(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Invert pixels >= threshold (on the 0..1 scale): torchvision's solarize for float images."""
    return torch.where(x >= threshold, 1.0 - x, x)


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """(x - mean) / std per channel (torchvision Normalize), channels_last."""
    mean = device_constant(tuple(mean), x.device, x.dtype).view(-1, 1, 1)
    std = device_constant(tuple(std), x.device, x.dtype).view(-1, 1, 1)
    return x.sub(mean).div(std).contiguous(memory_format=torch.channels_last)


def normalize_images(images_uint8_nhwc: torch.Tensor, mean, std) -> torch.Tensor:
    """Whole images, no augmentation (ToTensor, Normalize): (N, H, W, 3) uint8 -> (N, 3, H, W) float32."""
    x = images_uint8_nhwc.permute(0, 3, 1, 2).float().div(255)  # NHWC memory = channels_last
    return normalize(x, mean, std)


def augment(images: torch.Tensor, params: PatchParams, aug: AugmentConfig) -> torch.Tensor:
    """The whole recipe for given parameters: (P, 3, S, S) float32, normalized, channels_last."""
    x = crop_resize(images, params.image, params.box, params.flip, aug.crop_size)
    enabled = jitter_enabled(aug)
    if aug.jitter_p > 0 and any(enabled):
        x = _gate(params.jitter, color_jitter(x, params.factors, params.order, enabled), x)
    if aug.grayscale_p > 0:
        x = _gate(params.gray, grayscale(x).expand_as(x), x)
    if aug.blur_p > 0:
        radius = max(1, math.ceil(3 * max(aug.blur_sigma)))
        x = _gate(params.blur, gaussian_blur(x, params.sigma, radius), x)
    if aug.solarize_p > 0:
        x = _gate(params.solarize, solarize(x, aug.solarize_threshold / 255), x)
    return normalize(x, aug.mean, aug.std)


class TorchPatches(PatchBackend):
    """The batched torch backend over images (N, H, W, 3) uint8 on the device; on CUDA a request is made on a
    side stream (docs/data-backends.md). compile_recipe: `augment` through torch.compile (the draw stays
    eager; the pixels agree with the eager recipe to float rounding: `fastemp check`, row "patches compiled").
    """

    name = "torch"

    def __init__(self, images: torch.Tensor, aug: AugmentConfig, compile_recipe: bool = False):
        super().__init__()
        self.images, self.aug = images, aug
        self.recipe = torch.compile(augment, dynamic=False) if compile_recipe else augment
        self._stream = None
        if images.device.type == "cuda":
            # one eager patch on the current stream makes every device constant the recipe reads (a blocking
            # copy), so no kernel on the side stream can read one before its host copy has landed
            with torch.no_grad():
                augment(images, self.params(torch.zeros(1, dtype=torch.long, device=images.device), 1, 0), aug)
            self._stream = torch.cuda.Stream(images.device)

    def params(self, index: torch.Tensor, n: int, seed: int, shard: slice = slice(None)) -> PatchParams:
        """The parameters a call with these arguments uses."""
        height, width = self.images.shape[1:3]
        return sharded_params(PatchRequest(index, n, seed, shard), height, width, self.aug, self.images.device)

    def make(self, request: PatchRequest) -> torch.Tensor:
        with torch.no_grad(), torch.autocast(self.images.device.type, enabled=False), warnings.catch_warnings():
            # dynamo traces through device_constant's lru_cache (a pure constant) and warns that it did
            warnings.filterwarnings("ignore", message=".*functools.lru_cache", category=UserWarning)
            return self.recipe(self.images, self.params(*request), self.aug)

    def start(self, request: PatchRequest):
        if self._stream is None:
            return self.make(request), None
        side = self._stream
        side.wait_stream(torch.cuda.current_stream(self.images.device))
        with torch.cuda.stream(side):
            patches = self.make(request)
            event = torch.cuda.Event()
            event.record(side)
        if request.index.device.type == "cuda":
            request.index.record_stream(side)  # read on the side stream: not to be reused before it is done
        return patches, event

    def finish(self, handle) -> torch.Tensor:
        patches, event = handle
        if event is not None:
            stream = torch.cuda.current_stream(self.images.device)
            stream.wait_event(event)
            patches.record_stream(stream)  # made on the side stream, used and freed on this one
        return patches
