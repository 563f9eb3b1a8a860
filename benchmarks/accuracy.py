"""`fastemp bench accuracy`: the official EMP-SSL table's rows, over seeds, beside the official figures and the
official code's own runs on the same data.

Each row trains with the public Trainer (Trainer(cfg), train_until, evaluate) and is evaluated under the
config's eval protocol (default: official, docs/evaluation.md) after the epochs it names. Every (row, evaluated
epoch, seed) is one record in "runs": linear top-1 at the final probe epoch, best probe epoch on test (selected
on test, labelled so), kNN, training seconds without the first step (compilation, reported apart), evaluation
seconds, images/s. A row is a (row, evaluated epoch, config key) over its seeds: values, mean +- std from two
seeds on, the official README figure beside it. The config key is a hash of the resolved config without its
seed, device, data location and logging keys, plus the data file's name: seeds run under other overrides (a
fallback such as model.compile=none) form rows of their own.

--accumulate adds to <out>/<name>.json instead of writing a new file: a (row, config key, seed) already there
is not run again (recorded as such), so runs on later machines add seeds (`--seeds next:2`: the two lowest
seeds not yet measured). The official code's runs join the same file (add_official; `bench official-peer
--accuracy FILE`); the report pairs each row with the official runs of the same n, epochs, schedule, data file,
protocol and overrides, and gives fastemp - official with its uncertainty (accuracy_comparison).

Variants (`--variant LABEL "key=value ..."`) run every selected row again with those overrides on top, as
rows of their own named ROW+LABEL.

`--budget` bounds the wall-clock time: before each seed the bench predicts its duration from warm steps
(BudgetClock: setup + first step + warm step time x steps + evaluation, from this row's records in the file and
this process) and skips it, saying why, when it would end past the budget. Results are written after every
seed ("partial": true until the end), so a run cut by a timeout keeps every finished seed.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from fastemp import runs
from fastemp.config import eval_protocol_name, flat_dict, load_config, to_dict
from fastemp.data.cifar import CIFAR_ARCHIVES
from fastemp.runtime import resolve_device
from fastemp.train import Trainer
from fastemp.validate import check_config

from . import common


@dataclasses.dataclass(frozen=True)
class Row:
    """One training recipe of the official table, evaluated after each of `eval_epochs`."""

    name: str
    config: str  # built-in config it starts from
    schedule_epochs: int  # the cosine schedule spans this many epochs
    eval_epochs: tuple[int, ...]  # evaluate after these epochs (training stops after the last)
    official: tuple[float | None, ...]  # the official README's linear top-1 at each of eval_epochs
    note: str
    overrides: tuple[str, ...] = ()


# The official README (tsb0601/EMP-SSL): 1-epoch table from `main.py --epoch 2` (cosine over 1,000 steps,
# first-epoch checkpoint); multi-epoch table from `main.py --epoch 30` (its 1-epoch column is epoch 1 of 30).
ROWS: tuple[Row, ...] = (
    Row(
        "c10_n20_official_1ep",
        "cifar10_n20_1ep",
        2,
        (1, 2),
        (0.842, None),
        "the official 1-epoch command (--epoch 2: cosine over 2 epochs), evaluated after epochs 1 and 2; "
        "84.2% is its first-epoch checkpoint",
    ),
    Row(
        "c10_n20_1ep",
        "cifar10_n20_1ep",
        1,
        (1,),
        (None,),
        "fastemp's 1-epoch schedule (cosine over 1 epoch); the official table has no such row",
    ),
    Row("c10_n20_1of30", "cifar10_n20_1ep", 30, (1,), (0.806,), "epoch 1 of the official 30-epoch schedule"),
    Row(
        "c10_n20_10ep",
        "cifar10_n20_10ep",
        10,
        (10,),
        (0.907,),
        "10 epochs, cosine over 10 (the official table does not say whether its 10-epoch column is epoch 10 "
        "of the 30-epoch run; a variant with train.epochs=30 would be that)",
    ),
    Row(
        "c10_n200_1of30",
        "cifar10_n200_1ep",
        30,
        (1,),
        (0.826,),
        "n=200, epoch 1 of the official 30-epoch schedule (the README's starred figure)",
    ),
    Row(
        "c100_n20_official_1ep",
        "cifar100_n20_1ep",
        2,
        (1,),
        (0.585,),
        "CIFAR-100, the official 1-epoch command (--epoch 2), first-epoch checkpoint; skipped without its data",
    ),
)
ROW_NAMES = tuple(r.name for r in ROWS)


def parse_seeds(text: str) -> list[int] | int:
    """'3' = seeds 0, 1, 2; '0,5,7' = those seeds; 'next:2' = 2, meaning the two lowest seeds each row has not
    measured yet (with --accumulate: in its file)."""
    if text.startswith("next:") and text[5:].isdigit() and int(text[5:]) > 0:
        return int(text[5:])
    if "," in text:
        return [int(s) for s in text.split(",") if s.strip()]
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"--seeds must be a count >= 1, a comma-separated list or next:K, got {text!r}")
    return list(range(int(text)))


def select_rows(names: Sequence[str] | None, variants: Sequence[tuple[str, str]] = ()) -> list[Row]:
    """The rows named (all when None; ROW@E keeps only ROW's evaluation after epoch E and trains no
    further), then each again per variant as ROW+LABEL with its overrides."""
    by_name = {r.name: r for r in ROWS}
    base = []
    for spec in names if names is not None else ROW_NAMES:
        name, _, epoch = spec.partition("@")
        row = by_name.get(name)
        if row is None or (epoch and (not epoch.isdigit() or int(epoch) not in row.eval_epochs)):
            raise ValueError(
                f"unknown rows {spec}; choose from {', '.join(ROW_NAMES)} (ROW@E for one of its evaluated epochs)"
            )
        if epoch:
            keep = row.eval_epochs.index(int(epoch))
            row = dataclasses.replace(row, name=spec, eval_epochs=(int(epoch),), official=(row.official[keep],))
        base.append(row)
    out = list(base)
    for label, overrides in variants:
        out += [
            dataclasses.replace(
                r,
                name=f"{r.name}+{label}",
                overrides=r.overrides + tuple(overrides.split()),
                note=f"{r.note}; variant {label}: {overrides}",
            )
            for r in base
        ]
    return out


def dataset_of(config: str) -> str:
    return "cifar100" if "cifar100" in config else "cifar10"


def data_overrides(dataset: str, paths: dict[str, str | None]) -> list[str] | None:
    """Overrides that point a row at its data: a .tar.gz/folder in the ImageFolder layout (the JPEG copy),
    or a folder holding the canonical archive; None when no data was given and the canonical archive is
    not under the default data.root (the row is then skipped, never downloaded during a benchmark)."""
    path = paths.get(dataset)
    archive = CIFAR_ARCHIVES[dataset].filename
    if path is None:
        root = Path(load_config("quickstart").data.root).expanduser()
        return [f"data.source={dataset}", "data.download=false"] if (root / archive).is_file() else None
    p = Path(path).expanduser()
    if p.name == archive:
        return [f"data.source={dataset}", f"data.root={p.parent}", "data.download=false"]
    if p.is_dir() and (p / archive).is_file():
        return [f"data.source={dataset}", f"data.root={p}", "data.download=false"]
    return ["data.source=imagefolder", f"data.path={p}"]


def data_copy(data) -> str:
    """Which copy of the data a figure comes from."""
    if data.source == "synthetic":
        return "synthetic images (pipeline check, not CIFAR)"
    if data.source in CIFAR_ARCHIVES:
        return f"canonical archive ({CIFAR_ARCHIVES[data.source].filename})"
    name = Path(data.path).name
    return f"JPEG copy ({name})" if "jpeg" in name.lower() or "jpg" in name.lower() else f"ImageFolder copy ({name})"


def row_config(row: Row, seed: int, data: list[str], overrides: Sequence[str]):
    """The resolved config of one seed of a row (validated)."""
    cfg = load_config(
        row.config,
        [
            *data,
            f"train.epochs={row.schedule_epochs}",
            "train.max_steps=0",
            "eval.knn=true",
            *overrides,
            *row.overrides,
            f"train.seed={seed}",
            "eval.at_end=false",
        ],
    )
    check_config(cfg)
    return cfg


# what says where data and outputs live, which seed, or how often a run logs: not what a seed computes
NOT_IN_CONFIG_KEY = (
    "name",
    "data.root",
    "data.path",
    "data.download",
    "data.workers",
    "train.device",
    "train.seed",
    "train.log_every",
    "train.ckpt_every",
    "eval.at_end",
)
# ESTIMATE, not yet measured on a GPU: a later seed's first step in a process that already ran one (Dynamo traces
# the new Trainer's model, patch recipe and LARS again; Inductor's kernels are cached). Measured ones replace it.
RECOMPILE_ALLOWANCE_SECONDS = 20.0
_SEEDS_IN_THIS_PROCESS = [0]


def data_file(data) -> str:
    """The data a figure comes from, by file name (paths differ between machines)."""
    if data.source == "synthetic":
        return f"synthetic {data.synthetic_train}/{data.synthetic_test} seed {data.synthetic_seed}"
    return CIFAR_ARCHIVES[data.source].filename if data.source in CIFAR_ARCHIVES else Path(data.path).name


def config_key(cfg) -> str:
    """12 hex digits naming what a seed of this config computes, wherever and whenever it ran."""
    flat = {k: v for k, v in flat_dict(to_dict(cfg)).items() if k not in NOT_IN_CONFIG_KEY}
    flat["data.file"] = data_file(cfg.data)
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:12]


def record_name(row: Row, epoch: int) -> str:
    return row.name if len(row.eval_epochs) == 1 else f"{row.name}@{epoch}"


def run_seed(cfg, row: Row) -> list[dict]:
    """Train one seed of a row; one record per evaluated epoch, each with the seed's timing (for BudgetClock)."""
    start, warm = time.perf_counter(), _SEEDS_IN_THIS_PROCESS[0] > 0
    trainer = Trainer(cfg, None, progress=False)
    try:
        _ = trainer.test_set  # a missing test split fails before training
        setup = time.perf_counter() - start
        trainer.train_until(1)
        first_step = trainer.warmup_seconds + trainer.train_seconds
        records = []
        for epoch in row.eval_epochs:
            trainer.train_until(epoch * trainer.steps_per_epoch)
            t0 = time.perf_counter()
            metrics = trainer.evaluate()
            records.append(
                {
                    "epoch": epoch,
                    "step": trainer.step,
                    "train_seconds": trainer.warmup_seconds + trainer.train_seconds - first_step,
                    "first_step_seconds": first_step,
                    "eval_seconds": time.perf_counter() - t0,
                    "images_per_s": trainer.images_per_second(),
                    "data": trainer.train_set.description,
                    "runtime": trainer.runtime.resolved(),
                    **metrics,
                }
            )
        timing = {
            "setup_seconds": setup,
            "first_step_seconds": first_step,
            "steps": trainer.step,
            "warm_step_seconds": records[-1]["train_seconds"] / max(1, trainer.step - 1),
            "eval_seconds": sum(r["eval_seconds"] for r in records),
            "warm_cache": warm,
            "wall_seconds": time.perf_counter() - start,
        }
        return [{**r, "timing": timing} for r in records]
    finally:
        _SEEDS_IN_THIS_PROCESS[0] += 1
        del trainer
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class BudgetClock:
    """Predicts a seed's wall seconds from the warm steps of the seeds measured before (this row and config
    first, from the results file and this process) and says whether it ends within the budget:

        setup (data, model) + first step + warm step seconds x (steps - 1) + evaluation seconds

    The first step is the median of those measured in the same situation: a process's first seed compiles
    from scratch; a later one in the same process only retraces (RECOMPILE_ALLOWANCE_SECONDS until measured)."""

    def __init__(self, budget: float | None, history: Sequence[dict] = ()):
        self.budget, self.start = budget, time.perf_counter()
        self.timings = [dict(r["timing"], row=r["row"], key=r["config_key"]) for r in history if r.get("timing")]

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def predict(self, row: str, key: str) -> float | None:
        same = [t for t in self.timings if t["row"] == row and t["key"] == key]
        same = same or [t for t in self.timings if t["row"] == row]
        if not same:
            return None
        last, warm = same[-1], _SEEDS_IN_THIS_PROCESS[0] > 0
        firsts = [t["first_step_seconds"] for t in same if t["warm_cache"] == warm]
        first = (
            statistics.median(firsts)
            if firsts
            else (RECOMPILE_ALLOWANCE_SECONDS if warm else max(t["first_step_seconds"] for t in same))
        )
        return last["setup_seconds"] + first + last["warm_step_seconds"] * (last["steps"] - 1) + last["eval_seconds"]

    def fits(self, row: str, key: str) -> tuple[bool, float | None]:
        guess = self.predict(row, key)
        return self.budget is None or guess is None or self.elapsed() + guess <= self.budget, guess

    def record(self, record: dict) -> None:
        self.timings.append(dict(record["timing"], row=record["row"], key=record["config_key"]))


