"""The DALI patch backend: decode each image file once and cut its n patches, all on the GPU (CPU operators
without one). The graph, the worker thread and how it differs from the other backends: docs/data-backends.md
(#the-dali-pipeline) and docs/augmentation.md. The pipeline draws nothing itself: the parameters come from the
shared draw (patches/draw.py) on a CPU generator, the crops drawn for each image's size (from its header).
"""

from __future__ import annotations

import concurrent.futures
import os

import numpy as np
import torch

from ..config import AugmentConfig
from ..data.listing import undecodable
from ..data.streamed import BadFileError, or_why
from ..errors import DataError, one_line
from .draw import GRAY_WEIGHTS, PatchParams, sharded_params
from .prefetch import PatchBackend, PatchRequest, patch_major

READ_THREADS = 8  # host threads reading files (I/O, not decoding)

# Columns of the per-patch float parameters fed to the pipeline.
_B, _C, _S, _HUE, _JITTER, _GRAY, _BLUR, _SIGMA, _SOLARIZE = range(9)
_IDLE_SIGMA = 0.1  # a patch that is not blurred gets this sigma: a 3-tap window, cheap (its result is unused)


# ----------------------------------------------------------------------------- the colour ops


def _rgb(x):  # the channels of (n, H, W, 3) patches, each (n, H, W, 1)
    return x[:, :, :, 0:1], x[:, :, :, 1:2], x[:, :, :, 2:3]


def _gray(x):  # torchvision's grayscale
    r, g, b = _rgb(x)
    return GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b


def _gate(g, new, old):  # g in {0, 1} per patch or per pixel: exactly `old` where g = 0
    return g * new + (1.0 - g) * old


def _hue_hsv(x, shift):
    """torchvision's adjust_hue as DALI arithmetic: RGB -> HSV (_rgb2hsv), h = (h + shift) mod 1, -> RGB.

    x: (n, H, W, 3) in [0, 1]; shift: (n, 1, 1, 1), in turns. HSV -> RGB uses the closed form
    channel = v * (1 - s * clamp(min(k, 4 - k), 0, 1)), k = (m + 6h) mod 6, m = 5, 3, 1 for R, G, B,
    which equals torchvision's sector table (v, q, p, p, t, v ...) up to float rounding.
    """
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types

    r, g, b = _rgb(x)
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


def _build_pipeline(batch: int, n: int, aug: AugmentConfig, device_id):
    """The graph over `batch` encoded images, n patches each; device_id None: CPU operators only."""
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types
    from nvidia.dali import Pipeline

    on_gpu = device_id is not None
    size = aug.crop_size
    interp = {"bilinear": types.INTERP_LINEAR, "bicubic": types.INTERP_CUBIC}[aug.interpolation]

    pipe = Pipeline(
        batch_size=batch,
        num_threads=max(1, min(8, os.cpu_count() or 1)),
        device_id=device_id,
        prefetch_queue_depth=1,  # one request per run: the backend's worker feeds a request and runs it
    )
    with pipe:
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
                    interp_type=interp,
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
                mean = fn.reductions.mean(_gray(j), axes=[1, 2, 3], keep_dims=True)
                j = dmath.clamp(c * j + (1.0 - c) * mean, 0.0, 1.0)
            if aug.saturation > 0:
                s = column(_S)
                j = dmath.clamp(s * j + (1.0 - s) * _gray(j), 0.0, 1.0)
            if aug.hue > 0:
                j = _hue_hsv(j, column(_HUE))
            x = _gate(column(_JITTER), j, x)
        if aug.grayscale_p > 0:
            x = _gate(column(_GRAY), _gray(x), x)
        if aug.blur_p > 0:
            x = _gate(column(_BLUR), fn.gaussian_blur(x, sigma=fn.per_frame(prm[:, _SIGMA]), dtype=types.FLOAT), x)
        if aug.solarize_p > 0:
            x = _gate(column(_SOLARIZE) * (x >= aug.solarize_threshold / 255), 1.0 - x, x)
        mean = types.Constant(np.float32(aug.mean))
        std = types.Constant(np.float32(aug.std))
        pipe.set_outputs((x - mean) / std)
    pipe.build()
    return pipe


def pipeline_inputs(params: PatchParams, aug: AugmentConfig, n: int) -> dict[str, list[np.ndarray]]:
    """The host arrays the pipeline reads, one (n, k) array per image. params: patch-major, on the host. The jitter
    factors go as drawn: a patch not jittered keeps its pixels (the _JITTER gate), an op of amount 0 is not in the
    graph."""
    box = params.box.numpy().astype(np.int32)
    h, w = box[:, 2].astype(np.float32), box[:, 3].astype(np.float32)
    flip = params.flip.numpy()
    roi = np.stack([np.zeros_like(h), np.where(flip, w, 0), h, np.where(flip, 0, w)], axis=1).astype(np.float32)
    blur = params.blur.numpy()
    sigma = np.where(blur, params.sigma.numpy(), _IDLE_SIGMA)
    per_patch = (params.jitter.numpy(), params.gray.numpy(), blur, sigma, params.solarize.numpy())
    prm = np.column_stack([params.factors.numpy(), *per_patch]).astype(np.float32)  # columns _B ... _SOLARIZE
    uses_params = max(aug.jitter_p, aug.grayscale_p, aug.blur_p, aug.solarize_p) > 0  # else DALI prunes the input
    rows = {"window": box, "roi": roi, **({"params": prm} if uses_params else {})}
    b = box.shape[0] // n
    return {name: [np.ascontiguousarray(a.reshape(n, b, -1)[:, j]) for j in range(b)] for name, a in rows.items()}


