"""The augmentation-backend seam: something that turns image indices into n patches per image.

A backend is built once over a dataset that lives on the device as one uint8 tensor
(N, H, W, 3) and is then called once per step:

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
"""

from __future__ import annotations

from typing import Protocol

import torch

from ..config import AugmentConfig
from .torch_backend import TorchPatches, normalize_images  # noqa: F401  (normalize_images: evaluation's input path)


class PatchBackend(Protocol):
    name: str

    def __call__(self, index: torch.Tensor, n: int, seed: int, shard: slice = slice(None)) -> torch.Tensor: ...


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA/driver underneath
        return False
    return True


def resolve_backend_name(name: str, device: torch.device) -> str:
    """auto is the torch backend everywhere: on the first GPU run (H200, DALI 2.4, n=20 x B=100) it made a
    step's 2,000 patches in 4.9 ms against DALI's 181 ms (benchmarks/results/h200/kernels.json), and the
    end-to-end step ran at 68.7k vs 9.9k patches/s. DALI stays available as data.backend=dali."""
    if name == "auto":
        return "torch"
    if name not in ("torch", "dali"):
        raise ValueError(f"unknown patch backend '{name}' (choose auto, torch or dali)")
    if name == "dali" and not dali_available():
        raise RuntimeError("data.backend=dali but nvidia.dali does not import; install nvidia-dali-cuda130 (or -cuda120)")
    return name


def make_patch_backend(name: str, images: torch.Tensor, aug: AugmentConfig, seed: int = 0,
                       compile_recipe: bool = False) -> PatchBackend:
    """Build the backend `name` (auto | torch | dali) over device-resident uint8 NHWC images.
    compile_recipe: the torch backend's recipe through torch.compile (ignored by DALI)."""
    name = resolve_backend_name(name, images.device)
    if name == "dali":
        from .dali_backend import DaliPatches

        return DaliPatches(images, aug, seed=seed)
    return TorchPatches(images, aug, compile_recipe)
