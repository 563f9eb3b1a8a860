"""The one benchmark harness; every suite (throughput, tune, profile, kernels, data, accuracy) is a thin user:

points   a grid of named axes (grid); every point's config checked, and its data loaded, before anything
         is measured (Data.check: the checks `fastemp train` makes, through fastemp.validate and resolve)
build    through the library: a Trainer of the point's config over data loaded once (Data.trainer)
measure  warm-up calls, then timed ones on fastemp.clock.Clock, the library's one clock (time_calls; a
         Trainer's steps are timed by the Trainer, or by the clock its train_step marks)
reduce   median and spread (spread)
record   one row per point (run_points: an out-of-memory point is a row, not a crash), the result file
         rewritten after every row (Results), so a run cut at a time limit keeps what it measured
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import itertools
import re
import resource
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from fastemp import distributed, runs
from fastemp.clock import Clock
from fastemp.data import load_split, load_train_images
from fastemp.runtime import resolve, resolve_device
from fastemp.validate import check_config, check_data, check_output_path, check_probe


def parse_list(text: str | None, kind: Callable = str) -> list | None:
    """'20,200' -> [20, 200]; None or '' -> None (the axis keeps the config's value)."""
    if text is None or not str(text).strip():
        return None
    return [kind(item.strip()) for item in str(text).split(",") if item.strip()]


def grid(axes: dict[str, Sequence]) -> list[dict]:
    """Every combination of the named axes, in the order given: [{'n': 20, 'b': 100}, ...]."""
    return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def time_calls(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> list[float]:
    """Seconds of each of `iters` calls of fn() after `warmup` untimed ones, on the library's clock."""
    for _ in range(warmup):
        fn()
    clock = Clock(device)
    clock.mark("start")
    for _ in range(iters):
        fn()
        clock.mark("call")
    return [seconds for _, seconds in clock.intervals()]


class Wall:
    """Wall seconds on the library's clock on the host (perf_counter): `lap()` is the seconds since the last lap
    (or the start), `total` all of them."""

    def __init__(self):
        self.clock, self.total = Clock("cpu"), 0.0
        self.clock.mark("start")

    def lap(self) -> float:
        self.clock.mark("lap")
        seconds = sum(s for _, s in self.clock.intervals())
        self.total += seconds
        return seconds


def spread(seconds: Sequence[float]) -> dict:
    """The median of a measurement and its spread (the callers never pass no values: --steps >= 1)."""
    return {"median_s": statistics.median(seconds), "min_s": min(seconds), "max_s": max(seconds), "iters": len(seconds)}


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


def free_device_memory(device: torch.device) -> None:
    """Drop cached blocks and compiled graphs between points (else recompilations pile up to dynamo's limit)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    torch._dynamo.reset()


def is_out_of_memory(err: BaseException) -> bool:
    """CUDA OOM, including the ones that surface as RuntimeError (cuDNN, Inductor autotuning)."""
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


class Data:
    """Each split loaded once per data config and device, and every config checked before any work."""

    def __init__(self):
        self.splits: dict = {}

    def load(self, cfg, split: str, device: torch.device):
        key = (dataclasses.astuple(cfg.data), split, str(device))
        if key not in self.splits:  # train: what training reads; probe: the labelled train split; test
            train = split == "train"
            load = (
                load_train_images(cfg.data, device)
                if train
                else load_split(cfg.data, split.replace("probe", "train"), device)
            )
            self.splits[key] = load
        return self.splits[key]

    def check(self, cfg, evaluates: bool = False, check_memory: bool = False):
        """The start-up checks of `fastemp train` on cfg (values, machine, data, batch; the probe and the test
        split when it evaluates), one line each (UserError); returns its Runtime."""
        check_config(cfg)
        runtime = resolve(cfg, check_memory=check_memory)
        check_data(cfg, len(self.load(cfg, "train", runtime.device)))
        if evaluates:
            probe = self.load(cfg, "probe" if cfg.data.train_path else "train", runtime.device)
            check_probe(cfg, len(probe))
            self.load(cfg, "test", runtime.device)
        return runtime

    def trainer(self, cfg, evaluates: bool = False):
        from fastemp.train import Trainer

        runtime = self.check(cfg, evaluates)
        sets = {"test_set": self.load(cfg, "test", runtime.device)} if evaluates else {}
        return Trainer(cfg, None, False, runtime, self.load(cfg, "train", runtime.device), **sets)


def run_points(points: Sequence, measure: Callable, label: Callable, device: torch.device, done=None) -> list[dict]:
    """measure(point) for every point, as rows {**label(point), "status": "ok", ...}; a point that runs out of
    memory is the row {"status": "oom"}, one that fails otherwise {"status": "error"}, both with the reason, and
    the sweep goes on. done(rows) after every row (the result file rewritten)."""
    rows = []
    for point in points:
        row = label(point)
        print(f"fastemp bench: measuring {row}", file=sys.stderr, flush=True)
        try:
            row.update(status="ok", reason=None, **measure(point))
        except Exception as err:  # one point must not lose the rest of the sweep; its reason is in the row
            status = "oom" if is_out_of_memory(err) else "error"
            print(f"fastemp bench: {row} failed ({status}): {err}", file=sys.stderr, flush=True)
            row.update(status=status, reason=f"{type(err).__name__}: {err}"[:500])
        finally:
            free_device_memory(device)
        rows.append(row)
        if done:
            done(rows)
    return rows


def device_slug(environment: dict) -> str:
    """A folder name for a device: 'cpu', or e.g. 'h100-80gb-hbm3' from 'NVIDIA H100 80GB HBM3'."""
    if not str(environment.get("device", "cpu")).startswith("cuda"):
        return "cpu"
    name = re.sub(r"^nvidia\s+", "", str(environment.get("device_name", "gpu")).strip(), flags=re.I)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def cpu_model() -> str | None:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return None


class Results:
    """<out>/<name>.json and .md of one benchmark. The names are decided before measuring: an existing result
    is never replaced without force (the new one goes to <name>-2, -3, ..., said on stderr); `write` rewrites
    both (rank 0 only), the markdown made from the result, with "partial": true until the end."""

    def __init__(
        self,
        benchmark: str,
        markdown: Callable,
        out: str | None,
        name: str,
        device,
        force: bool,
        suffixes=(".json", ".md"),
    ):
        dev = resolve_device(device)
        self.environment = runs.environment(dev)
        self.environment.update(device_slug=device_slug(self.environment), cpu_model=cpu_model())
        folder = Path(out) if out else Path("benchmarks") / "results" / self.environment["device_slug"]
        check_output_path(folder, "--out")
        stem, k = name, 2
        while not force and any((folder / f"{stem}{s}").exists() for s in suffixes):
            stem, k = f"{name}-{k}", k + 1
        if stem != name:
            print(
                f"fastemp bench: {folder / name}{suffixes[0]} exists; results go to {folder / stem}{suffixes[0]} "
                "(--force replaces it)",
                file=sys.stderr,
            )
        self.folder, self.name, self.markdown = folder, stem, markdown
        called = ["fastemp", *sys.argv[1:]] if sys.argv and sys.argv[0].endswith("fastemp") else sys.argv
        self.base = {"benchmark": benchmark, "schema_version": 1, "created": now_iso()}
        self.base.update(command=" ".join(called), environment=self.environment)

    @property
    def json(self) -> Path:
        return self.folder / f"{self.name}.json"

    def write(self, result: dict, final: bool = False) -> dict:
        result = {**self.base, **result, "partial": not final}
        markdown = self.markdown(result)
        if distributed.is_main():
            self.folder.mkdir(parents=True, exist_ok=True)
            runs.write_json(self.json, result)
            (self.folder / f"{self.name}.md").write_text(markdown.rstrip() + "\n")
            if final:
                print(markdown + f"\n\nwrote {self.json} and {self.name}.md")
        return result
