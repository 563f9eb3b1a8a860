"""What the accuracy driver (accuracy.py) reports: the rows over seeds, the official code's runs beside them,
fastemp - official with its uncertainty (docs/evaluation.md), the time-to-accuracy summary; and their markdown."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from fastemp import runs
from fastemp.config import to_dict
from fastemp.evaluate import first_reaching

from .harness import page
from .report import fmt, on_h100, protocol_label, read_result, table, target_row, targets_markdown, time_to_target

DEFAULT_EVAL_SECONDS = 150.0  # ESTIMATE (official protocol, H100/H200, with compilation) until one is measured
MEASURED = ("linear_top1", "best_top1_on_test", "knn_top1", "train_seconds", "first_step_seconds", "eval_seconds")


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _std(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.stdev(values) if len(values) > 1 else None


def summarise(records: list[dict], meta: dict) -> dict:
    """One row of the table: a (row, evaluated epoch, config key) over its seeds' records."""
    first = records[0] if records else meta
    keys = ("row", "recipe", "note", "config_key", "overrides", "dataset", "data_copy", "data_file", "n_patches")
    keys += ("batch_size", "epochs_trained", "schedule_epochs", "protocol", "eval_patches", "probe_epochs")
    out = {k: first.get(k) for k in keys}
    out.update(status=meta["status"], reason=meta["reason"], seeds=[r["seed"] for r in records])
    for key in MEASURED:
        out[key] = [r.get(key) for r in records]
        out[f"{key}_mean"] = _mean(out[key])
    out["linear_top1_std"] = _std(out["linear_top1"])
    out["images_per_s_mean"] = _mean(r.get("images_per_s") for r in records)
    official, mean = first.get("official_linear_top1"), out["linear_top1_mean"]
    out.update(official_linear_top1=official, delta_vs_official=None if None in (mean, official) else mean - official)
    return out


def summarise_rows(records: list[dict], notes: dict) -> list[dict]:
    """Every (row, config key) with records or with a note from this run, in the order first seen."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["row"], r["config_key"]), []).append(r)
    for key in notes:
        groups.setdefault(key, [])
    earlier = {"status": "earlier runs", "reason": ""}
    return [summarise(sorted(g, key=lambda r: r["seed"]), notes.get(k, earlier)) for k, g in groups.items()]


def pairing(record: dict) -> tuple:
    """What must agree for fastemp's and the official code's figures to be compared: n, epochs, schedule, data file,
    protocol and the overrides that reach the official run's evaluation (not fastemp's training-only train/optim/
    loss keys, nor where it ran and where the data lies)."""
    apart = ("train.", "optim.", "loss.", "data.root=", "data.path=", "data.source=", "data.download=")
    overrides = tuple(sorted(o for o in record.get("overrides") or () if not o.startswith(apart)))
    fields = ("n_patches", "epochs_trained", "schedule_epochs", "data_file", "protocol")
    return (*(record.get(k) for k in fields), overrides)


def difference(fastemp: list[float], official: list[float]) -> dict:
    """Both sides' mean and std, fastemp - official and its standard error sqrt(s_f^2/n_f + s_o^2/n_o); with one
    run on a side, the other side's spread stands in (said so); one run each: none."""
    sf, so = _std(fastemp), _std(official)
    out = {"fastemp_mean": statistics.fmean(fastemp), "fastemp_std": sf}
    out.update(official_mean=statistics.fmean(official), official_std=so)
    out.update(delta=out["fastemp_mean"] - out["official_mean"], delta_standard_error=None)
    out["uncertainty"] = "one run each: no seed spread measured yet"
    if sf is not None and so is not None:
        out["delta_standard_error"] = math.sqrt(sf**2 / len(fastemp) + so**2 / len(official))
        out["uncertainty"] = "standard error from both sides' seed spreads"
    elif sf is not None or so is not None:
        spread, side = (sf, "fastemp's") if sf is not None else (so, "the official code's")
        out["delta_standard_error"] = spread * math.sqrt(1 / len(fastemp) + 1 / len(official))
        out["uncertainty"] = f"standard error with {side} seed spread standing in for the other side's (one run there)"
    return out


