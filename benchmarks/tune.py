"""`fastemp tune`: find the fastest settings for your card and write them as a config you can train.

Objective: end-to-end training images/s (the uninstrumented Trainer.train_until, median step
time, as `fastemp bench throughput` measures it) at YOUR n_patches. n is part of the method (it
changes what the model learns and the accuracy per epoch), so it is only swept when you pass
--n. The batch size is swept, but it is part of the method too: the TCR term and BatchNorm see
B images and an epoch has N/B steps, and the learning rate is NOT rescaled; pass --batch with a
single value to keep yours. Backend, compile mode (incl. CUDA graphs: reduce-overhead),
cudnn.benchmark and the compiled patch recipe change only speed (and, for DALI, the augmentation's
small documented differences; the compiled recipe, float rounding).

Memory: a point whose peak (torch.cuda.max_memory_allocated, dataset and model included) exceeds
the budget (default 90% of the card, leaving room for the CUDA context and allocator caching) or
runs out of memory is retried with twice the gradient-cache chunks (exact same gradients, less
memory, some recompute), up to n chunks. On the CPU there is no budget.

The winner is written as YAML (the base config with the winning values; train with
`fastemp train --config tuned.yaml`) and every point as JSON beside it.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import yaml

from fastemp import runs
from fastemp.config import Config, apply_overrides, to_dict
from fastemp.runtime import resolve_device

from . import common
from .throughput import AXES, config_value, run_point, sweep_points

# Settings that change only speed, swept by tune on top of the throughput axes: cuDNN's convolution
# autotuning and the compiled patch recipe (the compile mode, incl. CUDA graphs, is a throughput axis).
SETTINGS = {"cudnn_benchmark": "model.cudnn_benchmark", "patch_compile": "data.patch_compile"}


def default_budget_bytes(device: torch.device) -> int | None:
    """90% of the card's memory on CUDA, no budget on the CPU."""
    if device.type != "cuda":
        return None
    return int(0.9 * torch.cuda.get_device_properties(device).total_memory)


def fits(row: dict, budget: int | None) -> bool:
    """A measured point that ran and stayed within the memory budget."""
    if row["status"] != "ok":
        return False
    return budget is None or row["peak_memory_bytes"] <= budget


def more_chunks(chunks: int, n: int, bn_groups: int) -> int | None:
    """The next gradient-cache chunk count to try when `chunks` did not fit: twice as many (at most n), or
    with BatchNorm groups the next divisor of them (chunks hold whole groups); None when there is none
    (or chunks is 0: the Trainer already chose them from free memory)."""
    if chunks == 0:
        return None
    if bn_groups:
        return next((c for c in range(2 * chunks, bn_groups + 1) if bn_groups % c == 0), None)
    return min(n, 2 * chunks) if chunks < n else None


def measure_fitting(
    base: Config,
    point: dict,
    device: str,
    budget: int | None,
    warmup: int,
    steps: int,
    peak: dict,
    datasets: common.DatasetCache,
    max_doublings: int = 3,
) -> list[dict]:
    """Measure a point; when it does not fit, retry with more grad_chunks (more_chunks). All attempts returned."""
    attempts = []
    point = dict(point)
    for _ in range(max_doublings + 1):
        row = run_point(base, point, device, warmup, steps, split_steps=0, peak=peak, datasets=datasets)
        row["fits_budget"] = fits(row, budget)
        attempts.append(row)
        over = row["status"] == "oom" or (row["status"] == "ok" and not row["fits_budget"])
        following = more_chunks(point["grad_chunks"], point["n_patches"], base.train.bn_groups)
        if not over or following is None:
            break
        point["grad_chunks"] = following
    return attempts


def settings_variants(base: Config, settings: dict[str, list | None]) -> list[dict]:
    """Every combination of the speed-only settings to try; a setting left None keeps the config's value."""
    return common.grid({name: (settings.get(name) or [config_value(base, key)]) for name, key in SETTINGS.items()})


def with_settings(base: Config, setting: dict) -> Config:
    """The base config with one combination of SETTINGS applied."""
    cfg = copy.deepcopy(base)
    apply_overrides(cfg, [f"{SETTINGS[name]}={value}" for name, value in setting.items()])
    return cfg


def best_point(rows: list[dict]) -> dict | None:
    """The fastest point that fits, by end-to-end images/s."""
    candidates = [r for r in rows if r.get("fits_budget")]
    return max(candidates, key=lambda r: r["images_per_s"], default=None)


