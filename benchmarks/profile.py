"""`fastemp bench profile`: where a training step's time goes, op by op (torch.profiler). The Trainer of a config
runs its first step (compilation) and `warmup` steps untraced, then `steps` traced steps of its own train_until; the
report: the ops with the most self time on the device (CUDA kernels on a GPU, CPU ops on the CPU) per step, each in
a coarse category (convolution, matmul, Triton, BatchNorm, copy, other). `--trace FILE` writes the Chrome trace.
"""

from __future__ import annotations

import re
from collections import Counter

import torch

from fastemp.config import Config, to_dict

from . import harness
from .report import table

# first match wins; names are CUDA kernel names on a GPU, aten op names on the CPU
CATEGORIES = (
    ("convolution", r"conv|cudnn|xmma|implicit_gemm|winograd|fprop|dgrad|wgrad"),
    ("matmul", r"gemm|cutlass|matmul|\bmm\b|addmm|linear|nvjet"),
    ("triton", r"^triton|_kernel$"),
    ("batchnorm", r"batch_norm|batchnorm|\bbn_"),
    ("copy", r"copy|memcpy|memset|fill|cat\b|clone|contiguous"),
)
TOP = 25  # the most expensive ops listed


def category(name: str) -> str:
    return next((label for label, pattern in CATEGORIES if re.search(pattern, name, flags=re.I)), "other")


def run(args, cfg: Config, results: harness.Results) -> dict:
    from torch.profiler import ProfilerActivity, profile

    warmup, steps = args.warmup, args.steps
    cfg.train.max_steps, cfg.eval.at_end, cfg.eval.every = 1 + warmup + steps, False, "0"
    trainer = harness.Data().trainer(cfg)
    on_cuda = trainer.device.type == "cuda"
    trainer.train_until(1 + warmup)
    sync = torch.cuda.synchronize if on_cuda else lambda: None
    sync()
    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * on_cuda) as prof:
        trainer.train_until(1 + warmup + steps)
        sync()
    if args.trace:
        prof.export_chrome_trace(args.trace)
    # self time on the device that matters, in microseconds
    us = (lambda e: e.self_device_time_total) if on_cuda else (lambda e: e.self_cpu_time_total)
    events = sorted(((e.key, e.count, float(us(e))) for e in prof.key_averages() if us(e) > 0), key=lambda e: -e[2])
    total = sum(t for *_, t in events)
    rows = [
        {"name": k, "category": category(k), "calls_per_step": c / steps, "ms_per_step": t / steps / 1e3}
        | {"share": t / total}
        for k, c, t in events
    ]
    by_category = Counter()
    for row in rows:
        by_category[row["category"]] += row["ms_per_step"]
    result = {
        "config": to_dict(cfg),
        "resolved": trainer.runtime.resolved(),
        "clock": "self CUDA time of each kernel" if on_cuda else "self CPU time of each op",
        "steps": steps,
        "ms_per_step": total / steps / 1e3,
        "categories": {k: {"ms_per_step": v, "share": v * steps * 1e3 / total} for k, v in by_category.most_common()},
        "top": rows[:TOP],
    }
    return results.write(result, final=True)


def markdown(result: dict) -> str:
    cfg, resolved = result["config"], result["resolved"]
    categories = [{"name": k, **v} for k, v in result["categories"].items()]
    top = [{**r, "name": r["name"][:90]} for r in result["top"]]
    return harness.page(
        result,
        "Profile",
        f"- n={cfg['train']['n_patches']}, B={cfg['train']['batch_size']}, backend {resolved['backend']}, "
        f"compile {resolved['compile']}, {resolved['precision']}, fused loss {resolved['fused_loss']}",
        f"- {result['steps']} traced steps after compilation and warm-up; {result['clock']}: "
        f"{result['ms_per_step']:.2f} ms per step in all",
        "",
        table(categories, "name ms_per_step share:%", "category|ms per step|share"),
        "",
        table(top, "name category calls_per_step ms_per_step share:%", "op|category|calls per step|ms per step|share"),
    )
