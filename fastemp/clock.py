"""The one clock every reported duration comes from: marks are CUDA events on the current stream (never
waiting for the device) or perf_counter on the CPU; `intervals()` synchronises once. An interval is named
after the mark that ends it, so a caller leaves a pause out by naming its end apart (the Trainer's "start").
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
