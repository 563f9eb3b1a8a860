"""The DALI patch backend: one NVIDIA DALI pipeline emits all n*B patches of a step.

The random parameters of every patch are drawn on the host by the torch backend's own
`sharded_params` (a CPU torch.Generator seeded with the call's seed) and fed to the pipeline as
per-sample arguments, so the two backends share their random semantics (crop-size formula,
factor ranges, gates), the DALI pipeline itself holds no random state, and a call is
reproducible from (index, n, seed) alone, like the torch backend (including after a resume).

The images are gathered on their device (one uint8 gather, patch-major: row i*B + b is image
index[b]) and fed to `fn.external_source` without a copy; on CUDA every op runs on the GPU
(device="gpu"), on the CPU the same graph runs with the CPU twins of the ops and no GPU at all
(device_id=None). The output, HWC float32 per patch, is handed to torch through DLPack without
a copy and permuted to (n*B, 3, S, S), which is channels_last.

Graph: slice (crop window) -> resize (bilinear, antialiased; the flip is a reversed x ROI) ->
/255 -> colour jitter (p) -> grayscale (p) -> fn.gaussian_blur (p) -> solarize (p) ->
crop_mirror_normalize. Brightness, contrast, saturation, hue, grayscale and solarize are DALI
arithmetic expressions with torchvision's formulas (contrast pivots on the per-image grayscale
mean via fn.reductions.mean, clamping to [0, 1] after each op; the hue goes through HSV exactly
as torchvision's _rgb2hsv/_hsv2rgb). Every p-gate is an arithmetic blend
`g * new + (1 - g) * old` with g in {0, 1}, so a patch that does not draw an op is exactly
unchanged by it. Ops whose p (or jitter amount) is 0 are left out of the graph.

Differences from the torch backend (see the README section "Augmentation backends"): the jitter
ops run in the fixed order brightness, contrast, saturation, hue instead of a random order per
patch; fn.gaussian_blur reflects at the borders (reflect-101) where PIL and the torch backend
replicate the edge; DALI's antialiasing filter for downscaling (crop window larger than the
output) differs from torch's/PIL's. `exact_hue=False` swaps the ~50 arithmetic ops of the exact
hue for DALI's fn.hue: in degrees (360 x torchvision's fraction of a turn), and a linear
rotation about the gray axis (YIQ-like) rather than an HSV hue shift, which visibly changes the
colour statistics (per-channel std by up to ~10% over the default recipe).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from ..config import AugmentConfig
from .draw import BRIGHTNESS, CONTRAST, GRAY_WEIGHTS, HUE, SATURATION, PatchParams, jitter_enabled, sharded_params

# Columns of the per-patch float parameter vector fed to the pipeline.
_B, _C, _S, _HUE, _JITTER, _GRAY, _BLUR, _SIGMA, _SOLARIZE = range(9)
_N_COLUMNS = 9
_IDLE_SIGMA = 0.1  # a patch that is not blurred gets this sigma: a 3-tap window, cheap (its result is unused)


def _rgb(x, frames: bool = False):
    """The R, G, B channels of an HWC (or, with frames, FHWC) DALI node, each keeping a channel axis of 1."""
    if frames:
        return x[:, :, :, 0:1], x[:, :, :, 1:2], x[:, :, :, 2:3]
    return x[:, :, 0:1], x[:, :, 1:2], x[:, :, 2:3]


def _gray(x, frames: bool = False):
    """torchvision's grayscale weights as a DALI expression: (H, W, 1), or (F, H, W, 1) with frames."""
    r, g, b = _rgb(x, frames)
    return GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b


def _uses_params(aug: AugmentConfig) -> bool:
    """Whether the pipeline reads the "params" input (DALI prunes an input nothing reads)."""
    return max(aug.jitter_p, aug.grayscale_p, aug.blur_p, aug.solarize_p) > 0


def _gate(g, new, old):
    """g * new + (1 - g) * old for g in {0, 1} (per sample or per pixel): exactly `old` where g = 0."""
    return g * new + (1.0 - g) * old