def tuned_config(base: Config, best: dict) -> Config:
    """The base config with the winning values, 'auto' resolved (device, schedule, the rest kept)."""
    cfg = with_settings(base, {name: best[name] for name in SETTINGS if name in best})
    values = {
        **{axis: best[axis] for axis in AXES},
        **{k: best["resolved"][k] for k in ("backend", "compile", "precision")},
    }
    apply_overrides(cfg, [f"{key}={values[axis]}" for axis, key in AXES.items()])
    cfg.name = f"{base.name}_tuned"
    return cfg


def write_tuned_yaml(cfg: Config, best: dict, environment: dict, path: Path) -> Path:
    """The config as YAML, headed by a comment saying what was measured where."""
    header = [
        f"# Written by `fastemp tune` on {common.device_label(environment)} ({environment.get('device')}), "
        f"{common.now_iso()}.",
        f"# Fastest point within the memory budget: {best['images_per_s']:.1f} images/s end to end "
        f"(n={best['n_patches']}, B={best['batch_size']}, backend={best['resolved']['backend']}, "
        f"compile={best['resolved']['compile']}, grad_chunks={best['grad_chunks']}, "
        f"cudnn_benchmark={best.get('cudnn_benchmark')}, patch_compile={best.get('patch_compile')}).",
        "# Train with: fastemp train --config <this file>",
    ]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(header) + "\n" + yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path


def run_tune(
    base: Config,
    axes: dict[str, list | None],
    device: str = "auto",
    budget_gib: float | None = None,
    warmup: int = 3,
    steps: int = 20,
    settings: dict[str, list | None] | None = None,
    on_point=None,
) -> dict:
    """Sweep, pick the fastest point that fits; returns the JSON-ready result with 'best' and 'config'.

    settings: values of the SETTINGS to try (cudnn_benchmark, patch_compile), each combination a
    sweep of `axes` of its own; every row records the combination it ran with. on_point(result), when
    given, gets the result so far (marked partial) after every point: a run cut short keeps its rows."""
    dev = resolve_device(device)
    environment = runs.environment(dev)
    budget = int(budget_gib * 2**30) if budget_gib else default_budget_bytes(dev)
    peak = common.peak_info(dev, environment.get("device_name", ""))
    rows, datasets = [], common.DatasetCache()

    def result(partial: bool) -> dict:
        best = best_point(rows)
        return {
            **common.base_result("tune", environment),
            "objective": "end-to-end images/s (median step) at the given n; n swept only on request",
            "memory_budget_bytes": budget,
            "axes": {k: v for k, v in {**axes, **(settings or {})}.items() if v},
            "settings": {"warmup_steps": warmup, "timed_steps": steps},
            "partial": partial,
            "points": rows,
            "best": best,
            "config": to_dict(tuned_config(base, best)) if best else None,
        }

    for setting in settings_variants(base, settings or {}):
        variant = with_settings(base, setting)
        for point in sweep_points(variant, axes):
            rows += [
                {**row, **setting}
                for row in measure_fitting(variant, point, device, budget, warmup, steps, peak, datasets)
            ]
            if on_point:
                on_point(result(partial=True))
    return result(partial=False)


def tune_markdown(result: dict) -> str:
    env = result["environment"]
    budget = result["memory_budget_bytes"]
    rows = [
        [
            r["n_patches"],
            r["batch_size"],
            r["backend"],
            r["compile"],
            r["grad_chunks"],
            r.get("cudnn_benchmark"),
            r.get("patch_compile"),
            r["status"],
            r.get("images_per_s"),
            r["peak_memory_bytes"] / 2**30 if r.get("peak_memory_bytes") is not None else None,
            r.get("fits_budget"),
        ]
        for r in result["points"]
    ]
    best = result["best"]
    won = (
        "- winner: none within the memory budget"
        if best is None
        else f"- winner: {best['images_per_s']:.1f} images/s with compile={best['resolved']['compile']}, "
        f"cudnn_benchmark={best.get('cudnn_benchmark')}, patch_compile={best.get('patch_compile')}, "
        f"backend={best['resolved']['backend']}, B={best['batch_size']}, grad_chunks={best['grad_chunks']}"
    )
    lines = [
        f"# Tune: {common.device_label(env)} ({env.get('device')})",
        "",
        f"- objective: {result['objective']}",
        f"- memory budget: {budget / 2**30:.1f} GiB" if budget else "- memory budget: none (CPU)",
        won,
        "",
        common.markdown_table(
            [
                "n",
                "B",
                "backend",
                "compile",
                "chunks",
                "cudnn bench",
                "patch compile",
                "status",
                "images/s",
                "peak GiB",
                "fits",
            ],
            rows,
        ),
    ]
    return "\n".join(lines)
