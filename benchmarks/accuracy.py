"""`fastemp bench accuracy`: the official EMP-SSL table's rows, over seeds, beside the official figures.

Each row trains with the public Trainer (Trainer(cfg), train_until, evaluate) and is evaluated under the
config's eval protocol (default: official, docs/evaluation.md) after the epochs it names; one result row
per (row, evaluated epoch), each over every seed: the values, mean +- std, and the official figure beside
it, with the data copy named (canonical archive or JPEG copy). Evaluation is off the training clock; the
training seconds exclude the first step (compilation), which is reported apart.

Variants (`--variant LABEL "key=value ..."`) run every selected row again with those overrides on top, as
rows of their own named ROW+LABEL: an ablation (BN grouping, data order, precision, schedule, protocol) is
one variant, measured over the same seeds, with no code change.

`--budget` bounds the wall-clock time: before each seed the bench predicts its duration from the seeds
already run (same row first, else the seconds per training patch and per evaluation so far) and skips it
when it would end past the budget, recording why. Results are written after every seed ("partial": true
until the end), so a run cut by a timeout keeps every finished seed.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from fastemp import runs
from fastemp.config import eval_protocol_name, load_config
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


def parse_seeds(text: str) -> list[int]:
    """'3' = seeds 0, 1, 2; '0,5,7' = those seeds."""
    if "," in text:
        return [int(s) for s in text.split(",") if s.strip()]
    if int(text) < 1:
        raise ValueError(f"--seeds must be a count >= 1 or a list, got {text!r}")
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


def run_seed(cfg, row: Row) -> list[dict]:
    """Train one seed of a row; one record per evaluated epoch."""
    trainer = Trainer(cfg, None, progress=False)
    try:
        _ = trainer.test_set  # a missing test split fails before training
        trainer.train_until(1)
        first_step = trainer.warmup_seconds + trainer.train_seconds
        records = []
        for epoch in row.eval_epochs:
            trainer.train_until(epoch * trainer.steps_per_epoch)
            start = time.perf_counter()
            metrics = trainer.evaluate()
            eval_seconds = time.perf_counter() - start
            clock = trainer.warmup_seconds + trainer.train_seconds
            records.append(
                {
                    "epoch": epoch,
                    "step": trainer.step,
                    "train_seconds": clock - first_step,
                    "train_seconds_incl_first_step": clock,
                    "first_step_seconds": first_step,
                    "eval_seconds": eval_seconds,
                    "images_per_s": trainer.images_per_second(),
                    "data": trainer.train_set.description,
                    **metrics,
                }
            )
        return records
    finally:
        del trainer
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _std(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.stdev(values) if len(values) > 1 else None


def summarise(
    row: Row, epoch_index: int, cfg, seeds: list[int], records: list[dict], status: str, reason: str = ""
) -> dict:
    """One JSON row: a (row, evaluated epoch) over its seeds."""
    epoch = row.eval_epochs[epoch_index]
    official = row.official[epoch_index]
    linear = [r["linear_top1"] for r in records]
    mean = _mean(linear)
    name = row.name if len(row.eval_epochs) == 1 else f"{row.name}@{epoch}"
    return {
        "row": name,
        "recipe": row.name,
        "note": row.note,
        "status": status,
        "reason": reason,
        "dataset": dataset_of(row.config),
        "data_copy": data_copy(cfg.data) if cfg else None,
        "n_patches": cfg.train.n_patches if cfg else None,
        "batch_size": cfg.train.batch_size if cfg else None,
        "epochs_trained": epoch,
        "schedule_epochs": row.schedule_epochs,
        "protocol": eval_protocol_name(cfg.eval) if cfg else None,
        "eval_patches": cfg.eval.patches if cfg and cfg.eval.mode == "patches" else None,
        "probe_epochs": cfg.eval.probe_epochs if cfg else None,
        "overrides": list(row.overrides),
        "seeds": seeds[: len(records)],
        "linear_top1": linear,
        "linear_top1_mean": mean,
        "linear_top1_std": _std(linear),
        "best_top1_on_test": [r["best_top1_on_test"] for r in records],
        "best_top1_on_test_mean": _mean([r["best_top1_on_test"] for r in records]),
        "knn_top1": [r.get("knn_top1") for r in records],
        "knn_top1_mean": _mean([r.get("knn_top1") for r in records]),
        "official_linear_top1": official,
        "delta_vs_official": mean - official if mean is not None and official is not None else None,
        "train_seconds": [r["train_seconds"] for r in records],
        "train_seconds_mean": _mean([r["train_seconds"] for r in records]),
        "first_step_seconds": [r["first_step_seconds"] for r in records],
        "eval_seconds": [r["eval_seconds"] for r in records],
        "eval_seconds_mean": _mean([r["eval_seconds"] for r in records]),
        "images_per_s_mean": _mean([r["images_per_s"] for r in records]),
    }


class BudgetClock:
    """Predicts a seed's wall seconds from what ran so far and says whether it still fits the budget."""

    def __init__(self, budget: float | None):
        self.budget, self.start = budget, time.perf_counter()
        self.by_row: dict[str, float] = {}
        self.train_patch_seconds: list[float] = []  # wall seconds per training patch (setup included)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def predict(self, row: Row, cfg) -> float | None:
        if row.name in self.by_row:
            return self.by_row[row.name]
        if not self.train_patch_seconds or cfg is None:
            return None
        patches = (
            row.eval_epochs[-1] * 50_000 * cfg.train.n_patches
            if cfg.data.source != "synthetic"
            else row.eval_epochs[-1] * cfg.data.synthetic_train * cfg.train.n_patches
        )
        return statistics.fmean(self.train_patch_seconds) * patches

    def fits(self, row: Row, cfg) -> bool:
        guess = self.predict(row, cfg)
        return self.budget is None or guess is None or self.elapsed() + guess <= self.budget

    def record(self, row: Row, cfg, seconds: float, records: list[dict]) -> None:
        self.by_row[row.name] = seconds
        images = records[-1]["step"] * cfg.train.batch_size if records else 0
        if images:
            self.train_patch_seconds.append(seconds / (images * cfg.train.n_patches))


