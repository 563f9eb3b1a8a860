"""Image folders as file lists: every layout fastemp reads, one walker, every file checked when listed.

The layouts (imagefolder, tinyimagenet, unlabelled) and the checks: docs/data.md. Items are (class, path
relative to the base folder, size, mtime_ns), sorted by class then path; labels index the sorted classes.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import io
import json
import os
import re
import stat
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError, one_line
from ..progress import bar

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".pnm", ".tif", ".tiff", ".webp")
# Pillow's default decompression-bomb limit (about 9459 x 9459): a 3 MB PNG can declare 30000 x 30000
# pixels (2.7 GB as RGB); such a file is refused from its header, before any decoder allocates.
MAX_IMAGE_PIXELS = 89_478_485
# Twice the size of an uncompressed 8-bit RGB image at the pixel limit (256 MiB): no image fastemp would
# decode is larger, and a decoder that reads whole files (DALI) never holds more than this per file.
MAX_FILE_BYTES = 512 << 20
LAYOUTS = (
    "data.source=imagefolder reads train/<class>/* with test/<class>/* or val/<class>/* (a folder or .tar[.gz]), "
    "data.source=tinyimagenet a tiny-imagenet-200/ folder, data.train_path a folder of unlabelled images"
)
TEST_DIRS = ("test", "val")  # the folder of the test split, in order of preference
_CHECK_VERSION = 1

Item = tuple[str, str, int, int]  # (class, path relative to the base folder, size, mtime_ns)


@dataclass
class Listing:
    base: Path  # the folder the items' paths are relative to
    splits: dict[str, list[Item]]  # "train", "test" (unlabelled: "train" only, class "")
    classes: list[str]


def is_image(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return not base.startswith(".") and base.lower().endswith(IMAGE_EXTENSIONS)


def fingerprint(items) -> str:
    """A short hash of a split's files: (class, relative path, size) of each item, in order."""
    h = hashlib.sha256()
    for cls, rel, size, *_ in items:
        h.update(f"{cls}\t{rel}\t{size}\n".encode())
    return h.hexdigest()[:16]


def contents(items) -> dict[str, list]:
    """{folder: [files, bytes, hash]} of a split's items: what `what_changed` compares, cheap to keep."""
    out: dict[str, list] = {}
    for cls, rel, size, *_ in items:
        folder = rel.rpartition("/")[0]
        entry = out.setdefault(folder, [0, 0, 0])
        entry[0], entry[1] = entry[0] + 1, entry[1] + size
        entry[2] ^= int.from_bytes(hashlib.sha256(f"{cls}\t{rel}\t{size}".encode()).digest()[:6], "big")
    return out


def what_changed(then: dict, now: dict, was: str = "then") -> str:
    """What differs between two `contents`, in a few words: the first folder that differs, and a count."""
    differ = [f for f in sorted(then.keys() | now.keys()) if then.get(f) != now.get(f)]
    if not (then and now and differ):
        return "other files"
    f, a, b = differ[0], then.get(differ[0]), now.get(differ[0])
    if a is None or b is None:
        what = f"{f}/ ({(a or b)[0]} files) is {'new' if a is None else 'gone'}"
    elif a[0] != b[0]:
        what = f"{f}/ has {b[0]} files, {a[0]} {was} ({abs(b[0] - a[0])} {'added' if b[0] > a[0] else 'removed'})"
    else:
        what = f"{f}/ has as many files ({b[0]}) but other names or sizes ({b[1] - a[1]:+,} bytes)"
    return what + (f", and {len(differ) - 1} more folders differ" if len(differ) > 1 else "")


# ------------------------------------------------------------------------------------- one file


def size_problem(size: int) -> str | None:
    if size == 0:
        return "empty (0 bytes)"
    if size > MAX_FILE_BYTES:
        return f"{size / 2**30:.1f} GiB, over the limit of {MAX_FILE_BYTES >> 20} MiB for one file"
    return None


def os_problem(err: OSError) -> str:
    if err.errno == errno.ELOOP:
        return "a symlink loop"
    if err.errno == errno.ENOENT:
        return "missing (a broken link?)"
    return f"unreadable ({err.strerror or err})"


