"""Synthetic JPEG folders at any image size, made here (no download) from fastemp.data.synthetic: for tests and
benchmarks of the data path, not for accuracy. Same arguments, same bytes.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from .synthetic import CLASSES, make_synthetic

RENDER_CHUNK = 64  # images rendered at once
RENDER_MAX = 128  # larger images are rendered at this size and upscaled (rendering is the slow part)
QUALITY = 90  # like typical camera JPEGs
NOISE = 16.0  # std of Gaussian pixel noise (0..255): as many bytes per pixel as photos, which decode slower


def make_folder(
    path: str | Path, classes: int, per_class: int, size: int, seed: int = 0, test_per_class: int = 0
) -> Path:
    """Write a JPEG ImageFolder (train/, and test/ when test_per_class > 0; class folders c000, c001, ...)
    under `path`, overwriting, and return it. Every image keeps a random 75-100% of its width, so images
    differ in size as ImageNet's do (the streamed backends must read each image's own size)."""
    from PIL import Image

    root = Path(path)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    # an image of drawn label L goes to the first class L, L + 10, ... that still needs images: more than 10
    # classes repeat the 10 shapes under new names
    count, chunk = per_class + test_per_class, 0
    rendered: list[list[np.ndarray]] = [[] for _ in range(classes)]
    while any(len(k) < count for k in rendered):
        images, labels = make_synthetic(RENDER_CHUNK, seed * 1_000_003 + chunk, size=min(size, RENDER_MAX))
        chunk += 1
        for image, label in zip(images.numpy(), labels.tolist()):
            target = next((c for c in range(label, classes, len(CLASSES)) if len(rendered[c]) < count), None)
            if target is not None:
                rendered[target].append(image)
    for c, images in enumerate(rendered):
        widths = (size * (0.75 + 0.25 * torch.rand(len(images), generator=gen))).round().int().tolist()
        for k, (image, width) in enumerate(zip(images, widths)):
            split, number = ("train", k) if k < per_class else ("test", k - per_class)
            picture = Image.fromarray(image)
            if picture.width != size:
                picture = picture.resize((size, size), Image.BICUBIC)
            pixels = np.asarray(picture)[:, :width].astype(np.float32)
            pixels = pixels + rng.normal(0.0, NOISE, pixels.shape).astype(np.float32)
            folder = root / split / f"c{c:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            buffer = io.BytesIO()
            Image.fromarray(pixels.round().clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=QUALITY)
            (folder / f"{split}_{number:05d}.jpg").write_bytes(buffer.getvalue())
    return root
