"""Streamed ImageFolder data: file paths and labels only, the images read from disk every epoch.

data.source=imagefolder with data.streamed=true: `train/<class>/*` and `test/<class>/*` under
`data.path` (a directory; an archive cannot be read file by file cheaply), listed and labelled
exactly as the resident imagefolder source does (fastemp/data/imagefolder.py: sorted class folders
with an image in either split). Nothing is decoded here and no decoded copy of the set is ever
held: a streamed patch backend (fastemp/patches/pillow_images.py, dali_images.py) reads the files
of each batch, in the epoch's permutation, and cuts the patches from the full-size images. This
is the ImageNet path (the official ImageNet-100 recipe crops 224-pixel patches from the original
JPEGs); resident data stays the fast path for small images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import DataConfig
from ..errors import DataError
from ..errors import one_line as _one_line
from .imagefolder import _check_classes, _classes_of, _is_archive, _list_directory


@dataclass
class StreamedSet:
    """A split as files: the ImageSet counterpart for data that is read, not held."""

    paths: list[str]  # absolute path of every image, in label-then-name order
    labels: torch.Tensor  # (N,) int64, on the requested device
    classes: list[str]
    description: str  # what was listed, for logs
    device: torch.device  # where the patches of this set are wanted

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, i: int) -> np.ndarray:
        """The encoded bytes of image i as a uint8 array (what a decoder takes)."""
        try:
            return np.fromfile(self.paths[i], dtype=np.uint8)
        except OSError as e:
            raise DataError(f"cannot read {self.paths[i]} ({_one_line(e)}); restore the file or remove it") from e


def load_streamed(cfg: DataConfig, split: str, device: torch.device) -> StreamedSet:
    """List one split of the directory `cfg.path` (train/<class>/* and test/<class>/*)."""
    if not cfg.path:
        raise DataError(
            "data.streamed=true needs data.path; set it to a directory with train/<class>/* and test/<class>/*"
        )
    source = Path(cfg.path).expanduser().resolve()
    if _is_archive(source):
        raise DataError(
            f"data.streamed=true reads image files one by one, but {source} is an archive; "
            "extract it and point data.path at the folder, or set data.streamed=false"
        )
    if not source.is_dir():
        raise DataError(
            f"data.path {source} is not a directory; point it at a folder with train/<class>/* and test/<class>/*"
        )
    base, listing = _list_directory(source)
    items = listing[split]
    if not items:
        raise DataError(f"no images in {base / split}/<class>/; add them (expected train/<class>/* and test/<class>/*)")
    _check_classes(listing, str(base))  # as for resident folders: two classes, every test class trained on
    classes = _classes_of(listing)
    index = {c: i for i, c in enumerate(classes)}
    labels = torch.tensor([index[c] for c, _, _, _ in items], dtype=torch.int64, device=device)
    paths = [str(base / rel) for _, rel, _, _ in items]
    desc = f"imagefolder ({source}, streamed: full-size files read every epoch)"
    return StreamedSet(paths=paths, labels=labels, classes=classes, description=desc, device=torch.device(device))
