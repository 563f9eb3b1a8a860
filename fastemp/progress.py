"""Progress bars on stderr, drawn only on a terminal, and plain progress lines (`line`) when stdout is not one (a
batch scheduler's log): one module-level switch for the process (`--no-progress`) rather than a parameter threaded
through data loading and evaluation, which are also library calls."""

from __future__ import annotations

import sys

from tqdm import tqdm

enabled = True
lines = False  # one plain line per logged step on stdout (set by `decide`: off for a library Trainer)


def decide(requested: bool) -> bool:
    """Bars on iff requested and stderr is a terminal (a redirected log gets none), lines iff requested and
    stdout is not a terminal; sets the switches and returns the bars'."""
    global enabled, lines
    enabled, lines = bool(requested and sys.stderr.isatty()), bool(requested and not sys.stdout.isatty())
    return enabled


def line(record: dict, total: int, batch_size: int) -> str:
    """A metrics.jsonl record as one plain line: step/total, the loss terms, images/s and the time left at that
    rate; an evaluation's record, its results."""
    head = f"step {record['step']}/{total}"
    if "linear_top1" in record:
        knn = f" knn_top1 {record['knn_top1']:.4f}" if "knn_top1" in record else ""
        return f"{head} evaluation: linear_top1 {record['linear_top1']:.4f}{knn} ({record['eval_seconds']:.1f} s)"
    left = round((total - record["step"]) * batch_size / max(record["images_per_s"], 1e-9))
    return (
        f"{head} loss {record['loss']:.4f} sim {record['loss_sim']:.4f} tcr {record['loss_tcr']:.4f} "
        f"images/s {record['images_per_s']:.1f} ETA {left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}"
    )


def bar(iterable=None, **kwargs) -> tqdm:
    """A tqdm bar that honours `decide` (`--no-progress`, not a terminal, not rank 0)."""
    kwargs.setdefault("leave", False)
    return tqdm(iterable, disable=None if enabled else True, **kwargs)
