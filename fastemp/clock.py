"""The one clock: seconds of work on a device, read back with one synchronisation.

Every duration fastemp reports comes from a Clock: the Trainer's train and warm-up seconds (so images/s and
time to accuracy) and the benchmarks' step and phase times; a benchmark never times anything by itself.
On CUDA a mark is an event recorded on the current stream, so marking never waits for the device; on the
CPU, where torch ops run synchronously, it is time.perf_counter(). `intervals()` synchronises once and
returns the seconds between consecutive marks, each named after the mark that ends it, so a caller leaves
a pause out by naming the mark that ends it apart (the Trainer: "start" after an evaluation, "step" after
every training step).
"""

from __future__ import annotations

import time

import torch


class Clock:
    """Named marks on one device; `only`: the mark names kept (all when None)."""

    def __init__(self, device: torch.device | str = "cpu", only: tuple[str, ...] | None = None):
        self.device, self.only = torch.device(device), only
        self.marks: list[tuple[str, object]] = []

    def mark(self, phase: str) -> None:
        """The end of `phase` and the start of what follows, without waiting for the device."""
        if self.only is not None and phase not in self.only:
            return
        if self.device.type == "cuda":
            stamp = torch.cuda.Event(enable_timing=True)
            stamp.record()
        else:
            stamp = time.perf_counter()
        self.marks.append((phase, stamp))

    def intervals(self) -> list[tuple[str, float]]:
        """[(phase, seconds)] between consecutive marks since the last read; the last mark stays, as the
        start of the next interval."""
        if self.device.type == "cuda" and self.marks:
            torch.cuda.synchronize(self.device)
        out = [
            (name, start.elapsed_time(end) / 1e3 if self.device.type == "cuda" else end - start)
            for (_, start), (name, end) in zip(self.marks, self.marks[1:])
        ]
        del self.marks[:-1]
        return out

    def seconds(self, phase: str) -> float:
        """The seconds of every interval named `phase` since the last read (a read: see intervals)."""
        return sum(seconds for name, seconds in self.intervals() if name == phase)
