"""A stand-in for the official checkout (tsb0601/EMP-SSL) and its interpreter, for the peer's and the GPU suite's
tests without the real code or torchvision: main.py with its arguments, progress lines, checkpoint path and
DataParallel names; torchvision's CIFAR10 file checks; the official load_dataset for the DataLoader probe; a tiny
CIFAR-like JPEG archive. STAND_IN_MODE (environment) picks main.py's behaviour: ok (default), fail (a traceback
and exit 1 after a few steps), hang (progress lines forever, no epoch ends), hang_after_epoch (epoch 0 ends and is
saved, then epoch 1 never does)."""

import io
import stat
import sys
import tarfile
from pathlib import Path

import numpy as np

OFFICIAL_FILES = ("main.py", "model/model.py", "dataset/datasets.py", "dataset/aug.py", "lars.py", "loss.py", "func.py")

STAND_IN_MAIN = r"""
import argparse, os, sys, time
import torch
from torchvision.datasets import CIFAR10
from fastemp.model import EMPEncoder

p = argparse.ArgumentParser()
for name in ("--data", "--patch_sim", "--arch", "--lr"):
    p.add_argument(name)
p.add_argument("--epoch", type=int)
p.add_argument("--num_patches", type=int)
args = p.parse_args()
mode = os.environ.get("STAND_IN_MODE", "ok")
train = CIFAR10(root=os.path.join("./data/", "CIFAR10"), train=True, download=True)
net = EMPEncoder(width=8, hidden_dim=32, z_dim=16)
for epoch in range(args.epoch):
    step = 0
    while step < len(train) // 100 + 1 or mode == "hang" or (mode == "hang_after_epoch" and epoch > 0):
        sys.stderr.write(f"\r{step}it [00:00, 10.00it/s]"); sys.stderr.flush(); time.sleep(0.05)
        step += 1
        if mode == "fail" and step == 3:
            print("Traceback (most recent call last):\nValueError: boom", flush=True)
            sys.exit(1)
    sys.stderr.write("\n"); sys.stderr.flush()  # tqdm's close
    folder = f"./logs/EMP-SSL-Training/patchsim200_numpatch{args.num_patches}_bs100_lr0.3_NONE/save_models/"
    os.makedirs(folder, exist_ok=True)
    torch.save({"module." + k: v for k, v in net.state_dict().items()}, folder + str(epoch) + ".pt")
    print("At epoch:", epoch, "loss similarity is", -0.5, ",loss TCR is:", -100.0, "and learning rate is:", 0.15)
"""

STAND_IN_CIFAR10 = r'''
"""torchvision.datasets.CIFAR10's file checks: the canonical md5 sums (None: present), a download when one differs."""
import hashlib, os, pickle
import numpy as np

class CIFAR10:
    base_folder = "cifar-10-batches-py"
    train_list = [[f"data_batch_{i}", "canonical"] for i in range(1, 6)]
    test_list = [["test_batch", "canonical"]]
    meta = {"filename": "batches.meta", "key": "label_names", "md5": "canonical"}

    def __init__(self, root, train=True, transform=None, download=False):
        self.root = root
        for name, md5 in self.train_list + self.test_list + [[self.meta["filename"], self.meta["md5"]]]:
            with open(os.path.join(root, self.base_folder, name), "rb") as f:
                if md5 is not None and hashlib.md5(f.read()).hexdigest() != md5:
                    raise RuntimeError(f"{name}: md5 mismatch, torchvision would download the archive")
        data = []
        for name, _ in self.train_list if train else self.test_list:
            with open(os.path.join(root, self.base_folder, name), "rb") as f:
                data.append(pickle.load(f, encoding="latin1")["data"])
        self.data = np.vstack(data).reshape(-1, 3, 32, 32).transpose((0, 2, 3, 1))

    def __len__(self):
        return len(self.data)
'''

STAND_IN_DATASETS = r'''
"""The official load_dataset's interface: each item is (a list of num_patch views, label)."""
import os
import torch
from torchvision.datasets import CIFAR10

class Views(torch.utils.data.Dataset):
    def __init__(self, base, num_patch):
        self.base, self.num_patch = base, num_patch

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x = torch.from_numpy(self.base.data[i]).permute(2, 0, 1).float() / 255
        return [x] * self.num_patch, 0

def load_dataset(data_name, train=True, num_patch=4, path="./data/"):
    return Views(CIFAR10(root=os.path.join(path, "CIFAR10"), train=train, download=True), num_patch)
'''


def executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def official_stub(folder: Path) -> Path:
    """A folder with the official files the harness checks for (empty: enough for the checks before a run)."""
    for name in OFFICIAL_FILES:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).touch()
    return folder


def stand_in_checkout(folder: Path) -> tuple[Path, Path]:
    """(official dir, interpreter): the stand-in checkout, and a python that imports its torchvision and empty
    torchmetrics / sklearn (the requirement check looks for them)."""
    official = official_stub(folder / "official")
    (official / "main.py").write_text(STAND_IN_MAIN)
    (official / "dataset" / "datasets.py").write_text(STAND_IN_DATASETS)
    (official / "torchvision" / "datasets").mkdir(parents=True)
    (official / "torchvision" / "__init__.py").touch()
    (official / "torchvision" / "datasets" / "__init__.py").write_text(STAND_IN_CIFAR10)
    modules = folder / "modules"
    for name in ("torchvision", "torchmetrics", "sklearn"):
        (modules / name).mkdir(parents=True)
        (modules / name / "__init__.py").touch()
    python = executable(
        folder / "python",
        f'#!/bin/sh\nPYTHONPATH="{modules}${{PYTHONPATH:+:$PYTHONPATH}}" exec "{sys.executable}" "$@"\n',
    )
    return official, python


def fake_jpeg_tar(path: Path, train_per_class: int, test_per_class: int, classes=("cat", "dog")) -> Path:
    """A tiny ImageFolder tar.gz of random 32x32 JPEGs: train/<class>/*.jpg, test/<class>/*.jpg."""
    from PIL import Image

    gen = np.random.default_rng(0)
    with tarfile.open(path, "w:gz") as tar:
        for split, count in (("train", train_per_class), ("test", test_per_class)):
            for cls in classes:
                for i in range(count):
                    buf = io.BytesIO()
                    Image.fromarray(gen.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="JPEG")
                    info = tarfile.TarInfo(f"{split}/{cls}/{i:04d}.jpg")
                    info.size = buf.tell()
                    buf.seek(0)
                    tar.addfile(info, buf)
    return path
