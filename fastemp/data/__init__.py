"""Datasets as one device-resident uint8 tensor (airbench style): `load_split(cfg, split, device)`.

Sources (`data.source`):

synthetic
    The embedded procedural dataset (fastemp/data/synthetic.py): 10 shape/texture classes, no files.
    Train and test use different seeds derived from `data.synthetic_seed` (2*seed and 2*seed+1,
    so no seed's test set is another seed's training set) and sizes `synthetic_train` /
    `synthetic_test`.

cifar10, cifar100
    fastemp/data/cifar.py.

imagefolder
    fastemp/data/imagefolder.py; with data.streamed=true, fastemp/data/streamed.py (a StreamedSet:
    paths and labels, the files read every epoch by a streamed patch backend).

Every user-facing failure raises DataError with a one-line message saying what to do.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import torch

from ..config import DataConfig, choices
from ..errors import DataError
from .cifar import CIFAR_ARCHIVES, load_cifar
from .imagefolder import SPLITS, load_imagefolder
from .streamed import StreamedSet, load_streamed

__all__ = ["SOURCES", "SPLITS", "DataError", "ImageSet", "StreamedSet", "load_split", "synthetic_seed"]

SOURCES = choices(DataConfig, "source")


@dataclass
class ImageSet:
    images: torch.Tensor  # (N, H, W, 3) uint8, contiguous, on the requested device
    labels: torch.Tensor  # (N,) int64, on the requested device
    classes: list[str]
    description: str  # what was loaded, for logs

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def load_split(cfg: DataConfig, split: str, device: torch.device | str = "cpu") -> ImageSet | StreamedSet:
    """Load one split ("train" or "test") of the dataset that `cfg` describes onto `device`
    (a StreamedSet of file paths when cfg.streamed)."""
    if split not in SPLITS:
        raise DataError(f"unknown split '{split}' ; choose train or test")
    source = cfg.source
    if source not in SOURCES:
        close = difflib.get_close_matches(source, SOURCES, n=1, cutoff=0.3)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise DataError(f"unknown data.source '{source}'{hint} ; choose {', '.join(SOURCES)}")
    device = torch.device(device)
    if cfg.streamed:  # on data.source=imagefolder (fastemp.validate.check_backend)
        streamed = load_streamed(cfg, split, device)
        streamed.description = (
            f"{streamed.description}, {split}, {len(streamed)} images, {len(streamed.classes)} classes"
        )
        return streamed
    if source == "synthetic":
        images, labels, classes, desc = _load_synthetic(cfg, split)
    elif source in CIFAR_ARCHIVES:
        images, labels, classes, desc = load_cifar(cfg, source, split)
    else:
        images, labels, classes, desc = load_imagefolder(cfg, split, device)
    images = torch.as_tensor(images).to(device).contiguous()
    labels = torch.as_tensor(labels).to(device=device, dtype=torch.int64).contiguous()
    desc = f"{desc}, {split}, {len(labels)} images, {len(classes)} classes"
    return ImageSet(images=images, labels=labels, classes=list(classes), description=desc)


# ---------------------------------------------------------------------------------------------
# synthetic


def synthetic_seed(cfg: DataConfig, split: str) -> int:
    """The make_synthetic seed of a split: 2*seed for train, 2*seed+1 for test (never shared)."""
    return 2 * int(cfg.synthetic_seed) + (0 if split == "train" else 1)


def _load_synthetic(cfg: DataConfig, split: str):
    from .synthetic import CLASSES, make_synthetic

    n = cfg.synthetic_train if split == "train" else cfg.synthetic_test
    if n <= 0:
        raise DataError(f"data.synthetic_{split} must be a positive number of images, got {n}; set it to e.g. 1000")
    seed = synthetic_seed(cfg, split)
    images, labels = make_synthetic(n, seed, size=cfg.image_size)
    desc = f"synthetic (shapes and textures, {cfg.image_size}x{cfg.image_size}, seed {seed})"
    return images, labels, list(CLASSES), desc
