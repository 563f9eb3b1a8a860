"""The Pillow patch backend for streamed images, the reference and the fallback: the official recipe
(dataset/aug4img.py, torchvision on PIL images) op by op, its random choices from the shared draw (patches/draw.py,
the crop drawn for each image's own size), in data.workers processes (0: the training process) that each decode
one image and cut its n patches as uint8; ToTensor and Normalize run on the target device (docs/data-backends.md).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import os
import select
import signal
import threading
import time
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import torch

from ..config import AugmentConfig
from ..data.streamed import BadFileError, checked_image, or_why
from ..errors import DataError
from .draw import HUE, N_UNIFORMS, PatchParams, jitter_enabled, params_from_uniforms, sharded_uniforms
from .prefetch import PatchBackend, PatchRequest, patch_major
from .torch_backend import normalize_images

RESAMPLE = {"bilinear": 2, "bicubic": 3}  # PIL.Image.Resampling.BILINEAR, BICUBIC


def _adjust_hue(img, shift: float):
    """torchvision's F_pil.adjust_hue: shift the uint8 H channel of PIL's HSV by shift*255 (wrapping)."""
    from PIL import Image

    h, s, v = img.convert("HSV").split()
    np_h = ((np.asarray(h, dtype=np.int16) + int(shift * 255)) % 256).astype(np.uint8)
    return Image.merge("HSV", (Image.fromarray(np_h, "L"), s, v)).convert("RGB")


def official_patch(img, p: PatchParams, i: int, aug: AugmentConfig) -> np.ndarray:
    """Patch i of the official recipe from a PIL RGB image and the drawn parameters: (S, S, 3) uint8."""
    from PIL import Image, ImageEnhance, ImageFilter, ImageOps

    top, left, h, w = p.box[i].tolist()
    size = aug.crop_size
    x = img.crop((left, top, left + w, top + h)).resize((size, size), RESAMPLE[aug.interpolation])
    if p.flip[i]:
        x = x.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if p.jitter[i]:
        enabled = jitter_enabled(aug)
        enhancers = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)  # ops 0, 1, 2
        for op in (op for op in p.order[i].tolist() if enabled[op]):
            factor = float(p.factors[i, op])
            x = _adjust_hue(x, factor) if op == HUE else enhancers[op](x).enhance(factor)
    if p.gray[i]:
        x = Image.merge("RGB", (x.convert("L"),) * 3)  # torchvision: convert("L"), then 3 equal channels
    if p.blur[i]:
        x = x.filter(ImageFilter.GaussianBlur(float(p.sigma[i])))
    if p.solarize[i]:
        x = ImageOps.solarize(x, aug.solarize_threshold)
    return np.asarray(x, dtype=np.uint8)


def open_rgb(path: str):
    """The image at `path` decoded as PIL RGB (grayscale and CMYK converted); BadFileError when its file fails."""
    return checked_image(path, lambda blob, im: im.convert("RGB"))


def image_patches(path: str, uniforms: np.ndarray, aug: AugmentConfig) -> np.ndarray:
    """The n patches (n, S, S, 3) uint8 of one image from its n rows of the shared draw, the crops drawn for its
    size. Runs in a worker process."""
    img = open_rgb(path)
    u = torch.from_numpy(uniforms)
    p = params_from_uniforms(u, torch.zeros(u.shape[0], dtype=torch.long), img.height, img.width, aug)
    return np.stack([official_patch(img, p, i, aug) for i in range(u.shape[0])])


def _start_worker(trainer: int, started) -> None:
    """A worker ignores Ctrl-C and SIGTERM (sent to the process group, they are the training process's to handle,
    fastemp.stop) and ends with the training process however that ends: its parent, the forkserver, outlives a
    killed training process, so a thread waits for that pid. `started`: a barrier of all the workers."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def watch() -> None:
        try:
            select.select([os.pidfd_open(trainer)], [], [])  # readable once the process has ended
        except (AttributeError, OSError):  # no pidfd (not Linux >= 5.3): poll until the pid is gone
            with contextlib.suppress(OSError):
                while not os.kill(trainer, 0):
                    time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()
    started.wait(timeout=300)  # a worker that never starts breaks the barrier, and so the pool: one line


