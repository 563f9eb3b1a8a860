"""Streamed backends: the Pillow reference (the official recipe on PIL images) and the DALI graph's
CPU twin, op by op and in distribution, on the shared draw; exact resume; what auto chooses."""

from __future__ import annotations

import dataclasses
import os
import signal
import threading

import numpy as np
import pytest
import torch
from augment_helpers import aug_off

from fastemp.config import AugmentConfig, DataConfig
from fastemp.data import load_split
from fastemp.data.synthetic import make_folder
from fastemp.errors import DataError
from fastemp.patches import PatchRequest, make_patch_backend
from fastemp.patches.draw import PatchParams, sharded_uniforms
from fastemp.patches.pillow_images import PillowPatches, image_patches, official_patch, open_rgb
from fastemp.runtime import choose_backend
from fastemp.validate import check_backend


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("jpegs"), classes=3, per_class=4, size=96, seed=0, test_per_class=1)


@pytest.fixture(scope="module")
def images(folder):
    return load_split(DataConfig(source="imagefolder", path=str(folder), streamed=True), "train", "cpu")


def test_choose_backend_is_decided_by_data_device_and_dali():
    assert choose_backend("auto", False, "cuda", True)[0] == "torch"  # resident: torch, even with DALI on CUDA
    assert choose_backend("auto", True, "cuda", True)[0] == "dali"
    assert choose_backend("auto", True, "cpu", True)[0] == "pillow"
    assert choose_backend("auto", True, "cuda", False)[0] == "pillow"
    name, reason = choose_backend("dali", True, "cuda", False)
    assert name == "pillow" and "does not import" in reason and "\n" not in reason  # the fallback says so
    assert choose_backend("dali", True, "cpu", True) == ("dali", "data.backend=dali (CPU operators: no GPU)")
    for requested, streamed in (("torch", True), ("pillow", False), ("dali", False)):  # refused before
        with pytest.raises(ValueError):
            check_backend(requested, streamed)


def one_patch(box, flip=False, jitter=False, factors=(1.0, 1.0, 1.0, 0.0), order=(0, 1, 2, 3)) -> PatchParams:
    """The parameters of one patch: the given crop, flip and jitter; no grayscale, blur or solarize."""
    off = torch.tensor([False])
    box, flip, jitter, factors, order = (torch.tensor([v]) for v in (box, flip, jitter, factors, order))
    return PatchParams(torch.zeros(1), box, flip, jitter, factors, order, off, off, torch.tensor([1.0]), off)


def test_official_patch_crop_is_pil_crop_then_resize(images):
    from PIL import Image

    img = open_rgb(images.paths[0])
    aug = aug_off(crop_size=24, interpolation="bicubic")
    out = official_patch(img, one_patch((5, 7, 40, 30), flip=True), 0, aug)
    expected = img.crop((7, 5, 37, 45)).resize((24, 24), Image.BICUBIC).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    assert np.array_equal(out, np.asarray(expected))
    # the hue shift wraps PIL's uint8 hue channel like torchvision (+0.5 turn twice = +255/256... of a turn)
    hue_only = aug_off(crop_size=24, brightness=0, contrast=0, saturation=0)
    shifted = official_patch(img, one_patch((0, 0, 48, 48), jitter=True, factors=(1, 1, 1, 0.5)), 0, hue_only)
    assert not np.array_equal(shifted, official_patch(img, one_patch((0, 0, 48, 48)), 0, hue_only))


def test_pillow_uses_the_shared_draw_with_each_images_own_size(images):
    aug = aug_off(crop_size=16, crop_ratio=(0.75, 4 / 3))
    index = torch.tensor([5, 2, 9])
    u = sharded_uniforms(PatchRequest(index, 4, 7))
    assert torch.equal(u, torch.rand(12, 18, generator=torch.Generator().manual_seed(7)))
    u = u.view(4, 3, 18).transpose(0, 1)  # by image
    out = PillowPatches(images, aug, workers=0)(index, 4, seed=7)
    for j, i in enumerate(index.tolist()):  # patch-major: row k*3 + j is patch k of image index[j]
        per_image = image_patches(images.paths[i], u[j].numpy(), aug)
        assert torch.allclose(out[j::3], torch.from_numpy(per_image).permute(0, 3, 1, 2).float() / 255)


