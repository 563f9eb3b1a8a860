"""`fastemp bench time-to-accuracy`: training seconds until the linear probe reaches a target.

Trains with Trainer.train_until in chunks of `eval_every` steps and runs Trainer.evaluate after each
chunk under the config's eval protocol: official by default (docs/evaluation.md; `--protocol cheap` for
quick curves). The headline accuracy is the FINAL probe epoch; the best probe epoch, selected on the test
split, is reported apart. `compare_protocol` also scores every evaluated checkpoint under a second
protocol, so the offset between the two is measured on the same weights. Evaluation
time is kept off the training clock and reported separately. The training clock is the Trainer's
own (warm-up + timed steps, each chunk ending in a sync); the very first step, which includes
compilation, is reported apart and the target is judged on the clock without it (both are in
the JSON). The reported time is that of the first evaluation at or above the target, so it is an
upper bound at the resolution of `eval_every` steps. Stops at the target or at the end of the
config's schedule (train.epochs / train.max_steps; the cosine schedule spans all of it).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from fastemp import runs
from fastemp.config import Config, eval_config, eval_protocol_name, to_dict
from fastemp.train import Trainer

from . import common


def eval_schedule(total_steps: int, eval_every: int) -> list[int]:
    """The steps after which to evaluate: every eval_every steps, and the last step."""
    if eval_every <= 0:
        raise ValueError(f"eval_every must be positive, got {eval_every}")
    stops = list(range(eval_every, total_steps, eval_every))
    return stops + [total_steps]


def training_clock(trainer: Trainer) -> float:
    """Seconds spent in training steps so far (the Trainer's clock; evaluation is never on it)."""
    return trainer.warmup_seconds + trainer.train_seconds


def run_time_to_accuracy(
    cfg: Config,
    target: float,
    eval_every: int | None = None,
    max_wall_seconds: float | None = None,
    milestones: Sequence[float] = (),
    on_progress: Callable[[dict], None] | None = None,
    compare_protocol: str | None = None,
) -> dict:
    """Train until the linear probe reaches `target` top-1; every number of the run.

    max_wall_seconds (training + evaluation + setup) stops an unfinished run before the next chunk
    of training and its evaluation would end past it (predicted from the last chunk's), still
    writing its results (for remote calls with a hard time limit). `milestones` are lower
    accuracies whose first-reached times are reported too. on_progress(result) is called after
    every evaluation with the result so far ("partial": true).
    """
    wall_start = time.perf_counter()
    cfg = copy.deepcopy(cfg)
    cfg.eval.at_end = False
    compare = eval_config(compare_protocol, base=cfg.eval) if compare_protocol else None
    trainer = Trainer(cfg, None, progress=False)
    environment = runs.environment(trainer.device)
    eval_every = eval_every or max(1, trainer.steps_per_epoch // 2)
    trainer.train_until(1)
    first_step = training_clock(trainer)
    evals: list[dict] = []
    state = {"reached": None, "stopped_early": False}

    def assemble(partial: bool) -> dict:
        reached = state["reached"]
        result = {
            **common.base_result("time_to_accuracy", environment),
            "partial": partial,
            "config": to_dict(cfg),
            "target": target,
            "reached": reached is not None,
            "stopped_at_wall_limit": state["stopped_early"],
            "max_wall_seconds": max_wall_seconds,
            "train_seconds": reached["train_seconds_excl_first_step"] if reached else None,
            "train_seconds_incl_first_step": reached["train_seconds"] if reached else None,
            "first_step_seconds": first_step,
            "epochs": reached["epoch"] if reached else None,
            "steps": reached["step"] if reached else None,
            "images_seen": reached["images_seen"] if reached else None,
            "eval_seconds_total": sum(e["eval_seconds"] for e in evals),
            "final_linear_top1": evals[-1]["linear_top1"] if evals else None,
            "final_best_top1_on_test": evals[-1]["best_top1_on_test"] if evals else None,
            "best_linear_top1": max((e["linear_top1"] for e in evals), default=None),
            "protocol_offset": protocol_offset(evals, compare_protocol),
            "milestones": milestone_times(evals, sorted(set(milestones) | {target})),
            "protocol": {
                "name": eval_protocol_name(cfg.eval),
                "eval_mode": cfg.eval.mode,
                "eval_patches": cfg.eval.patches if cfg.eval.mode == "patches" else None,
                "probe_epochs": cfg.eval.probe_epochs,
                "probe_lr": cfg.eval.probe_lr,
                "eval_every_steps": eval_every,
                "probe_batch_size": cfg.eval.probe_batch_size,
                "metric": "linear_top1 (final probe epoch, test split); best_top1_on_test is "
                "the best probe epoch, selected on the test split",
            },
            "data": trainer.train_set.description,
            "test_data": trainer.test_set.description if evals else None,
            "n_patches": cfg.train.n_patches,
            "batch_size": cfg.train.batch_size,
            "epochs_scheduled": trainer.total_steps / trainer.steps_per_epoch,
            "images_per_s": trainer.images_per_second(),
            "evals": evals,
        }
        result["targets"] = tta_targets(result, environment)
        return result

    for stop in eval_schedule(trainer.total_steps, eval_every):
        chunk_start = time.perf_counter()
        trainer.train_until(stop)
        start = time.perf_counter()
        metrics = trainer.evaluate()
        eval_seconds = time.perf_counter() - start
        if compare is not None:  # the same weights under the second protocol, also off the clock
            other = trainer.evaluate(eval_cfg=compare)
            metrics.update(
                {f"{compare_protocol}_{k}": v for k, v in other.items()},
                **{f"{compare_protocol}_eval_seconds": time.perf_counter() - start - eval_seconds},
            )
        clock = training_clock(trainer)
        evals.append(
            {
                "step": trainer.step,
                "epoch": trainer.step / trainer.steps_per_epoch,
                "images_seen": trainer.step * cfg.train.batch_size,
                "train_seconds": clock,
                "train_seconds_excl_first_step": clock - first_step,
                "eval_seconds": eval_seconds,
                **metrics,
            }
        )
        print(
            f"step {trainer.step}: linear top-1 {metrics['linear_top1']:.4f} after "
            f"{clock - first_step:.1f} s of training (+{first_step:.1f} s first step)",
            flush=True,
        )
        if metrics["linear_top1"] >= target:
            state["reached"] = evals[-1]
            break
        chunk_seconds = time.perf_counter() - chunk_start
        if max_wall_seconds and time.perf_counter() - wall_start + chunk_seconds > max_wall_seconds:
            state["stopped_early"] = trainer.step < trainer.total_steps
            break
        if on_progress:
            on_progress(assemble(partial=True))
    return assemble(partial=False)


def protocol_offset(evals: list[dict], other: str | None) -> dict | None:
    """Headline protocol minus `other` on the same checkpoints: linear top-1 per evaluation and its mean."""
    if not other or not evals:
        return None
    offsets = [e["linear_top1"] - e[f"{other}_linear_top1"] for e in evals]
    return {
        "versus": other,
        "per_evaluation": offsets,
        "mean": sum(offsets) / len(offsets),
        "note": "linear_top1 (headline protocol) - linear_top1 (versus), same weights, final probe epochs",
    }


def milestone_times(evals: list[dict], levels: Sequence[float]) -> list[dict]:
    """For each accuracy level: the first evaluation at or above it (training seconds, first step
    excluded, and the epoch), or None when no evaluation got there."""
    out = []
    for level in levels:
        first = next((e for e in evals if e["linear_top1"] >= level), None)
        out.append(
            {
                "top1": level,
                "train_seconds": first["train_seconds_excl_first_step"] if first else None,
                "epoch": first["epoch"] if first else None,
                "step": first["step"] if first else None,
            }
        )
    return out


def tta_targets(result: dict, environment: dict) -> list[dict]:
    """Where the run stands on 'time to 85% <= 45 s' (only when this run's target is 85% at n=20)."""
    if abs(result["target"] - 0.85) > 1e-9 or result["n_patches"] != 20:
        return []
    row = common.target_row(
        "time_to_85_seconds",
        "training seconds to 85% linear probe (n=20)",
        common.TARGETS["time_to_85_seconds"],
        result["train_seconds"],
        False,
        common.on_h100(environment) and result["batch_size"] == 100,
        "first step (compile) excluded; data: " + result["data"],
    )
    if not result["reached"]:
        why = "the wall-clock limit" if result["stopped_at_wall_limit"] else "the schedule"
        row.update(met=False, note=f"target not reached within {why}")
    return [row]


def tta_markdown(result: dict) -> str:
    env, proto = result["environment"], result["protocol"]
    status = (
        f"reached {result['target']:.0%} after **{result['train_seconds']:.1f} s** of training "
        f"({result['epochs']:.2f} epochs, {result['images_seen']:,} images; first step "
        f"{result['first_step_seconds']:.1f} s excluded)"
        if result["reached"]
        else f"did NOT reach {result['target']:.0%} (best linear top-1 {common.fmt(result['best_linear_top1'])}"
        + (", stopped at the wall-clock limit)" if result["stopped_at_wall_limit"] else ")")
    )
    reached = [
        f"{m['top1']:.0%} after {m['train_seconds']:.1f} s (epoch {m['epoch']:.2f})"
        for m in result.get("milestones", [])
        if m["train_seconds"] is not None
    ]
    levels = ", ".join(f"{m['top1']:.0%}" for m in result.get("milestones", []))
    lines = [
        f"# Time to {result['target']:.0%}: {common.device_label(env)} ({env.get('device')})",
        "",
        f"- result: {status}",
        f"- first reached: {'; '.join(reached) if reached else 'none of ' + levels}",
        f"- data: {result['data']}; test: {result['test_data']}",
        f"- schedule: {result.get('epochs_scheduled', 0):g} epochs (cosine over all of them)"
        + (" (partial: the run was still going when this was written)" if result.get("partial") else ""),
        f"- n={result['n_patches']}, B={result['batch_size']}, {result['images_per_s']:.0f} images/s while training",
        f"- evaluation: **{proto.get('name', 'custom')} protocol** ({proto['eval_mode']}, eval patches "
        f"{proto['eval_patches']}, probe epochs {proto['probe_epochs']}), every {proto['eval_every_steps']} "
        f"steps; evaluation time {result['eval_seconds_total']:.1f} s in total, not on the training clock",
        "- linear top-1 = the final probe epoch (the headline); 'best on test' = the best probe epoch, "
        "selected on the test split (what the official script prints too)",
        "",
    ]
    offset = result.get("protocol_offset")
    other = offset["versus"] if offset else None
    headers = ["step", "epoch", "images", "train s", "linear top-1", "best on test", "eval s"]
    headers += [f"{other} linear top-1", f"offset ({proto.get('name')} - {other})"] if other else []
    rows = [
        [
            e["step"],
            e["epoch"],
            e["images_seen"],
            e["train_seconds_excl_first_step"],
            e["linear_top1"],
            e.get("best_top1_on_test"),
            e["eval_seconds"],
        ]
        + ([e[f"{other}_linear_top1"], e["linear_top1"] - e[f"{other}_linear_top1"]] if other else [])
        for e in result["evals"]
    ]
    lines += [common.markdown_table(headers, rows), ""]
    if offset:
        seconds = sum(e[f"{other}_eval_seconds"] for e in result["evals"])
        lines += [
            f"Offset {proto.get('name')} - {other} on the same weights: mean {offset['mean']:+.4f} over "
            f"{len(offset['per_evaluation'])} checkpoints ('eval s' is the {proto.get('name')} protocol's; "
            f"the {other} evaluations took {seconds:.1f} s more, also off the clock).",
            "",
        ]
    if result["targets"]:
        lines += [common.targets_markdown(result["targets"]), ""]
    lines += ["## Environment", "", common.environment_markdown(env)]
    return "\n".join(lines)


def plot_accuracy(result: dict, path: Path) -> Path | None:
    """PNG of linear top-1 vs training seconds with the target line; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    evals = result["evals"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([e["train_seconds_excl_first_step"] for e in evals], [e["linear_top1"] for e in evals], marker="o")
    ax.axhline(result["target"], color="gray", linestyle="--", label=f"target {result['target']:.0%}")
    ax.set_xlabel("training seconds (first step excluded)")
    ax.set_ylabel("linear probe top-1")
    ax.set_title(f"{common.device_label(result['environment'])}, n={result['n_patches']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
