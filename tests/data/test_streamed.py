"""Streamed ImageFolder data and the synthetic JPEG folders the project makes itself."""

import hashlib
import tarfile

import pytest
import torch

from fastemp.config import DataConfig
from fastemp.data import DataError, StreamedSet, load_split
from fastemp.data.synthetic import make_folder


def _digest(root):
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(root.rglob("*.jpg")))).hexdigest()


def test_make_folder_is_deterministic_with_varied_sizes(tmp_path):
    from PIL import Image

    a = make_folder(tmp_path / "a", classes=3, per_class=2, size=40, seed=1, test_per_class=1)
    b = make_folder(tmp_path / "b", classes=3, per_class=2, size=40, seed=1, test_per_class=1)
    assert _digest(a) == _digest(b)
    assert len(list((a / "train").rglob("*.jpg"))) == 6 and len(list((a / "test").rglob("*.jpg"))) == 3
    widths = {Image.open(p).size for p in a.rglob("*.jpg")}
    assert all(h == 40 and 30 <= w <= 40 for w, h in widths) and len(widths) > 1
    assert _digest(make_folder(tmp_path / "c", classes=3, per_class=2, size=40, seed=2, test_per_class=1)) != _digest(a)


def test_load_split_streamed_lists_files_without_decoding(tmp_path):
    root = make_folder(tmp_path / "f", classes=2, per_class=3, size=32, seed=0, test_per_class=1)
    cfg = DataConfig(source="imagefolder", path=str(root), streamed=True)
    train = load_split(cfg, "train", "cpu")
    assert isinstance(train, StreamedSet) and len(train) == 6 and train.classes == ["c000", "c001"]
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    blob, size = train.read(4)  # the bytes and the header's (height, width)
    assert blob.tobytes() == (root / "train" / "c001" / "train_00001.jpg").read_bytes() and size[0] == 32
    assert "streamed" in train.description and "6 images" in train.description
    assert len(load_split(cfg, "test", "cpu")) == 2


def test_streamed_errors_are_one_line(tmp_path):
    root = make_folder(tmp_path / "f", classes=1, per_class=1, size=16, seed=0)
    archive = tmp_path / "f.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(root, arcname="f")
    for cfg, words in (
        (DataConfig(source="imagefolder", path=str(archive), streamed=True), "archive"),
        (DataConfig(source="imagefolder", path=str(tmp_path / "none"), streamed=True), "does not exist"),
    ):  # synthetic data streamed: refused by validate.check_backend, the one statement of that rule
        with pytest.raises(DataError, match=words) as err:
            load_split(cfg, "train", "cpu")
        assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="no images"):
        load_split(DataConfig(source="imagefolder", path=str(root), streamed=True), "test", torch.device("cpu"))