def run_record(row: Row, index: int, seed: int, key: str, cfg, overrides: Sequence[str], measured: dict) -> dict:
    """One (row, evaluated epoch, seed) of the results file: what ran, what it measured, where and when."""
    env = runs.environment(resolve_device(cfg.train.device))
    return {
        "row": record_name(row, row.eval_epochs[index]),
        "recipe": row.name,
        "seed": seed,
        "config_key": key,
        "overrides": [*overrides, *row.overrides],
        "note": row.note,
        "dataset": dataset_of(row.config),
        "data_copy": data_copy(cfg.data),
        "data_file": data_file(cfg.data),
        "n_patches": cfg.train.n_patches,
        "batch_size": cfg.train.batch_size,
        "epochs_trained": row.eval_epochs[index],
        "schedule_epochs": row.schedule_epochs,
        "protocol": eval_protocol_name(cfg.eval),
        "eval_patches": cfg.eval.patches if cfg.eval.mode == "patches" else None,
        "probe_epochs": cfg.eval.probe_epochs,
        "official_linear_top1": row.official[index],
        **{k: measured.get(k) for k in ("linear_top1", "best_top1_on_test", "knn_top1", "step")},
        **{k: measured[k] for k in ("train_seconds", "first_step_seconds", "eval_seconds", "images_per_s")},
        "runtime": measured["runtime"],
        "timing": measured["timing"],
        "device_name": env.get("device_name"),
        "commit": env.get("commit"),
        "created": common.now_iso(),
    }


