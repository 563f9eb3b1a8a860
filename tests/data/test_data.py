"""Dataset loading: CIFAR python archives (tiny ones built here), imagefolder trees (directory,
.tar, .tar.gz; tiny PNGs written by a pure-python encoder), the decode cache, errors, and the
shared CIFAR-10 JPEG archive when it is present. Nothing here touches the network."""

import dataclasses
import functools
import io
import os
import pickle
import struct
import sys
import tarfile
import urllib.error
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import fastemp.data.cifar as cifar
import fastemp.data.imagefolder as imagefolder
from fastemp.config import DataConfig
from fastemp.data import DataError, load_split
from fastemp.errors import ConfigError


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    def refuse(url, dest):
        raise AssertionError(f"a test tried to download {url}")

    monkeypatch.setattr(cifar, "_download", refuse)


# ---------------------------------------------------------------------------------------------
# CIFAR python archives


def _cifar_batch(n: int, label_key: bytes, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        b"batch_label": b"batch",
        label_key: [int(v) for v in rng.integers(0, 3, n)],
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [b"x.png"] * n,
    }


def _add(tar: tarfile.TarFile, name: str, obj) -> None:
    payload = pickle.dumps(obj, protocol=2)
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def build_cifar10(path: Path) -> dict:
    batches = {f"data_batch_{i}": _cifar_batch(3, b"labels", i) for i in range(1, 6)}
    batches["test_batch"] = _cifar_batch(4, b"labels", 9)
    # a known pixel: train image 0 (data_batch_1, row 0), h=5, w=7, channel 1 (green) = 201
    batches["data_batch_1"][b"data"][0, 1 * 1024 + 5 * 32 + 7] = 201
    batches["data_batch_1"][b"data"][0, 0 * 1024 + 5 * 32 + 7] = 17
    batches["data_batch_1"][b"data"][0, 2 * 1024 + 31 * 32 + 0] = 99
    meta = {b"label_names": [b"plane", b"car", b"bird"], b"num_vis": 3072}
    with tarfile.open(path, "w:gz") as tar:
        for name, batch in batches.items():
            _add(tar, f"cifar-10-batches-py/{name}", batch)
        _add(tar, "cifar-10-batches-py/batches.meta", meta)
    return batches


def build_cifar100(path: Path) -> dict:
    batches = {"train": _cifar_batch(6, b"fine_labels", 1), "test": _cifar_batch(2, b"fine_labels", 2)}
    for b in batches.values():
        b[b"coarse_labels"] = [0] * len(b[b"fine_labels"])
    batches["test"][b"data"][1, 2 * 1024 + 0 * 32 + 31] = 250  # test image 1, h=0, w=31, blue
    meta = {b"fine_label_names": [b"apple", b"aquarium_fish", b"baby"], b"coarse_label_names": [b"x"]}
    with tarfile.open(path, "w:gz") as tar:
        for name, batch in batches.items():
            _add(tar, f"cifar-100-python/{name}", batch)
        _add(tar, "cifar-100-python/meta", meta)
    return batches


@pytest.fixture
def cifar_root(tmp_path, monkeypatch):
    """A data root holding tiny cifar-10 / cifar-100 archives, registered with their md5."""
    root = tmp_path / "root"
    root.mkdir()
    built = {
        "cifar10": build_cifar10(root / "cifar-10-python.tar.gz"),
        "cifar100": build_cifar100(root / "cifar-100-python.tar.gz"),
    }
    archives = dict(cifar.CIFAR_ARCHIVES)
    for name, spec in archives.items():
        archives[name] = dataclasses.replace(spec, md5=cifar._md5(root / spec.filename))
    monkeypatch.setattr(cifar, "CIFAR_ARCHIVES", archives)
    return root, built


