"""`fastemp bench throughput` (docs/benchmarks.md): images/s, patches/s, MFU, peak memory and the step split of the
Trainer's own step over a grid of AXES. Per point: the first step (compilation) timed apart by the Trainer, `warmup`
steps, then `steps` steps marked on the library's clock (images/s = B / median step); the split marks every phase
of `split_steps` more. --baseline: the reference-style pipeline (baseline.py) at each (n, B). Under torchrun rank 0
first measures each point alone (same global batch), then all ranks: scaling efficiency = total / (K x alone).
"""

from __future__ import annotations

import copy
import statistics
from operator import attrgetter

import torch

from fastemp import distributed
from fastemp.clock import Clock, PeakMemory, matmul_peak, utilisation
from fastemp.config import apply_overrides, to_dict
from fastemp.model import flops_per_patch

from . import harness
from .report import POINT_HEADERS, markdown_table, on_h100, pct, point_cells, table, target_row, targets_markdown

# sweep axis -> the config key it sets; the first two only change speed (swept by `fastemp tune`)
AXES = {"cudnn_benchmark": "model.cudnn_benchmark", "patch_compile": "data.patch_compile"}
AXES.update({"n_patches": "train.n_patches", "batch_size": "train.batch_size", "backend": "data.backend"})
AXES.update({"compile": "model.compile", "precision": "model.precision", "grad_chunks": "train.grad_chunks"})
PHASES = ("data", "forward", "loss", "backward", "optimizer")


def points(base, axes: dict) -> list[dict]:
    """Every combination of the given axis values; an axis left None keeps the config's value."""
    return harness.grid({axis: axes.get(axis) or [attrgetter(key)(base)] for axis, key in AXES.items()})


def point_config(base, point: dict, steps: int):
    """The base config with a point applied, for a run of `steps` steps that never evaluates."""
    cfg = apply_overrides(copy.deepcopy(base), [f"{AXES[axis]}={value}" for axis, value in point.items()])
    cfg.train.max_steps, cfg.eval.at_end, cfg.eval.every = steps, False, "0"
    return cfg


def measure_split(trainer, steps: int) -> dict:
    """Median seconds of each phase over `steps` Trainer steps (the clocks read once, after all are queued)."""
    clocks = [Clock(trainer.device) for _ in range(steps)]
    for clock in clocks:
        trainer.train_step(clock)
    phases = [dict(clock.intervals()) for clock in clocks]
    split = {name: statistics.median(p[name] for p in phases) for name in PHASES}
    split.update(
        forward_backward=statistics.median(p["forward"] + p["backward"] for p in phases),
        total=statistics.median(sum(p.values()) for p in phases),
        steps=steps,
        clock="cuda events" if trainer.device.type == "cuda" else "wall clock (perf_counter)",
    )
    return split


def measure_point(cfg, data: harness.Data, warmup: int, steps: int, split_steps: int, peak: dict | None) -> dict:
    """Every number of one point (raises on OOM: run_points records it); no MFU without a peak (the smoke's)."""
    trainer = data.trainer(cfg)
    memory = PeakMemory(trainer.device)
    memory.reset()
    trainer.train_until(1 + warmup)  # the first step is the Trainer's warm-up seconds
    clock = Clock(trainer.device, only=("start",))
    trainer.train_until(1 + warmup + steps, clock)
    clock.mark("start")  # the end of the last step
    step_seconds = [seconds for _, seconds in clock.intervals()]
    step, batch = statistics.median(step_seconds), cfg.train.batch_size
    flops = flops_per_patch(cfg.model, image_size=cfg.augment.crop_size)
    return {
        "resolved": trainer.runtime.resolved(),
        "grad_chunks_used": trainer.runtime.grad_chunks,  # 0 asks for chunks from free memory: what it chose
        "bn_groups": cfg.train.bn_groups,
        "data": trainer.train_set.description,
        "step_seconds_median": step,
        "images_per_s": batch / step,
        "patches_per_s": batch / step * cfg.train.n_patches,
        "first_step_seconds": trainer.warmup_seconds,
        "compile_seconds": max(0.0, trainer.warmup_seconds - step),
        **(utilisation(batch / step * cfg.train.n_patches, flops, peak) if peak else {}),
        **{k: trainer.last_record[k] for k in ("loss", "loss_sim", "loss_tcr")},  # the last step's
        "peak_memory_bytes": memory.peak_bytes(),
        "peak_memory_source": memory.source,
        "split": measure_split(trainer, split_steps) if split_steps else None,
        "step_seconds": step_seconds,
    }


