"""`fastemp tune`: the fastest settings for this card (end-to-end images/s of a throughput point at YOUR n_patches),
written as a config to train with. By default it tries n as configured (swept only with --n); batch sizes B and 2B
(B changes the method too: TCR and BatchNorm see B images, the learning rate is not rescaled; pass one --batch to keep
yours); the backends the data allows (torch, or pillow and dali); on CUDA the compile modes default,
max-autotune-no-cudagraphs and reduce-overhead, each with cudnn_benchmark off and on. A point over the memory budget
(default 90% of the card; none on the CPU) or out of memory is measured again with more gradient-cache chunks (the
same gradients, less memory) while there are more; one that fails otherwise says so.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import yaml

from fastemp.config import apply_overrides, to_dict
from fastemp.patches import dali_available

from . import harness
from .report import device_label, table
from .throughput import AXES, axes_of, measure_point, point_config, points


def more_chunks(chunks: int, n: int, bn_groups: int) -> int | None:
    """The next gradient-cache chunk count when `chunks` did not fit: twice as many (at most n), or with BatchNorm
    groups the next divisor of them (chunks hold whole groups); None when there is none (0: already chosen from
    free memory)."""
    if chunks == 0:
        return None
    if bn_groups:
        return next((c for c in range(2 * chunks, bn_groups + 1) if bn_groups % c == 0), None)
    return min(n, 2 * chunks) if chunks < n else None


def run(args, base, results: harness.Results) -> dict:
    """Every point of the axes given, or of the defaults (checked before anything is measured), each measured again
    with more chunks while over the budget; the fastest that fits is `best`."""
    cuda = results.environment["device"].startswith("cuda")
    streamed = ["pillow", "dali"] if dali_available() else ["pillow"]
    axes = {**axes_of(args), "batch_size": args.batch or [base.train.batch_size, 2 * base.train.batch_size]}
    axes["backend"] = args.backend or (streamed if base.data.streamed else ["torch"])
    axes["compile"] = args.compile or (["default", "max-autotune-no-cudagraphs", "reduce-overhead"] if cuda else None)
    axes["cudnn_benchmark"] = args.cudnn_benchmark or (["off", "on"] if cuda else None)
    axes["patch_compile"] = args.patch_compile
    steps, data = 1 + args.warmup + args.steps + 1, harness.Data()
    todo = [(point, point_config(base, point, steps)) for point in points(base, axes)]
    device = [data.check(cfg) for _, cfg in todo][0].device
    budget = int(args.memory_budget_gib * 2**30) if args.memory_budget_gib else None
    if budget is None and device.type == "cuda":
        budget = int(0.9 * torch.cuda.get_device_properties(device).total_memory)
    measure = lambda cfg: measure_point(cfg, data, args.warmup, args.steps, 0, None)  # noqa: E731
    rows: list[dict] = []

    def result() -> dict:
        fitting = [r for r in rows if r.get("fits_budget")]
        best = max(fitting, key=lambda r: r["images_per_s"], default=None)
        return {
            "objective": "end-to-end images/s (median step) at the given n; n swept only on request",
            "memory_budget_bytes": budget,
            "axes": {k: v for k, v in axes.items() if v},
            "settings": {"warmup_steps": args.warmup, "timed_steps": args.steps},
            "points": rows,
            "best": best,
            "config": to_dict(tuned_config(base, best)) if best else None,
        }

    for point, cfg in todo:
        while True:
            (row,) = harness.run_points([cfg], measure, lambda _, p=point: {**p})
            over = row["status"] == "oom" or (row["status"] == "ok" and budget and row["peak_memory_bytes"] > budget)
            rows.append({**row, "fits_budget": row["status"] == "ok" and not over})
            results.write(result())
            following = more_chunks(point["grad_chunks"], point["n_patches"], base.train.bn_groups)
            if not over or following is None:
                break
            point = {**point, "grad_chunks": following}
            cfg = point_config(cfg, {"grad_chunks": following}, steps)
    return results.write(result(), final=True)


def tuned_config(base, best: dict):
    """The base config with the winning values, 'auto' resolved (device, schedule, the rest kept)."""
    values = {**best, **{k: best["resolved"][k] for k in ("backend", "compile", "precision")}}
    cfg = apply_overrides(copy.deepcopy(base), [f"{key}={values[axis]}" for axis, key in AXES.items()])
    cfg.name = f"{base.name}_tuned"
    return cfg


def no_winner(points: list[dict]) -> str:
    """Why no point won: the memory budget only when a point ran and went over it, else the failures."""
    if any(p["status"] in ("ok", "oom") for p in points):
        return "no point ran within the memory budget"
    return f"every point failed ({points[0]['reason']})" if points else "no point ran"


def winner(best: dict) -> str:
    what = [f"{k}={best[k]}" for k in ("n_patches", "batch_size", "grad_chunks", "cudnn_benchmark", "patch_compile")]
    what += [f"{k}={best['resolved'][k]}" for k in ("backend", "compile")]
    return f"{best['images_per_s']:.1f} images/s with {', '.join(what)}"


def write_config(result: dict, path: Path) -> int:
    """tuned.yaml, headed by what was measured where; 1 with the reason when no point won."""
    best, env = result["best"], result["environment"]
    if best is None:
        print(f"fastemp tune: {no_winner(result['points'])}; nothing written to {path}")
        return 1
    header = [
        f"# Written by `fastemp tune` on {device_label(env)} ({env.get('device')}), {result['created']}.",
        f"# Fastest point within the memory budget: {winner(best)}.",
        "# Train with: fastemp train --config <this file>",
    ]
    path.write_text("\n".join(header) + "\n" + yaml.safe_dump(result["config"], sort_keys=False))
    print(f"wrote {path} ({best['images_per_s']:.1f} images/s); train with: fastemp train --config {path}")
    return 0


def markdown(result: dict) -> str:
    budget, best = result["memory_budget_bytes"], result["best"]
    keys = "n_patches batch_size backend compile grad_chunks cudnn_benchmark patch_compile status images_per_s"
    headers = "n|B|backend|compile|chunks|cudnn bench|patch compile|status|images/s|peak GiB|fits|reason"
    return harness.page(
        result,
        "Tune",
        f"- objective: {result['objective']}",
        f"- memory budget: {budget / 2**30:.1f} GiB" if budget else "- memory budget: none (CPU)",
        f"- winner: {winner(best) if best else 'none: ' + no_winner(result['points'])}",
        "",
        table(result["points"], f"{keys} peak_memory_bytes:GiB fits_budget reason", headers),
    )