def test_cifar10_layout(cifar_root):
    root, built = cifar_root
    cfg = DataConfig(source="cifar10", root=str(root), download=False)
    tr = load_split(cfg, "train")
    te = load_split(cfg, "test")
    assert tr.images.shape == (15, 32, 32, 3) and tr.images.dtype == torch.uint8 and tr.images.is_contiguous()
    assert te.images.shape == (4, 32, 32, 3)
    assert tr.labels.dtype == torch.int64
    assert tr.classes == ["plane", "car", "bird"]
    assert tr.images[0, 5, 7].tolist()[:2] == [17, 201]
    assert tr.images[0, 31, 0, 2] == 99
    expected = np.concatenate([built["cifar10"][f"data_batch_{i}"][b"labels"] for i in range(1, 6)])
    assert tr.labels.tolist() == expected.tolist()
    # the whole layout: row = R plane | G plane | B plane, each 32x32 row-major
    row = built["cifar10"]["data_batch_3"][b"data"][1]
    assert np.array_equal(tr.images[7].numpy(), row.reshape(3, 32, 32).transpose(1, 2, 0))
    assert te.labels.tolist() == list(built["cifar10"]["test_batch"][b"labels"])
    assert "cifar10" in tr.description and "cifar-10-python.tar.gz" in tr.description


def test_cifar100_fine_labels(cifar_root):
    root, built = cifar_root
    cfg = DataConfig(source="cifar100", root=str(root), download=False)
    te = load_split(cfg, "test")
    tr = load_split(cfg, "train")
    assert te.images[1, 0, 31, 2] == 250
    assert te.classes == ["apple", "aquarium_fish", "baby"]
    assert tr.labels.tolist() == list(built["cifar100"]["train"][b"fine_labels"])
    assert tr.images.shape == (6, 32, 32, 3)


def test_cifar_bad_md5_present_file(cifar_root, monkeypatch):
    root, _ = cifar_root
    spec = cifar.CIFAR_ARCHIVES["cifar10"]
    monkeypatch.setitem(cifar.CIFAR_ARCHIVES, "cifar10", dataclasses.replace(spec, md5="0" * 32))
    with pytest.raises(DataError) as e:
        load_split(DataConfig(source="cifar10", root=str(root)), "train")
    msg = str(e.value)
    assert "\n" not in msg and str(root / spec.filename) in msg and "md5" in msg and spec.url in msg


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_torchvisions_extracted_cifar_folders_are_read_when_no_archive_is_there(
    cifar_root, tmp_path, monkeypatch, name
):
    """data.root/cifar-10-batches-py/ (cifar-100-python/) as torchvision leaves it: the same images, labels and
    fingerprint as the archive; each file's md5 checked against torchvision's list."""
    root, _ = cifar_root
    spec = cifar.CIFAR_ARCHIVES[name]
    extracted = tmp_path / "tv"
    with tarfile.open(root / spec.filename) as tar:
        tar.extractall(extracted, filter="data")
    folder = extracted / spec.folder
    md5s = {m: cifar._md5(folder / m) for m in spec.member_md5}
    monkeypatch.setitem(cifar.CIFAR_ARCHIVES, name, dataclasses.replace(spec, member_md5=md5s))
    for split in ("train", "test"):
        archive = load_split(DataConfig(source=name, root=str(root), download=False), split)
        loaded = load_split(DataConfig(source=name, root=str(extracted), download=False), split)
        assert torch.equal(loaded.images, archive.images) and torch.equal(loaded.labels, archive.labels)
        assert loaded.classes == archive.classes and loaded.fingerprint == archive.fingerprint
        assert f"extracted folder {folder}" in loaded.description
    assert archive.fingerprint != load_split(DataConfig(source=name, root=str(root)), "train").fingerprint
    member = spec.test_members[0]
    (folder / member).write_bytes((folder / member).read_bytes()[:-1])
    with pytest.raises(DataError, match=f"{folder / member} is corrupt or incomplete \\(md5 .*expected {md5s[member]}"):
        load_split(DataConfig(source=name, root=str(extracted), download=False), "test")
    load_split(DataConfig(source=name, root=str(extracted), download=False), "train")  # the other files are fine


def assert_one_line_naming_file_and_url(msg, root, filename):
    assert "\n" not in msg
    assert str(root / filename) in msg
    assert f"https://www.cs.toronto.edu/~kriz/{filename}" in msg