def measure_scaling(cfg, data, warmup: int, steps: int, split_steps: int, peak: dict) -> dict:
    """One point under torchrun: rank 0 alone first (one process, same config), then every rank."""
    with distributed.alone() as measuring:
        single = measure_point(cfg, data, warmup, steps, 0, peak)["images_per_s"] if measuring else None
    single = distributed.run_on_main(lambda: single)
    result = measure_point(cfg, data, warmup, steps, split_steps, peak)
    world = distributed.world_size()
    per_rank = [cfg.train.batch_size / world / s for s in distributed.gather_objects(result["step_seconds_median"])]
    return {
        **result,
        "world_size": world,
        "per_rank_images_per_s": per_rank,
        "total_images_per_s": sum(per_rank),
        "single_process_images_per_s": single,
        "scaling_efficiency": sum(per_rank) / (world * single),
    }


def targets(rows: list[dict], environment: dict) -> list[dict]:
    """Where the sweep stands on the n=20 speed and the n=200 memory and epoch time (B=100; docs/benchmarks.md)."""
    h100, out = on_h100(environment), []
    n20, n200 = ([p for p in rows if (p["n_patches"], p["batch_size"]) == (n, 100)] for n in (20, 200))
    if n20:
        best = max((p["patches_per_s"] for p in n20 if p["status"] == "ok"), default=None)
        out.append(target_row("n20_patches_per_s", best, True, h100, "best point of this sweep"))
    if n200:
        ok = [p for p in n200 if p["status"] == "ok"]
        fits = [p["peak_memory_bytes"] / 2**30 for p in ok if p["peak_memory_bytes"]]
        note = "torch.cuda.max_memory_allocated" if fits else "no n=200 point ran"
        row = target_row("n200_memory_gib", min(fits, default=None), False, h100, note)
        if not fits and any(p["status"] == "oom" for p in n200):
            row.update(met=False, note="out of memory")
        epoch = 50_000 / max(p["images_per_s"] for p in ok) if ok else None
        out += [row, target_row("n200_epoch_seconds", epoch, False, h100, "fastest point of this sweep")]
    return out


def axes_of(args) -> dict:
    """The sweep's axes from the command line (None: the config's value)."""
    axes = {"n_patches": args.n, "batch_size": args.batch, "grad_chunks": args.grad_chunks}
    return {**axes, "backend": args.backend, "compile": args.compile}


def run(args, base, results: harness.Results) -> dict:
    """The whole sweep, written after every point; every point's config, machine and data are checked (one line
    each) before anything is measured."""
    axes, data = axes_of(args), harness.Data()
    todo = [point_config(base, p, 1 + args.warmup + args.steps + args.split_steps + 1) for p in points(base, axes)]
    device = [data.check(cfg) for cfg in todo][0].device
    peak, flops = matmul_peak(device, args.peak_size), flops_per_patch(base.model, image_size=base.augment.crop_size)

    def write(rows: list[dict], baselines: list[dict] = (), final: bool = False) -> dict:
        rates = {(b["n_patches"], b["batch_size"]): b["images_per_s"] for b in baselines if b["status"] == "ok"}
        for p in rows:
            rate = rates.get((p["n_patches"], p["batch_size"]))
            p["speedup_vs_baseline"] = p["images_per_s"] / rate if rate and p["status"] == "ok" else None
        notes = ["CPU timings are noisy: shared cores; MFU is against an fp32 matmul."] if device.type == "cpu" else []
        result = {
            "config": to_dict(base),
            "axes": {k: v for k, v in axes.items() if v},
            "data": next((p["data"] for p in rows if p.get("data")), base.data.source),
            "flops_per_patch": flops,
            "peak": peak,
            "settings": {"warmup_steps": args.warmup, "timed_steps": args.steps, "split_steps": args.split_steps},
            "points": rows,
            "baselines": list(baselines),
            "baseline_description": baselines[0].get("description", "") if baselines else "",
            "targets": targets(rows, results.environment),
            "notes": notes,
        }
        return results.write(result, final)

    measure = measure_scaling if distributed.world_size() > 1 else measure_point
    settings = (data, args.warmup, args.steps, args.split_steps, peak)
    label = lambda cfg: {axis: attrgetter(key)(cfg) for axis, key in AXES.items()}  # noqa: E731
    rows, baselines = harness.run_points(todo, lambda cfg: measure(cfg, *settings), label, write), []
    if args.baseline and distributed.world_size() == 1:
        from .baseline import measure_baseline

        measured = sorted({(p["n_patches"], p["batch_size"]) for p in rows})
        pairs = [{"n_patches": n, "batch_size": b} for n, b in measured]

        def baseline(pair) -> dict:
            cfg = point_config(base, pair, 1)
            images = data.load(cfg, "train", torch.device("cpu")).images
            return measure_baseline(cfg, images, device, args.baseline_workers, steps=args.baseline_steps)

        baselines = harness.run_points(pairs, baseline, dict, lambda done: write(rows, done))
    return write(rows, baselines, final=True)


