"""The Pillow patch backend for streamed images: the official recipe on PIL images, in worker processes.

This is the reference and the fallback for streamed data (fastemp/data/streamed.py). Every patch
is the official ImageNet recipe (dataset/aug4img.py of the official code, torchvision on PIL
images) with its random choices taken from the shared draw (draw.sharded_uniforms on a CPU
generator seeded with the call's seed, one row of 18 uniforms per patch, so a call depends only on
(seed, global image position, patch index), as in the other backends, and a resumed run sees the
same patches):

    RandomResizedCrop(S, crop_scale, crop_ratio, interpolation) -> RandomHorizontalFlip
    -> RandomApply(ColorJitter, jitter_p) (ops in the drawn order) -> RandomGrayscale
    -> GaussianBlur(sigma) (p) -> Solarize (p) -> ToTensor -> Normalize

each op as torchvision applies it to a PIL image (ImageEnhance for brightness, contrast and
saturation; the uint8 HSV hue shift; convert("L") grayscale; ImageFilter.GaussianBlur;
ImageOps.solarize). The crop window is drawn for the image's own size (read from its header).

Workers: data.workers processes (a ProcessPoolExecutor; 0 = in the training process) each decode
one image and cut its n patches, returning uint8 (n, S, S, 3); ToTensor and Normalize run in the
training process on the target device. A torch DataLoader is not used because its sampler must
know the next request ahead of time; `prefetch(index, n, seed, shard)` (the PatchBackend hook
the trainer calls for step t+1) submits the next step's images to the pool so they are decoded
while step t trains, in the epoch's order.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os

import numpy as np
import torch

from ..config import AugmentConfig
from .draw import BRIGHTNESS, CONTRAST, SATURATION, jitter_enabled, params_from_uniforms, sharded_uniforms
from .torch_backend import normalize_images

RESAMPLE = {"bilinear": 2, "bicubic": 3}  # PIL.Image.Resampling.BILINEAR, BICUBIC
PREFETCH_DEPTH = 2  # requests decoded ahead at most (a request nobody collects is dropped with the oldest)


def _adjust_hue(img, shift: float):
    """torchvision's F_pil.adjust_hue: shift the uint8 H channel of PIL's HSV by shift*255 (wrapping)."""
    from PIL import Image

    h, s, v = img.convert("HSV").split()
    np_h = ((np.asarray(h, dtype=np.int16) + int(shift * 255)) % 256).astype(np.uint8)
    return Image.merge("HSV", (Image.fromarray(np_h, "L"), s, v)).convert("RGB")


def _jitter_op(img, op: int, factor: float):
    """One ColorJitter op as torchvision applies it to a PIL image."""
    from PIL import ImageEnhance

    if op == BRIGHTNESS:
        return ImageEnhance.Brightness(img).enhance(factor)
    if op == CONTRAST:
        return ImageEnhance.Contrast(img).enhance(factor)
    if op == SATURATION:
        return ImageEnhance.Color(img).enhance(factor)
    return _adjust_hue(img, factor)


def official_patch(
    img,
    box,
    flip: bool,
    jitter: bool,
    factors,
    order,
    gray: bool,
    blur: bool,
    sigma: float,
    solarize: bool,
    aug: AugmentConfig,
) -> np.ndarray:
    """One patch of the official recipe from a PIL RGB image and its drawn parameters: (S, S, 3) uint8."""
    from PIL import Image, ImageFilter, ImageOps

    top, left, h, w = (int(v) for v in box)
    size = aug.crop_size
    x = img.crop((left, top, left + w, top + h)).resize((size, size), RESAMPLE[aug.interpolation])
    if flip:
        x = x.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if jitter:
        enabled = jitter_enabled(aug)
        for op in order:
            if enabled[op]:
                x = _jitter_op(x, int(op), float(factors[op]))
    if gray:
        x = Image.merge("RGB", (x.convert("L"),) * 3)  # torchvision: convert("L"), then 3 equal channels
    if blur:
        x = x.filter(ImageFilter.GaussianBlur(float(sigma)))
    if solarize:
        x = ImageOps.solarize(x, aug.solarize_threshold)
    return np.asarray(x, dtype=np.uint8)


def open_rgb(path: str):
    """The image at `path` as a decoded PIL RGB image (grayscale and CMYK JPEGs converted)."""
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def image_patches(path: str, uniforms: np.ndarray, aug: AugmentConfig) -> np.ndarray:
    """The n patches of one image from its n rows of the shared draw: (n, S, S, 3) uint8.

    The rows become parameters exactly as in the other backends (draw.params_from_uniforms), with
    the crop drawn for this image's size. Runs in a worker process.
    """
    img = open_rgb(path)
    u = torch.from_numpy(uniforms)
    p = params_from_uniforms(u, torch.zeros(u.shape[0], dtype=torch.long), img.height, img.width, aug)
    return np.stack(
        [
            official_patch(
                img,
                p.box[i].tolist(),
                bool(p.flip[i]),
                bool(p.jitter[i]),
                p.factors[i].tolist(),
                p.order[i].tolist(),
                bool(p.gray[i]),
                bool(p.blur[i]),
                float(p.sigma[i]),
                bool(p.solarize[i]),
                aug,
            )
            for i in range(u.shape[0])
        ]
    )


def draw_uniforms(index: torch.Tensor, n: int, seed: int, shard: slice) -> torch.Tensor:
    """The shard's rows of the shared draw as (b, n, 18): image-major, for per-image work."""
    generator = torch.Generator().manual_seed(seed)
    u = sharded_uniforms(int(index.shape[0]), n, shard, generator)
    return u.view(n, -1, u.shape[-1]).transpose(0, 1)


