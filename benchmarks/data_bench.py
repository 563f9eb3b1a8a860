"""`fastemp bench data`: what the data path costs, arm by arm, at several source image sizes.

For each source size (default 32, 64 and 400 px; synthetic JPEG folders made by
fastemp.data.synthetic_jpeg, no download) the same training step is fed four ways:

    pillow     streamed files, the official recipe on PIL images in `--workers` processes
               (fastemp/patches/pillow_images.py), the next step prefetched
    dali       streamed files, DALI: decode (nvJPEG on CUDA, CPU operators without a GPU) and all
               ops, prefetched (fastemp/patches/dali_images.py)
    resident   the images decoded once at the source size and held on the device, the batched
               torch backend (fastemp/patches/torch_backend.py; bilinear crops)
    step_only  the step with its patches already made (one fixed tensor): the reference

Per arm and source: images/s of the data path alone (the backend called step after step with
its prefetch, nothing else running), the seconds of a real training step fed by it, and
data_added_fraction = 1 - step_only / step (the share of a step's time the data path adds; 0 when
the step never waits), plus the CPU cores it kept busy (this process's CPU time, DALI's threads
included, plus the Pillow workers', over wall time). Patch size: 32 for sources up to 64 px (the
CIFAR recipe and stem), 224 above (the ImageNet-100 recipe and stem), unless --patch says.

The step runs without torch.compile by default (--compile): one model per source, no compile
time in a 10-minute job; a compiled step is shorter, so the data share it would see is larger.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from fastemp import runs
from fastemp.config import load_config
from fastemp.data import load_split
from fastemp.data.synthetic_jpeg import make_folder
from fastemp.patches import PatchBackend, dali_available
from fastemp.patches.torch_backend import TorchPatches
from fastemp.runtime import resolve_device
from fastemp.train import Trainer

from . import common

ARMS = ("pillow", "dali", "resident", "step_only")


def patch_size_for(source_px: int) -> int:
    """The recipe's patch side for a source size: 32 (CIFAR-like) up to 64 px, else 224 (ImageNet)."""
    return 32 if source_px <= 64 else 224


def bench_config(
    folder: Path,
    source_px: int,
    patch_px: int,
    n: int,
    batch: int,
    device: torch.device,
    compile_mode: str,
    overrides=(),
):
    """The imagenet100_n20 recipe on `folder`, at this patch size (CIFAR stem for 32-px patches)."""
    stem = "cifar" if patch_px <= 64 else "imagenet"
    return load_config(
        "imagenet100_n20",
        [
            f"data.path={folder}",
            f"train.device={device}",
            "data.backend=pillow",
            "data.workers=0",
            f"augment.crop_size={patch_px}",
            f"model.stem={stem}",
            f"train.n_patches={n}",
            f"train.batch_size={batch}",
            "train.max_steps=1000000",
            "train.log_every=1000000",
            f"model.compile={compile_mode}",
            "eval.at_end=false",
            *overrides,
        ],
    )


def cpu_seconds(pids: list[int]) -> float:
    """CPU seconds used so far by this process (all its threads) and the processes `pids`."""
    total = time.process_time()
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total


def worker_pids(backend) -> list[int]:
    pool = getattr(backend, "_pool", None)
    return list(getattr(pool, "_processes", None) or {})


class FixedPatches(PatchBackend):
    """The step_only arm: every step gets the same pre-made patches."""

    name = "step_only"

    def __init__(self, patches: torch.Tensor):
        super().__init__()
        self.patches = patches

    def start(self, request):
        return self.patches

    def finish(self, handle):
        return handle


def data_alone(trainer: Trainer, backend, warmup: int, steps: int) -> tuple[float, float]:
    """(seconds per batch, CPU cores busy) of the backend called as the trainer would, with its prefetch."""
    start = trainer.step

    def call(step):
        out = backend.take(step, trainer.patch_request(step))
        backend.prefetch(step + 1, trainer.patch_request(step + 1))
        return out

    for k in range(warmup):
        call(start + k)
    common.synchronize(trainer.device)
    cpu0, t0 = cpu_seconds(worker_pids(backend)), time.perf_counter()
    for k in range(steps):
        call(start + warmup + k)
    common.synchronize(trainer.device)
    wall = time.perf_counter() - t0
    busy = (cpu_seconds(worker_pids(backend)) - cpu0) / wall
    return wall / steps, busy


