"""The one harness under every suite (docs/benchmarks.md#how-the-numbers-are-computed): points checked before any
work, a Trainer over data loaded once, timed on the library's clock (fastemp.clock), one row per point, the result
file rewritten after every row.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import itertools
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from fastemp import distributed, runs
from fastemp.clock import Clock
from fastemp.data import load_split, load_train_images
from fastemp.runtime import resolve, resolve_device
from fastemp.validate import check_data, check_output_path

from .report import device_label


def grid(axes: dict[str, Sequence]) -> list[dict]:
    """Every combination of the named axes, in the order given: [{'n': 20, 'b': 100}, ...]."""
    return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class Wall:
    """Wall seconds on the library's clock on the host: `lap()` the seconds since the last lap (or the start),
    `total` all of them."""

    def __init__(self):
        self.clock, self.total = Clock("cpu"), 0.0
        self.clock.mark("start")

    def lap(self) -> float:
        self.clock.mark("lap")
        seconds = self.clock.seconds("lap")
        self.total += seconds
        return seconds


class Data:
    """Each split loaded once per data config and device, and every config checked before any work."""

    def __init__(self):
        self.splits: dict = {}

    def load(self, cfg, split: str, device: torch.device):
        """train: what training reads; probe: the labelled train split; test."""
        key = (dataclasses.astuple(cfg.data), split, str(device))
        if key not in self.splits:
            self.splits[key] = (
                load_train_images(cfg.data, device)
                if split == "train"
                else load_split(cfg.data, "test" if split == "test" else "train", device)
            )
        return self.splits[key]

    def check(self, cfg, evaluates: bool = False):
        """The start-up checks of `fastemp train` on cfg (values, machine, data, batch; the probe and the test
        split when it evaluates), one line each (UserError); returns its Runtime."""
        runtime = resolve(cfg)
        check_data(cfg, len(self.load(cfg, "train", runtime.device)))
        if evaluates:
            probe = self.load(cfg, "probe" if cfg.data.train_path else "train", runtime.device)
            check_data(cfg, len(probe), probe=True)
            self.load(cfg, "test", runtime.device)
        return runtime

    def trainer(self, cfg, evaluates: bool = False):
        from fastemp.train import Trainer

        runtime = self.check(cfg, evaluates)
        sets = {"test_set": self.load(cfg, "test", runtime.device)} if evaluates else {}
        return Trainer(cfg, None, False, runtime, self.load(cfg, "train", runtime.device), **sets)


def run_points(points: Sequence, measure: Callable, label: Callable, done=None) -> list[dict]:
    """measure(point) for every point, as rows {**label(point), "status": "ok", ...}; a point that runs out of
    memory is the row {"status": "oom"} (CUDA's, and those that surface as RuntimeError from cuDNN or Inductor),
    one that fails otherwise {"status": "error"}, both with the reason, and the sweep goes on. Cached blocks and
    compiled graphs are dropped between points (else recompilations pile up to dynamo's limit). done(rows) after
    every row (the result file rewritten)."""
    rows = []
    for point in points:
        row = label(point)
        print(f"fastemp bench: measuring {row}", file=sys.stderr, flush=True)
        try:
            row.update(status="ok", reason=None, **measure(point))
        except Exception as err:  # one point must not lose the rest of the sweep; its reason is in the row
            oom = isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()
            print(f"fastemp bench: {row} failed ({'oom' if oom else 'error'}): {err}", file=sys.stderr, flush=True)
            row.update(status="oom" if oom else "error", reason=f"{type(err).__name__}: {err}"[:500])
        finally:
            gc.collect()
            torch.cuda.empty_cache()  # a no-op unless CUDA is in use
            torch._dynamo.reset()
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


class Results:
    """<out>/<name>.json and .md of one benchmark. The names are decided before measuring: an existing result
    is never replaced without force (the new one goes to <name>-2, -3, ..., said on stderr); `write` rewrites
    both (rank 0 only), the markdown made from the result, with "partial": true until the end."""

    def __init__(
        self, benchmark: str, markdown: Callable, out, name: str, device, force: bool, suffixes=(".json", ".md")
    ):
        self.environment = runs.environment(resolve_device(device))
        self.environment["device_slug"] = device_slug(self.environment)
        folder = Path(out) if out else Path("benchmarks") / "results" / self.environment["device_slug"]
        check_output_path(folder, "--out")
        stem, k = name, 2
        while not force and any((folder / f"{stem}{s}").exists() for s in suffixes):
            stem, k = f"{name}-{k}", k + 1
        if stem != name:
            moved = f"{folder / name}{suffixes[0]} exists; results go to {folder / stem}{suffixes[0]}"
            print(f"fastemp bench: {moved} (--force replaces it)", file=sys.stderr)
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


def page(result: dict, title: str, *body: str) -> str:
    """A result's markdown: the title on its device, the body, the environment and the notes."""
    env = result["environment"]
    head = [f"# {title}: {device_label(env)} ({env.get('device')})", ""]
    keys = "device_name device cpu_model driver cuda torch triton dali python cpu_threads commit".split()
    facts = ["## Environment", "", *(f"- {k}: {env[k]}" for k in keys if k in env)]
    return "\n".join([*head, *body, "", *facts, *(f"- note: {n}" for n in result.get("notes", []))])
