"""Datasets as one device-resident uint8 tensor (airbench style), or with data.streamed=true a StreamedSet of
paths (streamed.py): `load_split(cfg, split, device)`. Sources: docs/data.md. Every set carries a `fingerprint`,
a short hash of what it holds, equal wherever the same data lies.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from ..config import DataConfig, check_choice, choices
from ..errors import DataError
from .cifar import CIFAR_ARCHIVES, load_cifar
from .imagefolder import SPLITS, load_imagefolder
from .streamed import StreamedSet, load_streamed
from .synthetic import load_synthetic


@dataclass
class ImageSet:
    images: torch.Tensor  # (N, H, W, 3) uint8, contiguous
    labels: torch.Tensor  # (N,) int64 (-1: unlabelled)
    classes: list[str]
    description: str  # for logs
    fingerprint: str = ""
    contents: dict = field(default_factory=dict)  # of a folder: listing.contents, which says what changed

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def absolute_paths(cfg: DataConfig) -> DataConfig:
    """cfg with data.path and data.train_path made absolute (~ expanded, normalised, links kept): `fastemp
    train` stores them so, and a run resumed from another folder reads the same data. Only new runs get
    this; an old run's relative path, in its config.yaml and its checkpoint alike, is read as before."""
    for key in ("path", "train_path"):
        if getattr(cfg, key).strip():
            setattr(cfg, key, os.path.abspath(os.path.expanduser(getattr(cfg, key))))
    return cfg


def load_split(cfg: DataConfig, split: str, device: torch.device | str = "cpu") -> ImageSet | StreamedSet:
    """Load one labelled split ("train" or "test") of the dataset that `cfg` describes onto `device`
    (a StreamedSet of file paths when cfg.streamed)."""
    if split not in SPLITS:
        raise DataError(f"unknown split '{split}' ; choose train or test")
    check_choice("data.source", cfg.source, choices(DataConfig, "source"))  # unchecked if made in Python
    return _load(cfg, split, torch.device(device), cfg.source)


def load_train_images(cfg: DataConfig, device: torch.device | str = "cpu") -> ImageSet | StreamedSet:
    """The images self-supervised training reads: data.train_path's (no labels: -1) when it is set, else
    the train split."""
    if not cfg.train_path:
        return load_split(cfg, "train", device)
    return _load(cfg, "train", torch.device(device), "unlabelled")


def _load(cfg: DataConfig, split: str, device: torch.device, layout: str) -> ImageSet | StreamedSet:
    if cfg.streamed:  # on image folders only (fastemp.validate.check_backend)
        out = load_streamed(cfg, split, device, layout)
    else:  # every loader gives (images, labels, classes, description, fingerprint, listing.contents of a folder)
        load = load_synthetic if layout == "synthetic" else load_cifar if layout in CIFAR_ARCHIVES else load_imagefolder
        images, labels, classes, desc, prints, folders = load(cfg, split, layout)
        images = torch.as_tensor(images).to(device).contiguous()
        labels = torch.as_tensor(labels).to(device=device, dtype=torch.int64).contiguous()
        out = ImageSet(images, labels, list(classes), desc, fingerprint=prints, contents=folders)
    name = "unlabelled" if layout == "unlabelled" else split
    out.description += f", {name}, {len(out)} images, {len(out.classes)} classes"
    return out
