"""`fastemp bench data`: what the data path costs, arm by arm, at several source image sizes (synthetic JPEG
folders, fastemp.data.synthetic_jpeg). The same training step is fed four ways: pillow (streamed files, the official
recipe in --workers processes, prefetched), dali (streamed files, DALI decode and ops, prefetched), resident (the
images decoded once at the source size, on the device, the torch backend, bilinear), step_only (patches made once:
the reference). Per arm: images/s of the data path alone (the backend asked as the Trainer asks it, on the library's
clock), the seconds of a real training step fed by it (the Trainer's clock), data_added_fraction = 1 - step_only /
step, and the CPU cores it kept busy (CPU seconds of this process and the Pillow workers over the same wall
seconds). Patch size: 32 for sources up to 64 px (CIFAR recipe and stem), else 224. The step is not compiled by
default (--compile): no compile time in a 10-minute job.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from pathlib import Path

import torch

from fastemp.config import load_config
from fastemp.data import load_split
from fastemp.data.synthetic_jpeg import make_folder
from fastemp.patches import PatchBackend, dali_available
from fastemp.patches.torch_backend import TorchPatches
from fastemp.train import Trainer

from . import harness
from .report import table

ARMS = ("step_only", "pillow", "dali", "resident")


def config_for(folder: Path, patch_px: int, args):
    """The imagenet100_n20 recipe on `folder` at this patch size (the CIFAR stem for 32-px patches)."""
    stem = "cifar" if patch_px <= 64 else "imagenet"
    keys = ["data.backend=pillow", "data.workers=0", f"augment.crop_size={patch_px}", f"model.stem={stem}"]
    keys += [f"train.n_patches={args.n}", f"train.batch_size={args.batch}", "train.max_steps=1000000"]
    keys += ["train.log_every=1000000", f"model.compile={args.compile}", "eval.at_end=false", *args.overrides]
    return load_config("imagenet100_n20", [f"data.path={folder}", f"train.device={args.device}", *keys])


class FixedPatches(PatchBackend):
    """The step_only arm: every step gets the same patches."""

    name = "step_only"

    def __init__(self, patches: torch.Tensor):
        super().__init__()
        self.patches = patches

    def start(self, request):
        return self.patches

    def finish(self, handle):
        return handle


def cpu_seconds(pids: list[int]) -> float:
    """CPU seconds used so far by this process (all its threads) and the processes `pids` (/proc)."""
    total, tick = time.process_time(), os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total


def build_arm(arm: str, trainer: Trainer, source_px: int, args, cache: Path):
    """(backend, CPU workers, note) of an arm over the trainer's folder."""
    cfg, device = trainer.cfg, trainer.device
    if arm == "step_only":
        return FixedPatches(trainer.patches(trainer.batch_index(0), args.n, seed=1).clone()), 0, "patches made once"
    if arm == "pillow":
        from fastemp.patches.pillow_images import PillowPatches

        return PillowPatches(trainer.train_set, cfg.augment, workers=args.workers), args.workers, ""
    if arm == "dali":
        from fastemp.patches.dali_images import READ_THREADS, DaliImagePatches

        threads = max(1, min(8, os.cpu_count() or 1))
        note = f"{threads} DALI threads + {READ_THREADS} file-reading threads"
        note += "" if device.type == "cuda" else "; DALI CPU operators (no GPU)"
        return DaliImagePatches(trainer.train_set, cfg.augment, seed=cfg.train.seed), threads, note
    data = dataclasses.replace(cfg.data, streamed=False, image_size=source_px, root=str(cache), backend="torch")
    images = load_split(data, "train", device).images
    backend = TorchPatches(images, dataclasses.replace(cfg.augment, interpolation="bilinear"))
    return backend, 0, f"decoded once at {source_px} px (shorter side, centre crop), bilinear crops"


