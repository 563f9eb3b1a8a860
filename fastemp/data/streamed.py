"""Streamed ImageFolder data (data.streamed=true): file paths and labels only, listed, checked and labelled as
for resident data; a streamed patch backend (fastemp/patches/pillow_images.py, dali_images.py) reads the files of
each batch every epoch. A file that fails after the listing is named (BadFileError) and data.bad_files decides
(docs/reliability.md#ending-a-run-early-signals-and-files-that-fail).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
import torch

from ..config import DataConfig
from ..errors import DataError, one_line
from .listing import MAX_FILE_BYTES, contents, file_problem, fingerprint, list_folder, pillow, source_path


class BadFileError(DataError):
    """An image file that fails when a backend reads or decodes it (it passed the listing's checks before)."""

    def __init__(self, path: str, why: str):
        super().__init__(f"cannot use {path}: {why}; restore the file, or set data.bad_files=skip to go on without it")
        self.path, self.why = path, why


@dataclass
class StreamedSet:
    """A split as files: the ImageSet counterpart for data that is read, not held."""

    paths: list[str]  # absolute, in label-then-name order
    labels: torch.Tensor  # (N,) int64 (-1: unlabelled)
    classes: list[str]
    description: str  # for logs
    device: torch.device  # where the patches of this set are wanted
    fingerprint: str = ""
    contents: dict = field(default_factory=dict)
    bad_files: str = "stop"
    skipped: dict = field(default_factory=dict)  # path -> why, of every file skipped (data.bad_files=skip)

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, i: int) -> tuple[np.ndarray, tuple[int, int]]:
        """The encoded bytes of image i as a uint8 array (what a decoder takes) and its (height, width), from
        checked_image: BadFileError when its file fails."""
        return checked_image(self.paths[i], lambda blob, im: (blob, (im.height, im.width)))

    def instead(self, index: list[int], p: int, why: str, make):
        """Image index[p] of a batch failed (`why`). data.bad_files=stop: BadFileError. skip: it is recorded in
        `skipped` and make(i) of the next image of the batch whose file works is returned (make raises
        BadFileError for one that fails too): a rule of the batch alone, so a resumed run makes the same patches."""
        n, path = len(index), self.paths[index[p]]
        if self.bad_files == "stop":
            raise BadFileError(path, why)
        self.skipped[path] = why
        for k in range(1, n):
            try:
                return make(index[(p + k) % n])
            except BadFileError as err:
                self.skipped[err.path] = err.why
        raise DataError(f"no file of a batch of {n} images could be used ({path}: {why}); check the data")


def checked_image(path: str, use):
    """use(encoded bytes, opened PIL image) of the file at path, after the listing's checks again (it may have
    changed since it was listed); BadFileError when one, the decode or `use` fails. Never more than
    MAX_FILE_BYTES are read: the size is checked first."""
    why = file_problem(path)
    if why is None:
        try:
            blob = np.fromfile(path, dtype=np.uint8, count=MAX_FILE_BYTES)
            with pillow().open(io.BytesIO(blob)) as im:
                return use(blob, im)
        except Exception as err:  # it changed again since, or whatever Pillow raises for a file it cannot decode
            why = f"cannot be decoded ({one_line(err)[:120]})"
    raise BadFileError(path, why)


def or_why(make, *args):
    """make(*args), or why its file failed (what a worker hands back for the training process to decide)."""
    try:
        return make(*args)
    except BadFileError as err:
        return err.why


def load_streamed(cfg: DataConfig, split: str, device: torch.device, layout: str = "imagefolder") -> StreamedSet:
    """List (and check) one split of the folder `cfg` names in `layout` (listing.list_folder)."""
    source = source_path(cfg, layout)
    listing = list_folder(source, layout, cfg.root, need=split)
    items = listing.splits[split]
    index = {c: i for i, c in enumerate(listing.classes)}
    return StreamedSet(
        paths=[str(listing.base / rel) for _, rel, _, _ in items],
        labels=torch.tensor([index.get(c, -1) for c, *_ in items], dtype=torch.int64, device=device),
        classes=listing.classes,
        description=f"{layout} ({source}, streamed: full-size files read every epoch)",
        device=torch.device(device),
        fingerprint=fingerprint(items),
        contents=contents(items),
        bad_files=cfg.bad_files,
    )
