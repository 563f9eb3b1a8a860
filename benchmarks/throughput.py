"""`fastemp bench throughput`: images/s, patches/s, TFLOP/s, MFU, peak memory and the step split of the Trainer's
own step, over a grid of (n_patches, batch_size, backend, compile, precision, grad_chunks).

Each point: a Trainer of the point's config; its first step (compilation, warm-up) is timed apart by the Trainer;
then `warmup` steps, then `steps` steps whose starts train_step marks on a Clock: images/s = B / median step.
The step split runs `split_steps` more steps with a clock that marks every phase (data, forward, loss, backward,
optimizer). MFU = patches/s x fastemp.model.flops_per_patch (model FLOPs: recomputation not counted) over a
matmul measured on the same device in the same run (bf16 on CUDA, fp32 on the CPU), the datasheet peak beside it.
--baseline also measures the reference-style pipeline (baseline.py) at each (n, B) and reports the ratio.

Under torchrun (K processes) every point is measured twice in one invocation: rank 0 alone first (one process,
same global batch), then all ranks: each rank's images/s, their sum and the scaling efficiency total / (K x the
one-process figure). The baseline is not run under torchrun.
"""

from __future__ import annotations

import copy
import re
import statistics

import torch

from fastemp import distributed
from fastemp.clock import Clock
from fastemp.config import apply_overrides, to_dict
from fastemp.model import flops_per_patch

from . import harness
from .report import device_label, environment_markdown, fmt, markdown_table, on_h100, pct, target_row, targets_markdown

AXES = {  # sweep axis -> the config key it sets
    "n_patches": "train.n_patches",
    "batch_size": "train.batch_size",
    "backend": "data.backend",
    "compile": "model.compile",
    "precision": "model.precision",
    "grad_chunks": "train.grad_chunks",
}
PHASES = ("data", "forward", "loss", "backward", "optimizer")
# Dense (no sparsity) BF16 tensor-core TFLOP/s from NVIDIA's datasheets; the first pattern that matches wins.
DATASHEET = (("H100.*PCIe", "H100 PCIe", 756.0), ("H100.*NVL", "H100 NVL", 835.0), ("H100", "H100 SXM", 989.0))
DATASHEET += (("H200", "H200", 989.0), ("A100", "A100", 312.0), ("RTX 4090", "GeForce RTX 4090", 165.0))
DATASHEET += ((r"\bL4\b", "L4", 121.0),)


