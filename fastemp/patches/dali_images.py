"""The DALI patch backend for streamed images: decode each JPEG once, cut its n patches, all on the GPU.

Samples are IMAGES, not patches: a pipeline run takes the b encoded files of a step (read on the
host, in the order the trainer asks for: the epoch's permutation), decodes them with
`fn.decoders.image(device="mixed")` (nvJPEG; the hardware JPEG decoder where the GPU has one) on
CUDA or the CPU decoder without a GPU (the CPU twin, same graph), and makes every image's n
patches as n crop+resize branches over the batch of images (slice the crop window, resize it to
S x S with the configured interpolation, antialiased; a flip is a reversed x ROI), stacked into
one (n, S, S, 3) sequence per image. The colour ops then run once over all n*b patches with
per-frame parameters (arithmetic broadcasting over (n, 1, 1, 1) columns, the Gaussian blur's
sigma through `fn.per_frame`): jitter (brightness, contrast, saturation, hue, in that fixed
order), grayscale, blur, solarize, normalize, each gated per patch, as in the resident DALI
backend (dali_backend.py, whose expressions are reused). Output: (n*b, 3, S, S) float32,
patch-major, channels_last, on the device.

Randomness: the parameters come from the shared draw (draw.sharded_uniforms on a CPU generator
seeded with the call's seed, turned into crops with each image's own size, read from its JPEG
header), exactly as in the Pillow backend (pillow_images.py), so both backends cut the same
windows, and a resumed run sees the same patches. The pipeline draws nothing itself.

Prefetch: `prefetch(index, n, seed, shard)` (called by the trainer for step t+1) reads the
files, feeds the pipeline and schedules its run; DALI runs it in its own threads and CUDA stream
while step t trains, up to PREFETCH_DEPTH requests ahead. The call for that request collects the
output; a call nobody prefetched (or that does not match the queue, e.g. evaluation) drains the
queue and runs at once.

Known differences from the Pillow reference (docs/data-backends.md): the fixed jitter order, float
arithmetic instead of uint8 rounding after every op, DALI's resampling filters, a sampled
Gaussian blur (reflect-101 borders) instead of PIL's box-blur approximation, the exact float HSV
hue instead of PIL's uint8 HSV.
"""

from __future__ import annotations

import collections
import concurrent.futures
import io
import os

import numpy as np
import torch

from ..config import AugmentConfig
from .dali_backend import (
    _B,
    _BLUR,
    _C,
    _GRAY,
    _HUE,
    _JITTER,
    _S,
    _SIGMA,
    _SOLARIZE,
    _gate,
    _gray,
    _hue_hsv,
    pipeline_inputs,
)
from .draw import PatchParams, sharded_params
from .pillow_images import _request_key as _key

PREFETCH_DEPTH = 2  # requests scheduled ahead of the one being trained on
READ_THREADS = 8  # host threads reading files (I/O, not decoding)


def _interp(name: str):
    import nvidia.dali.types as types

    return {"bilinear": types.INTERP_LINEAR, "bicubic": types.INTERP_CUBIC}[name]


def _build_pipeline(batch: int, n: int, aug: AugmentConfig, device_id, seed: int):
    """The graph over `batch` encoded images, n patches each; device_id None: CPU operators only."""
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    on_gpu = device_id is not None
    size = aug.crop_size

    @pipeline_def(
        batch_size=batch,
        num_threads=max(1, min(8, os.cpu_count() or 1)),
        device_id=device_id,
        seed=seed,
        prefetch_queue_depth=PREFETCH_DEPTH + 1,
    )
    def images_to_patches():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        window = fn.external_source(name="window", dtype=types.INT32, ndim=2)  # (n, 4): top, left, h, w
        roi = fn.external_source(name="roi", dtype=types.FLOAT, ndim=2)  # (n, 4): y0, x0, y1, x1 in the window
        prm = fn.external_source(name="params", dtype=types.FLOAT, ndim=2)  # (n, 9); pruned if unread

        def column(k):  # one parameter per patch as an (n, 1, 1, 1) operand next to the (n, S, S, 3) patches
            col = fn.reshape(prm[:, k], shape=[n, 1, 1, 1])
            return col.gpu() if on_gpu else col

        # pixels as stored, like PIL (and the official ImageFolder): the crop windows are drawn for the stored size
        image = fn.decoders.image(
            encoded, device="mixed" if on_gpu else "cpu", output_type=types.RGB, adjust_orientation=False
        )
        crops = []
        for i in range(n):
            crop = fn.slice(image, start=window[i, 0:2], shape=window[i, 2:4], axes=[0, 1])
            crops.append(
                fn.resize(
                    crop,
                    size=[size, size],
                    roi_start=roi[i, 0:2],
                    roi_end=roi[i, 2:4],
                    interp_type=_interp(aug.interpolation),
                    antialias=True,
                    dtype=types.FLOAT,
                )
            )
        x = fn.stack(*crops, axis=0, axis_name="F") / 255.0  # (n, S, S, 3) per image

        if aug.jitter_p > 0:  # in the fixed order brightness, contrast, saturation, hue
            j = x
            if aug.brightness > 0:
                j = dmath.clamp(column(_B) * j, 0.0, 1.0)
            if aug.contrast > 0:
                c = column(_C)
                mean = fn.reductions.mean(_gray(j, frames=True), axes=[1, 2, 3], keep_dims=True)
                j = dmath.clamp(c * j + (1.0 - c) * mean, 0.0, 1.0)
            if aug.saturation > 0:
                s = column(_S)
                j = dmath.clamp(s * j + (1.0 - s) * _gray(j, frames=True), 0.0, 1.0)
            if aug.hue > 0:
                j = _hue_hsv(j, column(_HUE), frames=True)
            x = _gate(column(_JITTER), j, x)
        if aug.grayscale_p > 0:
            x = _gate(column(_GRAY), _gray(x, frames=True), x)
        if aug.blur_p > 0:
            x = _gate(column(_BLUR), fn.gaussian_blur(x, sigma=fn.per_frame(prm[:, _SIGMA]), dtype=types.FLOAT), x)
        if aug.solarize_p > 0:
            x = _gate(column(_SOLARIZE) * (x >= aug.solarize_threshold / 255), 1.0 - x, x)
        mean = types.Constant(np.float32(aug.mean))
        std = types.Constant(np.float32(aug.std))
        return (x - mean) / std

    pipe = images_to_patches()
    pipe.build()
    # schedule_run's first call runs prefetch_queue_depth iterations at once (made for sources that
    # feed themselves); fed one request per schedule_run, every call must run exactly once
    pipe._first_iter = False
    return pipe


