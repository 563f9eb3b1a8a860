"""The augmentation-backend seam: something that turns image indices into n patches per image.

A backend is built once over a dataset, either resident on the device as one uint8 tensor
(N, H, W, 3) (torch, dali) or streamed as files read every epoch (dali via dali_images.py,
pillow via pillow_images.py), and is then called once per step:

    patches = backend(index, n, seed)   # index: (B,) int64 on the images' device

It returns (n*B, 3, S, S) float32 in channels_last memory format, normalized, patch-major:
row i*B + b is patch i of image index[b], so `z.view(n, B, d)` groups patch i of every image
the way the loss expects. Every patch draws its augmentation independently. `seed` alone makes a
call reproducible: both backends draw every patch's parameters with `draw.sharded_params`
from a generator seeded with it (torch: on the images' device; DALI: on the host), so a resumed run
sees the same patches as an uninterrupted one.

Under torchrun each rank passes the global batch's `index` and its `shard` (a slice of it) and gets
the n*b patches of its b images only; their randomness is the global batch's rows for those
images, so K ranks see bit-identical patches to one process (on the same device type).

Streamed backends also have `prefetch(index, n, seed, shard)`: the same request, made ahead (the
trainer announces step t+1 while step t runs), so the files are read and decoded in the
background; the later call with those arguments collects the result. `choose_backend` decides
what data.backend=auto means (docs/data-backends.md).
"""

from __future__ import annotations

from typing import Protocol

import torch

from ..config import AugmentConfig
from ..validate import check_backend
from .torch_backend import TorchPatches, normalize_images  # noqa: F401  (normalize_images: evaluation's input path)


class PatchBackend(Protocol):
    name: str

    def __call__(self, index: torch.Tensor, n: int, seed: int, shard: slice = slice(None)) -> torch.Tensor: ...

    def prefetch(self, index: torch.Tensor, n: int, seed: int, shard: slice = slice(None)) -> None:
        """Start making the patches of a later call with these arguments (the Trainer announces step t+1's
        batch before running step t), so they can be ready when asked for. Optional: a backend that makes
        its patches on call does nothing; the later call returns the same patches either way."""


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA/driver underneath
        return False
    return True


DALI_MISSING = "nvidia.dali does not import (install nvidia-dali-cuda130, or -cuda120)"


def choose_backend(requested: str, streamed: bool, device_type: str, dali_installed: bool) -> tuple[str, str]:
    """The patch backend to use and why: (name, reason). Pure: decided from the request, the data
    (resident tensor or streamed files), the device type and whether DALI imports.

    Resident data (decoded once, on the device): auto is the torch backend. On the H200 (DALI 2.4,
    n=20, B=100, 32x32) it made a step's 2,000 patches in 4.9 ms against the per-patch DALI graph's
    181 ms (benchmarks/results/h200/kernels.json); DALI stays available as data.backend=dali.
    Streamed files (full-size JPEGs): auto is DALI (nvJPEG decode and all ops on the GPU) on CUDA
    when DALI imports, else Pillow workers. data.backend=dali on streamed data without DALI falls
    back to Pillow and the reason says so; resident dali without DALI is an error, and so are the
    combinations validate.check_backend refuses (the one statement of that rule).
    """
    check_backend(requested, streamed)
    if not streamed:
        if requested in ("auto", "torch"):
            why = "resident images: the batched torch backend (37x faster than per-patch DALI on the H200)"
            return "torch", why if requested == "auto" else "data.backend=torch"
        if not dali_installed:
            raise RuntimeError(f"data.backend=dali but {DALI_MISSING}")
        return "dali", "data.backend=dali"
    if requested == "pillow":
        return "pillow", "data.backend=pillow"
    if requested == "dali":
        if dali_installed:
            return "dali", "data.backend=dali" + ("" if device_type == "cuda" else " (CPU operators: no GPU)")
        return "pillow", f"data.backend=dali but {DALI_MISSING}: Pillow workers instead"
    if dali_installed and device_type == "cuda":
        return "dali", "streamed files on CUDA: DALI decodes (nvJPEG) and cuts the patches on the GPU"
    missing = "no CUDA device" if dali_installed else DALI_MISSING
    return "pillow", f"streamed files, {missing}: Pillow workers"


def make_patch_backend(
    name: str, images, aug: AugmentConfig, seed: int = 0, workers: int = 0, compile_recipe: bool = False
) -> PatchBackend:
    """Build the backend `name` (torch | dali | pillow: what fastemp.runtime.resolve chose, never chosen again
    here) over the data: a device-resident uint8 NHWC tensor (or an ImageSet holding one), or a StreamedSet
    of files. compile_recipe: the torch backend's recipe through torch.compile (the other backends ignore it)."""
    from ..data.streamed import StreamedSet

    images = getattr(images, "images", images)  # an ImageSet: its tensor
    streamed = isinstance(images, StreamedSet)
    if streamed and name == "dali":
        from .dali_images import DaliImagePatches

        return DaliImagePatches(images, aug, seed=seed)
    if streamed:
        from .pillow_images import PillowPatches

        return PillowPatches(images, aug, workers=workers)
    if name == "dali":
        from .dali_backend import DaliPatches

        return DaliPatches(images, aug, seed=seed)
    return TorchPatches(images, aug, compile_recipe)
