"""The one clock every reported duration comes from: marks are CUDA events on the current stream (never
waiting for the device) or perf_counter on the CPU; `intervals()` synchronises once. An interval is named
after the mark that ends it, so a caller leaves a pause out by naming its end apart (the Trainer's "start").
Beside it, what a measurement reports with its seconds: CPU seconds, peak memory and model FLOP utilisation (MFU).
"""

from __future__ import annotations

import os
import re
import resource
import statistics
import time
from pathlib import Path

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


def time_calls(fn, device: torch.device | str, warmup: int, iters: int) -> list[float]:
    """Seconds of each of `iters` calls of fn() after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    clock = Clock(device)
    clock.mark("start")
    for _ in range(iters):
        fn()
        clock.mark("call")
    return [seconds for _, seconds in clock.intervals()]


def cpu_seconds(pids: list[int]) -> float:
    """CPU seconds used so far by this process (all its threads) and the processes `pids` (/proc): what a
    measurement kept busy beside its wall seconds."""
    total, tick = time.process_time(), os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total


class PeakMemory:
    """Peak memory over a region: torch.cuda.max_memory_allocated on CUDA; on the CPU the growth of the process's
    high-water mark (ru_maxrss), a lower bound (0 when an earlier region went higher): `source` says which."""

    def __init__(self, device: torch.device):
        self.device, self.start = device, 0
        self.source = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "ru_maxrss delta (lower bound)"

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.start = _rss()

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return max(0, _rss() - self.start)


def _rss() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


# Dense (no sparsity) BF16 tensor-core TFLOP/s from NVIDIA's datasheets; the first pattern that matches wins.
DATASHEET = (("H100.*PCIe", "H100 PCIe", 756.0), ("H100.*NVL", "H100 NVL", 835.0), ("H100", "H100 SXM", 989.0))
DATASHEET += (("H200", "H200", 989.0), ("A100", "A100", 312.0), ("RTX 4090", "GeForce RTX 4090", 165.0))
DATASHEET += ((r"\bL4\b", "L4", 121.0),)


def datasheet_peak(device_name: str) -> tuple[str, float] | None:
    return next(((label, tflops) for pattern, label, tflops in DATASHEET if re.search(pattern, device_name)), None)


def matmul_peak(device: torch.device, size: int | None = None) -> dict:
    """The peak MFU is measured against: median TFLOP/s of a size^3 matmul on this device (bf16 on CUDA, fp32 on
    the CPU), the datasheet's beside it for a known card."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    size = size or (8192 if device.type == "cuda" else 1024)
    gen = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(size, size, device=device, dtype=dtype, generator=gen) for _ in range(2))
    out = torch.empty_like(a)
    seconds = statistics.median(time_calls(lambda: torch.matmul(a, b, out=out), device, 3, 10))
    sheet = datasheet_peak(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    return {
        "measured_tflops": 2.0 * size**3 / seconds / 1e12,
        "dtype": str(dtype).replace("torch.", ""),
        "matmul_size": size,
        "datasheet_label": sheet and sheet[0],
        "datasheet_tflops": sheet and sheet[1],
    }


def utilisation(patches_per_s: float, flops_per_patch: float, peak: dict) -> dict:
    """Achieved model TFLOP/s (fastemp.model.flops_per_patch: recomputation not counted) and MFU against the
    measured and the datasheet peaks (matmul_peak)."""
    tflops, sheet = patches_per_s * flops_per_patch / 1e12, peak["datasheet_tflops"]
    mfu = tflops / peak["measured_tflops"]
    return {"achieved_tflops": tflops, "mfu": mfu, "mfu_datasheet": sheet and tflops / sheet}