def value_of(cfg, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def points(base, axes: dict) -> list[dict]:
    """Every combination of the given axis values; an axis left None keeps the config's value."""
    return harness.grid({axis: axes.get(axis) or [value_of(base, key)] for axis, key in AXES.items()})


def point_config(base, point: dict, steps: int):
    """The base config with a point applied, for a run of `steps` steps that never evaluates."""
    cfg = apply_overrides(copy.deepcopy(base), [f"{AXES[axis]}={value}" for axis, value in point.items()])
    cfg.train.max_steps, cfg.eval.at_end, cfg.eval.every = steps, False, "0"
    return cfg


def datasheet_peak(device_name: str) -> tuple[str, float] | None:
    return next(((label, tflops) for pattern, label, tflops in DATASHEET if re.search(pattern, device_name)), None)


def peak_info(device: torch.device, device_name: str, size: int | None = None) -> dict:
    """The peak MFU is measured against: median TFLOP/s of a size^3 matmul, with the datasheet's beside it."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    size = size or (8192 if device.type == "cuda" else 1024)
    gen = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(size, size, device=device, dtype=dtype, generator=gen) for _ in range(2))
    out = torch.empty_like(a)
    seconds = statistics.median(harness.time_calls(lambda: torch.matmul(a, b, out=out), device, 3, 10))
    sheet = datasheet_peak(device_name) if device.type == "cuda" else None
    return {
        "measured_tflops": 2.0 * size**3 / seconds / 1e12,
        "dtype": str(dtype).replace("torch.", ""),
        "matmul_size": size,
        "datasheet_label": sheet and sheet[0],
        "datasheet_tflops": sheet and sheet[1],
    }


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


def measure_point(cfg, data: harness.Data, warmup: int, steps: int, split_steps: int, peak: dict) -> dict:
    """Every number of one point (raises on OOM: run_points records it)."""
    memory = harness.PeakMemory(data.check(cfg).device)
    memory.reset()
    trainer = data.trainer(cfg)
    trainer.train_until(1 + warmup)  # the first step is the Trainer's warm-up seconds
    clock = Clock(trainer.device, only=("start",))
    trainer.train_until(1 + warmup + steps, clock)
    clock.mark("start")  # the end of the last step
    step_seconds = [seconds for _, seconds in clock.intervals()]
    peak_bytes = memory.peak_bytes()
    step = statistics.median(step_seconds)
    batch, flops = cfg.train.batch_size, flops_per_patch(cfg.model, image_size=cfg.augment.crop_size)
    patches_per_s = batch / step * cfg.train.n_patches
    return {
        "flops_per_patch": flops,
        "resolved": trainer.runtime.resolved(),
        "grad_chunks_used": trainer.runtime.grad_chunks,  # 0 asks for chunks from free memory: what it chose
        "bn_groups": cfg.train.bn_groups,
        "data": trainer.train_set.description,
        "step_seconds_median": step,
        "images_per_s": batch / step,
        "patches_per_s": patches_per_s,
        "images_per_s_window_mean": steps * batch / sum(step_seconds),
        "first_step_seconds": trainer.warmup_seconds,
        "compile_seconds": max(0.0, trainer.warmup_seconds - step),
        "achieved_tflops": patches_per_s * flops / 1e12,
        "mfu": patches_per_s * flops / 1e12 / peak["measured_tflops"],
        "mfu_datasheet": patches_per_s * flops / 1e12 / peak["datasheet_tflops"] if peak["datasheet_tflops"] else None,
        "peak_memory_bytes": peak_bytes,
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
    """Where the sweep stands on the n=20 speed and the n=200 memory and epoch time (B=100). The ratio to the
    baseline is reported with each point but is no target: against 16 CPU workers 30x needs ~94% of the peak."""
    h100, out = on_h100(environment), []
    n20 = [p for p in rows if (p["n_patches"], p["batch_size"]) == (20, 100)]
    if n20:
        best = max((p["patches_per_s"] for p in n20 if p["status"] == "ok"), default=None)
        description = "n=20 end to end patches/s (B=100)"
        out.append(target_row("n20_patches_per_s", description, best, True, h100, "best point of this sweep"))
    n200 = [p for p in rows if (p["n_patches"], p["batch_size"]) == (200, 100)]
    if n200:
        ok = [p for p in n200 if p["status"] == "ok"]
        fits = [p["peak_memory_bytes"] / 2**30 for p in ok if p["peak_memory_bytes"]]
        note = "torch.cuda.max_memory_allocated" if fits else "no n=200 point ran"
        row = target_row("n200_memory_gib", "n=200 peak memory (GiB)", min(fits, default=None), False, h100, note)
        if not fits and any(p["status"] == "oom" for p in n200):
            row.update(met=False, note="out of memory")
        epoch = 50_000 / max(p["images_per_s"] for p in ok) if ok else None
        description = "one CIFAR-10 epoch at n=200 (s, 50,000 images)"
        out += [row, target_row("n200_epoch_seconds", description, epoch, False, h100, "fastest point of this sweep")]
    return out


def run_throughput(base, axes: dict, args, results: harness.Results, data: harness.Data) -> dict:
    """The whole sweep, written after every point; every point's config, machine and data are checked (one line
    each) before anything is measured."""
    todo = [point_config(base, p, 1 + args.warmup + args.steps + args.split_steps + 1) for p in points(base, axes)]
    environment, device = results.environment, [data.check(cfg) for cfg in todo][0].device
    peak = peak_info(device, environment.get("device_name", ""), args.peak_size)
    rows, baselines = [], []

    def result() -> dict:
        rates = {(b["n_patches"], b["batch_size"]): b.get("images_per_s") for b in baselines if b["status"] == "ok"}
        for p in rows:
            rate = rates.get((p["n_patches"], p["batch_size"]))
            p["speedup_vs_baseline"] = p["images_per_s"] / rate if rate and p["status"] == "ok" else None
        notes = ["CPU timings are noisy: shared cores; MFU is against an fp32 matmul."] if device.type == "cpu" else []
        return {
            "config": to_dict(base),
            "axes": {k: v for k, v in axes.items() if v},
            "data": next((p["data"] for p in rows if p.get("data")), base.data.source),
            "flops_per_patch": flops_per_patch(base.model, image_size=base.augment.crop_size),
            "peak": peak,
            "settings": {"warmup_steps": args.warmup, "timed_steps": args.steps, "split_steps": args.split_steps},
            "points": rows,
            "baselines": baselines,
            "baseline_description": baselines[0].get("description", "") if baselines else "",
            "targets": targets(rows, environment),
            "notes": notes,
        }

    def measure(cfg) -> dict:
        scaled = distributed.world_size() > 1
        return (measure_scaling if scaled else measure_point)(
            cfg, data, args.warmup, args.steps, args.split_steps, peak
        )

    def label(cfg) -> dict:
        return {axis: value_of(cfg, key) for axis, key in AXES.items()}

    rows += harness.run_points(todo, measure, label, device, lambda _: results.write(result()))
    if args.baseline and distributed.world_size() == 1:
        from .baseline import measure_baseline

        pairs = sorted({(p["n_patches"], p["batch_size"]) for p in rows})
        cfgs = [point_config(base, {"n_patches": n, "batch_size": b}, 1) for n, b in pairs]

        def baseline(cfg) -> dict:
            images = data.load(cfg, "train", torch.device("cpu")).images
            return measure_baseline(cfg, images, device, args.baseline_workers, steps=args.baseline_steps)

        label_nb = lambda cfg: {"n_patches": cfg.train.n_patches, "batch_size": cfg.train.batch_size}  # noqa: E731
        baselines += harness.run_points(cfgs, baseline, label_nb, device, lambda _: results.write(result()))
    return results.write(result(), final=True)


def markdown(result: dict) -> str:
    env, peak, settings = result["environment"], result["peak"], result["settings"]
    sheet = f"{peak['datasheet_tflops']:.0f} TFLOP/s ({peak['datasheet_label']})" if peak["datasheet_tflops"] else "n/a"
    ok = [p for p in result["points"] if p["status"] == "ok"]
    on_cuda = str(env.get("device")).startswith("cuda")
    lines = [
        f"# Throughput: {device_label(env)} ({env.get('device')})",
        "",
        f"- data: {result['data']}",
        f"- FLOPs per training patch: {result['flops_per_patch'] / 1e9:.3f} GFLOP (fastemp.model.flops_per_patch)",
        f"- measured peak: {fmt(peak['measured_tflops'])} TFLOP/s ({peak['dtype']} {peak['matmul_size']}^3 matmul, "
        f"this run); datasheet: {sheet}",
        f"- median over {settings['timed_steps']} timed steps after {settings['warmup_steps']} warm-up steps; the "
        "first step (compilation) apart",
        "",
        markdown_table(
            "n|B|backend|compile|precision|chunks|images/s|patches/s|TFLOP/s|MFU (measured peak)|MFU (datasheet)".split(
                "|"
            )
            + ["peak mem GiB", "first-step extra s", "x baseline"],
            [
                [p["n_patches"], p["batch_size"], *(p["resolved"][k] for k in ("backend", "compile", "precision"))]
                + [p["grad_chunks_used"], p["images_per_s"], p["patches_per_s"], p["achieved_tflops"]]
                + [pct(p["mfu"]), pct(p["mfu_datasheet"])]
                + [p["peak_memory_bytes"] / 2**30 if on_cuda else f"{p['peak_memory_bytes'] / 2**30:.2f} (rss delta)"]
                + [p["compile_seconds"], p.get("speedup_vs_baseline")]
                for p in ok
            ],
        ),
    ]
    split = [p for p in ok if p["split"]]
    if split:
        lines += ["", f"## Step split (ms, medians, {split[0]['split']['clock']})", ""]
        lines.append(
            markdown_table(
                ["n", "B", "backend", "compile", "data", "fwd+bwd", "loss", "optimizer", "sum", "end-to-end step"],
                [
                    [p["n_patches"], p["batch_size"], p["resolved"]["backend"], p["resolved"]["compile"]]
                    + [p["split"][k] * 1e3 for k in ("data", "forward_backward", "loss", "optimizer", "total")]
                    + [p["step_seconds_median"] * 1e3]
                    for p in split
                ],
            )
        )
    scaled = [p for p in ok if p.get("world_size")]
    if scaled:
        lines += ["", "## Scaling under torchrun (1 process = rank 0 alone, same global batch)", ""]
        headers = ["n", "B (global)", "processes", "1-process images/s", "per-rank images/s", "total images/s"]
        rows = [
            [p["n_patches"], p["batch_size"], p["world_size"], p["single_process_images_per_s"]]
            + [", ".join(f"{x:.3g}" for x in p["per_rank_images_per_s"]), p["total_images_per_s"]]
            + [pct(p["scaling_efficiency"])]
            for p in scaled
        ]
        lines.append(markdown_table([*headers, "scaling efficiency"], rows))
    failed = [p for p in result["points"] if p["status"] != "ok"]
    lines += ["", "## Points without numbers", ""] if failed else []
    lines += [f"- {', '.join(f'{k}={p[k]}' for k in AXES)}: {p['status']} ({p['reason']})" for p in failed]
    if result["baselines"]:
        keys = ("n_patches", "batch_size", "status", "images_per_s", "patches_per_s", "workers")
        rows = [[b.get(k) for k in keys] + [pct(b.get("data_wait_fraction"))] for b in result["baselines"]]
        lines += ["", "## Reference-style baseline (same run)", "", result["baseline_description"], ""]
        lines.append(markdown_table(["n", "B", "status", "images/s", "patches/s", "workers", "data wait"], rows))
    if result["targets"]:
        lines += ["", targets_markdown(result["targets"])]
    lines += ["", environment_markdown(env)] + [f"- note: {note}" for note in result["notes"]]
    return "\n".join(lines)