def run_accuracy(
    rows: Sequence[Row],
    seeds: Sequence[int],
    overrides: Sequence[str],
    data_paths: dict,
    budget: float | None = None,
    on_progress: Callable[[dict], None] | None = None,
) -> dict:
    """Every seed of every row; the result after each seed goes to on_progress (partial until the end)."""
    clock = BudgetClock(budget)
    environment: dict = {}
    table: list[dict] = []
    seeds = list(seeds)

    def assemble(partial: bool) -> dict:
        env = environment or runs.environment(torch.device("cpu"))
        result = {
            **common.base_result("accuracy", env),
            "partial": partial,
            "budget_seconds": budget,
            "wall_seconds": clock.elapsed(),
            "seeds": seeds,
            "overrides": list(overrides),
            "device": env.get("device_name") or env.get("device"),
            "versions": {k: env.get(k) for k in ("torch", "triton", "dali", "cuda", "python")},
            "commit": env.get("commit"),
            "rows": table,
        }
        return result

    for row in rows:
        # data.source among the overrides (synthetic for a pipeline check) replaces every row's data
        chosen = any(o.startswith("data.source=") for o in (*overrides, *row.overrides))
        data = [] if chosen else data_overrides(dataset_of(row.config), data_paths)
        if data is None:
            table.extend(
                summarise(
                    row,
                    i,
                    None,
                    seeds,
                    [],
                    "skipped",
                    f"no {dataset_of(row.config)} data given and no canonical archive under data.root",
                )
                for i in range(len(row.eval_epochs))
            )
            continue
        per_epoch: list[list[dict]] = [[] for _ in row.eval_epochs]
        slots = [len(table) + i for i in range(len(row.eval_epochs))]
        cfg, status, reason = None, "complete", ""
        table.extend({} for _ in slots)
        for seed in seeds:
            try:
                cfg = row_config(row, seed, data, overrides)
            except Exception as err:  # a bad override or data: this row fails, the others still run
                status, reason = "error", f"{type(err).__name__}: {err}"
                break
            if not clock.fits(row, cfg):
                status, reason = "partial", f"seed {seed} and later skipped: they would end past --budget {budget:g} s"
                break
            start = time.perf_counter()
            try:
                records = run_seed(cfg, row)
            except Exception as err:
                status, reason = "error", f"seed {seed}: {type(err).__name__}: {err}"
                break
            clock.record(row, cfg, time.perf_counter() - start, records)
            if not environment:
                environment.update(runs.environment(resolve_device(cfg.train.device)))
            for i, record in enumerate(records):
                per_epoch[i].append(record)
                table[slots[i]] = summarise(row, i, cfg, seeds, per_epoch[i], "running")
            print(
                f"accuracy {row.name} seed {seed}: "
                + ", ".join(f"epoch {r['epoch']} linear {r['linear_top1']:.4f}" for r in records)
                + f" ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
            if on_progress:
                on_progress(assemble(partial=True))
        if status == "partial" and not per_epoch[0]:
            status = "skipped"
        for i in range(len(row.eval_epochs)):
            table[slots[i]] = summarise(row, i, cfg, seeds, per_epoch[i], status, reason)
        if on_progress:
            on_progress(assemble(partial=True))
    return assemble(partial=False)


def _pm(mean, std) -> str:
    if mean is None:
        return "n/a"
    return f"{100 * mean:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")


