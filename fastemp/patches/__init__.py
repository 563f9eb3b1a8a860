"""The augmentation-backend seam: something that turns image indices into n patches per image.

A backend is built once over a dataset, resident on the device as one uint8 tensor (N, H, W, 3)
(torch, torch_backend.py) or streamed as files read every epoch (dali, dali_images.py; pillow,
pillow_images.py), and makes one PatchRequest (index, n, seed, shard) per step:

    patches = backend.take(step, request)   # or backend(index, n, seed, shard): made now

(n*b, 3, S, S) float32, channels_last, normalized, patch-major: row i*b + j is patch i of image
index[shard][j], so `z.view(n, b, d)` groups patch i of every image the way the loss expects. Every
backend draws every patch's parameters with `draw.sharded_params` from a generator seeded with
`seed` alone, so a resumed run sees the same patches, and under torchrun each rank makes its images'
rows of the global batch's draw (bit-identical to one process on the same device type). Every
backend prefetches the same way (prefetch.py). `choose_backend` decides what data.backend=auto
means (docs/data-backends.md).
"""

from __future__ import annotations

from ..config import AugmentConfig
from ..validate import check_backend
from .prefetch import PatchBackend, PatchRequest  # noqa: F401  (the backends' base and their request)
from .torch_backend import TorchPatches, normalize_images  # noqa: F401  (normalize_images: evaluation's input path)


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

    Resident data (decoded once, on the device): the torch backend. Streamed files (full-size
    JPEGs): auto is DALI (nvJPEG decode and all ops on the GPU) on CUDA when DALI imports, else
    Pillow workers. data.backend=dali on streamed data without DALI falls back to Pillow and the
    reason says so; the combinations validate.check_backend refuses (the one statement of that
    rule) are errors.
    """
    check_backend(requested, streamed)
    if not streamed:
        return "torch", "resident images: the batched torch backend" if requested == "auto" else "data.backend=torch"
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
    images = getattr(images, "images", images)  # an ImageSet: its tensor
    if name == "dali":
        from .dali_images import DaliImagePatches

        return DaliImagePatches(images, aug, seed=seed)
    if name == "pillow":
        from .pillow_images import PillowPatches

        return PillowPatches(images, aug, workers=workers)
    return TorchPatches(images, aug, compile_recipe)