def test_cifar_missing_without_download(tmp_path):
    with pytest.raises(DataError) as e:
        load_split(DataConfig(source="cifar100", root=str(tmp_path), download=False), "train")
    assert_one_line_naming_file_and_url(str(e.value), tmp_path, "cifar-100-python.tar.gz")


def test_cifar_offline(tmp_path, monkeypatch):
    def offline(url, dest):
        Path(dest).write_bytes(b"partial")
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(cifar, "_download", offline)
    root = tmp_path / "fresh" / "data"  # not there yet
    with pytest.raises(DataError) as e:
        load_split(DataConfig(source="cifar10", root=str(root), download=True), "test")
    assert_one_line_naming_file_and_url(str(e.value), root, "cifar-10-python.tar.gz")
    assert list(root.iterdir()) == []  # the partial download is gone


def test_cifar_download(cifar_root, tmp_path, monkeypatch):
    src_root, _ = cifar_root
    source = src_root / "cifar-10-python.tar.gz"
    calls = []

    def fake_download(url, dest):
        calls.append(url)
        Path(dest).write_bytes(source.read_bytes())

    monkeypatch.setattr(cifar, "_download", fake_download)
    root = tmp_path / "dl"
    te = load_split(DataConfig(source="cifar10", root=str(root)), "test")
    assert calls == [cifar.CIFAR_ARCHIVES["cifar10"].url]
    assert te.images.shape == (4, 32, 32, 3)
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-python.tar.gz"]
    load_split(DataConfig(source="cifar10", root=str(root)), "train")
    assert len(calls) == 1  # present now: no second download


def test_cifar_download_md5_mismatch(tmp_path, monkeypatch):
    monkeypatch.setattr(cifar, "_download", lambda url, dest: Path(dest).write_bytes(b"not an archive"))
    root = tmp_path / "dl"
    with pytest.raises(DataError) as e:
        load_split(DataConfig(source="cifar10", root=str(root)), "train")
    msg = str(e.value)
    assert "\n" not in msg and "md5" in msg and "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in msg
    assert list(root.iterdir()) == []  # nothing left behind


def test_cifar_pickle_is_restricted(tmp_path, monkeypatch):
    """Only plain data and numpy arrays are unpickled, even from an archive with a matching md5."""
    path = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        _add(tar, "cifar-10-batches-py/test_batch", {b"data": os.system, b"labels": []})
        _add(tar, "cifar-10-batches-py/batches.meta", {b"label_names": []})
    spec = dataclasses.replace(cifar.CIFAR_ARCHIVES["cifar10"], md5=cifar._md5(path))
    monkeypatch.setitem(cifar.CIFAR_ARCHIVES, "cifar10", spec)
    with pytest.raises(DataError, match="cannot read"):
        load_split(DataConfig(source="cifar10", root=str(tmp_path)), "test")


# ---------------------------------------------------------------------------------------------
# imagefolder


