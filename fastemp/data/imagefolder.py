"""Image folders (as listing.py lists them) or a .tar[.gz] (read in one pass, so a cache miss decodes and caches
both splits) decoded once (Pillow), resized to image_size squares and cached (docs/data.md): the
resident imagefolder and tinyimagenet sources and an unlabelled data.train_path. A changed file re-decodes; an
unwritable cache only costs a warning.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ..config import DataConfig
from ..errors import DataError
from ..errors import one_line as _one_line
from ..progress import bar
from ..runs import atomic_path
from . import listing

SPLITS = ("train", "test")
_CACHE_VERSION = 4  # 2: a split passed the class checks; 3: DALI ignores EXIF rotation; 4: labels in the .json
Encoded = tuple[str, str, int, "bytes | Path"]  # (class, relative path, size, the encoded bytes or their file)


def _read_archive(path: Path) -> dict[str, list[Encoded]]:
    """{train, test and val folder: [(class, path from the split folder on, size, encoded bytes)]} of a
    .tar/.tar.gz, in one streaming pass; every member is checked as listing.file_problem checks a file."""
    found: dict[str, list[Encoded]] = {d: [] for d in ("train", *listing.TEST_DIRS)}
    prefixes: set[str] = set()
    bad: list[tuple[str, str]] = []
    try:
        with tarfile.open(path, "r|*") as tar:
            for member in bar(tar, desc=f"reading {path.name}", unit="file"):
                parts = [p for p in member.name.split("/") if p not in ("", ".")]  # [prefix/]split/class/.../file
                at = next((at for at in (0, 1) if len(parts) >= at + 3 and parts[at] in found), None)
                if at is None or not member.isfile() or not listing.is_image(member.name):
                    continue
                split, cls, rel = parts[at], parts[at + 1], "/".join(parts[at:])
                prefixes.add("/".join(parts[:at]))
                why = listing.size_problem(member.size)
                if why is None:  # the checks of a listed file
                    found[split].append((cls, rel, member.size, tar.extractfile(member).read()))
                    why = listing.image_problem(io.BytesIO(found[split][-1][3]), member.size)
                if why:
                    bad.append((member.name, why))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(
            f"cannot read the archive {path} ({_one_line(e)}); check that it is a complete .tar/.tar.gz"
        ) from e
    if len(prefixes) > 1:
        raise DataError(
            f"{path} holds several train/test trees ({', '.join(sorted(p or '.' for p in prefixes))}); keep one"
        )
    listing.refuse(bad, str(path))
    return found


def _decode(items: list[Encoded], size: int) -> np.ndarray:
    """(N, size, size, 3) uint8: every encoded image as Pillow (and the official torchvision ImageFolder) reads it,
    the stored pixels (no EXIF rotation), one of another size resized (shorter side to `size`, bilinear,
    antialiased) and centre-cropped. Threads: Pillow and torch work outside the GIL."""
    Image = listing.pillow()

    def square(item: Encoded) -> np.ndarray:
        _, rel, _, data = item
        try:  # a file is read here, in the thread
            with Image.open(data if isinstance(data, Path) else io.BytesIO(data)) as im:
                pixels = np.array(im.convert("RGB"))
        except Exception as e:
            raise DataError(f"cannot decode {rel} ({_one_line(e)[:200]}); remove or replace that file") from e
        h, w = pixels.shape[:2]
        if (h, w) == (size, size):
            return pixels
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float()
        y = torch.nn.functional.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
        top, left = (nh - size) // 2, (nw - size) // 2
        y = y[0, :, top : top + size, left : left + size].round().clamp(0, 255).to(torch.uint8)
        return y.permute(1, 2, 0).numpy()

    out = np.empty((len(items), size, size, 3), dtype=np.uint8)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        decoded = bar(pool.map(square, items), total=len(items), desc="decoding images", unit="image")
        for i, pixels in enumerate(decoded):
            out[i] = pixels
    return out


def _cache_paths(cfg: DataConfig, source: Path, split: str, key: object) -> tuple[Path, Path]:
    # "pil": the decoder, in the key since DALI decoded too (the entries written by Pillow stay valid)
    digest = hashlib.sha256(
        json.dumps([_CACHE_VERSION, str(source), int(cfg.image_size), "pil", split, key]).encode()
    ).hexdigest()[:16]
    name = re.sub(r"\.(tar\.gz|tgz|tar)$", "", source.name, flags=re.IGNORECASE)
    stem = Path(cfg.root).expanduser() / "cache" / f"imagefolder-{name}-{split}-{cfg.image_size}px-{digest}"
    return stem.with_name(stem.name + ".images.npy"), stem.with_name(stem.name + ".json")


def _cache_load(paths: tuple[Path, Path]) -> tuple | None:
    """(images, labels, classes, fingerprint, contents) of a cached split, or None. The key names everything the
    entry depends on, and the .json is written last, so an entry that is there is complete."""
    images_path, meta_path = paths
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        images = np.load(images_path)
    except (OSError, ValueError) as e:
        warnings.warn(f"ignoring unreadable cache {images_path} ({_one_line(e)})", stacklevel=3)
        return None
    labels = np.array(meta["labels"], dtype=np.int64)
    return images, labels, meta["classes"], meta["fingerprint"], meta["contents"]


def _cache_save(paths: tuple[Path, Path], images: np.ndarray, labels: np.ndarray, meta_data: dict) -> None:
    tag = f".tmp-{os.getpid()}"  # every rank of a torchrun job writes its own
    try:
        paths[0].parent.mkdir(parents=True, exist_ok=True)
        # renamed innermost first: the .json last, its presence marks a complete entry
        with atomic_path(paths[1], tag) as meta, atomic_path(paths[0], tag) as tmp, open(tmp, "wb") as f:
            np.save(f, images)
            meta.write_text(json.dumps({**meta_data, "labels": labels.tolist()}))
    except OSError as e:
        warnings.warn(f"could not write the dataset cache under {paths[0].parent} ({_one_line(e)})", stacklevel=3)


def load_imagefolder(cfg: DataConfig, split: str, layout: str = "imagefolder"):
    """(images, labels, classes, description, fingerprint, contents) of one split of the folder or archive that `cfg`
    names in `layout` (listing.list_folder; an archive is always the imagefolder layout)."""
    source = listing.source_path(cfg, layout)
    what = f"{layout} ({source}, decoded with Pillow"
    if source.is_dir():
        folder = listing.list_folder(source, layout, cfg.root, need=split)
        classes, key = folder.classes, [folder.classes, [item[1:] for item in folder.splits[split]]]
    else:
        st = source.stat()
        key = [st.st_size, st.st_mtime_ns]  # the archive's own
    paths = {s: _cache_paths(cfg, source, s, key) for s in SPLITS}
    hit = _cache_load(paths[split])
    if hit is not None:
        return (*hit[:3], f"{what}, from cache {paths[split][0]})", *hit[3:])
    if source.is_dir():
        found = {split: [(cls, rel, size, folder.base / rel) for cls, rel, size, _ in folder.splits[split]]}
    else:  # one pass reads both splits: decode and cache both
        found = listing.labelled_splits(_read_archive(source), str(source), split)
        classes = sorted({c for items in found.values() for c, *_ in items})
        found = {s: items for s, items in found.items() if items and (s == split or not paths[s][1].is_file())}
    for s, encoded in found.items():
        meta = {"classes": classes, "fingerprint": listing.fingerprint(encoded), "contents": listing.contents(encoded)}
        index = {c: i for i, c in enumerate(classes)}
        labels = np.array([index.get(c, -1) for c, *_ in encoded], dtype=np.int64)  # -1: unlabelled
        images = _decode(encoded, int(cfg.image_size))
        found[s] = []  # free the encoded bytes
        _cache_save(paths[s], images, labels, meta)
        if s == split:
            result = images, labels, classes, f"{what})", meta["fingerprint"], meta["contents"]
    return result
