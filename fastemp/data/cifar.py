"""CIFAR-10/100 python archives, or torchvision's extracted folders: found or downloaded, md5-verified on every
load, unpickled safely (docs/data.md); cifar100 uses the fine labels. A split's fingerprint is made of its
files' md5s, so both layouts give the same one.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import sys
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import DataConfig
from ..errors import DataError
from ..errors import one_line as _one_line
from ..progress import bar
from ..runs import atomic_path
from .listing import fingerprint


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
    folder: str  # torchvision's extracted folder (the archive's top folder)
    member_md5: dict[str, str]  # torchvision's md5 of every extracted file (datasets/cifar.py)


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
        folder="cifar-10-batches-py",
        member_md5={
            "data_batch_1": "c99cafc152244af753f735de768cd75f",
            "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
            "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
            "data_batch_4": "634d18415352ddfa80567beed471001a",
            "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
            "test_batch": "40351d587109b95175f43aff81a1287e",
            "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
        },
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
        folder="cifar-100-python",
        member_md5={
            "train": "16019d7e3df5f24257cddd939b257f8d",
            "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
            "meta": "7973b15100ade9c7d40fb424638fde48",
        },
    ),
}


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with (
        open(path, "rb") as f,
        bar(total=path.stat().st_size, desc=f"checksum {path.name}", unit="B", unit_scale=True) as progress,
    ):
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
            progress.update(len(block))
    return h.hexdigest()


def _check_md5(path: Path, expected: str, fix: str, name: str = "") -> None:
    if (got := _md5(path)) != expected:
        raise DataError(f"{name or path} is corrupt or incomplete (md5 {got}, expected {expected}); {fix}")


def _download(url: str, dest: Path) -> None:
    """Fetch `url` into `dest` (tests replace this to simulate being offline)."""
    with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        with bar(total=total, desc=f"download {url.rsplit('/', 1)[-1]}", unit="B", unit_scale=True) as progress:
            for block in iter(lambda: response.read(1 << 20), b""):
                out.write(block)
                progress.update(len(block))


def _ensure_archive(name: str, root: Path, download: bool) -> Path:
    spec = CIFAR_ARCHIVES[name]
    path = root / spec.filename
    if path.is_file():
        _check_md5(path, spec.md5, f"delete it and rerun with data.download=true, or replace it with {spec.url}")
        return path
    if not download:
        raise DataError(f"{name}: {path} not found and data.download=false; download {spec.url} and put it at {path}")
    print(f"{name}: downloading {spec.url} to {path}", file=sys.stderr, flush=True)
    with atomic_path(path, f".part-{os.getpid()}") as tmp:  # at `path` only once verified
        try:
            root.mkdir(parents=True, exist_ok=True)
            _download(spec.url, tmp)
        except Exception as e:  # offline, DNS, HTTP error, disk full, ...
            raise DataError(
                f"{name}: could not download {spec.url} ({_one_line(e)}); put {spec.filename} from that URL at {path}"
            ) from e
        _check_md5(tmp, spec.md5, f"removed it; retry, or put a good copy at {path}", f"the download of {spec.url}")
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


def _read_batches(path: Path, spec: CifarArchive, wanted: set[str]) -> dict[str, dict]:
    """Unpickle the members `wanted` of the archive, or of torchvision's extracted folder, at `path`: each file of
    a folder md5-checked as torchvision does (the archive was, whole). Verified data is the official layout."""
    blobs: dict[str, bytes] = {}
    fix = f"delete {path} to use the archive instead" if path.is_dir() else "delete it and download it again"
    try:
        if path.is_dir():
            for member in sorted(wanted):
                _check_md5(path / member, spec.member_md5[member], f"delete {path} to use the archive, or restore it")
                blobs[member] = (path / member).read_bytes()
        else:
            with tarfile.open(path, "r:gz") as tar:
                for member in tar:
                    base = member.name.rsplit("/", 1)[-1]
                    if member.isfile() and base in wanted and base not in blobs:
                        blobs[base] = tar.extractfile(member).read()
        return {m: _ArrayUnpickler(io.BytesIO(blob), encoding="bytes").load() for m, blob in blobs.items()}
    except (tarfile.TarError, OSError, EOFError, pickle.UnpicklingError) as e:
        raise DataError(f"cannot read {path} ({_one_line(e)}); {fix}") from e


def load_cifar(cfg: DataConfig, split: str, name: str):
    """(images, labels, classes, description, fingerprint, {}) of a split of the CIFAR set `name`."""
    spec = CIFAR_ARCHIVES[name]
    root = Path(cfg.root).expanduser()
    members = spec.train_members if split == "train" else spec.test_members
    path = root / spec.folder
    if (root / spec.filename).is_file() or not path.is_dir():
        path = _ensure_archive(name, root, cfg.download)
    batches = _read_batches(path, spec, {*members, spec.meta_member})
    data = np.concatenate([np.asarray(batches[m][b"data"], dtype=np.uint8) for m in members])
    labels = np.concatenate([np.asarray(batches[m][spec.label_key], dtype=np.int64) for m in members])
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in batches[spec.meta_member][spec.names_key]]
    # rows are channel-major (R plane, G plane, B plane), each 32x32 row-major
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    prints = fingerprint((name, m, spec.member_md5[m]) for m in (*members, spec.meta_member))
    what = "python archive" if path.is_file() else "extracted folder"
    return images, labels, classes, f"{name} ({what} {path})", prints, {}