def step_seconds(trainer: Trainer, backend, warmup: int, steps: int) -> float:
    """Seconds per real training step (patches, forward, backward, LARS) of a Trainer like `trainer` (same
    config and data) fed by `backend`."""
    trainer = Trainer(
        trainer.cfg, progress=False, runtime=trainer.runtime, train_set=trainer.train_set, patches=backend
    )
    trainer.train_until(trainer.step + max(1, warmup))
    common.synchronize(trainer.device)
    t0 = time.perf_counter()
    trainer.train_until(trainer.step + steps)
    common.synchronize(trainer.device)
    return (time.perf_counter() - t0) / steps


def build_arm(arm: str, trainer: Trainer, folder: Path, source_px: int, workers: int, cache: Path):
    """(backend, cpu workers, note) of an arm over the trainer's folder."""
    cfg = trainer.cfg
    if arm == "pillow":
        from fastemp.patches.pillow_images import PillowPatches

        return PillowPatches(trainer.train_set, cfg.augment, workers=workers), workers, ""
    if arm == "dali":
        from fastemp.patches.dali_images import READ_THREADS, DaliImagePatches

        note = "" if trainer.device.type == "cuda" else "DALI CPU operators (no GPU)"
        threads = max(1, min(8, os.cpu_count() or 1))
        return (
            DaliImagePatches(trainer.train_set, cfg.augment, seed=cfg.train.seed),
            threads,
            f"{threads} DALI threads + {READ_THREADS} file-reading threads" + (f"; {note}" if note else ""),
        )
    data = dataclasses.replace(cfg.data, streamed=False, image_size=source_px, root=str(cache), backend="torch")
    images = load_split(data, "train", trainer.device).images
    aug = dataclasses.replace(cfg.augment, interpolation="bilinear")
    return TorchPatches(images, aug), 0, f"decoded once at {source_px} px (shorter side, centre crop), bilinear crops"