def _hue_hsv(x, shift, frames: bool = False):
    """torchvision's adjust_hue as DALI arithmetic: RGB -> HSV (_rgb2hsv), h = (h + shift) mod 1, -> RGB.

    x: (H, W, 3) float in [0, 1] (or (F, H, W, 3) with frames); shift: per-sample scalar (per-frame
    (F, 1, 1, 1) with frames), in turns. HSV -> RGB uses the closed
    form channel = v * (1 - s * clamp(min(k, 4 - k), 0, 1)), k = (n + 6h) mod 6, n = 5, 3, 1 for
    R, G, B, which equals torchvision's sector table (v, q, p, p, t, v ...) up to float rounding.
    """
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types

    r, g, b = _rgb(x, frames)
    maxc = dmath.max(dmath.max(r, g), b)
    minc = dmath.min(dmath.min(r, g), b)
    eqc = maxc == minc
    cr = maxc - minc
    s = cr / dmath.max(maxc, eqc)  # torch.where(eqc, 1, maxc): maxc <= 1, and maxc > 0 unless eqc
    cr_divisor = dmath.max(cr, eqc)  # torch.where(eqc, 1, cr)
    rc, gc, bc = (maxc - r) / cr_divisor, (maxc - g) / cr_divisor, (maxc - b) / cr_divisor
    is_r = maxc == r
    is_g = (maxc == g) & (maxc != r)
    is_b = (maxc != g) & (maxc != r)
    h = (is_r * (bc - gc) + is_g * (2.0 + rc - bc) + is_b * (4.0 + gc - rc)) / 6.0 + 1.0
    h = h - dmath.floor(h)  # torch.fmod(h, 1) for h >= 0
    h = h + shift
    h = h - dmath.floor(h)  # (h + shift) % 1, Python-style
    k = (types.Constant(np.float32([5.0, 3.0, 1.0])) + 6.0 * h) % 6.0
    return maxc * (1.0 - s * dmath.clamp(dmath.min(k, 4.0 - k), 0.0, 1.0))


def _build_pipeline(
    batch_size: int, size: int, aug: AugmentConfig, device_id, image_device: str, seed: int, exact_hue: bool
):
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    @pipeline_def(
        batch_size=batch_size,
        num_threads=max(1, min(4, os.cpu_count() or 1)),
        device_id=device_id,
        seed=seed,
        prefetch_queue_depth=1,
    )
    def patches():
        images = fn.external_source(name="images", device=image_device, layout="HWC", dtype=types.UINT8, no_copy=True)
        window = fn.external_source(name="window", dtype=types.INT32)  # top, left, h, w
        roi = fn.external_source(name="roi", dtype=types.FLOAT)  # y0, x0, y1, x1 inside the window
        prm = fn.external_source(name="params", dtype=types.FLOAT)  # pruned when _uses_params(aug) is False

        crop = fn.slice(images, start=window[0:2], shape=window[2:4], axes=[0, 1])
        x = (
            fn.resize(
                crop,
                size=[size, size],
                roi_start=roi[0:2],
                roi_end=roi[2:4],
                dtype=types.FLOAT,
                antialias=True,
                minibatch_size=batch_size,
            )
            / 255.0
        )

        if aug.jitter_p > 0:  # in the fixed order brightness, contrast, saturation, hue
            j = x
            if aug.brightness > 0:
                j = dmath.clamp(prm[_B] * j, 0.0, 1.0)
            if aug.contrast > 0:
                c = prm[_C]
                j = dmath.clamp(c * j + (1.0 - c) * fn.reductions.mean(_gray(j)), 0.0, 1.0)
            if aug.saturation > 0:
                s = prm[_S]
                j = dmath.clamp(s * j + (1.0 - s) * _gray(j), 0.0, 1.0)
            if aug.hue > 0 and exact_hue:
                j = _hue_hsv(j, prm[_HUE])
            elif aug.hue > 0:
                j = dmath.clamp(fn.hue(j, hue=360.0 * prm[_HUE], dtype=types.FLOAT), 0.0, 1.0)  # fn.hue: degrees
            x = _gate(prm[_JITTER], j, x)
        if aug.grayscale_p > 0:
            x = _gate(prm[_GRAY], _gray(x), x)
        if aug.blur_p > 0:
            x = _gate(prm[_BLUR], fn.gaussian_blur(x, sigma=prm[_SIGMA], dtype=types.FLOAT), x)
        if aug.solarize_p > 0:
            x = _gate(prm[_SOLARIZE] * (x >= aug.solarize_threshold / 255), 1.0 - x, x)
        return fn.crop_mirror_normalize(
            x, mean=list(aug.mean), std=list(aug.std), output_layout="HWC", dtype=types.FLOAT
        )

    pipe = patches()
    pipe.build()
    return pipe