def test_same_patches_after_restart_prefetch_workers_and_shards(images):
    aug = AugmentConfig(crop_size=16, interpolation="bicubic")
    index = torch.tensor([3, 0, 7, 11])
    first = PillowPatches(images, aug, workers=0)(index, 3, seed=11)
    again = PillowPatches(images, aug, workers=0)(index, 3, seed=11)  # a resumed run: a new backend
    assert torch.equal(first, again)
    assert first.shape == (12, 3, 16, 16) and first.is_contiguous(memory_format=torch.channels_last)
    pooled = PillowPatches(images, aug, workers=1)
    pooled.prefetch(4, PatchRequest(index, 3, 11))
    assert torch.equal(pooled.take(4, PatchRequest(index, 3, 11)), first)  # decoded ahead in a worker process
    pooled.close()
    shard = PillowPatches(images, aug, workers=0)(index, 3, seed=11, shard=slice(2, 4))
    assert torch.equal(shard, first.view(3, 4, 3, 16, 16)[:, 2:4].reshape(6, 3, 16, 16))
    assert not torch.equal(PillowPatches(images, aug, workers=0)(index, 3, seed=12), first)


def test_a_pillow_worker_that_dies_is_one_line_naming_data_workers(images):
    pooled = PillowPatches(images, AugmentConfig(crop_size=16), workers=1)
    index = torch.tensor([3, 0])
    pooled(index, 2, seed=1)  # the worker has started
    os.kill(next(iter(pooled._executor()._processes)), signal.SIGKILL)  # as the out-of-memory killer would
    for _ in range(2):  # found by the request in flight, then by the next one
        with pytest.raises(DataError, match=r"a Pillow worker process died .*lower data.workers \(1\)$"):
            pooled(index, 2, seed=1)
    pooled.close()


def test_the_pillow_pool_starts_every_worker_at_once_each_ignoring_the_groups_signals(images):
    """A worker still starting when the process group is signalled would die and break the pool: none starts late."""
    pooled = PillowPatches(images, AugmentConfig(crop_size=16), workers=3)
    workers = list(pooled._executor()._processes)
    assert len(workers) == 3
    for pid in workers:
        ignored = int(next(line for line in open(f"/proc/{pid}/status") if line.startswith("SigIgn:")).split()[1], 16)
        assert ignored >> (signal.SIGINT - 1) & 1 and ignored >> (signal.SIGTERM - 1) & 1, pid
    pooled.close()


OPS = {
    "crop": {},
    "flip": dict(flip_p=0.5),
    "brightness": dict(jitter_p=1.0, contrast=0, saturation=0, hue=0),
    "contrast": dict(jitter_p=1.0, brightness=0, saturation=0, hue=0),
    "saturation": dict(jitter_p=1.0, brightness=0, contrast=0, hue=0),
    "hue": dict(jitter_p=1.0, brightness=0, contrast=0, saturation=0),
    "grayscale": dict(grayscale_p=1.0),
    "blur": dict(blur_p=1.0),
    "solarize": dict(solarize_p=1.0),
}


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_dali_cpu_twin_matches_pillow_op_by_op(images, interpolation):
    """Each op alone, on the same drawn parameters: DALI (float, its own filters) against Pillow (uint8
    after every op). Normalized scale [-1, 1]: 0.01 is 1.3/255. The blur's tail (PIL's box approximation
    vs a sampled Gaussian) and the hue (uint8 HSV vs float HSV) differ most."""
    pytest.importorskip("nvidia.dali")
    from fastemp.patches.dali_images import DaliImagePatches

    index = torch.arange(12)
    for op, kw in OPS.items():
        aug = aug_off(crop_size=32, interpolation=interpolation, crop_ratio=(0.75, 4 / 3), **kw)
        a = PillowPatches(images, aug, workers=0)(index, 4, seed=3)
        b = DaliImagePatches(images, aug)(index, 4, seed=3)
        diff = (a - b).abs()
        mean_tol, max_tol = (0.006, 0.08) if op == "hue" else (0.004, 0.15) if op == "blur" else (0.004, 0.04)
        assert diff.mean() < mean_tol and diff.max() < max_tol, (op, diff.mean().item(), diff.max().item())