def _mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _std(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.stdev(values) if len(values) > 1 else None


def summarise(records: list[dict], meta: dict, status: str, reason: str = "") -> dict:
    """One row of the table: a (row, evaluated epoch, config key) over its seeds' records."""

    def values(key: str) -> list:
        return [r.get(key) for r in records]

    first = records[0] if records else meta
    linear, official = values("linear_top1"), first.get("official_linear_top1")
    mean = _mean(linear)
    keys = ("recipe", "note", "config_key", "overrides", "dataset", "data_copy", "data_file", "n_patches")
    keys += ("batch_size", "epochs_trained", "schedule_epochs", "protocol", "eval_patches", "probe_epochs")
    return {
        "row": first.get("row"),
        **{k: first.get(k) for k in keys},
        "status": status,
        "reason": reason,
        "seeds": values("seed"),
        "linear_top1": linear,
        "linear_top1_mean": mean,
        "linear_top1_std": _std(linear),
        "best_top1_on_test": values("best_top1_on_test"),
        "best_top1_on_test_mean": _mean(values("best_top1_on_test")),
        "knn_top1": values("knn_top1"),
        "knn_top1_mean": _mean(values("knn_top1")),
        "official_linear_top1": official,
        "delta_vs_official": mean - official if mean is not None and official is not None else None,
        "train_seconds": values("train_seconds"),
        "train_seconds_mean": _mean(values("train_seconds")),
        "first_step_seconds": values("first_step_seconds"),
        "eval_seconds": values("eval_seconds"),
        "eval_seconds_mean": _mean(values("eval_seconds")),
        "images_per_s_mean": _mean(values("images_per_s")),
    }


def summarise_rows(records: list[dict], notes: dict) -> list[dict]:
    """Every (row, config key) with records or with a note from this run, in the order first seen."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["row"], r["config_key"]), []).append(r)
    for key in notes:
        groups.setdefault(key, [])
    out = []
    for key, group in groups.items():
        note = notes.get(key, {"status": "earlier runs", "reason": ""})
        out.append(summarise(sorted(group, key=lambda r: r["seed"]), note, note["status"], note["reason"]))
    return out


def pairing(record: dict) -> tuple:
    """What must agree for fastemp's and the official code's figures to be compared: n, epochs, schedule, data
    file, protocol, and the overrides that reach the official run's evaluation (model, data, augment, eval; not
    fastemp's training-only train/optim/loss keys, nor where it ran and where the data lies)."""
    apart = ("train.", "optim.", "loss.", "data.root=", "data.path=", "data.source=", "data.download=")
    overrides = tuple(sorted(o for o in record.get("overrides") or () if not o.startswith(apart)))
    fields = ("n_patches", "epochs_trained", "schedule_epochs", "data_file", "protocol")
    return (*(record.get(k) for k in fields), overrides)


def difference(fastemp: list[float], official: list[float]) -> tuple[float | None, float | None, str]:
    """fastemp mean - official mean, its standard error, and how that was computed."""
    if not fastemp or not official:
        return None, None, "no runs on one side"
    nf, no = len(fastemp), len(official)
    sf, so = _std(fastemp), _std(official)
    delta = statistics.fmean(fastemp) - statistics.fmean(official)
    if sf is not None and so is not None:
        return delta, math.sqrt(sf**2 / nf + so**2 / no), "standard error from both sides' seed spreads"
    if sf is not None or so is not None:
        spread, side = (sf, "fastemp's") if sf is not None else (so, "the official code's")
        how = f"standard error with {side} seed spread standing in for the other side's (one run there)"
        return delta, spread * math.sqrt(1 / nf + 1 / no), how
    return delta, None, "one run each: no seed spread measured yet"


def accuracy_comparison(result: dict) -> list[dict]:
    """Each row with official runs of the same pairing: fastemp - official in linear top-1, with its uncertainty."""
    official = [r for r in result.get("official_runs", []) if r.get("status") == "PASS"]
    out = []
    for row in result["rows"]:
        twins = [o for o in official if pairing(o) == pairing(row) and o.get("linear_top1") is not None]
        fastemp = [v for v in row["linear_top1"] if v is not None]
        if not twins or not fastemp:
            continue
        theirs = [o["linear_top1"] for o in twins]
        delta, se, how = difference(fastemp, theirs)
        rates = [o["images_per_s"] for o in twins if o.get("images_per_s")]
        out.append(
            {
                "row": row["row"],
                "config_key": row["config_key"],
                "fastemp_seeds": row["seeds"],
                "fastemp_mean": statistics.fmean(fastemp),
                "fastemp_std": _std(fastemp),
                "official_seeds": [o.get("seed") for o in twins],
                "official_mean": statistics.fmean(theirs),
                "official_std": _std(theirs),
                "delta": delta,
                "delta_standard_error": se,
                "uncertainty": how,
                "images_per_s_ratio": row["images_per_s_mean"] / statistics.fmean(rates)
                if rates and row["images_per_s_mean"]
                else None,
            }
        )
    return out


def run_accuracy(
    rows: Sequence[Row],
    seeds: Sequence[int] | int,
    overrides: Sequence[str],
    data_paths: dict,
    budget: float | None = None,
    on_progress: Callable[[dict], None] | None = None,
    previous: dict | None = None,
) -> dict:
    """Every seed of every row (seeds: a list, or K = the K lowest seeds a row has not measured in `previous`,
    the results file being added to); the result after each seed goes to on_progress (partial until the end)."""
    previous = previous or {}
    history: list[dict] = list(previous.get("runs", []))
    clock = BudgetClock(budget, history)
    new: list[dict] = []
    notes: dict[tuple, dict] = {}
    environment: dict = {}

    def assemble(partial: bool) -> dict:
        env = environment or runs.environment(torch.device("cpu"))
        result = {
            **previous,
            **common.base_result("accuracy", env),
            "schema_version": 2,
            "partial": partial,
            "budget_seconds": budget,
            "wall_seconds": clock.elapsed(),
            "seeds": seeds if isinstance(seeds, list) else f"next:{seeds}",
            "overrides": list(overrides),
            "device": env.get("device_name") or env.get("device"),
            "versions": {k: env.get(k) for k in ("torch", "triton", "dali", "cuda", "python")},
            "commit": env.get("commit"),
            "runs": history + new,
            "official_runs": previous.get("official_runs", []),
        }
        result["rows"] = summarise_rows(result["runs"], notes)
        result["comparison"] = accuracy_comparison(result)
        return result

    for row in rows:
        meta = {"recipe": row.name, "note": row.note, "dataset": dataset_of(row.config)}
        meta.update(overrides=[*overrides, *row.overrides], schedule_epochs=row.schedule_epochs)
        names = [record_name(row, e) for e in row.eval_epochs]

        def note(key: str, status: str, reason: str, row=row, meta=meta, names=names) -> None:
            for i, name in enumerate(names):
                extra = {"row": name, "epochs_trained": row.eval_epochs[i], "official_linear_top1": row.official[i]}
                notes[(name, key)] = {**meta, **extra, "config_key": key, "status": status, "reason": reason}

        # data.source among the overrides (synthetic for a pipeline check) replaces every row's data
        chosen = any(o.startswith("data.source=") for o in (*overrides, *row.overrides))
        data = [] if chosen else data_overrides(dataset_of(row.config), data_paths)
        if data is None:
            note("-", "skipped", f"no {dataset_of(row.config)} data given and no canonical archive under data.root")
            continue
        try:  # a bad override or data: this row fails, the others still run
            key = config_key(row_config(row, 0, data, overrides))
        except Exception as err:
            note("-", "error", f"{type(err).__name__}: {err}")
            continue
        done = {r["seed"] for r in history + new if r["row"] == names[-1] and r["config_key"] == key}
        wanted = seeds if isinstance(seeds, list) else [s for s in range(len(done) + seeds) if s not in done]
        todo = [s for s in wanted if s not in done]
        status, reasons = "complete", []
        if len(todo) < len(wanted):
            reasons.append(f"seeds {sorted(set(wanted) - set(todo))} already measured, not run again")
        for seed in todo:
            ok, guess = clock.fits(names[-1], key)
            if not ok:
                status = "partial"
                reasons.append(
                    f"seed {seed} and later skipped: predicted {guess:.0f} s from warm steps, "
                    f"{clock.elapsed():.0f} s used of --budget {budget:g} s"
                )
                break
            start = time.perf_counter()
            try:
                cfg = row_config(row, seed, data, overrides)
                measured = run_seed(cfg, row)
            except Exception as err:
                status = "error"
                reasons.append(f"seed {seed}: {type(err).__name__}: {err}")
                break
            records = [run_record(row, i, seed, key, cfg, overrides, m) for i, m in enumerate(measured)]
            new.extend(records)
            clock.record(records[-1])
            if not environment:
                environment.update(runs.environment(resolve_device(cfg.train.device)))
            note(key, "running", "")
            print(
                f"accuracy {row.name} seed {seed}: "
                + ", ".join(f"epoch {r['epochs_trained']} linear {r['linear_top1']:.4f}" for r in records)
                + f" ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
            if on_progress:
                on_progress(assemble(partial=True))
        if status == "partial" and not any(r["row"] == names[-1] and r["config_key"] == key for r in history + new):
            status = "skipped"
        note(key, status, "; ".join(reasons))
        if on_progress:
            on_progress(assemble(partial=True))
    return assemble(partial=False)


# ------------------------------------------------------------------------------ the official code's runs


def official_run_record(peer: dict) -> dict:
    """One run of the official code (official_peer.json) as the accuracy file keeps it, whatever its status."""
    official, training, evaluation = (peer.get(k) or {} for k in ("official", "training", "evaluation"))
    epochs = [e for e in training.get("epochs", []) if e.get("done")]
    env = peer.get("environment") or {}
    data = peer.get("data") or {}
    return {
        "status": peer.get("status"),
        "error": peer.get("error") or peer.get("reason"),
        "dry_run": peer.get("dry_run"),
        "seed": official.get("seed"),
        "n_patches": official.get("n_patches"),
        "epochs_trained": evaluation.get("epochs_trained"),
        "schedule_epochs": official.get("schedule_epochs"),
        "data_copy": data.get("copy"),
        "data_file": Path(data["path"]).name if data.get("path") else None,
        "protocol": evaluation.get("eval_protocol"),
        "overrides": peer.get("overrides", []),
        **{k: evaluation.get(k) for k in ("linear_top1", "best_top1_on_test", "knn_top1", "eval_seconds")},
        "train_seconds": sum(e["loop_seconds"] for e in epochs) if epochs else None,
        "startup_seconds": training.get("startup_seconds"),
        "images_per_s": training.get("images_per_s"),
        "images_per_s_whole_loop": training.get("images_per_s_whole_loop"),
        "device_name": env.get("device_name"),
        "commit": env.get("commit"),
        "created": peer.get("created"),
    }


def read_result(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def write_accuracy(path: Path, result: dict) -> None:
    """The results file and its markdown, the rows and the comparison recomputed from the records."""
    notes = {(r["row"], r["config_key"]): r for r in result.get("rows", [])}  # their last status stays
    result["rows"] = summarise_rows(result.get("runs", []), notes)
    result["comparison"] = accuracy_comparison(result)
    common.write_results(path.parent, path.stem, result, accuracy_markdown(result))


def add_official(accuracy_path: Path, peer_path: Path) -> dict:
    """Append the official code's run (official_peer.json, or why there is none) to the accuracy file."""
    result = read_result(accuracy_path) or {"benchmark": "accuracy", "schema_version": 2, "runs": []}
    result.setdefault("environment", {})
    peer = read_result(peer_path) or {"status": "FAIL", "error": f"no readable {peer_path.name}"}
    result["official_runs"] = [*result.get("official_runs", []), official_run_record(peer)]
    write_accuracy(accuracy_path, result)
    return result


def plan(accuracy_path: Path) -> dict:
    """What the suite's next official run takes from the file: the lowest seed no official run passed with (the
    official code unseeded starts from torch's fixed default seed, so repeated runs need seeds), and the
    seconds to keep for its evaluation (the slowest official-protocol evaluation here, else of any, x 1.25 + 15 s)."""
    from .official_peer import DEFAULT_EVAL_SECONDS

    result = read_result(accuracy_path) or {}
    used = {r.get("seed") for r in result.get("official_runs", []) if r.get("status") == "PASS"}
    runs_ = result.get("runs", [])
    evals = [r["eval_seconds"] for r in runs_ if r.get("protocol") == "official"] or [r["eval_seconds"] for r in runs_]
    return {
        "official_seed": min(s for s in range(len(used) + 1) if s not in used),
        "eval_seconds": round(max(evals) * 1.25 + 15) if evals else DEFAULT_EVAL_SECONDS,
    }


# ------------------------------------------------------------------------------ report


def _pm(mean, std) -> str:
    if mean is None:
        return "n/a"
    return f"{100 * mean:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")


def _pct(value) -> str:
    return "—" if value is None else f"{100 * value:.2f}"


def _s(value) -> str:
    return "—" if value is None else f"{value:.1f}"


def _commit(value) -> str:
    return "—" if not value else value[:9] + ("+dirty" if value.endswith("+dirty") else "")


RUN_HEADERS = "seed|linear top-1 %|best on test %|kNN %|train s|first step / startup s|eval s|images/s|commit|date"
RUN_HEADERS = RUN_HEADERS.split("|")


def _run_cells(r: dict) -> list:
    """One run's cells under RUN_HEADERS: fastemp's seed (first step = compilation) or the official code's run
    (startup = imports, data, model, workers)."""
    values = [_pct(r.get(k)) for k in ("linear_top1", "best_top1_on_test", "knn_top1")]
    values += [
        _s(r.get(k)) for k in ("train_seconds", "first_step_seconds", "startup_seconds", "eval_seconds") if k in r
    ]
    return [
        r.get("seed"),
        *values,
        common.fmt(r.get("images_per_s")),
        _commit(r.get("commit")),
        (r.get("created") or "")[:10],
    ]


def accuracy_markdown(result: dict) -> str:
    env = result.get("environment") or {}
    lines = [f"# Accuracy vs the official code and table: {common.device_label(env)}", ""]
    if not str(env.get("device", "cpu")).startswith("cuda"):
        lines += [
            "**CPU run: a pipeline check of the benchmark, not an accuracy claim** (tiny model, few "
            "steps; the official figures are for the full recipe).",
            "",
        ]
    seeds = result.get("seeds")
    lines += [
        f"- last run: seeds {seeds if isinstance(seeds, str) else ', '.join(map(str, seeds or []))}; overrides on "
        f"every row: {' '.join(result.get('overrides') or []) or 'none'}"
        + (f"; budget {result['budget_seconds']:g} s" if result.get("budget_seconds") else "")
        + (" (partial: still running when written)" if result.get("partial") else ""),
        "- linear top-1 = the FINAL probe epoch; best on test = the best probe epoch, selected on the test split "
        "(as the official script prints it)",
        "- train s: training without the first step (compilation: first step s); eval s: the evaluation; neither "
        "on the other's clock. The official code's train s is its epochs' loop (startup apart), its images/s the "
        "steady rate",
        "",
    ]
    body = [
        [
            r["row"],
            r["data_copy"] or "—",
            r["n_patches"] or "—",
            f"{r['epochs_trained']} / {r['schedule_epochs']}",
            f"{r['protocol']} ({r['eval_patches']}, {r['probe_epochs']})" if r["protocol"] else "—",
            len(r["seeds"]),
            _pm(r["linear_top1_mean"], r["linear_top1_std"]),
            _pct(r["best_top1_on_test_mean"]),
            _pct(r["knn_top1_mean"]),
            _pct(r["official_linear_top1"]),
            "—" if r["delta_vs_official"] is None else f"{100 * r['delta_vs_official']:+.2f}",
            _s(r["train_seconds_mean"]),
            _s(r["eval_seconds_mean"]),
            common.fmt(r["images_per_s_mean"]),
            r["status"] + (f": {r['reason']}" if r["reason"] else ""),
        ]
        for r in result.get("rows", [])
    ]
    headers = ["row", "data copy", "n", "epochs / schedule", "protocol (patches, probe epochs)", "seeds"]
    headers += ["linear top-1 % (mean ± std)", "best on test %", "kNN %", "official README %", "Δ README"]
    lines += [common.markdown_table([*headers, "train s", "eval s", "images/s", "status"], body), ""]
    per_run = [[r["row"], r["config_key"], *_run_cells(r)] for r in result.get("runs", [])]
    lines += ["## fastemp, per seed", "", common.markdown_table(["row", "config", *RUN_HEADERS], per_run)]
    official = result.get("official_runs") or []
    if official:
        body = [
            [o.get("status"), *_run_cells(o), (o.get("error") or "")[:120] + (" (dry run)" * bool(o.get("dry_run")))]
            for o in official
        ]
        lines += [
            "",
            "## The official code on the same data (benchmarks/official_peer.py, scored by fastemp's evaluator)",
            "",
            common.markdown_table(["status", *RUN_HEADERS, "note"], body),
        ]
    comparison = result.get("comparison") or []
    if comparison:
        lines += ["", "## fastemp - official (linear top-1, final probe epoch)", ""]
        for c in comparison:
            se = "" if c["delta_standard_error"] is None else f" ± {100 * c['delta_standard_error']:.2f}"
            ratio = (
                ""
                if c["images_per_s_ratio"] is None
                else f"; images/s fastemp / official {c['images_per_s_ratio']:.3g}x"
            )
            lines.append(
                f"- {c['row']} (config {c['config_key']}): fastemp {_pm(c['fastemp_mean'], c['fastemp_std'])} "
                f"({len(c['fastemp_seeds'])} seeds), official {_pm(c['official_mean'], c['official_std'])} "
                f"({len(c['official_seeds'])} runs): Δ = {100 * c['delta']:+.2f}{se} points ({c['uncertainty']}){ratio}"
            )
    lines += ["", "## Rows", ""]
    lines += sorted({f"- `{r['row']}`: {r['note']}" for r in result.get("rows", []) if r.get("note")})
    lines += ["", "## Environment (last run)", "", common.environment_markdown(env)]
    return "\n".join(lines)
