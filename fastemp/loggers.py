"""`train.loggers`: where a run's records go besides metrics.jsonl, which stays the source of truth.

    tensorboard  RUN/tensorboard/ event files (torch.utils.tensorboard; `pip install tensorboard`): every number
                 of a record as train/<key> or eval/<key> at its step
    csv          RUN/metrics.csv, a row per logged step, and RUN/evaluations.csv, a row per evaluation during
                 training (eval.every): metrics.jsonl's records, rewritten from it when they open (after a resume)
    wandb        a W&B run under RUN/wandb, offline unless WANDB_MODE or WANDB_API_KEY says otherwise

The Trainer feeds them the records it appends to metrics.jsonl, on rank 0: on logged steps only, with values
already on the host, so they add no device sync.
"""

from __future__ import annotations

import csv
import importlib.util
import os
from pathlib import Path

from . import runs
from .config import Config, ConfigError, to_dict

NAMES = ("tensorboard", "csv", "wandb")


def logger_names(text: str) -> list[str]:
    """train.loggers as names: a comma-separated list ('' or none: no logger)."""
    return [name.strip() for name in text.split(",") if name.strip() not in ("", "none")]


def check_loggers(text: str, training: bool = True) -> None:
    """Every name known and, when training, its package importable (one line saying what to install)."""
    for name in logger_names(text):
        if name not in NAMES:
            raise ConfigError(
                f"train.loggers: unknown logger {name!r}; use a comma-separated list of {', '.join(NAMES)}"
            )
        if training and name != "csv" and importlib.util.find_spec(name) is None:
            extra = ' (pip install -e ".[tensorboard]")' if name == "tensorboard" else ""
            raise ConfigError(f"train.loggers={text} needs the {name} package; pip install {name}{extra}, or drop it")


def _scalars(record: dict) -> dict:
    """The record's numbers (but its step) as train/<key>, or eval/<key> for an evaluation's record."""
    kind = "eval" if "linear_top1" in record else "train"
    numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {f"{kind}/{k}": v for k, v in numbers.items() if k != "step"}


def _tensorboard(run_dir: Path, cfg: Config, step: int):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=step)  # hides what a resumed run logs again

    def write(record: dict) -> None:
        for tag, value in _scalars(record).items():
            writer.add_scalar(tag, value, record["step"])

    return write, writer.close


def _csv(run_dir: Path, cfg: Config, step: int):
    files: dict[str, tuple] = {}

    def write(record: dict) -> None:
        name = "evaluations.csv" if "linear_top1" in record else "metrics.csv"
        if name not in files:
            f = open(run_dir / name, "w", newline="")
            files[name] = (f, csv.DictWriter(f, fieldnames=list(record), extrasaction="ignore"))
            files[name][1].writeheader()
        files[name][1].writerow(record)
        files[name][0].flush()

    for record in runs.read_metrics(run_dir):  # the records metrics.jsonl already holds (a resumed run's)
        write(record)
    return write, lambda: [f.close() for f, _ in files.values()]


def _wandb(run_dir: Path, cfg: Config, step: int):
    import wandb

    configured = os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY")
    run = wandb.init(
        project=os.environ.get("WANDB_PROJECT", "fastemp"),
        name=cfg.name,
        dir=str(run_dir),
        config=to_dict(cfg),
        mode=None if configured else "offline",
    )

    return lambda record: run.log(_scalars(record), step=record["step"]), run.finish


class Loggers:
    """The sinks train.loggers names, for one run folder; `step`: the first step this process logs."""

    def __init__(self, cfg: Config, run_dir: Path, step: int):
        opened = {"tensorboard": _tensorboard, "csv": _csv, "wandb": _wandb}
        self.sinks = [opened[name](Path(run_dir), cfg, step) for name in logger_names(cfg.train.loggers)]

    def write(self, record: dict) -> None:
        for write, _ in self.sinks:
            write(record)

    def close(self) -> None:
        for _, close in self.sinks:
            close()
        self.sinks = []
