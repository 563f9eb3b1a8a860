"""Datasets as one device-resident uint8 tensor (airbench style): `load_split(cfg, split, device)`.

Sources (`data.source`):

synthetic
    The embedded procedural dataset (fastemp/synthetic.py): 10 shape/texture classes, no files.
    Train and test use different seeds derived from `data.synthetic_seed` (2*seed and 2*seed+1,
    so no seed's test set is another seed's training set) and sizes `synthetic_train` /
    `synthetic_test`.

cifar10, cifar100
    The standard python pickle archives `cifar-10-python.tar.gz` / `cifar-100-python.tar.gz` in
    `data.root`, read straight from the tar.gz (no extraction). A missing archive is downloaded
    from the official URL when `data.download` is true (to a temporary file in `data.root`,
    md5-verified, then renamed into place); the md5 of a present archive is checked on every
    load (~0.3 s). cifar100 uses the 100 fine labels.

imagefolder
    `train/<class>/*` and `test/<class>/*` image files (JPEG, PNG, BMP, ...) under `data.path`,
    a directory or a `.tar` / `.tar.gz` / `.tgz` archive read directly into memory (an optional
    single top-level folder above train/ and test/ is allowed). Classes are the sorted names of
    the class folders that hold at least one image in either split; the label is the index in
    that list, so both splits agree. Files are decoded with NVIDIA DALI (`fn.decoders.image`,
    RGB; device="cpu" for CPU targets, device="mixed" i.e. nvJPEG on CUDA), in batches fed
    through `fn.external_source`; without DALI, with Pillow; without either, DataError.
    Resize: an image that is not `image_size` x `image_size` is resized once at load, keeping
    its aspect ratio: the shorter side is resized to `image_size` (torch bilinear interpolation
    with antialiasing, rounded back to uint8), then the centre square is cropped.
    Cache: a decoded split is saved under `<data.root>/cache/` as a pair of .npy files (uint8
    images (N, S, S, 3), int64 labels (N,)) plus a small .json with the class names, named
    `imagefolder-<name>-<split>-<S>px-<key>`, where key hashes the resolved source path, the
    image size, the decoder, and the source's fingerprint: size and mtime of an archive, or for a
    directory the relative path, size and mtime of every image file in the split. Changing any
    file therefore re-decodes; delete the folder to reclaim space. Reading an archive is one
    streaming pass, so on a cache miss both splits are decoded and cached together. An
    unwritable cache only costs a warning.

Every user-facing failure raises DataError with a one-line message saying what to do.
"""

from __future__ import annotations

import difflib
import hashlib
import io
import json
import os
import pickle
import sys
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import DataConfig

SOURCES = ("synthetic", "cifar10", "cifar100", "imagefolder")
SPLITS = ("train", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".pnm", ".tif", ".tiff", ".webp")
DECODE_BATCH = 512  # encoded files per DALI pipeline run
_CACHE_VERSION = 1


class DataError(RuntimeError):
    """A dataset that cannot be loaded; the message is one line and says what to do."""


@dataclass
class ImageSet:
    images: torch.Tensor  # (N, H, W, 3) uint8, contiguous, on the requested device
    labels: torch.Tensor  # (N,) int64, on the requested device
    classes: list[str]
    description: str  # what was loaded, for logs

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def _one_line(text: object) -> str:
    lines = [s.strip() for s in str(text).splitlines() if s.strip()]
    return " ".join(lines) if lines else type(text).__name__


def load_split(cfg: DataConfig, split: str, device: torch.device | str = "cpu") -> ImageSet:
    """Load one split ("train" or "test") of the dataset that `cfg` describes onto `device`."""
    if split not in SPLITS:
        raise DataError(f"unknown split '{split}' (choose train or test)")
    source = cfg.source
    if source not in SOURCES:
        close = difflib.get_close_matches(source, SOURCES, n=1, cutoff=0.3)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise DataError(f"unknown data.source '{source}'{hint} (choose {', '.join(SOURCES)})")
    device = torch.device(device)
    if source == "synthetic":
        images, labels, classes, desc = _load_synthetic(cfg, split)
    elif source in CIFAR_ARCHIVES:
        images, labels, classes, desc = _load_cifar(cfg, source, split)
    else:
        images, labels, classes, desc = _load_imagefolder(cfg, split, device)
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
        raise DataError(f"data.synthetic_{split} must be a positive number of images, got {n}")
    seed = synthetic_seed(cfg, split)
    images, labels = make_synthetic(n, seed, size=cfg.image_size)
    desc = f"synthetic (shapes and textures, {cfg.image_size}x{cfg.image_size}, seed {seed})"
    return images, labels, list(CLASSES), desc


