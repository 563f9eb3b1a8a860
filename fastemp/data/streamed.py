"""Streamed ImageFolder data: file paths and labels only, the images read from disk every epoch.

data.streamed=true: a folder of any layout fastemp/data/listing.py reads (imagefolder, tinyimagenet,
an unlabelled data.train_path; an archive cannot be read file by file cheaply), listed, checked and
labelled exactly as for resident data. Nothing is decoded here and no decoded copy of the set is ever
held: a streamed patch backend (fastemp/patches/pillow_images.py, dali_images.py) reads the files
of each batch, in the epoch's permutation, and cuts the patches from the full-size images. This
is the ImageNet path (the official ImageNet-100 recipe crops 224-pixel patches from the original
JPEGs); resident data stays the fast path for small images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..config import DataConfig
from ..errors import DataError
from ..errors import one_line as _one_line
from .listing import fingerprint, list_folder, source_path


@dataclass
class StreamedSet:
    """A split as files: the ImageSet counterpart for data that is read, not held."""

    paths: list[str]  # absolute path of every image, in label-then-name order
    labels: torch.Tensor  # (N,) int64, on the requested device (-1: unlabelled)
    classes: list[str]
    description: str  # what was listed, for logs
    device: torch.device  # where the patches of this set are wanted
    fingerprint: str = ""  # listing.fingerprint of the files: names, sizes, classes

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, i: int) -> np.ndarray:
        """The encoded bytes of image i as a uint8 array (what a decoder takes)."""
        try:
            return np.fromfile(self.paths[i], dtype=np.uint8)
        except OSError as e:
            raise DataError(f"cannot read {self.paths[i]} ({_one_line(e)}); restore the file or remove it") from e


def load_streamed(cfg: DataConfig, split: str, device: torch.device, layout: str = "imagefolder") -> StreamedSet:
    """List (and check) one split of the folder `cfg` names in `layout` (listing.list_folder)."""
    source = source_path(cfg, layout)
    listing = list_folder(source, layout, cfg.root, need=split)
    items = listing.splits[split]
    index = {c: i for i, c in enumerate(listing.classes)}
    labels = torch.tensor([index.get(c, -1) for c, _, _, _ in items], dtype=torch.int64, device=device)
    return StreamedSet(
        paths=[str(listing.base / rel) for _, rel, _, _ in items],
        labels=labels,
        classes=listing.classes,
        description=f"{layout} ({source}, streamed: full-size files read every epoch)",
        device=torch.device(device),
        fingerprint=fingerprint(items),
    )