def markdown(result: dict) -> str:
    peak, settings = result["peak"], result["settings"]
    sheet = f"{peak['datasheet_tflops']:.0f} TFLOP/s ({peak['datasheet_label']})" if peak["datasheet_tflops"] else "n/a"
    ok = [p for p in result["points"] if p["status"] == "ok"]
    rows = [[*point_cells(result, p), pct(p["mfu_datasheet"]), p["compile_seconds"]] for p in ok]
    lines = [
        f"- data: {result['data']}",
        f"- FLOPs per training patch: {result['flops_per_patch'] / 1e9:.3f} GFLOP (fastemp.model.flops_per_patch)",
        f"- measured peak: {peak['measured_tflops']:.3g} TFLOP/s ({peak['dtype']} {peak['matmul_size']}^3 matmul, "
        f"this run); datasheet: {sheet}",
        f"- median over {settings['timed_steps']} timed steps after {settings['warmup_steps']} warm-up steps; the "
        "first step (compilation) apart",
        "",
        markdown_table(f"{POINT_HEADERS}|MFU (datasheet)|first-step extra s".split("|"), rows),
    ]
    split = [p for p in ok if p["split"]]
    if split:
        lines += ["", f"## Step split (ms, medians, {split[0]['split']['clock']})", ""]
        keys = "n_patches batch_size resolved.backend resolved.compile split.data:ms split.forward_backward:ms"
        keys += " split.loss:ms split.optimizer:ms split.total:ms step_seconds_median:ms"
        lines.append(table(split, keys, "n|B|backend|compile|data|fwd+bwd|loss|optimizer|sum|end-to-end step"))
    scaled = [
        p | {"ranks": ", ".join(f"{x:.3g}" for x in p["per_rank_images_per_s"])} for p in ok if p.get("world_size")
    ]
    if scaled:
        keys = "n_patches batch_size world_size single_process_images_per_s ranks total_images_per_s"
        keys += " scaling_efficiency:%"
        headers = "n|B (global)|processes|1-process images/s|per-rank images/s|total images/s|scaling efficiency"
        lines += ["", "## Scaling under torchrun (1 process = rank 0 alone, same global batch)", ""]
        lines.append(table(scaled, keys, headers))
    failed = [p for p in result["points"] if p["status"] != "ok"]
    lines += ["", "## Points without numbers", ""] if failed else []
    lines += [f"- {', '.join(f'{k}={p[k]}' for k in AXES)}: {p['status']} ({p['reason']})" for p in failed]
    if result["baselines"]:
        lines += ["", "## Reference-style baseline (same run)", "", result["baseline_description"], ""]
        keys = "n_patches batch_size status images_per_s patches_per_s workers data_wait_fraction:%"
        lines.append(table(result["baselines"], keys, "n|B|status|images/s|patches/s|workers|data wait"))
    if result["targets"]:
        lines += ["", targets_markdown(result["targets"])]
    return harness.page(result, "Throughput", *lines)