# ---------------------------------------------------------------------------------------------
# CIFAR python archives


@dataclass(frozen=True)
class CifarArchive:
    filename: str
    url: str
    md5: str
    train_members: tuple[str, ...]  # basenames inside the archive
    test_members: tuple[str, ...]
    meta_member: str
    label_key: bytes
    names_key: bytes


CIFAR_ARCHIVES: dict[str, CifarArchive] = {
    "cifar10": CifarArchive(
        filename="cifar-10-python.tar.gz",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        train_members=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_members=("test_batch",),
        meta_member="batches.meta",
        label_key=b"labels",
        names_key=b"label_names",
    ),
    "cifar100": CifarArchive(
        filename="cifar-100-python.tar.gz",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        train_members=("train",),
        test_members=("test",),
        meta_member="meta",
        label_key=b"fine_labels",
        names_key=b"fine_label_names",
    ),
}


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _download(url: str, dest: Path) -> None:
    """Fetch `url` into `dest` (tests replace this to simulate being offline)."""
    import urllib.request

    with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0)
        done, shown = 0, -1
        while True:
            block = response.read(1 << 20)
            if not block:
                break
            out.write(block)
            done += len(block)
            if total and sys.stderr.isatty():
                pct = 100 * done // total
                if pct != shown:
                    shown = pct
                    print(f"\rdownloading {url}: {pct}%", end="", file=sys.stderr, flush=True)
        if total and sys.stderr.isatty():
            print(file=sys.stderr)


def _ensure_archive(name: str, root: Path, download: bool) -> Path:
    spec = CIFAR_ARCHIVES[name]
    path = root / spec.filename
    if path.is_file():
        got = _md5(path)
        if got != spec.md5:
            raise DataError(
                f"{path} is corrupt or incomplete (md5 {got}, expected {spec.md5}); delete it and "
                f"rerun with data.download=true, or replace it with {spec.url}"
            )
        return path
    if not download:
        raise DataError(
            f"{name}: {path} not found and data.download=false; download {spec.url} and put it at {path}"
        )
    print(f"{name}: downloading {spec.url} to {path}", file=sys.stderr, flush=True)
    tmp = path.with_name(f"{spec.filename}.part-{os.getpid()}")
    try:
        root.mkdir(parents=True, exist_ok=True)
        _download(spec.url, tmp)
    except Exception as e:  # offline, DNS, HTTP error, disk full, ...
        tmp.unlink(missing_ok=True)
        raise DataError(
            f"{name}: could not download {spec.url} ({_one_line(e)}); "
            f"put {spec.filename} from that URL at {path}"
        ) from e
    got = _md5(tmp)
    if got != spec.md5:
        tmp.unlink(missing_ok=True)
        raise DataError(
            f"{name}: the download of {spec.url} has md5 {got}, expected {spec.md5}; removed it, "
            f"retry, or put a good copy at {path}"
        )
    os.replace(tmp, path)
    return path


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR dicts (bytes, lists, numpy arrays) and nothing that could run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a CIFAR batch")
        return super().find_class(module, name)


