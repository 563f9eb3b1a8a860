"""`fastemp bench accuracy` and `fastemp bench time-to-accuracy`: one driver (run_seed), a Trainer evaluating with
`eval.every` (off the training clock; training seconds leave out the first step). docs/evaluation.md describes the
rows, the config key, --accumulate, --budget and time to accuracy."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import statistics
from collections.abc import Sequence
from pathlib import Path

from fastemp import runs
from fastemp.config import flat_dict, load_config, to_dict
from fastemp.data.cifar import CIFAR_ARCHIVES
from fastemp.errors import UserError

from . import harness
from .accuracy_report import comparison, summarise_rows, tta_summary
from .accuracy_report import tta_markdown as markdown  # noqa: F401 (time-to-accuracy's page, for cli.command)


@dataclasses.dataclass(frozen=True)
class Row:
    """One recipe of the official table, evaluated after each of `eval_epochs` (training stops after the last)."""

    name: str
    config: str  # the built-in config it starts from
    schedule_epochs: int  # the cosine schedule spans this many epochs
    eval_epochs: tuple[int, ...]
    official: tuple[float | None, ...]  # the official README's linear top-1 after each of eval_epochs
    note: str
    overrides: tuple[str, ...] = ()


# The official README (tsb0601/EMP-SSL): the 1-epoch table from `main.py --epoch 2` (cosine over 1,000 steps,
# first-epoch checkpoint); the multi-epoch table from `main.py --epoch 30` (its 1-epoch column: epoch 1 of 30).
# Whether its 10-epoch column is epoch 10 of that run is not stated: c10_n20_10ep+train.epochs=30 is the other
# reading. docs/evaluation.md describes every row.
ROWS = (
    Row("c10_n20_official_1ep", "cifar10_n20_1ep", 2, (1, 2), (0.842, None), "main.py --epoch 2; 84.2%: epoch 1"),
    Row("c10_n20_1ep", "cifar10_n20_1ep", 1, (1,), (None,), "fastemp's 1-epoch schedule (no official figure)"),
    Row("c10_n20_1of30", "cifar10_n20_1ep", 30, (1,), (0.806,), "epoch 1 of the official 30-epoch schedule"),
    Row("c10_n20_10ep", "cifar10_n20_10ep", 10, (10,), (0.907,), "10 epochs, cosine over 10"),
    Row("c10_n200_1of30", "cifar10_n200_1ep", 30, (1,), (0.826,), "n=200, epoch 1 of 30 (the README's starred one)"),
    Row("c100_n20_official_1ep", "cifar100_n20_1ep", 2, (1,), (0.585,), "CIFAR-100, main.py --epoch 2; epoch 1"),
)
# where data and outputs live, which seed, how often a run logs or evaluates: not what a seed computes
NOT_IN_CONFIG_KEY = ("name", "data.root", "data.path", "data.download", "data.workers", "train.device", "train.seed")
NOT_IN_CONFIG_KEY += ("train.log_every", "train.ckpt_every", "eval.at_end", "eval.every", "eval.stop_at")
# ESTIMATE, not measured on a GPU: a later seed's first step in a process that already ran one (Dynamo traces the
# new Trainer's model, patch recipe and LARS again; Inductor's kernels are cached). Measured ones replace it.
RECOMPILE_ALLOWANCE_SECONDS = 20.0
_SEEDS_IN_THIS_PROCESS = [0]


def parse_seeds(text: str) -> list[int] | int:
    """'3' = seeds 0, 1, 2; '0,5' = those; 'next:2' = 2: the two lowest seeds a row has not measured yet."""
    if text.startswith("next:") and text[5:].isdigit() and int(text[5:]) > 0:
        return int(text[5:])
    if "," in text and all(s.strip().isdigit() for s in text.split(",") if s.strip()):
        return [int(s) for s in text.split(",") if s.strip()]
    if not text.isdigit() or int(text) < 1:
        raise UserError(f"--seeds must be a count >= 1, a comma-separated list or next:K, got {text!r}")
    return list(range(int(text)))


def select_rows(names: Sequence[str] | None, variants: Sequence[tuple[str, str]] = ()) -> list[Row]:
    """The rows named (all when None; ROW@E keeps ROW's evaluation after epoch E and trains no further), then each
    again per variant as ROW+LABEL with its overrides."""
    by_name, rows = {r.name: r for r in ROWS}, []
    for spec in names or by_name:
        name, _, epoch = spec.partition("@")
        row = by_name.get(name)
        if row is None or (epoch and (not epoch.isdigit() or int(epoch) not in row.eval_epochs)):
            choices = ", ".join(by_name)
            raise UserError(f"unknown rows {spec}; choose from {choices} (ROW@E: one of its evaluated epochs)")
        if epoch:
            kept = row.eval_epochs.index(int(epoch))
            row = dataclasses.replace(row, name=spec, eval_epochs=(int(epoch),), official=(row.official[kept],))
        rows.append(row)
    variants = [(label, changes.split(), f"; variant {label}: {changes}") for label, changes in variants]
    return rows + [
        dataclasses.replace(r, name=f"{r.name}+{label}", overrides=(*r.overrides, *keys), note=r.note + note)
        for label, keys, note in variants
        for r in rows
    ]


def dataset_of(row: Row) -> str:
    return "cifar100" if "cifar100" in row.config else "cifar10"


def data_overrides(dataset: str, path: str | None) -> list[str] | None:
    """Overrides pointing a row at its data: an ImageFolder .tar.gz/folder (the JPEG copy), or a folder holding
    the canonical archive; None without data and without the archive under data.root (the row is skipped:
    a benchmark never downloads)."""
    archive = CIFAR_ARCHIVES[dataset].filename
    if path is None:
        root = Path(load_config("quickstart").data.root).expanduser()
        return [f"data.source={dataset}", "data.download=false"] if (root / archive).is_file() else None
    p = Path(path).expanduser()
    for folder in (p.parent, p) if p.name == archive else (p,):
        if (folder / archive).is_file():
            return [f"data.source={dataset}", f"data.root={folder}", "data.download=false"]
    return ["data.source=imagefolder", f"data.path={p}"]


def data_names(data) -> tuple[str, str]:
    """(the data's file name, which copy it is): a figure's data by name (paths differ between machines)."""
    if data.source == "synthetic":
        name = f"synthetic {data.synthetic_train}/{data.synthetic_test} seed {data.synthetic_seed}"
        return name, "synthetic images (pipeline check, not CIFAR)"
    if data.source in CIFAR_ARCHIVES:
        return CIFAR_ARCHIVES[data.source].filename, f"canonical archive ({CIFAR_ARCHIVES[data.source].filename})"
    name = Path(data.path).name
    jpeg = "jpeg" in name.lower() or "jpg" in name.lower()
    return name, f"JPEG copy ({name})" if jpeg else f"ImageFolder copy ({name})"


def row_config(row: Row, seed: int, data: list[str], overrides: Sequence[str]):
    keys = [*data, f"train.epochs={row.schedule_epochs}", "train.max_steps=0", "eval.knn=true", *overrides]
    keys += [*row.overrides, f"train.seed={seed}", "eval.at_end=false", f"eval.every={min(row.eval_epochs)}ep"]
    return load_config(row.config, keys)


def config_key(cfg) -> str:
    """12 hex digits naming what a seed of this config computes, wherever and whenever it ran."""
    flat = {k: v for k, v in flat_dict(to_dict(cfg)).items() if k not in NOT_IN_CONFIG_KEY}
    flat["data.file"] = data_names(cfg.data)[0]
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:12]


def row_fields(row: Row, overrides: Sequence[str]) -> list[dict]:
    """What names each evaluated epoch of a row, in its seeds' records and in its notes alike."""
    return [
        {"row": row.name if len(row.eval_epochs) == 1 else f"{row.name}@{epoch}", "recipe": row.name}
        | {"overrides": [*overrides, *row.overrides], "note": row.note, "dataset": dataset_of(row)}
        | {"epochs_trained": epoch, "schedule_epochs": row.schedule_epochs, "official_linear_top1": official}
        for epoch, official in zip(row.eval_epochs, row.official)
    ]


def predict(records: Sequence[dict], row: str, key: str) -> float | None:
    """A seed's seconds predicted from the warm steps of the seeds measured before it, this row and config first
    (docs/evaluation.md, --budget); None before the row has one."""
    same = [r for r in records if r["row"] == row and r.get("timing")]
    same = [r["timing"] for r in [r for r in same if r["config_key"] == key] or same]
    if not same:
        return None
    last, warm = same[-1], _SEEDS_IN_THIS_PROCESS[0] > 0
    firsts = [t["first_step_seconds"] for t in same if t["warm_cache"] == warm]
    first = statistics.median(firsts) if firsts else RECOMPILE_ALLOWANCE_SECONDS if warm else None
    first = max(t["first_step_seconds"] for t in same) if first is None else first
    return last["setup_seconds"] + first + last["warm_step_seconds"] * (last["steps"] - 1) + last["eval_seconds"]


def run_seed(cfg, data: harness.Data, stop_epoch: float | None = None, budget: float | None = None, seen=None):
    """Train a Trainer of cfg (eval.every set) one evaluation interval at a time, to `stop_epoch` (default: its
    schedule) or an evaluation reaching eval.stop_at; seen(trainer) after every evaluation. With `budget` (wall
    seconds), stop before the next interval (training and its evaluation) would end past it. Returns (trainer,
    timing, stopped at the budget)."""
    wall, warm = harness.Wall(), _SEEDS_IN_THIS_PROCESS[0] > 0
    _SEEDS_IN_THIS_PROCESS[0] += 1  # the next seed's first step finds this one's compiled kernels, even if it fails
    trainer = data.trainer(cfg, evaluates=True)
    setup = wall.lap()
    stop = round(stop_epoch * trainer.steps_per_epoch) if stop_epoch else trainer.total_steps
    every, cut = trainer.eval_every, False
    while trainer.step < stop and not trainer.stopped and not cut:
        trainer.train_until(min(stop, (trainer.step // every + 1) * every))
        if seen:
            seen(trainer)
        interval = wall.lap()  # the next one is predicted to take as long
        cut = bool(budget) and wall.total + interval > budget and trainer.step < stop and not trainer.stopped
    steps = trainer.step
    timing = {"setup_seconds": setup, "first_step_seconds": trainer.warmup_seconds, "steps": steps}
    timing.update(warm_step_seconds=trainer.train_seconds / max(1, steps - 1), warm_cache=warm)
    timing.update(eval_seconds=sum(e["eval_seconds"] for e in trainer.evaluations), wall_seconds=wall.total)
    return trainer, timing, cut


def seed_records(row: Row, seed: int, key: str, cfg, trainer, timing: dict, overrides) -> list[dict]:
    env, first, (file, copy) = runs.environment(trainer.device), trainer.warmup_seconds, data_names(cfg.data)
    by_step, records = {e["step"]: e for e in trainer.evaluations}, []
    for fields in row_fields(row, overrides):
        e = by_step[fields["epochs_trained"] * trainer.steps_per_epoch]
        record = {**fields, "seed": seed, "config_key": key, "data_copy": copy, "data_file": file}
        record.update(n_patches=cfg.train.n_patches, batch_size=cfg.train.batch_size, protocol=cfg.eval.protocol)
        record.update(eval_patches=cfg.eval.patches if cfg.eval.mode == "patches" else None)
        record.update({k: e.get(k) for k in ("linear_top1", "best_top1_on_test", "knn_top1", "step", "eval_seconds")})
        record.update(probe_epochs=cfg.eval.probe_epochs, train_seconds=e["train_seconds"] - first)
        images_per_s = (e["step"] - 1) * cfg.train.batch_size / max(1e-9, e["train_seconds"] - first)
        record.update(first_step_seconds=first, images_per_s=images_per_s, runtime=trainer.runtime.resolved())
        record.update(timing=timing, device_name=env.get("device_name"), commit=env.get("commit"))
        records.append({**record, "created": harness.now_iso()})
    return records


def run_accuracy(rows, seeds, overrides, paths: dict, budget, results: harness.Results, previous: dict) -> dict:
    """Every seed of every row (seeds: a list, or K: the K lowest seeds a row has not measured in `previous`, the
    results file added to); every row's config and data checked before the first seed."""
    records, notes, data = list(previous.get("runs", [])), {}, harness.Data()  # the file's seeds, then this run's
    wall, plans = harness.Wall(), []

    def elapsed() -> float:
        wall.lap()
        return wall.total

    for row in rows:  # every check (variants included) before any training: one line each (UserError)
        chosen = any(o.startswith("data.source=") for o in (*overrides, *row.overrides))  # e.g. synthetic checks
        where = [] if chosen else data_overrides(dataset_of(row), paths.get(dataset_of(row)))
        cfg = row_config(row, 0, where or [], overrides)  # its keys checked also when the row has no data
        if where is not None:
            data.check(cfg, evaluates=True)
        plans.append((row, where, "-" if where is None else config_key(cfg)))

    def result(final: bool = False) -> dict:
        out = {**previous, "schema_version": 2, "budget_seconds": budget, "wall_seconds": elapsed()}
        out.update(seeds=seeds if isinstance(seeds, list) else f"next:{seeds}", overrides=list(overrides), runs=records)
        out["rows"] = summarise_rows(records, notes)
        out["comparison"] = comparison(out)
        return results.write({k: v for k, v in out.items() if k not in results.base}, final)

    for row, where, key in plans:
        fields = row_fields(row, overrides)
        last = fields[-1]["row"]  # the row's last evaluated epoch: its seed counts when that was measured

        def note(status: str, reason: str, fields=fields, key=key) -> None:
            for f in fields:
                notes[(f["row"], key)] = {**f, "config_key": key, "status": status, "reason": reason}

        if where is None:
            note("skipped", f"no {dataset_of(row)} data given and no canonical archive under data.root")
            continue
        done = {r["seed"] for r in records if r["row"] == last and r["config_key"] == key}
        wanted = seeds if isinstance(seeds, list) else [s for s in range(len(done) + seeds) if s not in done]
        todo, status, reasons = [s for s in wanted if s not in done], "complete", []
        if len(todo) < len(wanted):
            reasons.append(f"seeds {sorted(set(wanted) - set(todo))} already measured, not run again")
        for seed in todo:
            guess = predict(records, last, key)
            if budget is not None and guess is not None and elapsed() + guess > budget:
                status = "partial" if done else "skipped"
                used = f"{wall.total:.0f} s used of --budget {budget:g} s"
                reasons.append(f"seed {seed} and later skipped: predicted {guess:.0f} s from warm steps, {used}")
                break
            cfg = row_config(row, seed, where, overrides)
            try:  # a seed that fails (diverges) ends its row; the other rows still run
                trainer, timing, _ = run_seed(cfg, data, max(row.eval_epochs))
            except Exception as err:
                status = "error"
                reasons.append(f"seed {seed}: {type(err).__name__}: {err}"[:300])
                break
            measured = seed_records(row, seed, key, cfg, trainer, timing, overrides)
            records.extend(measured)
            done.add(seed)
            note("running", "")
            found = ", ".join(f"epoch {r['epochs_trained']} linear {r['linear_top1']:.4f}" for r in measured)
            print(f"accuracy {row.name} seed {seed}: {found} ({timing['wall_seconds']:.0f} s)", flush=True)
            result()
        note(status, "; ".join(reasons))
        result()
    return result(final=True)


def run(args, cfg, results: harness.Results) -> dict:
    """`bench time-to-accuracy`: train cfg evaluating every --eval-every steps until the first evaluation reaches
    --target (or the end of its schedule, or --max-wall-seconds); the result, written after every evaluation."""
    cfg.eval.at_end, cfg.eval.stop_at = False, args.target
    cfg.eval.every = str(args.eval_every) if args.eval_every else "0.5ep"

    def result(trainer, final: bool = False, cut: bool = False) -> dict:
        levels = sorted({*args.milestones, args.target})
        summary = tta_summary(cfg, trainer, args.target, levels, cut, results.environment)
        return results.write(summary, final)

    trainer, _, cut = run_seed(cfg, harness.Data(), budget=args.max_wall_seconds, seen=result)  # checked first
    return result(trainer, final=True, cut=cut)