def image_size(blob: np.ndarray) -> tuple[int, int]:
    """(height, width) of an encoded image from its header (no decode)."""
    from PIL import Image

    with Image.open(io.BytesIO(blob.tobytes())) as im:
        return im.height, im.width


def streamed_params(
    index: torch.Tensor, n: int, seed: int, shard: slice, heights: list[int], widths: list[int], aug: AugmentConfig
) -> PatchParams:
    """Every patch's parameters for images index[shard] of sizes (heights, widths): the shared draw,
    patch-major (row i*b + j is patch i of image j), crops drawn for each image's own size."""
    generator = torch.Generator().manual_seed(seed)
    return sharded_params(
        index, n, shard, torch.tensor(heights).repeat(n), torch.tensor(widths).repeat(n), aug, generator
    )


class DaliImagePatches:
    """Streamed images -> (n*B, 3, S, S) float32 patches, decoded and augmented by DALI (GPU or CPU twin)."""

    name = "dali"

    def __init__(self, data, aug: AugmentConfig, seed: int = 0):
        import nvidia.dali  # noqa: F401  (fail here, not on the first call, when DALI is missing)

        self.data, self.aug, self.seed, self.device = data, aug, seed, data.device
        self._pipes: dict[tuple[int, int], object] = {}
        self._pending: dict[tuple[int, int], collections.deque] = {}  # per pipeline: requests scheduled, in order
        self._reader = concurrent.futures.ThreadPoolExecutor(READ_THREADS)

    def _pipeline(self, batch: int, n: int):
        if (batch, n) not in self._pipes:
            on_cuda = self.device.type == "cuda"
            device_id = (
                (self.device.index if self.device.index is not None else torch.cuda.current_device())
                if on_cuda
                else None
            )
            self._pipes[batch, n] = _build_pipeline(batch, n, self.aug, device_id, self.seed)
            self._pending[batch, n] = collections.deque()
        return self._pipes[batch, n]

    def params(self, index: torch.Tensor, n: int, seed: int, shard: slice = slice(None)) -> PatchParams:
        """The parameters a call with these arguments uses (reads the images' headers)."""
        blobs = list(self._reader.map(self.data.read, index.cpu()[shard].tolist()))
        heights, widths = zip(*(image_size(b) for b in blobs))
        return streamed_params(index.cpu(), n, seed, shard, list(heights), list(widths), self.aug)

    def _schedule(self, index: torch.Tensor, n: int, seed: int, shard: slice) -> None:
        """Read the files, feed the pipeline and start its run (asynchronous)."""
        index = index.cpu()
        mine = index[shard].tolist()
        blobs = list(self._reader.map(self.data.read, mine))
        heights, widths = zip(*(image_size(b) for b in blobs))
        params = streamed_params(index, n, seed, shard, list(heights), list(widths), self.aug)
        feed = pipeline_inputs(params, self.aug)
        b = len(mine)
        pipe = self._pipeline(b, n)
        pipe.feed_input("encoded", blobs)
        for name, rows in feed.items():  # patch-major (n*b, k) -> one (n, k) array per image
            per_image = rows.reshape(n, b, -1)
            pipe.feed_input(name, [np.ascontiguousarray(per_image[:, j]) for j in range(b)])
        pipe.schedule_run()
        self._pending[b, n].append(_key(index, n, seed, shard))

    def prefetch(self, index: torch.Tensor, n: int, seed: int, shard: slice = slice(None)) -> None:
        """Schedule a later call's run now, so its files are decoded while the current step trains."""
        b = len(index.cpu()[shard])
        queue = self._pending.get((b, n), ())
        if _key(index.cpu(), n, seed, shard) not in queue and len(queue) < PREFETCH_DEPTH:
            self._schedule(index, n, seed, shard)

    def __call__(self, index: torch.Tensor, n: int, seed: int, shard: slice = slice(None)) -> torch.Tensor:
        index = index.cpu()
        b, key = len(index[shard]), _key(index, n, seed, shard)
        pipe = self._pipeline(b, n)
        queue = self._pending[b, n]
        if key not in queue:  # not prefetched: drop whatever was scheduled, run this one now
            while queue:
                queue.popleft()
                pipe.outputs()
            self._schedule(index, n, seed, shard)
        while queue[0] != key:  # scheduled but skipped (the caller changed its mind): discard
            queue.popleft()
            pipe.outputs()
        queue.popleft()
        stream = torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else None
        (out,) = pipe.outputs(cuda_stream=stream)
        x = torch.from_dlpack(out.as_tensor())  # (b, n, S, S, 3), consumed on torch's stream
        x = x.transpose(0, 1).reshape(n * b, *x.shape[2:])  # patch-major: a copy DALI's buffer can go after
        return x.permute(0, 3, 1, 2)  # NHWC memory: channels_last