def test_dali_cpu_twin_matches_pillow_in_distribution_and_resumes(images):
    """The whole default recipe at independent seeds: per-channel means and stds agree (the DALI graph
    runs the jitter ops in a fixed order, Pillow in the drawn one); the same call repeats exactly,
    prefetched or not, on a new backend (a resumed run)."""
    pytest.importorskip("nvidia.dali")
    from fastemp.patches.dali_images import DaliImagePatches

    aug = dataclasses.replace(AugmentConfig(), crop_size=24, interpolation="bicubic", crop_ratio=(0.75, 4 / 3))
    index = torch.arange(12)
    a = torch.cat([PillowPatches(images, aug, workers=0)(index, 16, seed=s) for s in range(1, 5)])
    backend = make_patch_backend("dali", images, aug)
    assert isinstance(backend, DaliImagePatches)
    for seeds, mean_tol in ((range(1, 5), 0.015), (range(101, 105), 0.07)):  # same draw; independent draws
        b = torch.cat([backend(index, 16, seed=s) for s in seeds])
        assert b.shape == a.shape == (768, 3, 24, 24)
        assert (a.mean((0, 2, 3)) - b.mean((0, 2, 3))).abs().max() < mean_tol
        assert (a.std((0, 2, 3)) - b.std((0, 2, 3))).abs().max() < 0.03
    once = backend(index, 8, seed=101)
    kept = once.clone()
    backend.prefetch(1, PatchRequest(index, 8, 102))
    backend.prefetch(2, PatchRequest(index, 8, 101))
    assert torch.equal(backend.take(2, PatchRequest(index, 8, 101)), once)  # 1, never taken, is dropped
    assert torch.equal(once, kept)  # later runs do not overwrite an earlier output (no buffer reuse)
    assert torch.equal(DaliImagePatches(images, aug)(index, 8, seed=101), once)
    shard = backend(index, 8, seed=101, shard=slice(3, 7))  # a rank's images: its rows of the global draw
    assert torch.equal(shard, once.view(8, 12, 3, 24, 24)[:, 3:7].reshape(32, 3, 24, 24))
    params = backend.params(index, 8, seed=101)  # the crops are drawn for each image's own size
    widths = torch.tensor([open_rgb(p).width for p in images.paths]).repeat(8)
    assert params.box.shape == (96, 4) and bool(((params.box[:, 1] + params.box[:, 3]) <= widths).all())


def test_dali_reads_a_prefetched_requests_files_off_the_calling_thread(images, monkeypatch):
    """prefetch returns while no file of the request can be read yet; the files are read in the background."""
    pytest.importorskip("nvidia.dali")
    from fastemp.patches.dali_images import DaliImagePatches

    aug = aug_off(crop_size=16)
    backend, request = DaliImagePatches(images, aug), PatchRequest(torch.arange(6), 2, 5)
    expected = backend(*request)
    gate, read = threading.Event(), images.read

    def gated_read(i):
        assert gate.wait(10), "the file was read on the thread that called prefetch"
        return read(i)

    monkeypatch.setattr(images, "read", gated_read)
    backend.prefetch(0, request)
    gate.set()
    assert torch.equal(backend.take(0, request), expected)
    backend.close()


def test_exif_orientation_is_ignored_like_pil(tmp_path):
    """A JPEG with an EXIF rotation tag: both backends cut from the stored pixels (PIL does not rotate,
    so neither does the official ImageFolder), so the windows drawn for the stored size fit."""
    pytest.importorskip("nvidia.dali")
    from PIL import Image

    from fastemp.patches.dali_images import DaliImagePatches

    folder = tmp_path / "train" / "a"
    folder.mkdir(parents=True)
    y, x = np.mgrid[0:40, 0:64]
    pixels = np.stack([x * 4, y * 6, (x + y) * 2], -1).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(pixels).save(folder / "r.jpg", quality=95, exif=exif)
    (tmp_path / "train" / "b").mkdir()  # a second class: a probe needs two
    Image.fromarray(pixels).save(tmp_path / "train" / "b" / "s.jpg", quality=95)
    data = load_split(DataConfig(source="imagefolder", path=str(tmp_path), streamed=True), "train", "cpu")
    aug = aug_off(crop_size=16, crop_scale=(0.5, 0.5), crop_ratio=(0.5, 2.0))
    a = PillowPatches(data, aug, workers=0)(torch.tensor([0]), 4, seed=0)
    b = DaliImagePatches(data, aug)(torch.tensor([0]), 4, seed=0)
    assert (a - b).abs().mean() < 0.01
