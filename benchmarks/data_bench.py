"""`fastemp bench data` (docs/data-backends.md#the-benchmark): the same training step fed by Pillow workers, DALI,
resident images and fixed patches (step_only) at several synthetic JPEG source sizes. Per arm (a config of
`fastemp train`): its step on the Trainer's clock, then its data path alone on the library's clock (the backend
asked as the Trainer asks it) and the CPU cores kept busy. The step is not compiled by default (--compile): no
compile time in a 10-minute job.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace

from fastemp.clock import cpu_seconds, time_calls
from fastemp.config import load_config
from fastemp.data.synthetic import make_folder
from fastemp.patches import dali_available
from fastemp.patches.dali_images import READ_THREADS

from . import harness
from .report import table


def arms(source_px: int, args, cache: Path) -> dict:
    """arm -> (config keys, CPU workers, note): each arm's step is that of `fastemp train` with its keys."""
    threads = max(1, min(8, os.cpu_count() or 1))  # DaliImagePatches' own choice
    resident = ["data.streamed=false", "data.backend=torch", f"data.image_size={source_px}", f"data.root={cache}"]
    return {
        "step_only": (["data.backend=pillow", "data.workers=0"], 0, "patches made once"),
        "pillow": (["data.backend=pillow", f"data.workers={args.workers}"], args.workers, ""),
        "dali": (["data.backend=dali"], threads, f"{threads} DALI threads + {READ_THREADS} file-reading threads"),
        "resident": (resident, 0, f"decoded once at {source_px} px (shorter side, centre crop), bilinear crops"),
    }


def measure_arm(arm: str, trainer, workers: int, note: str, args) -> dict:
    """Warm-up and timed steps fed by the arm on the Trainer's clock, then its data path alone, asked as the
    Trainer asks it (with its prefetch), and the CPU cores it kept busy."""
    if arm == "step_only":  # every step gets the same patches, made once: the step alone
        made = trainer.patches(trainer.batch_index(0), args.n, seed=1)
        trainer.patches = SimpleNamespace(take=lambda *_: made, prefetch=lambda *_: None, close=lambda: None)
    backend = trainer.patches
    try:
        trainer.train_until(max(1, args.warmup))
        before = trainer.train_seconds
        trainer.train_until(trainer.step + args.steps)  # ends in a logged step: the Trainer's clock is read there
        steps = itertools.count(trainer.step)

        def call():
            step = next(steps)
            backend.take(step, trainer.patch_request(step))
            backend.prefetch(step + 1, trainer.patch_request(step + 1))

        pids = list(getattr(getattr(backend, "_pool", None), "_processes", None) or {})  # the Pillow workers
        busy = cpu_seconds(pids)
        # one untimed call: the batch the last training step prefetched had that whole step's head start
        data_s = sum(time_calls(call, trainer.device, 1, args.steps)) / args.steps
        busy = (cpu_seconds(pids) - busy) / (data_s * args.steps)
        out = {"images_per_s": args.batch / data_s, "data_seconds": data_s}
        out.update(step_seconds=(trainer.train_seconds - before) / args.steps, cpu_workers=workers, cpu_cores_busy=busy)
        return {**out, "note": note}
    finally:
        backend.close()


def measure_source(source_px: int, args, root: Path) -> list[dict]:
    """Every arm's row at one source size: the imagenet100_n20 recipe on a synthetic folder at the arm's patch
    size (the CIFAR stem for patches up to 64 px)."""
    patch_px = args.patch or (32 if source_px <= 64 else 224)
    per_class = max(args.per_class, -(-2 * args.batch // args.classes))
    folder = make_folder(root / f"jpeg{source_px}", args.classes, per_class, source_px, seed=0)
    files = list((folder / "train").rglob("*.jpg"))
    base = {"source_px": source_px, "patch_px": patch_px, "n_patches": args.n, "batch_size": args.batch}
    base.update(bytes_per_image=sum(p.stat().st_size for p in files) / len(files), images=len(files))
    keys = [f"data.path={folder}", f"train.device={args.device}", f"augment.crop_size={patch_px}"]
    keys += [f"model.stem={'cifar' if patch_px <= 64 else 'imagenet'}", f"model.compile={args.compile}"]
    keys += [f"train.n_patches={args.n}", f"train.batch_size={args.batch}", "train.max_steps=1000000"]
    keys += ["train.log_every=1000000", "eval.at_end=false"]
    todo = {a: v for a, v in arms(source_px, args, root / "cache").items() if a != "dali" or dali_available()}
    configs = {arm: load_config("imagenet100_n20", [*keys, *todo[arm][0], *args.overrides]) for arm in todo}
    data = harness.Data()
    for cfg in configs.values():  # every arm as `fastemp train` checks it, before any is measured
        data.check(cfg)
    measure = lambda arm: measure_arm(arm, data.trainer(configs[arm]), *todo[arm][1:], args)  # noqa: E731
    rows = harness.run_points(todo, measure, lambda arm: {**base, "arm": arm})
    reference = rows[0].get("step_seconds")
    for row in rows:
        added = 1 - reference / row["step_seconds"] if reference and row.get("step_seconds") else None
        row.update(step_only_seconds=reference, data_added_fraction=None if added is None else max(0.0, added))
    skipped = {**base, "arm": "dali", "status": "skipped", "note": "nvidia.dali does not import: not measured"}
    return rows + ([] if "dali" in todo else [skipped])


def run(args, _, results: harness.Results) -> dict:
    notes = [f"model.compile={args.compile}", "synthetic JPEGs (quality 90 + pixel noise): see bytes_per_image"]
    if results.environment["device"] == "cpu":
        notes.append("CPU run: every arm shares the cores with the step; DALI runs its CPU operators.")
    settings = {k: getattr(args, k) for k in "n batch workers warmup steps classes per_class compile".split()}
    settings.update(sources=args.sources, patch=args.patch, overrides=args.overrides)
    result = {"settings": settings, "rows": [], "notes": notes}
    with tempfile.TemporaryDirectory() as tmp:
        for source_px in args.sources:
            result["rows"] += measure_source(source_px, args, Path(tmp))
            results.write(result)
    return results.write(result, final=True)


def markdown(result: dict) -> str:
    s = result["settings"]
    keys = "source_px patch_px arm images_per_s step_seconds:ms data_added_fraction cpu_workers cpu_cores_busy"
    keys += " bytes_per_image:kB status note"
    headers = "source px|patch px|arm|images/s|step ms|added|cpu workers|cores busy|kB/image|status|note"
    return harness.page(
        result,
        "Data path",
        f"n={s['n']}, B={s['batch']}, {s['warmup']} warm-up + {s['steps']} timed steps per arm; images/s of the data "
        "path alone (with its prefetch); step ms: a training step fed by the arm; added = 1 - step_only / step.",
        "",
        table(result["rows"], keys, headers),
    )
