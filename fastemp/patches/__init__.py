"""The augmentation-backend seam: a backend turns a PatchRequest (index, n, seed, shard) into n patches per
image, (n*b, 3, S, S), patch-major (docs/augmentation.md, docs/data-backends.md).

    patches = backend.take(step, request)   # or backend(index, n, seed, shard): made now
"""

from __future__ import annotations

from ..config import AugmentConfig
from ..data.listing import dali_available  # noqa: F401  (runtime.resolve's and the check's)
from ..validate import check_backend
from .prefetch import PatchBackend, PatchRequest, patch_major  # noqa: F401  (the backends' base, request, order)
from .torch_backend import TorchPatches, normalize_images  # noqa: F401  (normalize_images: evaluation's input path)

DALI_MISSING = "nvidia.dali does not import (install nvidia-dali-cuda130, or -cuda120)"


def choose_backend(requested: str, streamed: bool, device_type: str, dali_installed: bool) -> tuple[str, str]:
    """(the patch backend, why) from the request, the data (resident or streamed), the device and whether DALI
    imports (docs/data-backends.md)."""
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
    name: str, images, aug: AugmentConfig, workers: int = 0, compile_recipe: bool = False
) -> PatchBackend:
    """The backend `name` (fastemp.runtime.resolve's choice, never made again here) over a device-resident uint8
    NHWC tensor (or an ImageSet of one) or a StreamedSet of files; compile_recipe: the torch backend's."""
    images = getattr(images, "images", images)  # an ImageSet: its tensor
    if name == "dali":
        from .dali_images import DaliImagePatches

        return DaliImagePatches(images, aug)
    if name == "pillow":
        from .pillow_images import PillowPatches

        return PillowPatches(images, aug, workers=workers)
    return TorchPatches(images, aug, compile_recipe)