def comparison(result: dict) -> list[dict]:
    """Each row with official runs that passed under the same pairing: fastemp - official in linear top-1."""
    official = [r for r in result.get("official_runs", []) if r.get("status") == "PASS" and r.get("linear_top1")]
    out = []
    for row in result["rows"]:
        twins, fastemp = [o for o in official if pairing(o) == pairing(row)], [v for v in row["linear_top1"] if v]
        if not twins or not fastemp:
            continue
        theirs, rates = [o["linear_top1"] for o in twins], [o["images_per_s"] for o in twins if o.get("images_per_s")]
        ratio = row["images_per_s_mean"] / statistics.fmean(rates) if rates and row["images_per_s_mean"] else None
        compared = {"row": row["row"], "config_key": row["config_key"], "fastemp_seeds": row["seeds"]}
        compared.update(difference(fastemp, theirs), official_seeds=[o.get("seed") for o in twins])
        out.append({**compared, "images_per_s_ratio": ratio})
    return out


def official_run_record(peer: dict) -> dict:
    """One run of the official code (official_peer.json) as the accuracy file keeps it, whatever its status."""
    official, training, evaluation, data, env = (
        peer.get(k) or {} for k in ("official", "training", "evaluation", "data", "environment")
    )
    epochs = [e for e in training.get("epochs", []) if e.get("done")]
    out = {"status": peer.get("status"), "error": peer.get("error") or peer.get("reason")}
    out.update(dry_run=peer.get("dry_run"), **{k: official.get(k) for k in ("seed", "n_patches", "schedule_epochs")})
    out.update(epochs_trained=evaluation.get("epochs_trained"), data_copy=data.get("copy"))
    out["data_file"] = Path(data["path"]).name if data.get("path") else None
    out.update(protocol=evaluation.get("eval_protocol"), overrides=peer.get("overrides", []))
    out.update({k: evaluation.get(k) for k in ("linear_top1", "best_top1_on_test", "knn_top1", "eval_seconds")})
    out["train_seconds"] = sum(e["loop_seconds"] for e in epochs) if epochs else None
    out.update({k: training.get(k) for k in ("startup_seconds", "images_per_s", "images_per_s_whole_loop")})
    return {**out, "device_name": env.get("device_name"), "commit": env.get("commit"), "created": peer.get("created")}


def add_official(accuracy_path: Path, peer_path: Path) -> dict:
    """Append the official code's run (official_peer.json, or why there is none) to the accuracy file."""
    result = read_result(accuracy_path) or {"benchmark": "accuracy", "schema_version": 2, "runs": [], "environment": {}}
    peer = read_result(peer_path) or {"status": "FAIL", "error": f"no readable {peer_path.name}"}
    result["official_runs"] = [*result.get("official_runs", []), official_run_record(peer)]
    notes = {(r["row"], r["config_key"]): r for r in result.get("rows", [])}  # their last status stays
    result["rows"] = summarise_rows(result.get("runs", []), notes)
    result["comparison"] = comparison(result)
    runs.write_json(accuracy_path, result)
    accuracy_path.with_suffix(".md").write_text(accuracy_markdown(result) + "\n")
    return result


def plan(accuracy_path: Path) -> dict:
    """What the next official run takes from the file: the lowest seed no official run passed with (the official
    code unseeded starts from torch's fixed default seed), and the seconds to keep for its evaluation (the slowest
    official-protocol evaluation measured here, else any, x 1.25 + 15 s)."""
    result = read_result(accuracy_path) or {}
    used = {r.get("seed") for r in result.get("official_runs", []) if r.get("status") == "PASS"}
    records = result.get("runs", [])
    evals = [r["eval_seconds"] for r in records if r.get("protocol") == "official"]
    evals = evals or [r["eval_seconds"] for r in records]
    seconds = round(max(evals) * 1.25 + 15) if evals else DEFAULT_EVAL_SECONDS
    return {"official_seed": min(s for s in range(len(used) + 1) if s not in used), "eval_seconds": seconds}


