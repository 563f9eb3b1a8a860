"""Synthetic JPEG folders at any image size, made here (no download): for tests and benchmarks.

`make_folder(path, classes, per_class, size, seed)` writes `train/<class>/*.jpg` and
`test/<class>/*.jpg` rendered by the procedural generator of fastemp/data/synthetic.py at `size`
pixels and encoded with Pillow (quality 90, like typical camera JPEGs; ImageNet's average image is
about 400 x 350). Class c draws the generator's class c mod 10, so up to 10 classes are truly
distinct; more classes (e.g. 100 for an ImageNet-100-shaped folder) repeat the 10 shapes under new
names, which is enough for throughput and for checking the data path, not for accuracy. With
`aspect=True` every image keeps a random 75-100% of its width, so images differ in size as
ImageNet's do (the streamed backends must read each image's own size). Same arguments, same bytes.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from .synthetic import CLASSES, make_synthetic

RENDER_CHUNK = 64  # images rendered at once (64 x 400 x 400 x 3 bytes = 31 MB)


def _render_class(cls: int, count: int, size: int, seed: int) -> np.ndarray:
    """`count` images of generator class `cls` at `size` px: render seeded chunks, keep that class."""
    kept, chunk = [], 0
    while sum(len(k) for k in kept) < count:
        images, labels = make_synthetic(RENDER_CHUNK, seed * 1_000_003 + cls * 7_919 + chunk, size=size)
        kept.append(images[labels == cls].numpy())
        chunk += 1
    return np.concatenate(kept)[:count]


def make_folder(path: str | Path, classes: int, per_class: int, size: int, seed: int = 0,
                test_per_class: int = 0, aspect: bool = True, quality: int = 90) -> Path:
    """Write a JPEG ImageFolder (train/, and test/ when test_per_class > 0) under `path`; return it.

    Files are named `<class>/<split>_<k>.jpg`; class folders `c000`, `c001`, ... An existing file
    is overwritten, so calling twice gives the same folder.
    """
    from PIL import Image

    root = Path(path)
    gen = torch.Generator().manual_seed(seed)
    for c in range(classes):
        images = _render_class(c % len(CLASSES), per_class + test_per_class, size, seed + c // len(CLASSES))
        widths = (size * (0.75 + 0.25 * torch.rand(len(images), generator=gen))).round().int().tolist() \
            if aspect else [size] * len(images)
        for k, (image, width) in enumerate(zip(images, widths)):
            split, number = ("train", k) if k < per_class else ("test", k - per_class)
            folder = root / split / f"c{c:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            buffer = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(image[:, :width])).save(buffer, format="JPEG", quality=quality)
            (folder / f"{split}_{number:05d}.jpg").write_bytes(buffer.getvalue())
    return root
