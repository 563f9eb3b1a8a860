"""`fastemp bench {throughput, accuracy, time-to-accuracy, kernels, data, profile, report, official-peer}` and
`fastemp tune`. Every argument is checked by its parser and every config, machine and data set by harness.Data.check
before anything is measured (one line, exit 2, no result file); results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import importlib
import os
from pathlib import Path

import torch

from fastemp.config import load_config
from fastemp.errors import UserError

from . import harness, tune
from .accuracy import parse_seeds, run_accuracy, select_rows
from .accuracy_report import accuracy_markdown, read_result


def _checked(kind, low, what: str, high: float | None = None, many: bool = False):
    def parse(text: str):
        try:
            values = [kind(v.strip()) for v in text.split(",") if v.strip()] if many else [kind(text)]
        except ValueError:
            values = []
        if not values or not all(low <= v <= (v if high is None else high) for v in values):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text[:80]!r}")
        return values if many else values[0]

    return parse


COUNT, AT_LEAST_1 = _checked(int, 0, "a whole number >= 0"), _checked(int, 1, "a whole number >= 1")
AT_LEAST_2 = _checked(int, 2, "a whole number >= 2")
INTS = _checked(int, 1, "comma-separated whole numbers >= 1 such as 20,200", many=True)
CHUNKS = _checked(int, 0, "comma-separated whole numbers >= 0 such as 0,10", many=True)
FRACTION = _checked(float, 1e-9, "a linear top-1 in (0, 1] such as 0.85", 1.0)
FRACTIONS = _checked(float, 1e-9, "comma-separated accuracies in (0, 1] such as 0.7,0.8", 1.0, many=True)
POSITIVE = _checked(float, 1e-9, "a number > 0")
NAMES = _checked(str, "", "comma-separated names", many=True)


# The sweep of `bench throughput` and `fastemp tune` (tune's own defaults: its description, tune.py's docstring).
SWEEP = (
    ("--n", INTS, None, "n_patches values, comma-separated (default: the config's)"),
    ("--batch", INTS, None, "batch sizes (default: the config's; tune: B and 2B)"),
    ("--backend", NAMES, None, "patch backends: torch for resident images, pillow/dali for streamed ones"),
    ("--compile", NAMES, None, "compile modes (none, default, max-autotune, ...)"),
    ("--grad-chunks", CHUNKS, None, "gradient-cache chunks (0: from free memory)"),
    ("--warmup", COUNT, 3, "untimed steps after the first (compilation) step"),
    ("--steps", AT_LEAST_1, 20, "timed steps per point (median; default 20)"),
)


def overrides_of(args) -> list[str]:
    """The command line's overrides, then --device; time-to-accuracy's --protocol first (explicit eval keys win)."""
    protocol = [f"eval.protocol={args.protocol}"] if "protocol" in args else []
    return [*protocol, *args.overrides, *([f"train.device={args.device}"] if args.device else [])]


def results_for(args, benchmark: str, markdown, device: str, suffixes=(".json", ".md")) -> harness.Results:
    if args.threads:
        torch.set_num_threads(args.threads)
    return harness.Results(benchmark, markdown, args.out, args.name, device, args.force, suffixes)


# ------------------------------------------------------------------------------ commands


def command(module: str, name: str, *rows: str):
    """`fastemp bench NAME`: MODULE.run(args, its config or None, results) writes the result; exit 1 when one of
    its `rows` is an error."""

    def run(args) -> int:
        benchmark = importlib.import_module(f"{__package__}.{module}")
        cfg = load_config(args.config, overrides_of(args)) if "config" in args else None
        device = cfg.train.device if cfg else args.device
        result = benchmark.run(args, cfg, results_for(args, name, benchmark.markdown, device))
        return int(any(r["status"] == "error" for key in rows for r in result[key]))

    return run


def cmd_tune(args) -> int:
    base, target = load_config(args.config, overrides_of(args)), Path(args.out)
    suffix = target.suffix or ".yaml"
    args.out, args.name = str(target.parent), target.stem
    results = results_for(args, "tune", tune.markdown, base.train.device, (suffix, ".json", ".md"))
    return tune.write_config(tune.run(args, base, results), results.folder / f"{results.name}{suffix}")


def cmd_accuracy(args) -> int:
    if args.list_rows:
        for row in select_rows(None):
            print(f"{row.name}: {row.note}")
        return 0
    rows, seeds = select_rows(args.rows, args.variant or ()), parse_seeds(args.seeds)
    overrides = overrides_of(args)
    device = load_config("quickstart", overrides).train.device
    args.force = args.force or args.accumulate
    results = results_for(args, "accuracy", accuracy_markdown, device)
    previous = read_result(results.json) if args.accumulate and results.json.exists() else {}
    if previous is None:
        raise UserError(f"--accumulate: {results.json} is not a readable results file; move it away or fix it")
    paths = {"cifar10": args.cifar10, "cifar100": args.cifar100}
    result = run_accuracy(rows, seeds, overrides, paths, args.budget, results, previous)
    return int(any(r["status"] == "error" for r in result["rows"]))


# ------------------------------------------------------------------------------ parsers


def _config_args(p, default: str) -> None:
    p.add_argument("--config", default=default, help=f"YAML file or built-in name (default: {default})")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. data.source=synthetic")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (default: the config's train.device)")


def _add(p, *specs) -> None:
    """Options as (flag, type, default, help) rows."""
    for flag, kind, default, text in specs:
        if kind is bool:
            p.add_argument(flag, action="store_true", help=text)
        else:
            p.add_argument(flag, type=kind, default=default, help=text)


def _output(p, name: str | None, func) -> None:
    """The result-file options every benchmark shares (tune, no name: its --out is a file), and the command to run."""
    p.set_defaults(func=func)
    _add(p, ("--threads", AT_LEAST_1, None, "torch CPU threads (e.g. 1 on a busy shared machine)"))
    if name:
        _add(p, ("--out", str, None, "output folder (default: benchmarks/results/<device>)"))
        _add(p, ("--name", str, name, f"file name stem (default: {name})"))
    _add(p, ("--force", bool, None, "replace existing result files (default: write <name>-2, -3, ... beside them)"))


def register_cli(subparsers) -> None:
    workers = min(16, os.cpu_count() or 1)
    sub = subparsers.add_parser("bench", help="benchmarks (docs/benchmarks.md)").add_subparsers(required=True)
    p = sub.add_parser("throughput", help="images/s, MFU, peak memory and the step split over a grid (+ baseline)")
    _config_args(p, "cifar10_n20_1ep")
    _add(
        p,
        *SWEEP,
        ("--split-steps", COUNT, 20, "instrumented steps of the step split (0: none)"),
        ("--baseline", bool, None, "also measure the reference-style baseline"),
        ("--baseline-workers", COUNT, workers, "DataLoader workers of the baseline (default: min(16, cores))"),
        ("--baseline-steps", AT_LEAST_1, None, "timed baseline steps (default: max(20, 2 x workers))"),
        ("--peak-size", AT_LEAST_1, None, "matmul size of the measured peak (default 8192 GPU, 1024 CPU)"),
    )
    _output(p, "throughput", command("throughput", "throughput", "points", "baselines"))

    p = sub.add_parser("accuracy", help="the official table's rows over seeds, beside the official figures and code")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides for every row, e.g. model.width=16")
    _add(
        p,
        ("--device", str, None, "auto | cpu | cuda | cuda:N (default: the configs' train.device)"),
        ("--rows", NAMES, None, "comma-separated row names (default: all; ROW@E: one evaluated epoch)"),
        ("--list-rows", bool, None, "print the rows and what each reproduces, then exit"),
        ("--seeds", str, "3", "a count (seeds 0..N-1), a list, or next:K (K seeds not yet measured) (default 3)"),
        ("--accumulate", bool, None, "add to <out>/<name>.json (seeds already there are not run again)"),
        ("--budget", POSITIVE, None, "wall seconds: seeds predicted (from warm steps) to end past it are skipped"),
        ("--cifar10", str, None, "CIFAR-10: the JPEG copy (.tar.gz or folder) or cifar-10-python.tar.gz"),
        ("--cifar100", str, None, "CIFAR-100, likewise (its rows are skipped when there is none)"),
    )
    text = 'rerun every row with these overrides as ROW+LABEL (repeatable), e.g. --variant fp32 "model.precision=fp32"'
    p.add_argument("--variant", nargs=2, action="append", metavar=("LABEL", "OVERRIDES"), help=text)
    _output(p, "accuracy", cmd_accuracy)

    p = sub.add_parser("time-to-accuracy", help="training seconds until the linear probe reaches --target")
    _config_args(p, "cifar10_n20_10ep")
    _add(
        p,
        ("--target", FRACTION, 0.85, "linear-probe top-1 to reach (default 0.85)"),
        ("--eval-every", AT_LEAST_1, None, "training steps between evaluations (default: half an epoch)"),
        ("--max-wall-seconds", POSITIVE, None, "stop before the next evaluation interval would end past this"),
        ("--milestones", FRACTIONS, [], "lower accuracies whose first times are reported too, e.g. 0.7,0.75,0.8"),
    )
    p.add_argument("--protocol", choices=("official", "cheap"), default="official", help="evaluation protocol")
    _output(p, "time_to_accuracy", command("accuracy", "time_to_accuracy"))

    p = sub.add_parser("kernels", help="cosine-to-mean, TCR, the patch recipe and LARS, each beside its reference")
    _add(
        p,
        ("--device", str, "auto", "auto | cpu | cuda | cuda:N"),
        ("--n", INTS, "20,50,200", "patches per image (default 20,50,200)"),
        ("--batch", INTS, "100,256", "images per batch (default 100,256)"),
        ("--dim", INTS, "1024", "projection dimension d (default 1024)"),
        ("--width", AT_LEAST_1, 64, "model width of the LARS rows (default 64: the standard model)"),
        ("--warmup", COUNT, 3, "untimed calls"),
        ("--iters", AT_LEAST_1, 20, "timed calls per measurement (median)"),
        ("--images", AT_LEAST_1, 10_000, "random 32x32 images for the augmentation rows"),
        ("--baseline-aug-patches", AT_LEAST_1, 200, "patches for the baseline's per-patch CPU rate"),
    )
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the compiled variants")
    _output(p, "kernels", command("kernels", "kernels", "rows", "augmentation"))

    p = sub.add_parser("data", help="the data path: Pillow workers vs DALI vs resident images vs the step alone")
    p.add_argument("overrides", nargs="*", help="config overrides of the step, e.g. model.width=8")
    _add(
        p,
        ("--device", str, "auto", "auto | cpu | cuda | cuda:N"),
        ("--sources", INTS, "32,64,400", "source image sizes in px (default 32,64,400)"),
        ("--patch", AT_LEAST_1, None, "patch size for every source (default: 32 up to 64 px sources, else 224)"),
        ("--n", AT_LEAST_2, 20, "patches per image (default 20)"),
        ("--batch", AT_LEAST_1, 100, "images per step (default 100)"),
        ("--workers", COUNT, workers, "Pillow worker processes (default: min(16, cores))"),
        ("--warmup", COUNT, 2, "untimed steps per arm (default 2)"),
        ("--steps", AT_LEAST_1, 10, "timed steps, then timed calls of the data path alone, per arm (default 10)"),
        ("--classes", AT_LEAST_2, 10, "classes of each synthetic folder (default 10)"),
        ("--per-class", AT_LEAST_1, 20, "training images per class (at least 2 batches in all)"),
        ("--compile", str, "none", "model.compile of the step (default none)"),
    )
    _output(p, "data", command("data_bench", "data", "rows"))

    p = sub.add_parser("profile", help="where a training step's time goes, kernel by kernel (torch.profiler)")
    _config_args(p, "cifar10_n20_1ep")
    _add(
        p,
        ("--warmup", COUNT, 3, "untraced steps after the first (compile) step"),
        ("--steps", AT_LEAST_1, 5, "traced steps (default 5)"),
        ("--trace", str, None, "also write the traced steps as a Chrome trace (chrome://tracing, Perfetto) to FILE"),
    )
    _output(p, "profile", command("profile", "profile"))

    from .official_peer import add_arguments as peer_arguments
    from .report import add_arguments as report_arguments

    report_arguments(sub.add_parser("report", help="regenerate the README performance table from benchmarks/results"))
    peer_arguments(sub.add_parser("official-peer", help="the official code on this GPU and data, scored by fastemp"))

    p = subparsers.add_parser("tune", help="the fastest settings for this card, as a config", description=tune.__doc__)
    _config_args(p, "cifar10_n20_1ep")
    _add(
        p,
        *SWEEP,
        ("--cudnn-benchmark", NAMES, None, "model.cudnn_benchmark values, e.g. off,on"),
        ("--patch-compile", NAMES, None, "data.patch_compile values, e.g. off,on (default: the config's)"),
        ("--memory-budget-gib", POSITIVE, None, "peak-memory budget (default: 90%% of the card)"),
        ("--out", str, "tuned.yaml", "the config to write (default: tuned.yaml; JSON and markdown beside it)"),
    )
    _output(p, None, cmd_tune)