PERCENT = ("linear_top1", "best_top1_on_test", "knn_top1", "official_linear_top1", "delta_vs_official", "delta")
PERCENT += ("linear_top1_mean", "linear_top1_std", "best_top1_on_test_mean", "knn_top1_mean", "fastemp_mean")
PERCENT += ("fastemp_std", "official_mean", "official_std", "delta_standard_error")
SEED_KEYS = "seed linear_top1 best_top1_on_test knn_top1 train_seconds first_step_seconds eval_seconds images_per_s"


def _cells(record: dict) -> dict:
    """A record as the tables show it: accuracies in percent (2 decimals), the commit short, the date."""
    commit = record.get("commit") or ""
    out = {**record, **{k: f"{100 * record[k]:.2f}" for k in PERCENT if isinstance(record.get(k), float)}}
    return out | {
        "commit": commit[:9] + "+dirty" * commit.endswith("+dirty"),
        "created": (record.get("created") or "")[:10],
    }


def accuracy_markdown(result: dict) -> str:
    seeds, env = result.get("seeds"), result.get("environment") or {}
    lines = []
    if not str(env.get("device", "cpu")).startswith("cuda"):
        lines += ["**CPU run: a pipeline check of the benchmark, not an accuracy claim** (tiny model, few steps).", ""]
    lines += [
        f"- last run: seeds {seeds if isinstance(seeds, str) else ', '.join(map(str, seeds or []))}; overrides on every "
        f"row: {' '.join(result.get('overrides') or []) or 'none'}"
        + (f"; budget {result['budget_seconds']:g} s" if result.get("budget_seconds") else "")
        + (" (partial: still running when written)" if result.get("partial") else ""),
        "- linear top-1 = the FINAL probe epoch; best on test = the best probe epoch, selected on the test split",
        "- train s: training without the first step (compilation: first step s); eval s: the evaluation; neither on "
        "the other's clock. The official code's train s is its epochs' loop (startup apart), its images/s the steady rate",
        "",
    ]
    keys = "row data_copy n_patches epochs_trained schedule_epochs protocol eval_patches probe_epochs seeds"
    keys += " linear_top1_mean linear_top1_std best_top1_on_test_mean knn_top1_mean official_linear_top1"
    keys += " delta_vs_official train_seconds_mean eval_seconds_mean images_per_s_mean status reason"
    headers = "row|data copy|n|epochs|schedule|protocol|eval patches|probe epochs|seeds|linear top-1 %|± std"
    headers += "|best on test %|kNN %|official README %|Δ README|train s|eval s|images/s|status|why"
    lines += [table(map(_cells, result.get("rows", [])), keys, headers), "", "## fastemp, per seed", ""]
    lines.append(table(map(_cells, result.get("runs", [])), f"row config_key {SEED_KEYS} commit created"))
    if result.get("official_runs"):
        title = "## The official code on the same data (benchmarks/official_peer.py, scored by fastemp's evaluator)"
        keys = f"status dry_run {SEED_KEYS.replace('first_step', 'startup')} commit created error"
        lines += ["", title, "", table(map(_cells, result["official_runs"]), keys)]
    if result.get("comparison"):
        keys = "row config_key fastemp_mean fastemp_std fastemp_seeds official_mean official_std official_seeds delta"
        lines += ["", "## fastemp - official (linear top-1 %, final probe epoch)", ""]
        lines.append(
            table(map(_cells, result["comparison"]), f"{keys} delta_standard_error uncertainty images_per_s_ratio")
        )
    notes = sorted({f"- `{r['row']}`: {r['note']}" for r in result.get("rows", []) if r.get("note")})
    return page(
        {**result, "environment": env}, "Accuracy vs the official code and table", *lines, "", "## Rows", "", *notes
    )


