"""Folder layouts (ImageFolder with test/ or val/, Tiny-ImageNet, unlabelled training folders), the checks every
listed file passes before any work (one bad kind at a time, in either split, resident and streamed), the
listing cache, and dataset fingerprints. Every folder is a few tiny images the test writes."""

import io
import os
import shutil
import struct
import tarfile
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fastemp.data.listing as listing
from fastemp.config import DataConfig
from fastemp.data import DataError, absolute_paths, load_split, load_train_images


def jpeg(seed: int, size: int = 16) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (no image data: nothing to decode)."""

    def chunk(tag: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def imagefolder(root: Path, test_dir: str = "test", per_class: int = 2) -> Path:
    for split in ("train", test_dir):
        for c, cls in enumerate(("ant", "bee")):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                (root / split / cls / f"{i}.jpg").write_bytes(jpeg(100 * c + i + (50 if split != "train" else 0)))
    return root


def cfg_for(path: Path, tmp_path: Path, **kw) -> DataConfig:
    kw.setdefault("source", "imagefolder")
    return DataConfig(path=str(path), root=str(tmp_path / "data_root"), **kw)


# ------------------------------------------------------------------------------------- bad files


def _bad(kind: str, path: Path, monkeypatch) -> str:
    """Make `path` a bad file of `kind`; return the words the refusal must say."""
    good = jpeg(7, size=48)
    if kind == "truncated":
        path.write_bytes(good[: len(good) // 2])
        return "truncated"
    if kind == "random bytes":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
        return "not an image"
    if kind == "zero bytes":
        path.write_bytes(b"")
        return "empty"
    if kind == "unreadable":
        path.write_bytes(good)
        os.chmod(path, 0)
        if os.geteuid() == 0:  # root reads anything: the refusal of the open is simulated for this one file
            real = open

            def refusing(name, *args, **kw):
                if os.fspath(name) == str(path):
                    raise PermissionError(13, "Permission denied", str(name))
                return real(name, *args, **kw)

            monkeypatch.setattr(listing, "open", refusing, raising=False)
        return "unreadable"
    if kind == "symlink loop":
        path.symlink_to(path.name)
        return "a symlink loop"
    if kind == "too many pixels":
        path.write_bytes(png_header(20_000, 20_000))
        return "400,000,000 pixels, over the limit of 89,478,485"
    if kind == "too large":
        with open(path, "wb") as f:
            f.truncate(listing.MAX_FILE_BYTES + 1)  # sparse: nothing written
        return "over the limit of 512 MiB"
    raise AssertionError(kind)


KINDS = ("truncated", "random bytes", "zero bytes", "unreadable", "symlink loop", "too many pixels", "too large")


@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_bad_file_in_either_split_is_refused_in_one_line_before_any_work(
    tmp_path, monkeypatch, kind, split, streamed
):
    root = imagefolder(tmp_path / "tree")
    name = f"{split}/bee/bad.jpg"
    words = _bad(kind, root / name, monkeypatch)
    if streamed:
        monkeypatch.setattr("fastemp.data.imagefolder._decode", lambda *a, **k: pytest.fail("decoded"))
    with pytest.raises(DataError) as err:
        load_split(cfg_for(root, tmp_path, streamed=streamed), "train")  # the test split's files too
    message = str(err.value)
    assert message.startswith(f"1 bad image file in {root}: {name} (") and words in message, message
    assert "\n" not in message and message.endswith("; remove or replace it")


def test_many_bad_files_are_counted_and_the_first_named(tmp_path):
    root = imagefolder(tmp_path / "tree")
    for i in range(5):
        (root / "train" / "ant" / f"z{i}.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"^5 bad image files in .*: train/ant/z0.png \(empty \(0 bytes\)\), "):
        load_split(cfg_for(root, tmp_path), "test")
    with pytest.raises(DataError, match=r"train/ant/z2.png \(empty \(0 bytes\)\) and 2 more; remove or replace them"):
        load_split(cfg_for(root, tmp_path), "test")


def test_complete_files_pass_and_bytes_after_a_complete_jpeg_are_allowed(tmp_path):
    root = imagefolder(tmp_path / "tree")
    (root / "train" / "ant" / "tail.jpg").write_bytes(jpeg(3) + b"\x00" * 100)  # decodes: the decoder decides
    (root / "train" / "bee" / "x.png").write_bytes(_png(np.zeros((8, 8, 3), np.uint8)))
    assert len(load_split(cfg_for(root, tmp_path), "train")) == 6
    (root / "train" / "bee" / "x.png").write_bytes(_png(np.zeros((8, 8, 3), np.uint8))[:-12])  # no IEND
    with pytest.raises(DataError, match=r"train/bee/x.png \(truncated"):
        load_split(cfg_for(root, tmp_path), "train")


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def test_a_bad_archive_member_is_refused_by_the_same_checks(tmp_path):
    files = {f"train/{c}/{i}.jpg": jpeg(i) for c in ("a", "b") for i in range(2)}
    files |= {"test/a/0.jpg": jpeg(9), "test/a/bomb.png": png_header(20_000, 20_000), "train/b/e.jpg": b""}
    with tarfile.open(tmp_path / "t.tar", "w") as tar:
        for name, payload in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    with pytest.raises(DataError, match=r"^2 bad image files in .*t.tar: test/a/bomb.png \(400,000,000 pixels"):
        load_split(cfg_for(tmp_path / "t.tar", tmp_path), "train")


def test_a_folder_that_passed_is_not_checked_again_until_a_file_changes(tmp_path, monkeypatch):
    root = imagefolder(tmp_path / "tree")
    cfg = cfg_for(root, tmp_path, streamed=True)
    load_split(cfg, "train")
    assert len(list((tmp_path / "data_root" / "cache").glob("checked-tree-*.json"))) == 1
    calls = []
    monkeypatch.setattr(listing, "file_problem", lambda p: calls.append(p))
    load_split(cfg, "test")
    assert calls == []
    os.utime(root / "test" / "ant" / "0.jpg", ns=(1, 1))
    load_split(cfg, "test")
    assert len(calls) == 4 + 4


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # pytest resets the filter per test
def test_file_problem_is_the_one_file_check_the_backends_can_call(tmp_path):
    good = tmp_path / "good.jpg"
    good.write_bytes(jpeg(1))
    assert listing.file_problem(good) is None
    assert listing.file_problem(tmp_path / "gone.jpg") == "missing (a broken link?)"
    (tmp_path / "big.png").write_bytes(png_header(10_000, 9_000))
    assert "90,000,000 pixels" in listing.file_problem(tmp_path / "big.png")
    assert "empty" in listing.file_problem(_empty(tmp_path))


def test_a_pipe_among_the_images_is_reported_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "pipe.jpg")  # open() on a pipe with no writer would wait forever
    answer = []
    reader = threading.Thread(target=lambda: answer.append(listing.file_problem(tmp_path / "pipe.jpg")), daemon=True)
    reader.start()
    reader.join(10)
    assert answer == ["empty (0 bytes)"]


def _empty(tmp_path: Path) -> Path:
    (tmp_path / "empty.jpg").write_bytes(b"")
    return tmp_path / "empty.jpg"


# ------------------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("streamed", [False, True])
def test_an_imagefolder_whose_test_split_is_val(tmp_path, streamed):
    root = imagefolder(tmp_path / "tree", test_dir="val")
    test = load_split(cfg_for(root, tmp_path, streamed=streamed), "test")
    assert len(test) == 4 and test.classes == ["ant", "bee"] and test.labels.tolist() == [0, 0, 1, 1]
    imagefolder(root, test_dir="test")
    with pytest.raises(DataError, match="has both test/ and val/ class folders; keep one"):
        load_split(cfg_for(root, tmp_path, streamed=streamed), "train")


def test_val_in_an_archive_and_class_folders_read_to_any_depth(tmp_path):
    root = imagefolder(tmp_path / "tree", test_dir="val")
    (root / "train" / "bee" / "deeper").mkdir()
    (root / "train" / "bee" / "deeper" / "2.jpg").write_bytes(jpeg(77))
    with tarfile.open(tmp_path / "tree.tar.gz", "w:gz") as tar:
        tar.add(root, arcname="tree")
    for where in (root, tmp_path / "tree.tar.gz"):
        train = load_split(cfg_for(where, tmp_path), "train")
        assert len(train) == 5 and train.labels.tolist() == [0, 0, 1, 1, 1]
        assert len(load_split(cfg_for(where, tmp_path), "test")) == 4


def tiny_imagenet(root: Path, val_folders: bool = False) -> Path:
    """tiny-imagenet-200/ in miniature: 3 wnids, 2 training images each, 4 val images, an unlabelled test/."""
    wnids = ["n02", "n01", "n03"]  # wnids.txt is not sorted; labels follow the sorted names
    (root / "wnids.txt").parent.mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (root / "words.txt").write_text("n01\tgoldfish\n")
    for w, wnid in enumerate(wnids):
        folder = root / "train" / wnid / "images"
        folder.mkdir(parents=True)
        for i in range(2):
            (folder / f"{wnid}_{i}.JPEG").write_bytes(jpeg(10 * w + i, size=64))
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("ignored\n")
    notes = []
    for i, wnid in enumerate(["n03", "n01", "n01", "n02"]):
        folder = root / "val" / (wnid if val_folders else "images")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"val_{i}.JPEG").write_bytes(jpeg(90 + i, size=64))
        notes.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t63\t63")
    if not val_folders:
        (root / "val" / "val_annotations.txt").write_text("\n".join(notes) + "\n")
    (root / "test" / "images").mkdir(parents=True)
    (root / "test" / "images" / "test_0.JPEG").write_bytes(b"never read: no labels")
    return root


@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize("val_folders", [False, True])
def test_tiny_imagenet_as_downloaded(tmp_path, streamed, val_folders):
    root = tiny_imagenet(tmp_path / "dl" / "tiny-imagenet-200", val_folders)
    cfg = cfg_for(tmp_path / "dl", tmp_path, source="tinyimagenet", streamed=streamed, image_size=64)
    train, test = load_split(cfg, "train"), load_split(cfg, "test")
    assert train.classes == test.classes == ["n01", "n02", "n03"]
    assert train.labels.tolist() == [0, 0, 1, 1, 2, 2] and sorted(test.labels.tolist()) == [0, 0, 1, 2]
    if streamed:
        assert train.paths[0] == str(root / "train" / "n01" / "images" / "n01_0.JPEG")
        assert {Path(p).name: int(y) for p, y in zip(test.paths, test.labels)}["val_0.JPEG"] == 2
    else:
        assert train.images.shape == (6, 64, 64, 3) and "tinyimagenet" in train.description
        decoded = np.asarray(Image.open(root / "train" / "n01" / "images" / "n01_0.JPEG"))
        assert np.array_equal(train.images[0].numpy(), decoded)


def test_tiny_imagenet_mistakes_say_which_layouts_are_read(tmp_path):
    root = tiny_imagenet(tmp_path / "tiny-imagenet-200")
    with pytest.raises(DataError, match="is a Tiny-ImageNet folder .*set data.source=tinyimagenet"):
        load_split(cfg_for(root, tmp_path), "train")
    with pytest.raises(DataError, match="no wnids.txt.*data.source=imagefolder reads train/<class>/"):
        load_split(cfg_for(imagefolder(tmp_path / "plain"), tmp_path, source="tinyimagenet"), "train")
    (root / "val" / "images" / "extra.JPEG").write_bytes(jpeg(5))
    with pytest.raises(DataError, match="extra.JPEG has no line in .*val_annotations.txt"):
        load_split(cfg_for(root, tmp_path, source="tinyimagenet"), "test")
    with tarfile.open(tmp_path / "t.tar", "w") as tar:
        tar.add(root, arcname="tiny-imagenet-200")
    with pytest.raises(DataError, match="is an archive, but data.path is read as a folder; extract it"):
        load_split(cfg_for(tmp_path / "t.tar", tmp_path, source="tinyimagenet"), "train")


def test_a_wrong_layout_is_one_line_listing_the_layouts(tmp_path):
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.jpg").write_bytes(jpeg(1))
    with pytest.raises(DataError) as err:
        load_split(cfg_for(tmp_path / "flat", tmp_path), "train")
    message = str(err.value)
    assert "no images in" in message and "\n" not in message
    assert all(w in message for w in ("test/<class>/* or val/<class>/*", "tinyimagenet", "data.train_path"))


@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize("shape", ["flat", "train_folder"])
def test_an_unlabelled_training_folder_beside_a_labelled_set(tmp_path, streamed, shape):
    unlabelled = tmp_path / "unlabelled"
    inner = unlabelled / "train" if shape == "train_folder" else unlabelled
    (inner / "deeper").mkdir(parents=True)
    for i in range(3):
        (inner / f"u{i}.jpg").write_bytes(jpeg(200 + i))
    (inner / "deeper" / "u9.png").write_bytes(_png(np.zeros((8, 8, 3), np.uint8)))
    if shape == "train_folder":  # beside train/: never read
        (unlabelled / "test").mkdir()
        (unlabelled / "test" / "t.jpg").write_bytes(jpeg(1))
    labelled = imagefolder(tmp_path / "labelled")
    cfg = cfg_for(labelled, tmp_path, streamed=streamed, train_path=str(unlabelled))
    train = load_train_images(cfg)
    assert len(train) == 4 and train.classes == [] and train.labels.tolist() == [-1] * 4
    assert "unlabelled" in train.description
    probe = load_split(cfg, "train")
    assert len(probe) == 4 and probe.labels.tolist() == [0, 0, 1, 1]
    (inner / "u1.jpg").write_bytes(b"")
    with pytest.raises(DataError, match=r"^1 bad image file in .*unlabelled.*: (train/)?u1.jpg \(empty"):
        load_train_images(cfg)
    with pytest.raises(DataError, match="data.train_path .*nowhere does not exist"):
        load_train_images(cfg_for(labelled, tmp_path, train_path=str(tmp_path / "nowhere")))


def test_training_reads_the_unlabelled_folder_and_the_probe_the_labelled_splits(tmp_path):
    from fastemp.config import load_config
    from fastemp.train import Trainer

    unlabelled = tmp_path / "unlabelled"
    unlabelled.mkdir()
    for i in range(8):
        (unlabelled / f"u{i}.jpg").write_bytes(jpeg(300 + i))
    labelled = imagefolder(tmp_path / "labelled", per_class=4)
    cfg = load_config(
        "quickstart",
        [
            "data.source=imagefolder",
            f"data.path={labelled}",
            f"data.train_path={unlabelled}",
            f"data.root={tmp_path / 'data_root'}",
            "data.image_size=16",
            "augment.crop_size=8",
            "model.width=4",
            "model.hidden_dim=16",
            "model.z_dim=8",
            "train.n_patches=2",
            "train.batch_size=4",
            "train.max_steps=2",
            "train.device=cpu",
            "eval.mode=plain",
            "eval.probe_epochs=1",
            "eval.probe_batch_size=4",
        ],
    )
    trainer = Trainer(cfg, progress=False)
    assert len(trainer.train_set) == 8 and trainer.steps_per_epoch == 2
    assert trainer.probe_train_set.labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    trainer.train_until()
    result = trainer.evaluate()
    assert 0.0 <= result["linear_top1"] <= 1.0


# ------------------------------------------------------------------------------------- identity


def test_the_fingerprint_names_the_data_not_where_it_lies(tmp_path):
    root = imagefolder(tmp_path / "a")
    first = {s: load_split(cfg_for(root, tmp_path, streamed=True), s).fingerprint for s in ("train", "test")}
    assert first["train"] != first["test"] and len(first["train"]) == 16
    copy = tmp_path / "b"
    shutil.copytree(root, copy)  # other place, other mtimes: the same data
    os.utime(copy / "train" / "ant" / "0.jpg", ns=(5, 5))
    assert load_split(cfg_for(copy, tmp_path), "train").fingerprint == first["train"]  # resident: the same
    assert load_split(cfg_for(copy, tmp_path, streamed=True), "test").fingerprint == first["test"]
    (copy / "train" / "ant" / "0.jpg").write_bytes(jpeg(999, size=20))  # another size
    assert load_split(cfg_for(copy, tmp_path, streamed=True), "train").fingerprint != first["train"]
    (copy / "train" / "ant" / "0.jpg").write_bytes((root / "train" / "ant" / "0.jpg").read_bytes())
    assert load_split(cfg_for(copy, tmp_path, streamed=True), "train").fingerprint == first["train"]
    for split in ("train", "test"):  # another class name, the same files
        (copy / split / "ant").rename(copy / split / "ants")
    assert load_split(cfg_for(copy, tmp_path, streamed=True), "test").fingerprint != first["test"]
    with tarfile.open(tmp_path / "a.tar", "w") as tar:
        tar.add(root, arcname="a")
    archived = cfg_for(tmp_path / "a.tar", tmp_path)
    assert load_split(archived, "train").fingerprint == first["train"]  # the same files in an archive
    assert load_split(archived, "train").fingerprint == first["train"]  # and from its decoded cache
    synthetic = [load_split(DataConfig(synthetic_train=n, synthetic_test=8), "train").fingerprint for n in (8, 9)]
    assert synthetic[0] != synthetic[1]
    assert load_split(DataConfig(synthetic_train=8, synthetic_test=8), "train").fingerprint == synthetic[0]


def test_data_paths_are_stored_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = absolute_paths(DataConfig(path="data/../tree", train_path="~/unlabelled"))
    assert cfg.path == str(tmp_path / "tree") and cfg.train_path == str(Path.home() / "unlabelled")
    assert absolute_paths(DataConfig()).path == ""  # unset stays unset


def test_a_run_stores_its_data_path_absolute_and_resumes_from_anywhere(tmp_path, monkeypatch):
    """fastemp train stores data.path resolved; a run made before (relative path in config.yaml and in its
    checkpoint alike) still resumes from its folder."""
    import yaml

    from fastemp.cli import main

    here = tmp_path / "here"
    imagefolder(here / "images", per_class=4)
    monkeypatch.chdir(here)
    tiny = ["data.source=imagefolder", "data.path=images", f"data.root={tmp_path / 'data_root'}"]
    tiny += ["model.width=4", "model.hidden_dim=16", "model.z_dim=8", "train.n_patches=2", "train.batch_size=4"]
    tiny += ["train.max_steps=1", "eval.at_end=false", "--no-progress"]
    assert main(["train", *tiny, "--out", str(tmp_path / "new")]) == 0
    stored = yaml.safe_load((tmp_path / "new" / "config.yaml").read_text())["data"]["path"]
    assert stored == str(here / "images")
    monkeypatch.setattr("fastemp.startup.absolute_paths", lambda cfg: cfg)  # a run from before this change
    assert main(["train", *tiny, "--out", str(tmp_path / "old")]) == 0
    assert yaml.safe_load((tmp_path / "old" / "config.yaml").read_text())["data"]["path"] == "images"
    assert main(["resume", str(tmp_path / "old"), "--no-progress"]) == 0
    monkeypatch.chdir(tmp_path)  # elsewhere: the new run finds its data
    assert main(["resume", str(tmp_path / "new"), "--no-progress"]) == 0


def test_the_tiny_imagenet_recipe_trains_and_evaluates_on_a_miniature(tmp_path):
    """configs/tinyimagenet_n20.yaml shrunk (patch side, widths): resident 64 px images, the ImageNet stem."""
    from fastemp.config import load_config
    from fastemp.train import Trainer

    root = tiny_imagenet(tmp_path / "tiny-imagenet-200")
    shrink = ["augment.crop_size=32", "model.width=4", "model.hidden_dim=16", "model.z_dim=8", "train.n_patches=2"]
    shrink += ["train.batch_size=3", "train.max_steps=1", "train.device=cpu", "eval.patches=2", "eval.batch_size=4"]
    shrink += ["eval.probe_epochs=1", "eval.probe_batch_size=3", "eval.knn=false"]
    cfg = load_config("tinyimagenet_n20", [f"data.path={root}", f"data.root={tmp_path / 'data_root'}", *shrink])
    trainer = Trainer(cfg, progress=False)
    assert trainer.runtime.backend == "torch" and trainer.model.backbone.conv1.kernel_size == (7, 7)
    assert trainer.train_set.images.shape == (6, 64, 64, 3) and len(trainer.test_set) == 4
    trainer.train_until()
    assert 0.0 <= trainer.evaluate()["linear_top1"] <= 1.0