def image_problem(f, size: int) -> str | None:
    """What is wrong with the encoded image in the binary file object `f` (`size` bytes, which passed
    size_problem), from its header (and a full decode only when a JPEG or PNG lacks its end marker); None when
    nothing is."""
    Image = pillow()
    try:
        with Image.open(f) as im:
            pixels, kind = im.size[0] * im.size[1], im.format
    except Image.DecompressionBombError as err:  # Pillow's own check, at twice its limit, names the count
        found = re.search(r"\((\d+) pixels\)", str(err))
        pixels, kind = int(found.group(1)) if found else 2 * MAX_IMAGE_PIXELS + 1, None
    except OSError as err:  # a failed read has an errno; Pillow's "cannot identify" and friends have none
        return os_problem(err) if err.errno else "not an image Pillow can read"
    except Exception:  # a header that breaks the parser (SyntaxError, ValueError, struct.error, ...)
        return "not an image (a broken header)"
    if pixels > MAX_IMAGE_PIXELS:
        return f"{pixels:,} pixels, over the limit of {MAX_IMAGE_PIXELS:,} pixels for one image"
    if kind == "PNG":  # Pillow decodes a PNG cut after its last image data, DALI does not: IEND must be there
        f.seek(max(0, size - 4096))
        if b"IEND" not in f.read():
            return "truncated (no IEND chunk at its end)"
    if kind == "JPEG":
        f.seek(max(0, size - 2))
        if f.read() != b"\xff\xd9":  # no end marker: decode it (bytes after a complete image are allowed)
            f.seek(0)
            if undecodable(f.read()):
                return "truncated (it ends before its image data does)"
    return None


def undecodable(blob) -> str | None:
    """Why Pillow cannot decode the encoded image `blob` (bytes or a uint8 array), or None: what names the file of
    a batch a decoder failed on."""
    try:
        with pillow().open(io.BytesIO(bytes(blob))) as im:
            im.load()
    except Exception as err:
        return f"cannot be decoded ({one_line(err)[:120]})"
    return None


def file_problem(path: str | os.PathLike) -> str | None:
    """What is wrong with one image file (unreadable, empty, too large, a looping link, not an image,
    too many pixels, truncated), or None."""
    try:
        size = os.stat(path).st_size  # before opening: a pipe or device (size 0) would block open()
        if problem := size_problem(size):
            return problem
        with open(path, "rb") as f:  # opening it is the readability check
            return image_problem(f, size)
    except OSError as err:
        return os_problem(err)


@functools.cache
def pillow():
    """PIL.Image, which image folders need (their checks, decoding). Its decompression-bomb warning is silenced
    once, for the process (catch_warnings is not thread-safe): every image past its limit is refused here as an
    error."""
    try:
        from PIL import Image
    except Exception as err:  # ImportError, or a broken install
        raise DataError(
            f"image folders are read with Pillow, which does not import ({one_line(err)}); pip install pillow"
        ) from err
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    return Image


def refuse(bad: list[tuple[str, str]], where: str) -> None:
    """One line naming the first bad files and how many there are (nothing when `bad` is empty)."""
    if not bad:
        return
    bad = sorted(bad)
    named = ", ".join(f"{name} ({why})" for name, why in bad[:3])
    more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    s = "s" if len(bad) > 1 else ""
    raise DataError(
        f"{len(bad)} bad image file{s} in {where}: {named}{more}; remove or replace {'them' if s else 'it'}"
    )


def check_files(base: Path, items: list[Item], cache_root: str | os.PathLike, bad: list[tuple[str, str]]) -> None:
    """Check every listed file (threads) and refuse the bad ones with those in `bad` (the listing's); remember
    a folder that passed under cache_root/cache."""
    h = hashlib.sha256(json.dumps([_CHECK_VERSION, MAX_IMAGE_PIXELS, MAX_FILE_BYTES, str(base)]).encode())
    for _, rel, size, mtime in sorted(items, key=lambda t: t[1]):
        h.update(f"{rel}\t{size}\t{mtime}\n".encode())
    marker = Path(cache_root).expanduser() / "cache" / f"checked-{base.name}-{h.hexdigest()[:20]}.json"
    if not bad and marker.is_file():
        return
    chunks = [[rel for _, rel, _, _ in items[i : i + 256]] for i in range(0, len(items), 256)]
    bad = list(bad)
    with ThreadPoolExecutor(max_workers=min(32, 4 * (os.cpu_count() or 1))) as pool:
        progress = bar(total=len(items), desc=f"checking {base.name}", unit="file")
        for chunk, problems in zip(chunks, pool.map(lambda c: [file_problem(base / rel) for rel in c], chunks)):
            bad += [(rel, why) for rel, why in zip(chunk, problems) if why]
            progress.update(len(chunk))
        progress.close()
    refuse(bad, str(base))
    with contextlib.suppress(OSError):  # else checked again next time
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"files": len(items)}))