def to_patch_batch(per_image: np.ndarray | torch.Tensor, aug: AugmentConfig, device: torch.device) -> torch.Tensor:
    """(b, n, S, S, 3) uint8 patches -> (n*b, 3, S, S) float32 normalized, patch-major, channels_last."""
    x = patch_major(torch.as_tensor(per_image).to(device, non_blocking=True))
    return normalize_images(x, aug.mean, aug.std)


class PillowPatches(PatchBackend):
    """Streamed images -> (n*b, 3, S, S) float32: a request is one task per image in the pool (no workers: made
    when started)."""

    name = "pillow"

    def __init__(self, data, aug: AugmentConfig, workers: int = 8):
        super().__init__()
        self.data, self.aug, self.workers, self.device = data, aug, workers, data.device
        self._pool = None

    def _executor(self):
        if self._pool is None:
            # forkserver: a fork of a process that runs DALI or CUDA threads is not safe
            context = multiprocessing.get_context("forkserver" if os.name == "posix" else "spawn")
            started = context.Barrier(self.workers)
            self._pool = concurrent.futures.ProcessPoolExecutor(
                self.workers, mp_context=context, initializer=_start_worker, initargs=(os.getpid(), started)
            )
            # Every worker now, none later: one still starting (before it ignores signals) when the process group
            # is signalled would die and break the pool; the barrier makes each task below start its own worker.
            for done in [self._pool.submit(os.getpid) for _ in range(self.workers)]:
                done.result()
        return self._pool

    def start(self, request: PatchRequest):
        index = request.index.cpu().tolist()
        u = sharded_uniforms(request).view(request.n, -1, N_UNIFORMS).transpose(0, 1).numpy()  # (b, n, 18) by image
        positions = range(len(index))[request.shard]
        paths = [self.data.paths[index[p]] for p in positions]
        try:
            run = self._executor().submit if self.workers else lambda make, *args: make(*args)
            made = [run(or_why, image_patches, path, u[j], self.aug) for j, path in enumerate(paths)]
        except BrokenProcessPool:
            raise self._died() from None
        return index, positions, u, made

    def finish(self, handle) -> torch.Tensor:
        index, positions, u, made = handle
        per_image = []
        for j, (p, result) in enumerate(zip(positions, made)):
            try:
                result = result if self.workers == 0 else result.result()
            except BrokenProcessPool:
                raise self._died() from None
            if isinstance(result, str):  # its file failed: data.bad_files decides
                result = self.data.instead(
                    index, p, result, lambda i, row=u[j]: image_patches(self.data.paths[i], row, self.aug)
                )
            per_image.append(result)
        return to_patch_batch(np.stack(per_image), self.aug, self.device)

    def _died(self) -> DataError:
        return DataError(
            f"a Pillow worker process died (killed, or out of memory?); lower data.workers ({self.workers})"
        )

    def drop(self, handle) -> None:
        for future in handle[3] if self.workers else ():
            future.cancel()

    def close(self) -> None:
        """Stop the worker processes (they also stop with the training process)."""
        super().close()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def whole_images(data, index: torch.Tensor, aug: AugmentConfig) -> torch.Tensor:
    """Un-augmented streamed images for "plain" evaluation: shorter side resized to S, centre S x S crop,
    ToTensor, Normalize -> (b, 3, S, S) float32 channels_last on data.device."""
    size = aug.crop_size
    out, index = [], index.tolist()
    for p, i in enumerate(index):
        try:
            img = open_rgb(data.paths[i])
        except BadFileError as err:  # data.bad_files decides, as in training
            img = data.instead(index, p, err.why, lambda k: open_rgb(data.paths[k]))
        scale = size / min(img.width, img.height)
        w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
        img = img.resize((w, h), RESAMPLE[aug.interpolation])
        left, top = (w - size) // 2, (h - size) // 2
        out.append(np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8))
    return to_patch_batch(np.stack(out)[:, None], aug, data.device)