def _pct(value) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def accuracy_markdown(result: dict) -> str:
    env = result["environment"]
    cpu = not str(env.get("device", "cpu")).startswith("cuda")
    lines = [f"# Accuracy vs the official table: {common.device_label(env)}", ""]
    if cpu:
        lines += [
            "**CPU run: a pipeline check of the benchmark, not an accuracy claim** (tiny model, few "
            "steps; the official figures are for the full recipe).",
            "",
        ]
    lines += [
        f"- seeds: {', '.join(map(str, result['seeds']))}; overrides on every row: "
        f"{' '.join(result['overrides']) or 'none'}"
        + (f"; budget {result['budget_seconds']:g} s" if result["budget_seconds"] else "")
        + (" (partial: still running when written)" if result["partial"] else ""),
        "- linear top-1 = the FINAL probe epoch (the official script also prints the best epoch on test: "
        "column 'best on test', selected on the test split)",
        "- train s: training clock without the first step (compilation); evaluation is off the clock",
        "",
    ]
    headers = [
        "row",
        "data copy",
        "n",
        "epochs / schedule",
        "protocol (patches, probe epochs)",
        "linear top-1 % (mean ± std)",
        "per seed",
        "best on test %",
        "kNN %",
        "official %",
        "Δ",
        "train s",
        "eval s",
        "status",
    ]
    body = []
    for r in result["rows"]:
        if not r:
            continue
        body.append(
            [
                r["row"],
                r["data_copy"] or "—",
                r["n_patches"] or "—",
                f"{r['epochs_trained']} / {r['schedule_epochs']}",
                f"{r['protocol']} ({r['eval_patches']}, {r['probe_epochs']})" if r["protocol"] else "—",
                _pm(r["linear_top1_mean"], r["linear_top1_std"]),
                " ".join(f"{100 * v:.2f}" for v in r["linear_top1"]) or "—",
                _pct(r["best_top1_on_test_mean"]),
                _pct(r["knn_top1_mean"]),
                _pct(r["official_linear_top1"]),
                "—" if r["delta_vs_official"] is None else f"{100 * r['delta_vs_official']:+.1f}",
                "—" if r["train_seconds_mean"] is None else f"{r['train_seconds_mean']:.1f}",
                "—" if r["eval_seconds_mean"] is None else f"{r['eval_seconds_mean']:.1f}",
                r["status"] + (f": {r['reason']}" if r["reason"] else ""),
            ]
        )
    lines += [common.markdown_table(headers, body), "", "## Rows", ""]
    lines += [f"- `{r['row']}`: {r['note']}" for r in result["rows"] if r]
    lines += ["", "## Environment", "", common.environment_markdown(env)]
    return "\n".join(lines)


def plot_accuracy_vs_seconds(result: dict, path: Path) -> Path | None:
    """PNG: linear top-1 (mean ± std over seeds) vs training seconds, official figures beside; None without
    matplotlib or without a finished row."""
    rows = [r for r in result["rows"] if r and r["linear_top1_mean"] is not None]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        x = r["train_seconds_mean"]
        ax.errorbar(x, 100 * r["linear_top1_mean"], yerr=100 * (r["linear_top1_std"] or 0), fmt="o", capsize=3)
        ax.annotate(r["row"], (x, 100 * r["linear_top1_mean"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
        if r["official_linear_top1"] is not None:
            ax.plot(x, 100 * r["official_linear_top1"], marker="_", markersize=14, color="gray")
    ax.set_xlabel("training seconds (first step excluded)")
    ax.set_ylabel("linear probe top-1 % (final probe epoch)")
    ax.set_title(f"{common.device_label(result['environment'])} (gray bars: official README)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def attach_peer(accuracy_path: Path, peer_path: Path) -> dict:
    """Put the official code's peer run (official_peer.json, or why it did not run) into the accuracy result and
    its markdown, so the suite publishes both as one file. A missing accuracy result becomes a stub saying so."""
    try:
        result = json.loads(accuracy_path.read_text())
    except (OSError, json.JSONDecodeError):
        result = {"benchmark": "accuracy", "partial": True, "rows": [], "note": "fastemp's accuracy run wrote nothing"}
    try:
        peer = json.loads(peer_path.read_text())
    except (OSError, json.JSONDecodeError):
        peer = {"benchmark": "official_peer", "status": "SKIP", "reason": f"no readable {peer_path.name}"}
    result["official_peer"] = peer
    runs.write_json(accuracy_path, result)
    scalars = [
        f"- {key}: {common.fmt(value)}"
        for key, value in peer.items()
        if isinstance(value, (int, float, str, bool)) and key not in ("command", "created")
    ]
    md = accuracy_path.with_suffix(".md")
    text = md.read_text().rstrip() + "\n\n" if md.exists() else "# Accuracy\n\n"
    md.write_text(
        text + "## The official code on the same data (benchmarks/official_peer.py)\n\n" + "\n".join(scalars) + "\n"
    )
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastemp.benchmarks.accuracy")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("attach-peer", help="put official_peer.json into accuracy.json and accuracy.md")
    p.add_argument("--accuracy", required=True, type=Path)
    p.add_argument("--peer", required=True, type=Path)
    args = parser.parse_args(argv)
    attach_peer(args.accuracy, args.peer)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