# ------------------------------------------------------------------------------------- folders


def _scan(directory: Path, rel: str, cls: str, items: list, bad: list, ancestors: frozenset = frozenset()) -> None:
    """Every image file under `directory`, to any depth (links followed, loops cut), into `items` as
    (cls, rel/name, size, mtime_ns); an image name that cannot be stat'ed, or a folder that cannot be
    listed, into `bad`."""
    try:
        st = directory.stat()
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError as err:
        bad.append((rel, os_problem(err)))
        return
    if (st.st_dev, st.st_ino) in ancestors:
        return
    ancestors = ancestors | {(st.st_dev, st.st_ino)}
    for entry in entries:
        if entry.name.startswith("."):
            continue
        name = f"{rel}/{entry.name}" if rel else entry.name
        if is_image(entry.name):
            try:
                est = entry.stat()
            except OSError as err:
                bad.append((name, os_problem(err)))
                continue
            if stat.S_ISREG(est.st_mode):
                items.append((cls, name, est.st_size, est.st_mtime_ns))
                continue
        if entry.is_dir():
            _scan(Path(entry.path), name, cls, items, bad, ancestors)


def _labelled(base: Path, split_dir: str, bad: list) -> list[Item]:
    """The images of every class folder of base/split_dir, labelled by their folder's name."""
    items: list[Item] = []
    folders = sorted(p for p in (base / split_dir).iterdir() if p.is_dir()) if (base / split_dir).is_dir() else []
    for class_dir in (p for p in folders if not p.name.startswith(".")):
        _scan(class_dir, f"{split_dir}/{class_dir.name}", class_dir.name, items, bad)
    return items


def _tiny_val(base: Path, bad: list) -> list[Item] | None:
    """Tiny-ImageNet's val/images/* labelled by val/val_annotations.txt (None when it has not that layout)."""
    notes, images = base / "val" / "val_annotations.txt", base / "val" / "images"
    if not (notes.is_file() and images.is_dir()):
        return None
    label = dict(line.split("\t")[:2] for line in notes.read_text().splitlines() if "\t" in line)
    found: list[Item] = []
    _scan(images, "val/images", "", found, bad)
    unlabelled = [rel for _, rel, _, _ in found if rel.rsplit("/", 1)[-1] not in label]
    if unlabelled:
        raise DataError(
            f"{base / unlabelled[0]} has no line in {notes} ({len(unlabelled)} such files); "
            "restore the annotations or remove those images"
        )
    return [(label[rel.rsplit("/", 1)[-1]], rel, size, mtime) for _, rel, size, mtime in found]


def labelled_splits(found: dict[str, list], where: str, need: str) -> dict[str, list]:
    """{"train", "test"} of the labelled split folders `found` (train, test and/or val), sorted by class and path,
    checked: one test folder, images in the split `need`, two classes for a probe to tell apart, and only test
    classes it was trained on."""
    named = [d for d in TEST_DIRS if found.get(d)]
    if len(named) > 1:
        raise DataError(f"{where} has both test/ and val/ class folders; keep one of them as the test split")
    test_dir = named[0] if named else next(d for d in TEST_DIRS if d in found)
    splits = {split: sorted(found[d], key=lambda t: t[:2]) for split, d in (("train", "train"), ("test", test_dir))}
    if not splits[need]:
        raise DataError(f"no images in {where}/{'train' if need == 'train' else test_dir}/<class>/; {LAYOUTS}")
    train = {item[0] for item in splits["train"]}
    test = {item[0] for item in splits["test"]}
    if splits["train"] and len(train) < 2:
        raise DataError(
            f"{where}: train/ has {len(train)} class ({', '.join(sorted(train))}); a linear probe needs "
            "at least 2 classes: add train/<class>/ folders"
        )
    missing = sorted(test - train) if splits["train"] else []
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise DataError(
            f"{where}: {test_dir}/ has classes with no training images: {', '.join(missing[:3])}{more}; "
            f"add train/<class>/ images for them or remove them from {test_dir}/"
        )
    return splits