def measure_source(source_px: int, patch_px: int, args: dict, device: torch.device, root: Path) -> list[dict]:
    """Every arm's row at one source size."""
    n, batch, workers, warmup, steps = (args[k] for k in ("n", "batch", "workers", "warmup", "steps"))
    per_class = max(args["per_class"], -(-2 * batch // args["classes"]))
    folder = make_folder(root / f"jpeg{source_px}", args["classes"], per_class, source_px, seed=0)
    files = sorted((folder / "train").rglob("*.jpg"))
    bytes_per_image = sum(p.stat().st_size for p in files) / len(files)
    cfg = bench_config(folder, source_px, patch_px, n, batch, device, args["compile"], args["overrides"])
    base = {
        "source_px": source_px,
        "patch_px": patch_px,
        "n_patches": n,
        "batch_size": batch,
        "bytes_per_image": bytes_per_image,
        "images": len(files),
        "stem": cfg.model.stem,
        "device": args["device_name"],
    }
    print(
        f"fastemp bench data: {source_px} px sources -> {patch_px} px patches, n={n}, B={batch}",
        file=sys.stderr,
        flush=True,
    )
    try:
        trainer = Trainer(cfg, progress=False)
        fixed = trainer.patches(trainer.batch_index(0), n, seed=1).clone()
        reference = step_seconds(trainer, FixedPatches(fixed), warmup, steps)
    except Exception as err:  # the step itself does not run (e.g. out of memory): every arm says so
        status = "oom" if common.is_out_of_memory(err) else "error"
        print(f"fastemp bench data: the step at {source_px} px failed: {err}", file=sys.stderr, flush=True)
        common.free_device_memory(device)
        return [
            {
                **base,
                "arm": arm,
                "status": status,
                "images_per_s": None,
                "data_seconds": None,
                "step_seconds": None,
                "step_only_seconds": None,
                "data_added_fraction": None,
                "cpu_workers": None,
                "cpu_cores_busy": None,
                "note": f"the step failed: {type(err).__name__}: {err}"[:300],
            }
            for arm in ARMS
        ]
    rows = [
        {
            **base,
            "arm": "step_only",
            "status": "ok",
            "images_per_s": batch / reference,
            "data_seconds": 0.0,
            "step_seconds": reference,
            "step_only_seconds": reference,
            "data_added_fraction": 0.0,
            "cpu_workers": 0,
            "cpu_cores_busy": None,
            "note": "patches made once; the step alone",
        }
    ]
    for arm in ("pillow", "dali", "resident"):
        row = {
            **base,
            "arm": arm,
            "status": "ok",
            "images_per_s": None,
            "data_seconds": None,
            "step_seconds": None,
            "step_only_seconds": reference,
            "data_added_fraction": None,
            "cpu_workers": None,
            "cpu_cores_busy": None,
            "note": "",
        }
        if arm == "dali" and not dali_available():
            rows.append({**row, "status": "skipped", "note": "nvidia.dali does not import: not measured"})
            continue
        backend = None
        try:
            backend, row["cpu_workers"], row["note"] = build_arm(
                arm, trainer, folder, source_px, workers, root / "cache"
            )
            seconds, busy = data_alone(trainer, backend, warmup, steps)
            step = step_seconds(trainer, backend, warmup, steps)
            row.update(
                images_per_s=batch / seconds,
                data_seconds=seconds,
                cpu_cores_busy=busy,
                step_seconds=step,
                data_added_fraction=max(0.0, 1.0 - reference / step),
            )
        except Exception as err:
            status = "oom" if common.is_out_of_memory(err) else "error"
            print(f"fastemp bench data: {arm} at {source_px} px failed: {err}", file=sys.stderr, flush=True)
            row.update(status=status, note=f"{type(err).__name__}: {err}"[:300])
        finally:
            if backend is not None and hasattr(backend, "close"):
                backend.close()
        rows.append(row)
    del trainer, fixed
    common.free_device_memory(device)
    return rows


def run_data_bench(
    device: str = "auto",
    sources=(32, 64, 400),
    n: int = 20,
    batch: int = 100,
    workers: int = 16,
    warmup: int = 2,
    steps: int = 10,
    classes: int = 10,
    per_class: int = 20,
    patch: int | None = None,
    compile_mode: str = "none",
    overrides=(),
    folder_root: str | None = None,
    on_progress=None,
) -> dict:
    dev = resolve_device(device)
    environment = runs.environment(dev)
    args = {
        "n": n,
        "batch": batch,
        "workers": workers,
        "warmup": warmup,
        "steps": steps,
        "classes": classes,
        "per_class": per_class,
        "compile": compile_mode,
        "overrides": list(overrides),
        "device_name": environment.get("device_name"),
    }
    notes = [
        f"step without torch.compile (model.compile={compile_mode})"
        if compile_mode == "none"
        else f"model.compile={compile_mode}",
        "synthetic JPEGs (fastemp.data.synthetic_jpeg, quality 90 + pixel noise): see bytes_per_image; "
        "ImageNet photos average about 110 kB at ~400 x 350 px, so they decode somewhat slower",
    ]
    if dev.type == "cpu":
        notes.append(
            "CPU run: every arm shares this machine's cores with the training step; DALI runs its CPU "
            "operators. These numbers describe the CPU, not a GPU."
        )
    result = {
        **common.base_result("data", environment),
        "partial": True,
        "settings": {
            **{k: v for k, v in args.items() if k not in ("overrides", "device_name")},
            "sources": list(sources),
            "patch": patch,
            "overrides": list(overrides),
        },
        "rows": [],
        "notes": notes,
    }
    with tempfile.TemporaryDirectory(dir=folder_root) as tmp:
        for source_px in sources:
            result["rows"] += measure_source(source_px, patch or patch_size_for(source_px), args, dev, Path(tmp))
            if on_progress:
                on_progress(result)
    result["partial"] = False
    return result


def data_markdown(result: dict) -> str:
    env, s = result["environment"], result["settings"]
    lines = [
        f"# Data path: {common.device_label(env)} ({env.get('device')})",
        "",
        f"n={s['n']}, B={s['batch']}, {s['warmup']} warm-up + {s['steps']} timed steps per arm; "
        "images/s of the data path alone (with its prefetch); step s = a real training step fed by the arm; "
        "added = 1 - step_only / step.",
        "",
    ]
    rows = [
        [
            r["source_px"],
            r["patch_px"],
            r["arm"],
            r["images_per_s"],
            r["step_seconds"] * 1e3 if r["step_seconds"] else None,
            r["data_added_fraction"],
            r["cpu_workers"],
            r["cpu_cores_busy"],
            r["bytes_per_image"] / 1e3,
            r["status"],
            r["note"],
        ]
        for r in result["rows"]
    ]
    lines += [
        common.markdown_table(
            [
                "source px",
                "patch px",
                "arm",
                "images/s",
                "step ms",
                "added",
                "cpu workers",
                "cores busy",
                "kB/image",
                "status",
                "note",
            ],
            rows,
        ),
        "",
    ]
    lines += ["## Environment", "", common.environment_markdown(env), ""]
    if result["notes"]:
        lines += ["## Notes", ""] + [f"- {note}" for note in result["notes"]]
    return "\n".join(lines)
