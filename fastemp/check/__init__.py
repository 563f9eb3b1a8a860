"""`fastemp check`: every fast path against its reference, on fresh random inputs, on this machine.

    fastemp check [--device cuda|cpu] [--json FILE] [--quick] [--seed N] [--only NAME,...]

One table row per compared quantity; exit 1 if any row fails. Each run draws a new seed (printed and written to
the JSON; `--seed` replays it). Not start-up validation (fastemp.validate). What each check compares, the pass
criterion and every tolerance: docs/check.md; the tests run the same checks on the CPU (tests/check/test_cases.py).
"""

from __future__ import annotations

import math
import os
import sys
import time
import traceback
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from ..config import ConfigError
from ..runs import environment, write_json
from ..validate import check_output_path
from .augment import check_augment_stats, check_eval_forward, check_patches_compiled, check_prefetch
from .core import CheckResult, Context, compare, row  # noqa: F401  (compare: public API)
from .loss import check_cosine_to_mean, check_projection_loss, check_total_coding_rate
from .training import (
    check_activation_checkpointing,
    check_compile,
    check_ghost_batchnorm,
    check_gradient_cache,
    check_lars,
)

CHECKS: dict[str, Callable[[Context], list[CheckResult]]] = {
    "cosine_to_mean": check_cosine_to_mean,
    "tcr": check_total_coding_rate,
    "loss": check_projection_loss,
    "compile": check_compile,
    "augment": check_augment_stats,
    "patches": check_patches_compiled,
    "gradcache": check_gradient_cache,
    "checkpoint": check_activation_checkpointing,
    "ghostbn": check_ghost_batchnorm,
    "lars": check_lars,
    "prefetch": check_prefetch,
    "eval_forward": check_eval_forward,
}


def new_seed() -> int:
    return int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF


def run_checks(
    device: str | torch.device,
    quick: bool = False,
    seed: int | None = None,
    only: Sequence[str] | None = None,
    report: Callable[[CheckResult], None] | None = None,
    timings: dict[str, float] | None = None,
) -> list[CheckResult]:
    """The rows of the checks (all, or those in `only`, in that order: a caller short of time names the most
    needed first); `report` sees each row as it is made, `timings` gets each check's seconds. An exception in a
    check becomes a FAIL row; the caller's RNG state is left untouched."""
    device = torch.device(device)
    unknown = sorted(set(only or ()) - set(CHECKS))
    if unknown:
        raise ConfigError(f"unknown check(s) {', '.join(unknown)} (choose from {', '.join(CHECKS)})")
    seed = new_seed() if seed is None else seed
    results: list[CheckResult] = []
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        for name in dict.fromkeys(only or CHECKS):
            # each check draws from its own stream: `--seed S --only NAME` replays NAME's inputs exactly
            stream = (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63
            t0 = time.perf_counter()
            try:
                rows = CHECKS[name](Context(device, quick, torch.Generator().manual_seed(stream)))
            except Exception as err:  # a crash in a fast path is a failure, with its traceback shown
                traceback.print_exc(file=sys.stderr)
                note = f"{type(err).__name__}: {err}".splitlines()[0][:200]
                rows = [row(name, "-", "-", math.nan, math.nan, note=note)]
            if timings is not None:
                timings[name] = round(time.perf_counter() - t0, 3)
            for r in rows if report else ():
                report(r)
            results += rows
    return results


_COLUMNS = {"op": 24, "shape": 16, "dtype": 8, "err": 9, "tol": 9, "max_abs": 9, "max_rel": 9, "result": 7}


def _num(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.2e}"


def format_row(r: CheckResult) -> str:
    err = "nan" if r.status == "FAIL" and math.isnan(r.err) else _num(r.err)
    cells = [r.op, r.shape, r.dtype, err, _num(r.tol), _num(r.max_abs), _num(r.max_rel), r.status]
    return " ".join(f"{c:<{w}}" for c, w in zip(cells, _COLUMNS.values())) + (f" {r.note}" if r.note else "")


def cmd_check(args) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda, but CUDA is not available (use --device cpu)")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    only = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else None
    if args.json:  # before the checks run, not after
        check_output_path(args.json, "--json", is_file=True)
    seed = new_seed() if args.seed is None else args.seed
    env = {**environment(device), "triton_interpret": os.environ.get("TRITON_INTERPRET", "0")}
    print(
        f"fastemp check on {env['device_name']} ({device}); torch {env['torch']}, triton {env['triton']}, "
        f"DALI {env['dali']}; TRITON_INTERPRET={env['triton_interpret']}"
    )
    print(f"seed {seed} (replay with --seed {seed})")
    print(" ".join(f"{name:<{width}}" for name, width in _COLUMNS.items()) + " note")
    timings: dict[str, float] = {}
    results = run_checks(device, args.quick, seed, only, lambda r: print(format_row(r), flush=True), timings)
    seconds = sum(timings.values())
    counts = {s: sum(r.status == s for r in results) for s in ("pass", "FAIL", "skipped")}
    ok = counts["FAIL"] == 0
    print(
        f"{'OK' if ok else 'FAILED'}: {counts['pass']} passed, {counts['FAIL']} failed, "
        f"{counts['skipped']} skipped in {seconds:.1f} s"
    )
    if args.json:
        doc = {
            "passed": ok,
            "seed": seed,
            "device": str(device),
            "quick": bool(args.quick),
            "only": only,
            "seconds": seconds,
            "check_seconds": timings,
            "counts": counts,
            "environment": env,  # device_name, torch, triton, dali, ...
            "results": [asdict(r) for r in results],
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_json(Path(args.json), doc)
        print(f"wrote {args.json}")
    return 0 if ok else 1


def register_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "check",
        help="check every fast path against its reference on this machine",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when available, else cpu")
    p.add_argument("--json", metavar="FILE", help="also write the table, versions and seed as JSON")
    p.add_argument("--quick", action="store_true", help="fewer shapes, no torch.compile")
    p.add_argument("--seed", type=int, help="replay a run's random inputs (default: a fresh seed)")
    p.add_argument("--only", metavar="NAMES", help=f"comma-separated subset of: {', '.join(CHECKS)}")
    p.set_defaults(func=cmd_check)