def source_path(cfg, layout: str) -> Path:
    """The resolved folder (or, for imagefolder data decoded once, .tar[.gz]) that the DataConfig `cfg` names
    for `layout`; a missing or wrong one is a one-line error."""
    key, given = ("data.train_path", cfg.train_path) if layout == "unlabelled" else ("data.path", cfg.path)
    if not given.strip():
        raise DataError(f"data.source={layout} needs data.path; set it to the dataset's folder ({LAYOUTS})")
    source = Path(given).expanduser().resolve()
    if not source.exists():
        raise DataError(f"{key} {source} does not exist; check the path ({LAYOUTS})")
    archive = source.is_file() and source.name.lower().endswith((".tar", ".tar.gz", ".tgz"))
    if archive and (cfg.streamed or layout != "imagefolder"):
        why = "data.streamed=true reads files one by one" if cfg.streamed else f"{key} is read as a folder"
        raise DataError(f"{source} is an archive, but {why}; extract it and point {key} at the folder")
    if not (source.is_dir() or archive):
        raise DataError(f"{key} {source} is neither a folder nor a .tar/.tar.gz/.tgz archive; point {key} at one")
    return source


def list_folder(source: Path, layout: str, cache_root: str | os.PathLike, need: str = "train") -> Listing:
    """List (and check) the folder `source` in `layout` (imagefolder | tinyimagenet | unlabelled); the
    split `need` must have images."""
    bad: list[tuple[str, str]] = []
    splits: dict[str, list[Item]] = {"train": [], "test": []}
    if layout == "unlabelled":
        base = source
        top = "train" if (base / "train").is_dir() else ""
        _scan(base / top, top, "", splits["train"], bad)
        splits["train"].sort(key=lambda t: t[:2])
        if not splits["train"]:
            raise DataError(f"no images under {base / top}; data.train_path is a folder of image files (any depth)")
    else:
        tiny, dirs = layout == "tinyimagenet", ("train", *TEST_DIRS)

        def has_layout(folder: Path) -> bool:
            return (folder / "wnids.txt").is_file() if tiny else any((folder / d).is_dir() for d in dirs)

        base = source
        if not has_layout(source):  # or its only subfolder, when the layout sits one level down
            subdirs = [p for p in source.iterdir() if p.is_dir() and not p.name.startswith(".")]
            base = subdirs[0] if len(subdirs) == 1 and has_layout(subdirs[0]) else source
        if tiny and not (base / "wnids.txt").is_file():
            raise DataError(f"{source} has no wnids.txt, so it is not a tiny-imagenet-200/ folder; {LAYOUTS}")
        if not tiny and (base / "wnids.txt").is_file():
            raise DataError(f"{base} is a Tiny-ImageNet folder (it has wnids.txt); set data.source=tinyimagenet")
        train = _labelled(base, "train", bad)
        val = _tiny_val(base, bad) if tiny else None
        tests = ("val",) if tiny else TEST_DIRS  # tiny-imagenet-200/test/ has no labels: never read
        found = {"train": train, **({"val": val} if val is not None else {d: _labelled(base, d, bad) for d in tests})}
        if tiny:
            wnids = set((base / "wnids.txt").read_text().split())
            stray = sorted({c for items in found.values() for c, *_ in items} - wnids)
            if stray:
                raise DataError(f"{base}: class {stray[0]} is not in wnids.txt; add it there or remove its folder")
        splits = labelled_splits(found, str(base), need)
    check_files(base, splits["train"] + splits["test"], cache_root, bad)
    classes = sorted({c for items in splits.values() for c, *_ in items} - {""})
    return Listing(base=base, splits=splits, classes=classes)