def to_patch_batch(per_image: np.ndarray | torch.Tensor, aug: AugmentConfig, device: torch.device) -> torch.Tensor:
    """(b, n, S, S, 3) uint8 patches -> (n*b, 3, S, S) float32 normalized, patch-major, channels_last."""
    x = torch.as_tensor(per_image).to(device, non_blocking=True).transpose(0, 1)
    return normalize_images(x.reshape(-1, *x.shape[2:]), aug.mean, aug.std)


def _request_key(index: torch.Tensor, n: int, seed: int, shard: slice) -> tuple:
    return (tuple(index.tolist()), n, seed, shard.start, shard.stop, shard.step)


class PillowPatches:
    """Streamed images -> (n*B, 3, S, S) float32, the official recipe on PIL images in worker processes."""

    name = "pillow"

    def __init__(self, data, aug: AugmentConfig, workers: int = 8):
        self.data, self.aug, self.workers, self.device = data, aug, workers, data.device
        self._pool = None
        self._pending: dict[tuple, list] = {}  # request -> futures of its images, in order

    def _executor(self):
        if self._pool is None and self.workers > 0:
            # forkserver: a fork of a process that runs DALI or CUDA threads is not safe
            context = multiprocessing.get_context("forkserver" if os.name == "posix" else "spawn")
            self._pool = concurrent.futures.ProcessPoolExecutor(self.workers, mp_context=context)
        return self._pool

    def _submit(self, index: torch.Tensor, n: int, seed: int, shard: slice) -> list:
        u = draw_uniforms(index, n, seed, shard).numpy()
        mine = index[shard].tolist()
        return [self._executor().submit(image_patches, self.data.paths[i], u[j], self.aug) for j, i in enumerate(mine)]

    def prefetch(self, index: torch.Tensor, n: int, seed: int, shard: slice = slice(None)) -> None:
        """Start decoding the images of a later call (in the workers) so it finds them ready."""
        key = _request_key(index, n, seed, shard)
        if self.workers > 0 and key not in self._pending:
            while len(self._pending) >= PREFETCH_DEPTH:
                for future in self._pending.pop(next(iter(self._pending))):
                    future.cancel()
            self._pending[key] = self._submit(index.cpu(), n, seed, shard)

    def __call__(self, index: torch.Tensor, n: int, seed: int, shard: slice = slice(None)) -> torch.Tensor:
        index = index.cpu()
        if self.workers == 0:
            u = draw_uniforms(index, n, seed, shard).numpy()
            per_image = [image_patches(self.data.paths[i], u[j], self.aug) for j, i in enumerate(index[shard].tolist())]
        else:
            key = _request_key(index, n, seed, shard)
            futures = self._pending.pop(key, None) or self._submit(index, n, seed, shard)
            per_image = [f.result() for f in futures]
        return to_patch_batch(np.stack(per_image), self.aug, self.device)

    def close(self) -> None:
        """Stop the worker processes (they also stop with the training process)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def whole_images(data, index: torch.Tensor, aug: AugmentConfig) -> torch.Tensor:
    """Un-augmented streamed images for "plain" evaluation: shorter side resized to S, centre S x S crop,
    ToTensor, Normalize -> (b, 3, S, S) float32 channels_last on data.device."""
    size = aug.crop_size
    out = []
    for i in index.tolist():
        img = open_rgb(data.paths[i])
        scale = size / min(img.width, img.height)
        w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
        img = img.resize((w, h), RESAMPLE[aug.interpolation])
        left, top = (w - size) // 2, (h - size) // 2
        out.append(np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8))
    return to_patch_batch(np.stack(out)[:, None], aug, data.device)
