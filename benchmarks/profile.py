"""`fastemp bench profile`: where a training step's time goes, op by op (torch.profiler).

The step split of `fastemp bench throughput` says which phase costs what; this says which kernels.
It builds the Trainer of a config (as a throughput point does), runs the first step (compilation)
and `warmup` steps untraced, then traces `steps` steps of the Trainer's own train_until and
reports the ops with the most self time on the device (CUDA kernels on a GPU, CPU ops on the CPU),
per step, with a coarse category per op (convolution, matmul, Triton, BatchNorm, copy, other) so the
totals say what kind of work the step is made of. `--trace FILE` also writes the Chrome trace.
"""

from __future__ import annotations

import re
from collections import defaultdict

import torch

from fastemp.config import Config, to_dict

from .report import device_label, environment_markdown, markdown_table, pct

# first match wins; names are CUDA kernel names on a GPU, aten op names on the CPU
CATEGORIES = (
    ("convolution", r"conv|cudnn|xmma|implicit_gemm|winograd|fprop|dgrad|wgrad"),
    ("matmul", r"gemm|cutlass|matmul|\bmm\b|addmm|linear|nvjet"),
    ("triton", r"^triton|_kernel$"),
    ("batchnorm", r"batch_norm|batchnorm|\bbn_"),
    ("copy", r"copy|memcpy|memset|fill|cat\b|clone|contiguous"),
)


def category(name: str) -> str:
    for label, pattern in CATEGORIES:
        if re.search(pattern, name, flags=re.I):
            return label
    return "other"


def _self_us(event, on_cuda: bool) -> float:
    """Self time of a key-averaged event in microseconds, on the device that matters."""
    if on_cuda:
        return float(getattr(event, "self_device_time_total", 0.0) or getattr(event, "self_cuda_time_total", 0.0))
    return float(event.self_cpu_time_total)


def profile_steps(cfg: Config, data, warmup: int, steps: int, top: int, trace: str | None = None) -> dict:
    """Trace `steps` training steps after compilation and warm-up; the result (JSON-ready)."""
    from torch.profiler import ProfilerActivity, profile

    cfg.train.max_steps, cfg.eval.at_end, cfg.eval.every = 1 + warmup + steps, False, "0"
    trainer = data.trainer(cfg)
    on_cuda = trainer.device.type == "cuda"
    trainer.train_until(1 + warmup)
    sync = torch.cuda.synchronize if on_cuda else lambda: None
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with profile(activities=activities) as prof:
        trainer.train_until(1 + warmup + steps)
        sync()
    if trace:
        prof.export_chrome_trace(trace)
    events = [(e.key, e.count, _self_us(e, on_cuda)) for e in prof.key_averages() if _self_us(e, on_cuda) > 0]
    total = sum(us for *_, us in events)
    rows = [
        {"name": k, "category": category(k), "calls_per_step": c / steps, "ms_per_step": us / steps / 1e3}
        | {"share": us / total}
        for k, c, us in sorted(events, key=lambda e: -e[2])
    ]
    by_category: dict[str, float] = defaultdict(float)
    for row in rows:
        by_category[row["category"]] += row["ms_per_step"]
    return {
        "config": to_dict(cfg),
        "resolved": trainer.runtime.resolved(),
        "clock": "self CUDA time of each kernel" if on_cuda else "self CPU time of each op",
        "steps": steps,
        "ms_per_step": total / steps / 1e3,
        "categories": {
            k: {"ms_per_step": v, "share": v * steps * 1e3 / total}
            for k, v in sorted(by_category.items(), key=lambda kv: -kv[1])
        },
        "top": rows[:top],
    }


def markdown(result: dict) -> str:
    cfg, resolved = result["config"], result["resolved"]
    rows = [
        [r["name"][:90], r["category"], r["calls_per_step"], r["ms_per_step"], pct(r["share"])] for r in result["top"]
    ]
    return "\n".join(
        [
            f"# Profile: {device_label(result['environment'])}",
            "",
            f"- n={cfg['train']['n_patches']}, B={cfg['train']['batch_size']}, backend {resolved['backend']}, "
            f"compile {resolved['compile']}, {resolved['precision']}, fused loss {resolved['fused_loss']}",
            f"- {result['steps']} traced steps after compilation and warm-up; {result['clock']}: "
            f"{result['ms_per_step']:.2f} ms per step in all",
            "",
            markdown_table(
                ["category", "ms per step", "share"],
                [[k, v["ms_per_step"], pct(v["share"])] for k, v in result["categories"].items()],
            ),
            "",
            markdown_table(["op", "category", "calls per step", "ms per step", "share"], rows),
            "",
            environment_markdown(result["environment"]),
        ]
    )
