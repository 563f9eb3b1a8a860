"""Micro-timings of a step's parts outside the model, each fast path beside the path it replaced.

    python3 -m fastemp.benchmarks.step_parts [--device cpu|cuda] [--n 20] [--batch 100] [--out DIR]

    lars     the standard model's 34M parameters, one optimizer step with random gradients:
             check.reference.ReferenceLARS (the per-tensor rule, lists of 0-d factors, then torch SGD),
             LARS eager (adaptation in segment views, then torch SGD), LARS fused (one compiled pass)
    patches  one step's n*B patches of the torch backend: eager recipe, compiled recipe

Median of --iters timed calls after --warmup untimed ones (compilation happens in the warm-up and is
reported apart), synchronised on CUDA. What it measures on a CPU says little about a GPU: on the CPU
foreach ops loop over tensors either way and nothing is launch-bound.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from fastemp import runs
from fastemp.check.reference import reference_lars
from fastemp.config import AugmentConfig, ModelConfig, OptimConfig
from fastemp.lars import build_lars
from fastemp.model import build_model
from fastemp.patches.torch_backend import TorchPatches

from . import common


def timed(fn, device: torch.device, warmup: int, iters: int) -> dict:
    """Median and min seconds of fn() over iters calls, after warmup calls (the first one timed apart)."""

    def once() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    first = once()
    for _ in range(max(0, warmup - 1)):
        once()
    seconds = [once() for _ in range(iters)]
    return {"first_call_s": first, "median_s": common.median(seconds), "min_s": min(seconds), "iters": iters}


def lars_rows(
    device: torch.device, warmup: int, iters: int, model_cfg: ModelConfig | None = None, fused: bool = True
) -> list[dict]:
    """One row per LARS path (fused: include the compiled one) over model_cfg's parameters (default: standard)."""
    o = OptimConfig()
    rows = []
    makers = {
        "reference (per-tensor 0-d factors) + torch SGD": lambda m: reference_lars(m, o),
        "eager (segment views) + torch SGD": lambda m: build_lars(m, o),
        "fused (one compiled pass)": lambda m: build_lars(m, o, fused_update=True),
    }
    if not fused:
        makers.pop("fused (one compiled pass)")
    for name, make in makers.items():
        torch.manual_seed(0)
        model = build_model(model_cfg or ModelConfig()).to(device).to(memory_format=torch.channels_last)
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-2
        grads = [p.grad.clone() for p in model.parameters()]
        opt = make(model)

        def copy_grads(model=model, grads=grads):
            for p, g in zip(model.parameters(), grads):
                p.grad.copy_(g)  # the adaptation rewrites gradients: the same ones every call

        def step(opt=opt, copy_grads=copy_grads):
            copy_grads()
            opt.step()

        copy_only = timed(copy_grads, device, 1, iters)
        row = {
            "part": "lars",
            "path": name,
            **timed(step, device, warmup, iters),
            "gradient_copy_median_s": copy_only["median_s"],
            "params": sum(p.numel() for p in model.parameters()),
        }
        rows.append(row)
    return rows


def patch_rows(
    device: torch.device, n: int, batch: int, warmup: int, iters: int, compiled: tuple[bool, ...] = (False, True)
) -> list[dict]:
    """One row per recipe (eager, compiled) making one step's n*batch patches."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (5000, 32, 32, 3), generator=gen, dtype=torch.uint8).to(device)
    index = torch.randperm(5000, generator=gen)[:batch].to(device)
    rows = []
    for flag in compiled:
        name = "compiled recipe" if flag else "eager recipe"
        backend = TorchPatches(images, AugmentConfig(), compile_recipe=flag)
        rows.append(
            {
                "part": "patches",
                "path": name,
                "patches": n * batch,
                **timed(lambda backend=backend: backend(index, n, seed=1), device, warmup, iters),
            }
        )
    return rows


def markdown(result: dict) -> str:
    env = result["environment"]
    table = [[r["part"], r["path"], r["median_s"] * 1e3, r["min_s"] * 1e3, r["first_call_s"]] for r in result["rows"]]
    return "\n".join(
        [
            f"# Step parts: {common.device_label(env)} ({env.get('device')})",
            "",
            f"torch {env.get('torch')}, commit {env.get('commit')}, {env.get('cpu_threads')} threads; "
            f"n={result['n']}, B={result['batch']}. LARS rows include re-copying the gradients "
            "(gradient_copy_median_s in the JSON).",
            "",
            common.markdown_table(["part", "path", "median ms", "min ms", "first call s"], table),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m fastemp.benchmarks.step_parts", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", default=None, help="folder for step_parts.json/.md (default: print only)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    result = {
        **common.base_result("step_parts", runs.environment(device)),
        "n": args.n,
        "batch": args.batch,
        "rows": lars_rows(device, args.warmup, args.iters)
        + patch_rows(device, args.n, args.batch, args.warmup, args.iters),
    }
    text = markdown(result)
    print(text)
    if args.out:
        common.write_results(Path(args.out), "step_parts", result, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