class DaliImagePatches(PatchBackend):
    """Image files -> (n*b, 3, S, S) float32 patches by DALI (GPU or CPU operators); a request is a task on the one
    worker thread, which builds a pipeline per (b, n) on first use."""

    name = "dali"

    def __init__(self, data, aug: AugmentConfig):
        super().__init__()
        import nvidia.dali  # noqa: F401  (fail here, not on the first call, when DALI is missing)

        self.data, self.aug, self.device = data, aug, data.device
        self._device_id, self._stream = None, None  # CPU operators
        if self.device.type == "cuda":
            self._device_id = torch.cuda.current_device() if self.device.index is None else self.device.index
            self._stream = torch.cuda.Stream(self.device)
        self._pipes: dict[tuple[int, int], object] = {}
        self._reader = concurrent.futures.ThreadPoolExecutor(READ_THREADS)
        self._worker = concurrent.futures.ThreadPoolExecutor(1)  # the one thread that calls DALI
        self._undecodable: dict[str, str] = {}  # path -> why, of files that passed the checks but not DALI

    def _read_one(self, i: int) -> tuple[int, np.ndarray, tuple[int, int]]:
        """(i, encoded bytes, (height, width)); BadFileError for a file failing its checks or DALI before."""
        path = self.data.paths[i]
        if path in self._undecodable:
            raise BadFileError(path, self._undecodable[path])
        return (i, *self.data.read(i))

    def _read(self, request: PatchRequest) -> tuple[list, PatchParams]:
        """The request's files as (i, bytes, size), a failing one replaced as data.bad_files says, and its patches'
        parameters (drawn for the sizes in their headers)."""
        index = request.index.cpu().tolist()
        positions = range(len(index))[request.shard]
        files = list(self._reader.map(lambda i: or_why(self._read_one, i), [index[p] for p in positions]))
        files = [
            f if not isinstance(f, str) else self.data.instead(index, p, f, self._read_one)
            for p, f in zip(positions, files)
        ]
        heights, widths = (torch.tensor(side).repeat(request.n) for side in zip(*(size for _, _, size in files)))
        return files, sharded_params(request, heights, widths, self.aug)

    def params(self, index: torch.Tensor, n: int, seed: int, shard: slice = slice(None)) -> PatchParams:
        """The parameters a request with these arguments uses (reads the images' headers)."""
        return self._read(PatchRequest(index, n, seed, shard))[1]

    def _make(self, request: PatchRequest) -> torch.Tensor:
        """Read, draw and run the pipeline (on the worker thread). A file DALI cannot decode (one that passed the
        checks) is found with Pillow, and the request is made again without it."""
        while True:
            files, params = self._read(request)
            try:
                return self._run([blob for _, blob, _ in files], params, request.n)
            except RuntimeError as err:
                self._pipes.pop((len(files), request.n), None)  # a pipeline that failed cannot run again
                bad = {self.data.paths[i]: why for i, blob, _ in files if (why := undecodable(blob))}
                if not bad:
                    first = self.data.paths[files[0][0]]
                    raise DataError(
                        f"DALI could not make the patches of {len(files)} images from {first} on "
                        f"({one_line(err)[:200]}); set data.backend=pillow to read them with Pillow"
                    ) from None
                self._undecodable.update(bad)

    def _run(self, blobs: list[np.ndarray], params: PatchParams, n: int) -> torch.Tensor:
        b = len(blobs)
        if (b, n) not in self._pipes:
            self._pipes[b, n] = _build_pipeline(b, n, self.aug, self._device_id)
        inputs = {"encoded": blobs, **pipeline_inputs(params, self.aug, n)}
        with torch.cuda.stream(self._stream):  # None (CPU operators): the current stream
            (out,) = self._pipes[b, n].run(getattr(self._stream, "cuda_stream", None), **inputs)
            # (b, n, S, S, 3) -> (n*b, 3, S, S) channels_last: a copy, after which DALI's buffer can go
            patches = patch_major(torch.from_dlpack(out.as_tensor())).permute(0, 3, 1, 2)
        if self._stream is not None:
            self._stream.synchronize()  # complete before the training thread takes it and DALI's buffer goes
        return patches

    def start(self, request: PatchRequest):
        return self._worker.submit(self._make, request)

    def finish(self, handle) -> torch.Tensor:
        patches = handle.result()
        if self._stream is not None:
            patches.record_stream(torch.cuda.current_stream(self.device))  # made on the side stream, freed here
        return patches

    def drop(self, handle) -> None:
        handle.cancel()  # not started yet: never runs; running: finishes on the worker, unused

    def close(self) -> None:
        super().close()
        self._worker.shutdown(wait=True, cancel_futures=True)
        self._reader.shutdown(wait=True, cancel_futures=True)
