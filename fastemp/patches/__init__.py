"""The augmentation-backend seam: a backend turns a PatchRequest (index, n, seed, shard) into n patches per
image, (n*b, 3, S, S), patch-major (docs/augmentation.md, docs/data-backends.md).

    patches = backend.take(step, request)   # or backend(index, n, seed, shard): made now
"""

from __future__ import annotations

from ..config import AugmentConfig
from .dali_images import DaliImagePatches
from .pillow_images import PillowPatches
from .prefetch import PatchBackend, PatchRequest, patch_major  # noqa: F401  (the backends' base, request, order)
from .torch_backend import TorchPatches, normalize_images  # noqa: F401  (normalize_images: evaluation's input path)


def dali_available() -> bool:
    """Whether DALI imports here: runtime.resolve's choice of backend, and the check's."""
    try:
        import nvidia.dali.fn  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA/driver underneath
        return False
    return True


def make_patch_backend(
    name: str, images, aug: AugmentConfig, workers: int = 0, compile_recipe: bool = False
) -> PatchBackend:
    """The backend `name` (fastemp.runtime.resolve's choice, never made again here) over a device-resident uint8
    NHWC tensor (or an ImageSet of one) or a StreamedSet of files; compile_recipe: the torch backend's."""
    images = getattr(images, "images", images)  # an ImageSet: its tensor
    if name == "dali":
        return DaliImagePatches(images, aug)
    if name == "pillow":
        return PillowPatches(images, aug, workers=workers)
    return TorchPatches(images, aug, compile_recipe)