def pipeline_inputs(params: PatchParams, aug: AugmentConfig) -> dict[str, np.ndarray]:
    """The per-patch host arrays the pipeline reads (every op a patch does not draw is an identity)."""
    box = params.box.cpu().numpy().astype(np.int32)
    h, w = box[:, 2].astype(np.float32), box[:, 3].astype(np.float32)
    flip = params.flip.cpu().numpy()
    zeros = np.zeros_like(h)
    roi = np.stack([zeros, np.where(flip, w, 0), h, np.where(flip, 0, w)], axis=1).astype(np.float32)

    jitter = params.jitter.cpu().numpy()
    factors = params.factors.cpu().numpy().astype(np.float32)
    enabled = jitter_enabled(aug)
    prm = np.zeros((box.shape[0], _N_COLUMNS), np.float32)
    for column, op in ((_B, BRIGHTNESS), (_C, CONTRAST), (_S, SATURATION)):
        prm[:, column] = np.where(jitter & enabled[op], factors[:, op], 1.0)
    prm[:, _HUE] = np.where(jitter & enabled[HUE], factors[:, HUE], 0.0)  # turns
    prm[:, _JITTER] = jitter
    prm[:, _GRAY] = params.gray.cpu().numpy()
    blur = params.blur.cpu().numpy()
    prm[:, _BLUR] = blur
    prm[:, _SIGMA] = np.where(blur, params.sigma.cpu().numpy(), _IDLE_SIGMA)
    prm[:, _SOLARIZE] = params.solarize.cpu().numpy()
    return {"window": box, "roi": roi, **({"params": prm} if _uses_params(aug) else {})}


class DaliPatches:
    """The DALI backend: (index, n, seed) -> (n*B, 3, S, S) float32, channels_last, on the images' device.

    One pipeline per batch size n*B (built on first use, then cached). `seed` seeds the pipelines
    but they draw nothing themselves: the per-call `seed` decides every random choice, so a call
    is reproducible on its own (same device, same DALI version).
    """

    name = "dali"

    def __init__(self, images: torch.Tensor, aug: AugmentConfig, seed: int = 0, exact_hue: bool = True):
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected (N, H, W, 3) uint8 images, got {tuple(images.shape)} {images.dtype}")
        import nvidia.dali  # noqa: F401  (fail here, not on the first call, when DALI is missing)

        self.images, self.aug, self.seed, self.exact_hue = images, aug, seed, exact_hue
        self.device = images.device
        self._pipes: dict[int, object] = {}
        self._inputs = None  # the last batch fed without a copy, kept alive while DALI may read it

    def _pipeline(self, batch_size: int):
        if batch_size not in self._pipes:
            on_cuda = self.device.type == "cuda"
            device_id = (
                (self.device.index if self.device.index is not None else torch.cuda.current_device())
                if on_cuda
                else None
            )
            self._pipes[batch_size] = _build_pipeline(
                batch_size,
                self.aug.crop_size,
                self.aug,
                device_id,
                "gpu" if on_cuda else "cpu",
                self.seed,
                self.exact_hue,
            )
        return self._pipes[batch_size]

    def params(self, index: torch.Tensor, n: int, seed: int, shard: slice = slice(None)) -> PatchParams:
        """The parameters a call with these arguments uses: the torch backend's, drawn on the CPU
        (`image` stays on the index's device); a rank feeds only its shard's rows."""
        generator = torch.Generator()
        generator.manual_seed(seed)
        return sharded_params(index, n, shard, self.images.shape[1], self.images.shape[2], self.aug, generator)

    def __call__(self, index: torch.Tensor, n: int, seed: int, shard: slice = slice(None)) -> torch.Tensor:
        params = self.params(index, n, seed, shard)  # on the host, without waiting for the device
        with torch.no_grad():
            gathered = self.images[params.image.to(self.device)]  # (P, H, W, 3), patch-major
        self._inputs = gathered
        feed = pipeline_inputs(params, self.aug)
        pipe = self._pipeline(gathered.shape[0])
        if self.device.type == "cuda":
            stream = torch.cuda.current_stream(self.device)
            (out,) = pipe.run(stream.cuda_stream, images=gathered, **feed)
        else:
            (out,) = pipe.run(images=gathered.numpy(), **feed)
        return _to_torch(out, self.device).permute(0, 3, 1, 2)

    def prefetch(self, index: torch.Tensor, n: int, seed: int, shard: slice = slice(None)) -> None:
        """Nothing started ahead: the patches are made on call (see PatchBackend.prefetch)."""


def _to_torch(out, device: torch.device) -> torch.Tensor:
    """A DALI output batch as one torch tensor: a DLPack view when DALI holds it densely, else a copy."""
    if out.is_dense_tensor():
        return torch.from_dlpack(out.as_tensor())  # the default (dynamic) executor never reuses it
    from nvidia.dali.plugin.pytorch import feed_ndarray

    shape = (len(out),) + tuple(out[0].shape())
    dst = torch.empty(shape, dtype=torch.float32, device=device)
    feed_ndarray(out, dst, cuda_stream=torch.cuda.current_stream(device) if device.type == "cuda" else None)
    return dst