def _read_members(path: Path, wanted: set[str]) -> dict[str, dict]:
    """Unpickle the archive members whose basename is in `wanted`."""
    found: dict[str, dict] = {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                base = member.name.rsplit("/", 1)[-1]
                if member.isfile() and base in wanted and base not in found:
                    f = tar.extractfile(member)
                    assert f is not None
                    found[base] = _ArrayUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
    except (tarfile.TarError, OSError, EOFError, pickle.UnpicklingError) as e:
        raise DataError(f"cannot read {path} ({_one_line(e)}); delete it and download it again") from e
    missing = sorted(wanted - found.keys())
    if missing:
        raise DataError(f"{path} lacks {', '.join(missing)}; is it the right archive?")
    return found


def _load_cifar(cfg: DataConfig, name: str, split: str):
    spec = CIFAR_ARCHIVES[name]
    root = Path(cfg.root).expanduser()
    path = _ensure_archive(name, root, cfg.download)
    members = spec.train_members if split == "train" else spec.test_members
    batches = _read_members(path, set(members) | {spec.meta_member})
    try:
        data = np.concatenate([np.asarray(batches[m][b"data"], dtype=np.uint8) for m in members])
        labels = np.concatenate([np.asarray(batches[m][spec.label_key], dtype=np.int64) for m in members])
        classes = [c.decode() if isinstance(c, bytes) else str(c) for c in batches[spec.meta_member][spec.names_key]]
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{path} does not have the CIFAR python layout ({_one_line(e)})") from e
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise DataError(f"{path}: unexpected data shape {data.shape} with {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
        raise DataError(f"{path}: labels outside 0..{len(classes) - 1}")
    # rows are channel-major (R plane, G plane, B plane), each 32x32 row-major
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return torch.from_numpy(images), torch.from_numpy(labels), classes, f"{name} (python archive {path})"


# ---------------------------------------------------------------------------------------------
# imagefolder


def _is_image(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return not base.startswith(".") and base.lower().endswith(IMAGE_EXTENSIONS)


def _split_parts(relpath: str) -> tuple[str, str, str] | None:
    """(prefix, split, class) of `[prefix/]split/class/file`, or None."""
    parts = [p for p in relpath.split("/") if p not in ("", ".")]
    if len(parts) < 3 or len(parts) > 4 or parts[-3] not in SPLITS:
        return None
    return "/".join(parts[:-3]), parts[-3], parts[-2]


def _is_archive(path: Path) -> bool:
    name = path.name.lower()
    return path.is_file() and name.endswith((".tar", ".tar.gz", ".tgz"))


def _list_directory(root: Path) -> tuple[Path, dict[str, list[tuple[str, str, int, int]]]]:
    """(base, {split: [(class, path relative to base, size, mtime_ns)]}) of a directory tree;
    base is `root`, or its only subfolder when train/ and test/ sit one level down."""
    base = root
    if not any((root / s).is_dir() for s in SPLITS):
        subdirs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
        if len(subdirs) == 1 and any((subdirs[0] / s).is_dir() for s in SPLITS):
            base = subdirs[0]
    out: dict[str, list[tuple[str, str, int, int]]] = {s: [] for s in SPLITS}
    for split in SPLITS:
        split_dir = base / split
        if not split_dir.is_dir():
            continue
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            with os.scandir(class_dir) as it:
                for entry in it:
                    if entry.is_file() and _is_image(entry.name):
                        st = entry.stat()
                        rel = f"{split}/{class_dir.name}/{entry.name}"
                        out[split].append((class_dir.name, rel, st.st_size, st.st_mtime_ns))
        out[split].sort(key=lambda t: (t[0], t[1]))
    return base, out


def _read_archive(path: Path) -> dict[str, list[tuple[str, str, bytes]]]:
    """{split: [(class, member name, encoded bytes)]} of a .tar/.tar.gz, in one streaming pass."""
    out: dict[str, list[tuple[str, str, bytes]]] = {s: [] for s in SPLITS}
    prefixes: set[str] = set()
    try:
        with tarfile.open(path, "r|*") as tar:
            for member in tar:
                if not member.isfile() or not _is_image(member.name):
                    continue
                parts = _split_parts(member.name)
                if parts is None:
                    continue
                prefix, split, cls = parts
                prefixes.add(prefix)
                f = tar.extractfile(member)
                assert f is not None
                out[split].append((cls, member.name, f.read()))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"cannot read the archive {path} ({_one_line(e)})") from e
    if len(prefixes) > 1:
        raise DataError(f"{path} holds several train/test trees ({', '.join(sorted(p or '.' for p in prefixes))}); keep one")
    for items in out.values():
        items.sort(key=lambda t: (t[0], t[1]))
    return out


def _decoder_for(device: torch.device) -> str:
    """dali-cpu | dali-mixed | pil, the decoder this process would use for `device`."""
    if _dali_importable():
        return "dali-mixed" if device.type == "cuda" else "dali-cpu"
    if _pil_importable():
        return "pil"
    raise DataError(
        "imagefolder needs an image decoder: install nvidia-dali-cuda130 (or -cuda120) or pillow"
    )


def _dali_importable() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.fn  # noqa: F401
    except Exception:  # ImportError or a broken CUDA / driver stack underneath
        return False
    return True


def _pil_importable() -> bool:
    try:
        import PIL.Image  # noqa: F401
    except Exception:
        return False
    return True


def _decode_dali(blobs: list[np.ndarray], names: list[str], mixed: bool, device_index: int) -> list[np.ndarray]:
    from nvidia.dali import fn, pipeline_def, types

    batch = min(DECODE_BATCH, max(1, len(blobs)))

    @pipeline_def(
        batch_size=batch,
        num_threads=max(1, min(8, os.cpu_count() or 1)),
        device_id=device_index if mixed else None,
        prefetch_queue_depth=1,
        exec_dynamic=True,
    )
    def pipe():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        return fn.decoders.image(encoded, device="mixed" if mixed else "cpu", output_type=types.RGB)

    try:
        p = pipe()
        p.build()
    except Exception as e:
        raise DataError(f"cannot build the DALI decoding pipeline ({_one_line(e)[:300]})") from e
    out: list[np.ndarray] = []
    for start in range(0, len(blobs), batch):
        chunk = blobs[start : start + batch]
        p.feed_input("encoded", chunk)
        try:
            (decoded,) = p.run()
        except Exception as e:
            bad = _first_undecodable(chunk, names[start : start + batch])
            where = bad or f"one of {names[start]} .. {names[start + len(chunk) - 1]}"
            raise DataError(f"cannot decode {where} ({_one_line(e)[:200]})") from e
        if mixed:
            decoded = decoded.as_cpu()
        if decoded.is_dense_tensor():
            arr = np.array(decoded.as_array())
            out.extend(arr[i] for i in range(arr.shape[0]))
        else:
            out.extend(np.array(decoded[i]) for i in range(len(chunk)))
    return out


def _first_undecodable(blobs: list[np.ndarray], names: list[str]) -> str | None:
    if not _pil_importable():
        return None
    from PIL import Image

    for blob, name in zip(blobs, names):
        try:
            Image.open(io.BytesIO(blob.tobytes())).convert("RGB")
        except Exception:
            return name
    return None


def _decode_pil(blobs: list[np.ndarray], names: list[str]) -> list[np.ndarray]:
    from PIL import Image

    out = []
    for blob, name in zip(blobs, names):
        try:
            with Image.open(io.BytesIO(blob.tobytes())) as im:
                out.append(np.asarray(im.convert("RGB")))
        except Exception as e:
            raise DataError(f"cannot decode {name} ({_one_line(e)[:200]})") from e
    return out


def _resize_square(images: list[np.ndarray], size: int) -> np.ndarray:
    """Stack decoded HWC uint8 images into (N, size, size, 3), resizing those of another size:
    shorter side to `size` (bilinear, antialiased), then a centre crop."""
    import torch.nn.functional as F

    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, im in enumerate(images):
        if im.ndim == 2:
            im = images[i] = np.repeat(im[:, :, None], 3, axis=2)
        if im.shape[:2] == (size, size):
            out[i] = im[:, :, :3]
        else:
            groups.setdefault(im.shape[:2], []).append(i)
    for (h, w), idx in groups.items():
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        for start in range(0, len(idx), 256):
            part = idx[start : start + 256]
            x = torch.from_numpy(np.stack([images[i][:, :, :3] for i in part])).permute(0, 3, 1, 2).float()
            y = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
            top, left = (nh - size) // 2, (nw - size) // 2
            y = y[:, :, top : top + size, left : left + size].round().clamp(0, 255).to(torch.uint8)
            out[part] = y.permute(0, 2, 3, 1).numpy()
    return out


def _decode(items: list[tuple[str, str, bytes]], classes: list[str], size: int, decoder: str,
            device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index[c] for c, _, _ in items], dtype=np.int64)
    blobs = [np.frombuffer(b, dtype=np.uint8) for _, _, b in items]
    names = [n for _, n, _ in items]
    if decoder == "pil":
        decoded = _decode_pil(blobs, names)
    else:
        mixed = decoder == "dali-mixed"
        index = device.index if device.index is not None else (torch.cuda.current_device() if mixed else 0)
        decoded = _decode_dali(blobs, names, mixed=mixed, device_index=index)
    return _resize_square(decoded, size), labels


def _cache_paths(cfg: DataConfig, source: Path, split: str, fingerprint: object, decoder: str) -> tuple[Path, Path, Path]:
    key = hashlib.sha256(
        json.dumps([_CACHE_VERSION, str(source), int(cfg.image_size), decoder, split, fingerprint]).encode()
    ).hexdigest()[:16]
    name = source.name
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    stem = f"imagefolder-{name}-{split}-{cfg.image_size}px-{key}"
    cache = Path(cfg.root).expanduser() / "cache"
    return cache / f"{stem}.images.npy", cache / f"{stem}.labels.npy", cache / f"{stem}.json"


def _cache_load(paths: tuple[Path, Path, Path], size: int):
    img_path, lab_path, meta_path = paths
    if not (img_path.is_file() and lab_path.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        images = np.load(img_path)
        labels = np.load(lab_path)
    except (OSError, ValueError) as e:
        warnings.warn(f"ignoring unreadable cache {img_path} ({_one_line(e)})", stacklevel=3)
        return None
    if (images.dtype != np.uint8 or images.shape[1:] != (size, size, 3) or labels.dtype != np.int64
            or labels.shape != (images.shape[0],) or meta.get("n") != images.shape[0]):
        warnings.warn(f"ignoring inconsistent cache {img_path}", stacklevel=3)
        return None
    return images, labels, list(meta["classes"])


def _cache_save(paths: tuple[Path, Path, Path], images: np.ndarray, labels: np.ndarray, classes: list[str]) -> None:
    img_path, lab_path, meta_path = paths
    try:
        img_path.parent.mkdir(parents=True, exist_ok=True)
        tag = f".tmp-{os.getpid()}"
        for path, arr in ((img_path, images), (lab_path, labels)):
            with open(path.with_name(path.name + tag), "wb") as f:
                np.save(f, arr)
        meta_tmp = meta_path.with_name(meta_path.name + tag)
        meta_tmp.write_text(json.dumps({"classes": classes, "n": int(len(labels))}))
        # the .json last: its presence marks a complete entry
        os.replace(img_path.with_name(img_path.name + tag), img_path)
        os.replace(lab_path.with_name(lab_path.name + tag), lab_path)
        os.replace(meta_tmp, meta_path)
    except OSError as e:
        warnings.warn(f"could not write the dataset cache under {img_path.parent} ({_one_line(e)})", stacklevel=3)


def _classes_of(listing: dict[str, list]) -> list[str]:
    return sorted({item[0] for items in listing.values() for item in items})


def _load_imagefolder(cfg: DataConfig, split: str, device: torch.device):
    if not cfg.path:
        raise DataError("data.source=imagefolder needs data.path: a directory or .tar/.tar.gz with train/<class>/* and test/<class>/*")
    source = Path(cfg.path).expanduser().resolve()
    if not source.exists():
        raise DataError(f"data.path {source} does not exist")
    if not (source.is_dir() or _is_archive(source)):
        raise DataError(f"data.path {source} is neither a directory nor a .tar/.tar.gz/.tgz archive")
    if cfg.image_size < 1:
        raise DataError(f"data.image_size must be positive, got {cfg.image_size}")
    decoder = _decoder_for(device)
    size = int(cfg.image_size)
    how = f"decoded with {'Pillow' if decoder == 'pil' else 'DALI on ' + decoder.split('-')[1]}"

    if source.is_dir():
        base, listing = _list_directory(source)
        items = listing[split]
        if not items:
            raise DataError(f"no images in {base / split}/<class>/ (expected train/<class>/* and test/<class>/*)")
        classes = _classes_of(listing)
        fingerprint = [[rel, sz, mt] for _, rel, sz, mt in items]
        paths = _cache_paths(cfg, source, split, fingerprint, decoder)
        hit = _cache_load(paths, size)
        if hit is not None and hit[2] == classes:
            return torch.from_numpy(hit[0]), torch.from_numpy(hit[1]), classes, f"imagefolder ({source}, {how}, from cache {paths[0]})"
        encoded = []
        for cls, rel, _, _ in items:
            try:
                encoded.append((cls, rel, (base / rel).read_bytes()))
            except OSError as e:
                raise DataError(f"cannot read {base / rel} ({_one_line(e)})") from e
        images, labels = _decode(encoded, classes, size, decoder, device)
        _cache_save(paths, images, labels, classes)
        return torch.from_numpy(images), torch.from_numpy(labels), classes, f"imagefolder ({source}, {how})"

    st = source.stat()
    fingerprint = [st.st_size, st.st_mtime_ns]
    paths = {s: _cache_paths(cfg, source, s, fingerprint, decoder) for s in SPLITS}
    hit = _cache_load(paths[split], size)
    if hit is not None:
        return torch.from_numpy(hit[0]), torch.from_numpy(hit[1]), hit[2], f"imagefolder ({source}, {how}, from cache {paths[split][0]})"
    listing = _read_archive(source)
    if not listing[split]:
        raise DataError(f"no images under {split}/<class>/ in {source} (expected train/<class>/* and test/<class>/*)")
    classes = _classes_of(listing)
    result = None
    for s in SPLITS:  # one pass read both splits: decode and cache both
        if not listing[s]:
            continue
        if s != split and _cache_load(paths[s], size) is not None:
            continue
        images, labels = _decode(listing[s], classes, size, decoder, device)
        listing[s] = []  # free the encoded bytes
        _cache_save(paths[s], images, labels, classes)
        if s == split:
            result = images, labels
    assert result is not None
    return torch.from_numpy(result[0]), torch.from_numpy(result[1]), classes, f"imagefolder ({source}, {how})"
