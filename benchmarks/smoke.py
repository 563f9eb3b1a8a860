"""The GPU suite's first part: every GPU path once, in about a minute, one PASS/FAIL/SKIP line each.

    python3 -m fastemp.benchmarks.smoke run ITEM --record FILE [--dry-run]
    python3 -m fastemp.benchmarks.smoke report --record FILE --out DIR

benchmarks/gpu_suite.sh runs each item in its own process under its own time limit (a hung item
costs its limit, never the whole call) and appends one JSON line per item to FILE; a process killed
at its limit gets its FAIL line from the shell. `report` turns the lines into DIR/smoke.json
("benchmark": "smoke"), prints one line per item and exits 1 on any FAIL.

Items (ITEMS below, in order):
    environment  device, driver, torch / triton / DALI / numpy versions
    check        `fastemp check --quick` on the device: every fast path against its reference
    train        3 steps of the real model (width 64, n=20, B=100), compiled + channels_last + bf16 +
                 fused Triton loss; the first step (compilation) is reported apart
    large_n      one n=200 x B=100 step with cifar10_n200_1ep's large-n option and its peak memory
                 (eager, so that it adds no second compilation to the part's time)
    dali         DALI vs torch patch statistics on the device and two training steps with DALI patches
                 of a small synthetic JPEG folder (streamed); SKIP when nvidia.dali does not import

--dry-run runs the same code on the CPU at toy sizes (width 8, n=4, B=16, no compilation): what CI
uses to exercise the suite end to end.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from fastemp import runs
from fastemp.config import load_config
from fastemp.data.synthetic_jpeg import make_folder

from . import common

ITEMS = ("environment", "check", "train", "large_n", "dali")
N200_MEMORY_GIB = common.TARGETS["n200_memory_gib"]


class Skip(Exception):
    """The item cannot run here (e.g. DALI missing): reported as SKIP with the reason."""


def _device(dry_run: bool) -> torch.device:
    if dry_run:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("CUDA is not available to torch (run with --dry-run on a machine without a GPU)")
    return torch.device("cuda")


def _config(spec: str, dry_run: bool, overrides: list[str]):
    """A shipped recipe on synthetic data (content does not matter here), shrunk for --dry-run."""
    base = [
        "data.source=synthetic",
        "data.synthetic_train=200",
        "data.synthetic_test=100",
        "eval.at_end=false",
        "train.log_every=1",
    ]
    tiny = (
        [
            "model.width=8",
            "model.hidden_dim=64",
            "model.z_dim=32",
            "train.n_patches=4",
            "train.batch_size=16",
            "train.grad_chunks=2",
            "train.bn_groups=2",
            "model.compile=none",
            "loss.fused=off",
            "train.device=cpu",
        ]
        if dry_run
        else []
    )
    return load_config(spec, base + overrides + tiny)


def _steps(cfg, steps: int) -> dict:
    """Train `steps` steps of a fresh Trainer; the first (compilation, warm-up) timed apart."""
    from fastemp.train import Trainer

    cfg.train.max_steps = steps
    trainer = Trainer(cfg, None, progress=False)
    memory = common.PeakMemory(trainer.device)
    memory.reset()
    seconds = []
    for step in range(1, steps + 1):
        start = time.perf_counter()
        trainer.train_until(step)  # each call ends in the logged step's host sync
        seconds.append(time.perf_counter() - start)
    record = trainer.last_record
    finite = all(math.isfinite(record[k]) for k in ("loss", "loss_sim", "loss_tcr"))
    later = common.median(seconds[1:]) if len(seconds) > 1 else None
    return {
        **trainer.runtime.resolved(),
        "n_patches": cfg.train.n_patches,
        "batch_size": cfg.train.batch_size,
        "grad_chunks": trainer.grad_chunks,
        "bn_groups": cfg.train.bn_groups,
        "width": cfg.model.width,
        "first_step_seconds": seconds[0],
        "step_seconds": later,
        "compile_seconds": max(0.0, seconds[0] - later) if later is not None else None,
        "loss": record["loss"],
        "loss_sim": record["loss_sim"],
        "loss_tcr": record["loss_tcr"],
        "finite": finite,
        "peak_memory_gib": memory.peak_bytes() / 2**30,
        "peak_memory_source": memory.source,
    }


# ------------------------------------------------------------------------------------ items


def item_environment(dry_run: bool) -> tuple[str, dict]:
    import numpy

    device = _device(dry_run)
    env = runs.environment(device)
    env["numpy"] = numpy.__version__
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            memory_gib=props.total_memory / 2**30,
            multiprocessors=props.multi_processor_count,
            capability=f"{props.major}.{props.minor}",
        )
    summary = (
        f"{env['device_name']}, driver {env.get('driver')}, torch {env['torch']}, triton {env['triton']}, "
        f"DALI {env['dali']}, numpy {env['numpy']}"
    )
    return summary, env


def item_check(dry_run: bool) -> tuple[str, dict]:
    from fastemp.check import run_checks

    device = _device(dry_run)
    only = ["tcr", "loss", "gradcache"] if dry_run else None  # CPU: no Triton kernel outside the interpreter
    rows = run_checks(device, quick=True, only=only)
    failed = [f"{r.op} {r.shape} {r.dtype} err {r.err:.2e} > tol {r.tol:.1e}" for r in rows if r.status == "FAIL"]
    counts = {s: sum(r.status == s for r in rows) for s in ("pass", "FAIL", "skipped")}
    details = {
        "counts": counts,
        "failed": failed,
        "rows": [
            {
                "op": r.op,
                "shape": r.shape,
                "dtype": r.dtype,
                "err": r.err,
                "tol": r.tol,
                "status": r.status,
                "note": r.note,
            }
            for r in rows
        ],
    }
    if failed:
        raise AssertionError(f"{counts['FAIL']} of {len(rows)} rows failed: " + "; ".join(failed[:4]))
    return f"{counts['pass']} rows passed, {counts['skipped']} skipped (quick)", details


def item_train(dry_run: bool) -> tuple[str, dict]:
    cfg = _config("cifar10_n20_1ep", dry_run, ["model.compile=auto", "model.precision=auto", "loss.fused=auto"])
    result = _steps(cfg, 3)
    if not dry_run:
        wanted = {"compile": "default", "precision": "bf16", "channels_last": True, "fused_loss": True}
        off = {k: result[k] for k, v in wanted.items() if result[k] != v}
        if off:
            raise AssertionError(f"the fast path was not taken: {off}")
    if not result["finite"]:
        raise AssertionError(f"non-finite loss after 3 steps: {result['loss']}")
    return (
        f"3 steps, compile {result['compile']} {result['first_step_seconds']:.1f} s first step, then "
        f"{result['step_seconds'] * 1e3:.0f} ms/step, loss {result['loss']:.2f}, "
        f"peak {result['peak_memory_gib']:.2f} GiB"
    ), result


def item_large_n(dry_run: bool) -> tuple[str, dict]:
    # the memory-lean option (one chunk per BatchNorm group), which must fit an 80 GB card; the one-pass
    # ghost-BN path uses whatever memory is free and is measured by the suite's throughput200 part
    cfg = _config("cifar10_n200_1ep", dry_run, ["model.compile=none", "train.grad_chunks=10"])
    result = _steps(cfg, 1)
    t = cfg.train
    option = common.large_n_option(result["grad_chunks"], t.bn_groups, t.n_patches, t.checkpoint_activations)
    result["large_n_option"] = option
    if not result["finite"]:
        raise AssertionError(f"non-finite loss: {result['loss']}")
    if not dry_run and result["peak_memory_gib"] > N200_MEMORY_GIB:
        raise AssertionError(f"peak {result['peak_memory_gib']:.1f} GiB exceeds {N200_MEMORY_GIB} GiB")
    return (
        f"n={cfg.train.n_patches} x B={cfg.train.batch_size}, {option}, eager, "
        f"{result['first_step_seconds']:.1f} s, peak {result['peak_memory_gib']:.2f} GiB"
    ), result


def item_dali(dry_run: bool) -> tuple[str, dict]:
    from fastemp.check import run_checks
    from fastemp.patches import dali_available

    if not dali_available():
        raise Skip("nvidia.dali does not import here: no DALI number was measured")
    device = _device(dry_run)
    rows = run_checks(device, quick=True, only=["augment"])
    failed = [f"{r.op} {r.note}" for r in rows if r.status == "FAIL"]
    if failed:
        raise AssertionError("DALI patch statistics differ from the torch backend's: " + "; ".join(failed))
    with tempfile.TemporaryDirectory() as root:
        folder = make_folder(root, classes=10, per_class=20, size=32)  # 200 JPEGs: DALI reads image files
        files = [f"data.path={folder}", "data.source=imagefolder", "data.streamed=true", "data.backend=dali"]
        cfg = _config("cifar10_n20_1ep", dry_run, [*files, "model.compile=none"])
        result = _steps(cfg, 2)
    if result["backend"] != "dali" or not result["finite"]:
        raise AssertionError(f"backend {result['backend']}, loss {result['loss']}")
    result["augment_rows"] = [{"shape": r.shape, "err": r.err, "tol": r.tol, "status": r.status} for r in rows]
    return (
        f"patch statistics match torch ({len(rows)} rows); a training step with DALI patches: "
        f"{result['step_seconds'] * 1e3:.0f} ms eager, loss {result['loss']:.2f}"
    ), result


RUNNERS = {
    "environment": item_environment,
    "check": item_check,
    "train": item_train,
    "large_n": item_large_n,
    "dali": item_dali,
}


def run_item(name: str, dry_run: bool) -> dict:
    """One item as a record: {item, status PASS/FAIL/SKIP, reason, seconds, details}."""
    start = time.perf_counter()
    try:
        reason, details = RUNNERS[name](dry_run)
        status = "PASS"
    except Skip as why:
        status, reason, details = "SKIP", str(why), {}
    except Exception as err:  # the item failed: its one line says how, the log keeps the traceback
        traceback.print_exc(file=sys.stderr)
        status, reason, details = "FAIL", f"{type(err).__name__}: {err}".splitlines()[0][:300], {}
    return {
        "item": name,
        "status": status,
        "reason": reason,
        "seconds": round(time.perf_counter() - start, 2),
        "dry_run": dry_run,
        "details": details,
    }


# ----------------------------------------------------------------------------------- report


def read_records(path: Path) -> list[dict]:
    """The item records in run order; a later record of the same item replaces an earlier one."""
    records: dict[str, dict] = {}
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill at the limit
        records[record["item"]] = record
    return [records[name] for name in ITEMS if name in records]


def format_line(record: dict) -> str:
    return f"smoke {record['item']:<12} {record['status']:<4} {record['seconds']:6.1f} s  {record['reason']}"


def smoke_markdown(result: dict) -> str:
    rows = [[r["item"], r["status"], f"{r['seconds']:.1f}", r["reason"]] for r in result["items"]]
    return "\n".join(
        [
            f"# Smoke: {common.device_label(result['environment'])}",
            "",
            f"- {result['verdict']}: {result['counts']['PASS']} PASS, {result['counts']['FAIL']} FAIL, "
            f"{result['counts']['SKIP']} SKIP in {result['seconds']:.1f} s",
            "",
            common.markdown_table(["item", "status", "seconds", "what"], rows),
            "",
            "## Environment",
            "",
            common.environment_markdown(result["environment"]),
        ]
    )


def report(record_path: Path, out_dir: Path) -> int:
    records = read_records(record_path)
    missing = [name for name in ITEMS if name not in {r["item"] for r in records}]
    records += [
        {"item": name, "status": "FAIL", "reason": "did not run (no record)", "seconds": 0.0, "details": {}}
        for name in missing
    ]
    env_record = next((r for r in records if r["item"] == "environment" and r["status"] == "PASS"), None)
    environment = env_record["details"] if env_record else {"device": "unknown"}
    counts = {s: sum(r["status"] == s for r in records) for s in ("PASS", "FAIL", "SKIP")}
    result = {
        **common.base_result("smoke", environment),
        "verdict": "FAIL" if counts["FAIL"] else "PASS",
        "counts": counts,
        "seconds": sum(r["seconds"] for r in records),
        "items": records,
    }
    print(f"smoke: {result['verdict']} ({counts['PASS']} PASS, {counts['FAIL']} FAIL, {counts['SKIP']} SKIP)")
    common.write_results(out_dir, "smoke", result, smoke_markdown(result))
    return 1 if counts["FAIL"] else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m fastemp.benchmarks.smoke", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run one item and append its record")
    p.add_argument("item", choices=ITEMS)
    p.add_argument("--record", required=True, help="JSON-lines file the record is appended to")
    p.add_argument("--dry-run", action="store_true", help="CPU, toy sizes, no compilation (CI)")
    p = sub.add_parser("report", help="smoke.json from the records; exit 1 on any FAIL")
    p.add_argument("--record", required=True)
    p.add_argument("--out", required=True, help="folder for smoke.json and smoke.md")
    args = parser.parse_args(argv)
    if args.command == "report":
        return report(Path(args.record), Path(args.out))
    record = run_item(args.item, args.dry_run)
    with open(args.record, "a") as f:
        f.write(json.dumps(runs.finite_or_none(record)) + "\n")
    print(format_line(record), flush=True)
    return 1 if record["status"] == "FAIL" else 0


if __name__ == "__main__":
    raise SystemExit(main())
