"""A run's records: appended to metrics.jsonl, the source of truth, then given to the `train.loggers` sinks
(tensorboard, csv, wandb: what each writes is in docs/training.md). Rank 0 alone writes, on logged steps only,
values already on the host: the sinks add no device sync.
"""

from __future__ import annotations

import contextlib
import csv
import importlib
import os
from pathlib import Path

from . import distributed, runs
from . import progress as bars
from .config import Config, ConfigError, to_dict


def logger_names(text: str) -> list[str]:
    """train.loggers as names: a comma-separated list ('' or none: no logger)."""
    return [name.strip() for name in text.split(",") if name.strip() not in ("", "none")]


def check_loggers(text: str) -> None:
    """Every name known and its package imported now, not on the clock at the first record."""
    for name in logger_names(text):
        if name not in SINKS:
            raise ConfigError(
                f"train.loggers: unknown logger {name!r}; use a comma-separated list of {', '.join(SINKS)}"
            )
        try:
            importlib.import_module({"tensorboard": "torch.utils.tensorboard", "csv": "csv"}.get(name, name))
        except ImportError:
            extra = ' (pip install -e ".[tensorboard]")' if name == "tensorboard" else ""
            raise ConfigError(
                f"train.loggers={text} needs the {name} package; pip install {name}{extra}, or drop it"
            ) from None


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

    for record in runs.read_lines(run_dir / runs.METRICS):  # what a resumed run logged before
        write(record)
    return write, lambda: [f.close() for f, _ in files.values()]


def _wandb(run_dir: Path, cfg: Config, step: int):
    import wandb

    configured = os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY")
    mode = None if configured else "offline"
    project = os.environ.get("WANDB_PROJECT", "fastemp")
    run = wandb.init(project=project, name=cfg.name, dir=str(run_dir), config=to_dict(cfg), mode=mode)
    return lambda record: run.log(_scalars(record), step=record["step"]), run.finish


SINKS = {"tensorboard": _tensorboard, "csv": _csv, "wandb": _wandb}  # each opens as (write, close)


class Records(contextlib.AbstractContextManager):
    """A run folder's records on rank 0. The sinks open at the first record this process writes (a resumed run's
    CSV is rewritten from metrics.jsonl); off a terminal each record is also printed (fastemp.progress.line)."""

    def __init__(self, cfg: Config, run_dir: Path | None, total_steps: int):
        self.cfg, self.total_steps, self.sinks = cfg, total_steps, None
        self.run_dir = Path(run_dir) if run_dir and distributed.is_main() else None

    def write(self, record: dict) -> None:
        if self.run_dir is None:
            return
        if self.sinks is None:
            names = logger_names(self.cfg.train.loggers)
            self.sinks = [SINKS[name](self.run_dir, self.cfg, record["step"]) for name in names]
        runs.append_line(self.run_dir / runs.METRICS, record)
        for write, _ in self.sinks:
            write(record)
        if bars.lines:
            print(bars.line(record, self.total_steps, self.cfg.train.batch_size), flush=True)

    def __exit__(self, *exc) -> None:
        for _, close in self.sinks or ():
            close()
        self.sinks = None