def measure_arm(arm: str, trainer: Trainer, source_px: int, args, cache: Path) -> dict:
    backend, workers, note = build_arm(arm, trainer, source_px, args, cache)
    try:
        start = [trainer.step]

        def call():  # the backend asked as the Trainer asks it, with its prefetch
            step = start[0] = start[0] + 1
            backend.take(step, trainer.patch_request(step))
            backend.prefetch(step + 1, trainer.patch_request(step + 1))

        for _ in range(args.warmup):
            call()
        pids = list(getattr(getattr(backend, "_pool", None), "_processes", None) or {})  # the Pillow workers
        busy = cpu_seconds(pids)
        seconds = harness.time_calls(call, trainer.device, 0, args.steps)
        busy = (cpu_seconds(pids) - busy) / sum(seconds)
        fed = Trainer(trainer.cfg, None, False, trainer.runtime, trainer.train_set, patches=backend)
        fed.train_until(max(1, args.warmup))
        before = fed.train_seconds
        fed.train_until(fed.step + args.steps)  # ends in a logged step: the Trainer's clock is read there
        step = (fed.train_seconds - before) / args.steps
        data_s = sum(seconds) / args.steps
        out = {"images_per_s": args.batch / data_s, "data_seconds": data_s, "step_seconds": step}
        return {**out, "cpu_workers": workers, "cpu_cores_busy": busy, "note": note}
    finally:
        if hasattr(backend, "close"):
            backend.close()


def measure_source(source_px: int, args, root: Path, device: torch.device) -> list[dict]:
    """Every arm's row at one source size; a step that cannot run marks every arm."""
    patch_px = args.patch or (32 if source_px <= 64 else 224)
    per_class = max(args.per_class, -(-2 * args.batch // args.classes))
    folder = make_folder(root / f"jpeg{source_px}", args.classes, per_class, source_px, seed=0)
    files = sorted((folder / "train").rglob("*.jpg"))
    base = {"source_px": source_px, "patch_px": patch_px, "n_patches": args.n, "batch_size": args.batch}
    base.update(bytes_per_image=sum(p.stat().st_size for p in files) / len(files), images=len(files))
    trainer = harness.Data().trainer(config_for(folder, patch_px, args))  # the checks of `fastemp train`
    arms = [a for a in ARMS if a != "dali" or dali_available()]
    rows = harness.run_points(
        arms, lambda a: measure_arm(a, trainer, source_px, args, root / "cache"), lambda a: {**base, "arm": a}, device
    )
    reference = rows[0].get("step_seconds")
    for row in rows:
        added = 1 - reference / row["step_seconds"] if reference and row.get("step_seconds") else None
        row.update(step_only_seconds=reference, data_added_fraction=None if added is None else max(0.0, added))
    skipped = {**base, "arm": "dali", "status": "skipped", "note": "nvidia.dali does not import: not measured"}
    return rows + ([] if "dali" in arms else [skipped])


def run_data(args, results: harness.Results) -> dict:
    device = torch.device(results.environment["device"])
    notes = [f"model.compile={args.compile}", "synthetic JPEGs (quality 90 + pixel noise): see bytes_per_image"]
    notes += ["CPU run: every arm shares the cores with the step; DALI runs its CPU operators."] * (
        device.type == "cpu"
    )
    settings = {k: getattr(args, k) for k in "n batch workers warmup steps classes per_class compile".split()}
    settings.update(sources=args.sources, patch=args.patch, overrides=args.overrides)
    result = {"settings": settings, "rows": [], "notes": notes}
    with tempfile.TemporaryDirectory(dir=args.folder_root) as tmp:
        for source_px in args.sources:
            result["rows"] += measure_source(source_px, args, Path(tmp), device)
            results.write(result)
    return results.write(result, final=True)


def markdown(result: dict) -> str:
    s = result["settings"]
    rows = [
        {**r, "ms": r.get("step_seconds") and r["step_seconds"] * 1e3, "kb": r["bytes_per_image"] / 1e3}
        for r in result["rows"]
    ]
    keys = "source_px patch_px arm images_per_s ms data_added_fraction cpu_workers cpu_cores_busy kb status note"
    headers = "source px|patch px|arm|images/s|step ms|added|cpu workers|cores busy|kB/image|status|note"
    return harness.page(
        result,
        "Data path",
        f"n={s['n']}, B={s['batch']}, {s['warmup']} warm-up + {s['steps']} timed steps per arm; images/s of the data "
        "path alone (with its prefetch); step ms: a training step fed by the arm; added = 1 - step_only / step.",
        "",
        table(rows, keys, headers),
    )