def png_bytes(img: np.ndarray) -> bytes:
    """A minimal RGB or grayscale 8-bit PNG encoder (no Pillow needed)."""
    img = np.ascontiguousarray(img, dtype=np.uint8)
    h, w = img.shape[:2]
    colour_type = 2 if img.ndim == 3 else 0
    raw = b"".join(b"\x00" + img[y].tobytes() for y in range(h))

    def chunk(tag: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", w, h, 8, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def tagged_image(label: int, index: int, split: str, size: int = 32) -> np.ndarray:
    """An image that says who it is: pixel (0, 0) = (40 * label, 10 * index, split code);
    the rest is a fixed pattern."""
    yy, xx = np.mgrid[0:size, 0:size]
    img = np.stack([(xx * 7) % 256, (yy * 5) % 256, ((xx + yy) * 3) % 256], -1).astype(np.uint8)
    img[0, 0] = (40 * label, 10 * index, 100 if split == "train" else 200)
    return img


# created in a non-sorted order on purpose: labels must follow sorted class names
TREE = {"train": {"cat": 3, "ant": 2, "bee": 1}, "test": {"cat": 1, "bee": 2, "ant": 1}}
SORTED = ["ant", "bee", "cat"]


def tree_files() -> dict[str, bytes]:
    files = {}
    for split, classes in TREE.items():
        for cls, count in classes.items():
            for i in range(count):
                files[f"{split}/{cls}/{i:03d}.png"] = png_bytes(tagged_image(SORTED.index(cls), i, split))
    files["train/ant/.hidden.png"] = b"junk"  # skipped: hidden
    files["train/ant/notes.txt"] = b"not an image"  # skipped: not an image
    files["README.md"] = b"top-level files are ignored"
    return files


def write_dir(root: Path, files: dict[str, bytes]) -> Path:
    for rel, payload in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(payload)
    return root


def write_tar(path: Path, files: dict[str, bytes], prefix: str = "") -> Path:
    mode = "w:gz" if path.name.endswith("gz") else "w"
    with tarfile.open(path, mode) as tar:
        for rel, payload in files.items():
            info = tarfile.TarInfo(prefix + rel)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def check_tree(split_set, split: str) -> None:
    assert split_set.classes == SORTED
    expected = []  # (label, index) in load order: by class, then by file name
    for label, cls in enumerate(SORTED):
        expected += [(label, i) for i in range(TREE[split][cls])]
    assert split_set.images.shape == (len(expected), 32, 32, 3)
    assert split_set.images.dtype == torch.uint8 and split_set.images.is_contiguous()
    assert split_set.labels.tolist() == [lab for lab, _ in expected]
    for k, (label, i) in enumerate(expected):
        assert np.array_equal(split_set.images[k].numpy(), tagged_image(label, i, split)), (split, k)


def folder_cfg(path: Path, tmp_path: Path, **kw) -> DataConfig:
    return DataConfig(source="imagefolder", path=str(path), root=str(tmp_path / "cache_root"), **kw)


def test_imagefolder_directory(tmp_path):
    src = write_dir(tmp_path / "tree", tree_files())
    cfg = folder_cfg(src, tmp_path)
    for split in ("train", "test"):
        s = load_split(cfg, split)
        check_tree(s, split)
        assert "imagefolder" in s.description


@pytest.mark.parametrize("suffix,prefix", [(".tar", ""), (".tar.gz", ""), (".tgz", "./mydata/")])
def test_imagefolder_archive(tmp_path, suffix, prefix):
    src = write_tar(tmp_path / f"tree{suffix}", tree_files(), prefix=prefix)
    cfg = folder_cfg(src, tmp_path)
    check_tree(load_split(cfg, "test"), "test")
    check_tree(load_split(cfg, "train"), "train")


def test_imagefolder_nested_directory(tmp_path):
    """train/ and test/ one level down (an unpacked archive with a top folder) are found."""
    write_dir(tmp_path / "outer" / "cifar", tree_files())
    check_tree(load_split(folder_cfg(tmp_path / "outer", tmp_path), "train"), "train")


@pytest.mark.parametrize("streamed", [False, True])
def test_image_folders_without_pillow_are_one_line(tmp_path, monkeypatch, streamed):
    src = write_dir(tmp_path / "tree", tree_files())
    monkeypatch.setitem(sys.modules, "PIL", None)  # `from PIL import Image` fails
    monkeypatch.setattr(imagefolder.listing, "pillow", functools.cache(imagefolder.listing.pillow.__wrapped__))
    with pytest.raises(DataError, match=r"^image folders are read with Pillow, .*; pip install pillow$"):
        load_split(folder_cfg(src, tmp_path, streamed=streamed), "train")


def test_imagefolder_resize(tmp_path):
    files = {}
    files["train/a/big.png"] = png_bytes(np.full((48, 48, 3), (10, 130, 250), np.uint8))  # one colour
    files["train/a/gray.png"] = png_bytes(np.full((40, 40), 77, np.uint8))  # grayscale PNG
    # 64 wide, 32 high: green | red | blue | green bands of 16 columns. The aspect ratio is kept:
    # shorter side to 32, then the centre crop keeps columns 16..47 (red | blue), no green.
    wide = np.zeros((32, 64, 3), np.uint8)
    wide[:, :16] = wide[:, 48:] = (0, 255, 0)
    wide[:, 16:32] = (255, 0, 0)
    wide[:, 32:48] = (0, 0, 255)
    files["train/b/wide.png"] = png_bytes(wide)
    files["train/b/exact.png"] = png_bytes(tagged_image(1, 0, "train"))
    files["test/a/x.png"] = png_bytes(np.zeros((16, 24, 3), np.uint8))
    # a 1-pixel checkerboard shrunk 3x: antialiasing averages it to flat grey
    checker = ((np.add.outer(np.arange(96), np.arange(96)) % 2) * 255).astype(np.uint8)
    files["test/a/y.png"] = png_bytes(np.repeat(checker[:, :, None], 3, axis=2))
    src = write_dir(tmp_path / "tree", files)
    s = load_split(folder_cfg(src, tmp_path), "train")
    assert s.images.shape == (4, 32, 32, 3)
    big, gray, exact, wide_out = s.images  # sorted: a/big, a/gray, b/exact, b/wide
    assert (big == torch.tensor([10, 130, 250], dtype=torch.uint8)).all()
    assert (gray == 77).all()
    assert np.array_equal(exact.numpy(), tagged_image(1, 0, "train"))  # right size: untouched
    assert (wide_out[:, :15] == torch.tensor([255, 0, 0], dtype=torch.uint8)).all()
    assert (wide_out[:, 17:] == torch.tensor([0, 0, 255], dtype=torch.uint8)).all()
    te = load_split(folder_cfg(src, tmp_path), "test")
    assert te.images.shape == (2, 32, 32, 3)
    assert (te.images[0] == 0).all()  # upsampled: 16x24 -> 32x48 -> centre crop
    flat = te.images[1].float()
    assert (flat - 127.5).abs().max() < 20, flat
    # another image_size
    s16 = load_split(folder_cfg(src, tmp_path, image_size=16), "train")
    assert s16.images.shape == (4, 16, 16, 3)
    assert (s16.images[0] == torch.tensor([10, 130, 250], dtype=torch.uint8)).all()


def test_imagefolder_jpeg(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    yy, xx = np.mgrid[0:32, 0:32]
    smooth = np.stack([xx * 8, yy * 8, np.full_like(xx, 128)], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(smooth).save(buf, format="JPEG", quality=95)
    files = {
        "train/only/a.jpg": buf.getvalue(),
        "train/other/c.jpg": buf.getvalue(),
        "test/only/b.jpeg": buf.getvalue(),
    }
    src = write_tar(tmp_path / "jpeg.tar", files)
    s = load_split(folder_cfg(src, tmp_path), "train")
    err = (s.images[0].int() - torch.from_numpy(smooth).int()).abs().float()
    assert err.mean() < 3 and err.max() < 40


def test_imagefolder_ignores_exif_rotation_like_pil(tmp_path):
    """A JPEG tagged "rotate 90 to display" decodes to the stored 24x40 pixels (centre-cropped to 24x24), as the
    official torchvision ImageFolder (PIL) reads it."""
    Image = pytest.importorskip("PIL.Image")
    y, x = np.mgrid[0:24, 0:40]
    pixels = np.stack([x * 6, y * 10, (x + y) * 4], -1).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95, exif=exif)
    (decoded,) = imagefolder._decode([("c", "r.jpg", len(buf.getvalue()), buf.getvalue())], 24)
    assert np.abs(decoded.astype(int) - pixels[:, 8:32].astype(int)).mean() < 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_imagefolder_on_cuda(tmp_path):
    """Decoded on the CPU, the split lands on the GPU."""
    cfg = folder_cfg(write_tar(tmp_path / "tree.tar", tree_files()), tmp_path)
    gpu = load_split(cfg, "train", device="cuda")
    assert gpu.images.is_cuda and gpu.labels.is_cuda
    check_tree(dataclasses.replace(gpu, images=gpu.images.cpu(), labels=gpu.labels.cpu()), "train")


def test_imagefolder_cache(tmp_path, monkeypatch):
    src = write_dir(tmp_path / "tree", tree_files())
    cfg = folder_cfg(src, tmp_path)
    first = load_split(cfg, "train")
    cache = tmp_path / "cache_root" / "cache"
    assert len(list(cache.glob("imagefolder-tree-train-32px-*.images.npy"))) == 1
    assert len(list(cache.glob("imagefolder-*.json"))) == 1

    def no_decode(*a, **k):
        raise AssertionError("decoded although the cache holds this split")

    monkeypatch.setattr(imagefolder, "_decode", no_decode)
    second = load_split(cfg, "train")
    assert "from cache" in second.description
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
    assert second.classes == first.classes
    # a changed file invalidates the entry
    target = src / "train" / "cat" / "000.png"
    target.write_bytes(png_bytes(tagged_image(2, 5, "train")))
    os.utime(target, ns=(1, 1))
    with pytest.raises(AssertionError, match="decoded although"):
        load_split(cfg, "train")


def test_imagefolder_archive_cache(tmp_path, monkeypatch):
    src = write_tar(tmp_path / "tree.tar.gz", tree_files())
    cfg = folder_cfg(src, tmp_path)
    first = load_split(cfg, "train")  # one pass decodes and caches both splits

    def no_read(*a, **k):
        raise AssertionError("read the archive although the cache holds this split")

    monkeypatch.setattr(imagefolder, "_read_archive", no_read)
    test = load_split(cfg, "test")
    check_tree(test, "test")
    again = load_split(cfg, "train")
    assert torch.equal(first.images, again.images) and torch.equal(first.labels, again.labels)
    os.utime(src, ns=(5, 5))  # a touched archive is read again
    with pytest.raises(AssertionError, match="read the archive"):
        load_split(cfg, "train")


def test_imagefolder_unwritable_cache(tmp_path):
    src = write_dir(tmp_path / "tree", tree_files())
    blocker = tmp_path / "root_is_a_file"
    blocker.write_text("")
    cfg = DataConfig(source="imagefolder", path=str(src), root=str(blocker))
    with pytest.warns(UserWarning, match="cache"):
        s = load_split(cfg, "test")
    check_tree(s, "test")


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DataError, match="needs data.path"):
        load_split(DataConfig(source="imagefolder", path=""), "train")
    with pytest.raises(DataError, match="does not exist"):
        load_split(DataConfig(source="imagefolder", path=str(tmp_path / "nope")), "train")
    only_train = {k: v for k, v in tree_files().items() if k.startswith("train/")}
    src = write_dir(tmp_path / "tree", only_train)
    with pytest.raises(DataError, match="no images") as e:
        load_split(folder_cfg(src, tmp_path), "test")
    assert "\n" not in str(e.value)
    tar = write_tar(tmp_path / "t.tar", only_train)
    with pytest.raises(DataError, match="no images"):
        load_split(folder_cfg(tar, tmp_path), "test")
    bad = write_dir(
        tmp_path / "bad", {"train/a/x.png": b"\x89PNG garbage", "train/b/x.png": b"junk", "test/a/y.png": b"junk"}
    )
    with pytest.raises(DataError, match="3 bad image files in .*: test/a/y.png \\(not an image Pillow can read\\)"):
        load_split(folder_cfg(bad, tmp_path), "train")


def test_an_image_that_decodes_past_the_pixel_limit_is_refused_from_its_header(tmp_path, huge_png):
    import time
    import tracemalloc

    files = {k: v for k, v in tree_files().items()}
    files["train/bee/bomb.png"] = huge_png
    assert len(files["train/bee/bomb.png"]) < 1 << 20
    src = write_dir(tmp_path / "tree", files)
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(
        DataError, match=r"train/bee/bomb.png \(900,000,000 pixels, over the limit of 89,478,485 pixels"
    ) as err:
        load_split(folder_cfg(src, tmp_path), "train")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert "\n" not in str(err.value) and time.perf_counter() - start < 30 and peak < 200 << 20, peak


def test_one_class_or_a_test_class_without_training_images_is_an_error(tmp_path):
    one = {k: v for k, v in tree_files().items() if k.startswith(("train/cat/", "test/cat/"))}
    for where in (write_dir(tmp_path / "one", one), write_tar(tmp_path / "one.tar", one)):
        with pytest.raises(DataError, match=r"train/ has 1 class \(cat\); a linear probe needs at least 2 classes"):
            load_split(folder_cfg(where, tmp_path), "train")
    streamed = dataclasses.replace(folder_cfg(tmp_path / "one", tmp_path), streamed=True)  # file by file too
    with pytest.raises(DataError, match=r"train/ has 1 class \(cat\); a linear probe needs at least 2 classes"):
        load_split(streamed, "train")
    extra = {
        **tree_files(),
        "test/dog/000.png": png_bytes(tagged_image(0, 0, "test")),
        "test/eel/000.png": png_bytes(tagged_image(0, 0, "test")),
    }
    for where in (write_dir(tmp_path / "extra", extra), write_tar(tmp_path / "extra.tar.gz", extra)):
        for split in ("train", "test"):
            with pytest.raises(DataError, match="test/ has classes with no training images: dog, eel; add train"):
                load_split(folder_cfg(where, tmp_path), split)
    with pytest.raises(DataError, match="test/ has classes with no training images: dog, eel; add train"):
        load_split(dataclasses.replace(folder_cfg(tmp_path / "extra", tmp_path), streamed=True), "train")


def test_unknown_source_and_split():
    with pytest.raises(ConfigError, match="data.source must be one of .*; did you mean 'cifar10'") as e:
        load_split(DataConfig(source="cifar-10"), "train")
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="did you mean 'imagefolder'"):
        load_split(DataConfig(source="image_folder"), "train")
    with pytest.raises(DataError, match="unknown split"):
        load_split(DataConfig(), "val")