# ------------------------------------------------------------------------------ time to accuracy


def tta_summary(cfg, trainer, target: float, levels, cut: bool, environment: dict) -> dict:
    """The time-to-accuracy result of a Trainer's evaluations: the first reaching the target, and each level's."""
    first, batch = trainer.warmup_seconds, cfg.train.batch_size
    evals = [
        {**e, "images_seen": e["step"] * batch, "train_seconds_excl_first_step": e["train_seconds"] - first}
        for e in trainer.evaluations
    ]
    hit = first_reaching(evals, target) or {}
    result = {"config": to_dict(cfg), "target": target, "reached": bool(hit), "stopped_at_wall_limit": cut}
    result.update(train_seconds=hit.get("train_seconds_excl_first_step"), first_step_seconds=first)
    result.update(epochs=hit.get("epoch"), steps=hit.get("step"), images_seen=hit.get("images_seen"))
    result["best_linear_top1"] = max((e["linear_top1"] for e in evals), default=None)
    reached = [(level, first_reaching(evals, level) or {}) for level in levels]
    result["milestones"] = [
        {"top1": level, "train_seconds": e.get("train_seconds_excl_first_step"), "epoch": e.get("epoch")}
        | {"step": e.get("step")}
        for level, e in reached
    ]
    result["protocol"] = {"name": cfg.eval.protocol, "eval_mode": cfg.eval.mode, "probe_epochs": cfg.eval.probe_epochs}
    result["protocol"].update(eval_patches=cfg.eval.patches if cfg.eval.mode == "patches" else None)
    result["protocol"]["eval_every_steps"] = trainer.eval_every
    result.update(data=trainer.train_set.description, test_data=trainer.test_set.description)
    result.update(n_patches=cfg.train.n_patches, batch_size=batch)
    result.update(epochs_scheduled=trainer.total_steps / trainer.steps_per_epoch)
    result.update(images_per_s=trainer.images_per_second(), evals=evals, targets=[])
    if abs(target - 0.85) < 1e-9 and cfg.train.n_patches == 20:  # the project's target: time to 85% <= 30 s
        hardware = on_h100(environment) and batch == 100
        why = "first step (compile) excluded" if hit else time_to_target(result)
        row = target_row("time_to_85_seconds", result["train_seconds"], False, hardware, why)
        result["targets"] = [row if hit else {**row, "met": False}]
    return result


def tta_markdown(result: dict) -> str:
    proto, target = result["protocol"], result["target"]
    keys = "step epoch images_seen train_seconds_excl_first_step linear_top1 best_top1_on_test eval_seconds"
    lines = [
        f"- training seconds to {target:.0%}: **{time_to_target(result)}** (first step "
        f"{result['first_step_seconds']:.1f} s excluded)",
        f"- data: {result['data']}; test: {result['test_data']}",
        f"- schedule: {result['epochs_scheduled']:g} epochs (cosine over all of them)"
        + (" (partial: still running)" if result.get("partial") else ""),
        f"- n={result['n_patches']}, B={result['batch_size']}, {fmt(result['images_per_s'])} images/s while training",
        f"- evaluation: **{proto['name']} protocol**: {protocol_label(proto)}, every {proto['eval_every_steps']} "
        "steps, off the training clock; linear top-1 = the final probe epoch, best on test = the best (on test)",
        "",
        table(result["milestones"], "top1 train_seconds epoch step", "first reaching|train s|epoch|step"),
        "",
        table(result["evals"], keys, "step|epoch|images|train s|linear top-1|best on test|eval s"),
    ]
    if result["targets"]:
        lines += ["", targets_markdown(result["targets"])]
    return page(result, f"Time to {target:.0%}", *lines)