# ---------------------------------------------------------------------------------------------
# the shared CIFAR-10 JPEG archive (development data; skipped when absent)

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(scope="module")
def shared_cifar10(cifar10_jpeg_tar, tmp_path_factory):
    """Both splits, decoded once for the module into a temporary cache root."""
    root = tmp_path_factory.mktemp("shared_cache")
    cfg = DataConfig(source="imagefolder", path=str(cifar10_jpeg_tar), root=str(root))
    return cfg, load_split(cfg, "train"), load_split(cfg, "test")


def test_shared_cifar10_jpeg(shared_cifar10):
    cfg, train, test = shared_cifar10
    assert train.images.shape == (50000, 32, 32, 3) and test.images.shape == (10000, 32, 32, 3)
    assert train.classes == test.classes == CIFAR10_CLASSES
    assert torch.equal(torch.bincount(train.labels), torch.full((10,), 5000))
    assert torch.equal(torch.bincount(test.labels), torch.full((10,), 1000))
    assert "from cache" in test.description  # the train load cached the test split too
    # canonical CIFAR-10 train statistics: mean (125.3, 123.0, 113.9), std (63.0, 62.1, 66.7);
    # measured on this JPEG copy (every 5th image): (125.3, 123.1, 114.0), (62.6, 62.0, 66.7)
    x = train.images[::5].reshape(-1, 3).float()
    mean, std = x.mean(0), x.std(0)
    assert torch.allclose(mean, torch.tensor([125.3, 123.0, 113.9]), atol=3), mean
    assert torch.allclose(std, torch.tensor([63.0, 62.1, 66.7]), atol=3), std
    # labels belong to their images: ships are bluer than frogs (measured +16.4 vs -31.7)
    blue_minus_red = (train.images[..., 2].to(torch.int16) - train.images[..., 0].to(torch.int16)).float().mean((1, 2))
    per_class = torch.stack([blue_minus_red[train.labels == c].mean() for c in range(10)])
    assert per_class[CIFAR10_CLASSES.index("ship")] > per_class[CIFAR10_CLASSES.index("frog")] + 10, per_class
    assert len(torch.unique(train.images[:200].reshape(200, -1), dim=0)) == 200


def test_shared_cifar10_cache_hit(shared_cifar10):
    cfg, train, _ = shared_cifar10
    again = load_split(cfg, "train")
    assert "from cache" in again.description
    assert torch.equal(again.images, train.images) and torch.equal(again.labels, train.labels)
