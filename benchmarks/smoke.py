"""The GPU suite's first part: every GPU path once, one PASS/FAIL/SKIP record each, and the gate: which fast paths
an accuracy run may use (lease_gate); and the accuracy lease (issue 21) built on it, in three device calls
(`benchmarks/gpu_suite.sh --lease call1|call2|call3 OUT`, `lease`): call 1 the smoke part and its gate, call 2 the
accuracy part under the gate, call 3 profile and throughput20; each ends by itself within CALL_SECONDS.
docs/benchmarks.md has the exact `run` commands.

    python3 -m fastemp.benchmarks.smoke run ITEM --record FILE [--dry-run]     (one item, its record appended)
    python3 -m fastemp.benchmarks.smoke report --record FILE --out DIR         (DIR/smoke.json with the gate)

The suite runs every item (ITEMS, in order of need; docs/benchmarks.md says what each does) in its own process
under its own limit and writes the FAIL record of one killed at it. --dry-run: the CPU at toy sizes (CI).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from fastemp import runs
from fastemp.config import load_config

from . import harness
from .report import read_result, table
from .throughput import measure_point

# the items in order of need, each with its default limit in the suite (LIMIT_SMOKE_<ITEM>): ESTIMATES
ITEMS = dict(environment=60, check=300, train=240, large_n=90, dali=120)
CHECK_GROUPS = (  # (checks, quick) in order of need
    (("tcr", "loss", "cosine_to_mean"), True),  # quick covers the accuracy run's n=20, B=100, d=1024
    (("prefetch", "patches", "lars", "eval_forward", "compile"), False),
    (("ghostbn",), False),
    (("gradcache", "checkpoint"), True),
)
DRY_CHECK_GROUPS = ((("tcr", "loss"), True), (("prefetch", "eval_forward", "ghostbn"), False), (("gradcache",), True))
# (row op prefix, the override that keeps its path out of an accuracy run (None: stop), the Runtime field that says
# whether the run takes the path (None: always))
GATE = (
    ("prefetch", None, None),
    ("tcr", None, None),
    ("loss unfused", None, None),
    ("loss fused", "loss.fused=off", "fused_loss"),
    ("cos_to_mean", "loss.fused=off", "fused_loss"),
    ("patches compiled", "data.patch_compile=off", "patch_compile"),
    ("lars fused", "optim.fused_update=off", "fused_update"),
    ("eval forward", "model.compile=none", "compile"),
    ("compile", "model.compile=none", "compile"),
)
TINY = "model.width=8 model.hidden_dim=64 model.z_dim=32 train.n_patches=4 train.batch_size=16 train.grad_chunks=2"
TINY += " train.bn_groups=2 model.compile=none loss.fused=off train.device=cpu"


class Skip(Exception):
    """The item cannot run here (e.g. DALI missing): SKIP with the reason."""


def _device(dry_run: bool) -> torch.device:
    if not dry_run and not torch.cuda.is_available():
        raise RuntimeError("CUDA is not available to torch (--dry-run on a machine without a GPU)")
    return torch.device("cpu" if dry_run else "cuda")


def _steps(spec: str, dry_run: bool, overrides: list[str], steps: int, real_data: bool = False) -> dict:
    """throughput's point of a shipped recipe (shrunk by --dry-run) over `steps` steps, the first timed apart;
    real_data: the CIFAR-10 JPEG copy when given, so its compiled kernels are those of the accuracy run."""
    jpeg = os.environ.get("FASTEMP_CIFAR10_JPEG", "")
    data = "data.source=synthetic data.synthetic_train=200 data.synthetic_test=100"
    if real_data and not dry_run and Path(jpeg).is_file():
        data = f"data.source=imagefolder data.path={jpeg}"
    keys = [*data.split(), "eval.at_end=false", f"train.max_steps={steps}", *overrides]
    cfg = load_config(spec, keys + TINY.split() * dry_run)
    _device(dry_run)
    point = measure_point(cfg, harness.Data(), 0, steps - 1, 0, None)
    if not all(math.isfinite(point[k]) for k in ("loss", "loss_sim", "loss_tcr")):
        raise AssertionError(f"non-finite loss after {steps} steps: {point['loss']}")
    sizes = {"n_patches": cfg.train.n_patches, "batch_size": cfg.train.batch_size}
    return {**point["resolved"], **point, **sizes, "peak_memory_gib": point["peak_memory_bytes"] / 2**30}


def item_environment(dry_run: bool, record: Path) -> tuple[str, dict]:
    import numpy

    device = _device(dry_run)
    env = {**runs.environment(device), "numpy": numpy.__version__}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(memory_gib=props.total_memory / 2**30, capability=f"{props.major}.{props.minor}")
    versions = ", ".join(f"{k} {env.get(k)}" for k in ("driver", "torch", "triton", "dali", "numpy"))
    return f"{env['device_name']}, {versions}", env


def item_check(dry_run: bool, record: Path) -> tuple[str, dict]:
    from fastemp.check import run_checks
    from fastemp.runtime import resolve

    device, path = _device(dry_run), rows_path(record)
    runtime = resolve(load_config("cifar10_n20_1ep", [f"train.device={device}"]), device, training=False)
    path.write_text(json.dumps({"runtime": runtime.resolved()}) + "\n")  # which paths the accuracy recipe takes

    def report(r) -> None:
        row = {k: getattr(r, k) for k in ("op", "shape", "dtype", "err", "tol", "status", "note")}
        runs.append_line(path, runs.finite_or_none(row))

    groups = DRY_CHECK_GROUPS if dry_run else CHECK_GROUPS
    rows = [r for only, quick in groups for r in run_checks(device, quick=quick, only=only, report=report)]
    failed = [f"{r.op} {r.shape} {r.dtype} err {r.err:.2e} > tol {r.tol:.1e}" for r in rows if r.status == "FAIL"]
    counts = {s: sum(r.status == s for r in rows) for s in ("pass", "FAIL", "skipped")}
    if failed:
        raise AssertionError(f"{counts['FAIL']} of {len(rows)} rows failed: " + "; ".join(failed[:4]))
    full = [name for only, quick in groups if not quick for name in only]
    return f"{counts['pass']} rows passed, {counts['skipped']} skipped ({', '.join(full)} in full)", {"counts": counts}


def item_train(dry_run: bool, record: Path) -> tuple[str, dict]:
    result = _steps("cifar10_n20_1ep", dry_run, [], 3, real_data=True)
    wanted = {"compile": "default", "precision": "bf16", "channels_last": True, "fused_loss": True}
    off = {k: result[k] for k, v in {**wanted, "patch_compile": True, "fused_update": True}.items() if result[k] != v}
    if off and not dry_run:
        raise AssertionError(f"the fast path was not taken: {off}")
    return (
        f"3 steps, compile {result['compile']} {result['first_step_seconds']:.1f} s first step, then "
        f"{result['step_seconds_median'] * 1e3:.0f} ms/step, loss {result['loss']:.2f}, peak {result['peak_memory_gib']:.2f} GiB"
    ), result


def item_large_n(dry_run: bool, record: Path) -> tuple[str, dict]:
    # the memory-lean option (a chunk per BatchNorm group), which must fit an 80 GB card; the one-pass ghost-BN path
    # takes what memory is free and is measured by the suite's throughput200 part
    result = _steps("cifar10_n200_1ep", dry_run, ["model.compile=none", "train.grad_chunks=10"], 2)
    if not dry_run and result["peak_memory_gib"] > 78.0:
        raise AssertionError(f"peak {result['peak_memory_gib']:.1f} GiB exceeds the 78 GiB of an 80 GB card")
    what = f"n={result['n_patches']} x B={result['batch_size']}, grad cache x{result['grad_chunks_used']}, eager"
    return f"{what}, {result['first_step_seconds']:.1f} s, peak {result['peak_memory_gib']:.2f} GiB", result


def item_dali(dry_run: bool, record: Path) -> tuple[str, dict]:
    from fastemp.check import run_checks
    from fastemp.data.synthetic import make_folder
    from fastemp.patches import dali_available

    if not dali_available():
        raise Skip("nvidia.dali does not import here: no DALI number was measured")
    rows = run_checks(_device(dry_run), quick=True, only=["augment"])
    failed = [f"{r.op} {r.note}" for r in rows if r.status == "FAIL"]
    if failed:
        raise AssertionError("DALI patch statistics differ from the torch backend's: " + "; ".join(failed))
    with tempfile.TemporaryDirectory() as root:
        folder = make_folder(root, classes=10, per_class=20, size=32)  # 200 JPEGs: DALI reads image files
        files = [f"data.path={folder}", "data.source=imagefolder", "data.streamed=true", "data.backend=dali"]
        result = _steps("cifar10_n20_1ep", dry_run, [*files, "model.compile=none"], 2)
    if result["backend"] != "dali":
        raise AssertionError(f"backend {result['backend']}, not dali")
    step = f"{result['step_seconds_median'] * 1e3:.0f} ms eager, loss {result['loss']:.2f}"
    return f"patch statistics match torch ({len(rows)} rows); a training step with DALI patches: {step}", result


def rows_path(record: Path) -> Path:
    """Where the check item appends its rows as they are made (beside the item records)."""
    return Path(record).with_name(Path(record).stem + "_check_rows.jsonl")


def run_item(name: str, dry_run: bool, record: Path) -> dict:
    """One item as a record: {item, status PASS/FAIL/SKIP, reason, seconds, details}."""
    wall = harness.Wall()
    try:
        (reason, details), status = globals()[f"item_{name}"](dry_run, record), "PASS"
    except Skip as why:
        status, reason, details = "SKIP", str(why), {}
    except Exception as err:  # its one line says how; the log keeps the traceback
        traceback.print_exc(file=sys.stderr)
        status, reason, details = "FAIL", f"{type(err).__name__}: {err}".splitlines()[0][:300], {}
    return {"item": name, "status": status, "reason": reason, "seconds": round(wall.lap(), 2), "details": details}


def write_record(path, item: str, status: str, reason: str, seconds: float = 0, details=None, **extra) -> None:
    """An item's record appended to the record file, and its one line printed."""
    record = {"item": item, "status": status, "reason": reason, "seconds": seconds, "details": details or {}, **extra}
    runs.append_line(path, runs.finite_or_none(record))
    print(f"smoke {item} {status} {seconds:.1f} s: {reason}", flush=True)


def lease_gate(records: list[dict], rows_file: Path) -> dict:
    """What an accuracy run after this smoke may use: the overrides that switch off each fast path it takes whose
    check rows failed or never passed (GATE), and why it must not run at all (a path without a switch). The official
    run is always tried ("peer": "run"; LEASE_PEER="skip: WHY" keeps it out by hand)."""
    lines = runs.read_lines(rows_file)
    runtime, rows = (lines[0].get("runtime"), lines[1:]) if lines else (None, [])  # None: the check never started
    overrides, notes, stop = [], [], []
    for prefix, switch, field in GATE:
        if runtime is not None and field is not None and runtime.get(field) in (False, "none"):
            continue  # the accuracy run does not take this path here
        mine = [r for r in rows if r["op"].startswith(prefix)]
        failed = any(r["status"] == "FAIL" for r in mine)
        if failed or not any(r["status"] == "pass" for r in mine):
            why = f"{prefix}: {'FAIL' if failed else 'not verified'}"
            stop += [f"{why}, and it has no off switch"] if switch is None else []
            overrides += [switch] if switch and switch not in overrides else []
            notes.append(f"{why} -> {switch or 'stop'}")
    train = next((r for r in records if r["item"] == "train"), None)
    if train and train["status"] == "FAIL" and not train["reason"].startswith("timed out"):
        overrides += [o for o in ("model.compile=none", "loss.fused=off") if o not in overrides]
        notes.append(f"train: FAIL ({train['reason'][:120]}) -> model.compile=none loss.fused=off")
    return {"overrides": overrides, "stop": "; ".join(stop) or None, "peer": "run", "notes": notes}


def verdict(result: dict) -> list[str]:
    """The smoke's verdict and its gate, in smoke.md and the log."""
    gate, counts = result["gate"], result["counts"]
    run = f"STOP: {gate['stop']}" if gate["stop"] else "go"
    return [
        f"{result['verdict']}: {counts['PASS']} PASS, {counts['FAIL']} FAIL, {counts['SKIP']} SKIP in "
        f"{result['seconds']:.1f} s",
        f"accuracy run: {run}; overrides {' '.join(gate['overrides']) or 'none'}; official run: {gate['peer']}",
    ]


def markdown(result: dict) -> str:
    lines = [f"- {line}" for line in verdict(result)] + [f"  - {note}" for note in result["gate"]["notes"]]
    return harness.page(result, "Smoke", *lines, "", table(result["items"], "item status seconds reason"))


def report(record: Path, out: Path, items=ITEMS) -> int:
    """smoke.json and smoke.md from the item records (a later record of an item replaces an earlier one; an item
    without one FAILs); 1 on any FAIL."""
    found = {r["item"]: r for r in runs.read_lines(record)}
    missing = {"status": "FAIL", "reason": "did not run (no record)", "seconds": 0.0, "details": {}}
    records = [found.get(name) or {"item": name, **missing} for name in ITEMS if name in found or name in items]
    counts = {s: sum(r["status"] == s for r in records) for s in ("PASS", "FAIL", "SKIP")}
    results = harness.Results("smoke", markdown, str(out), "smoke", "cpu", True)
    env = found.get("environment", {})
    results.base["environment"] = env["details"] if env.get("status") == "PASS" else {"device": "unknown"}
    result = {"verdict": "FAIL" if counts["FAIL"] else "PASS", "counts": counts, "items": records}
    result.update(seconds=sum(r["seconds"] for r in records), gate=lease_gate(records, rows_path(record)))
    print("\n".join(f"smoke: {line}" for line in verdict(result)))
    results.write(result, final=True)
    return int(bool(counts["FAIL"]))


CALLS = {"call1": (230, ["smoke"]), "call2": (550, ["accuracy"]), "call3": (200, ["profile", "throughput20"])}
NO_GATE = {"overrides": [], "peer": "run"}  # every fast path on, the official run too


def lease(call: str, out: str) -> int:
    from .suite import Suite  # the suite imports this module

    env, state = os.environ, Path(os.environ.get("LEASE_STATE") or "runs/lease").resolve()
    seconds, details = float(env.get("CALL_SECONDS") or CALLS[call][0]), state / call
    env.update(SUITE_DEADLINE=str(time.time() + seconds), SUITE_DETAILS=str(details))
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(state / "inductor"))  # call 2 reuses call 1's compilations
    if (details / "accuracy.json").exists():  # a call 2 again: what it measured is the history now
        shutil.copy(details / "accuracy.json", state / "accuracy.json")
    if call == "call2" and (state / "accuracy.json").exists():  # also when the last call 2 stopped before measuring
        env.setdefault("ACCURACY_HISTORY", str(state / "accuracy.json"))
    shutil.rmtree(details, ignore_errors=True)
    print(f"lease: {call}: {seconds:.0f} s, results into {out} (details: {details})")
    if call == "call1":
        env.setdefault("SMOKE_ITEMS", "environment,check,train,large_n")
        status = Suite(out).run(["smoke"])
        stop = f"call 1 wrote no readable smoke gate ({out}/smoke.json)"
        gate = (read_result(Path(out) / "smoke.json") or {}).get("gate") or {**NO_GATE, "stop": stop}
        (state / "gate.json").write_text(json.dumps(gate))
        if gate["stop"]:
            print(f"lease: STOP: {gate['stop']}. Do not run call 2 as it is: fix it (docs/check.md), run call 1 again.")
            return 3
        print(f"lease: call 1 {'passed' if status == 0 else 'had failures (smoke.json): the gate accounts for them'}")
        print(
            f"lease: next: LEASE_OVERRIDES='{' '.join(gate['overrides'])}' LEASE_PEER='{gate['peer']}' CALL_SECONDS="
            '<min(550, budget_left_s - 40)> bash benchmarks/gpu_suite.sh --lease call2 "$OUT"'
        )
        return status
    if "LEASE_OVERRIDES" in env or "LEASE_PEER" in env:  # the command line's, else call 1's on this machine
        gate = {"overrides": env.get("LEASE_OVERRIDES", "").split(), "peer": env.get("LEASE_PEER") or "run"}
    else:
        gate = read_result(state / "gate.json") or NO_GATE
        if not (state / "gate.json").exists():
            print("lease: WARNING: no gate from call 1 here and none on the command line: every fast path on")
    if gate.get("stop"):
        print(f"lease: STOP (call 1's gate): {gate['stop']}")
        return 3
    env.update(SUITE_OVERRIDES=" ".join([*gate["overrides"], *env.get("SUITE_OVERRIDES", "").split()]))
    env["LEASE_PEER"] = gate["peer"]
    print(f"lease: overrides: {env['SUITE_OVERRIDES'] or 'none'}; official run: {gate['peer']}")
    if call == "call3":
        env.setdefault("LIMIT_PROFILE", str(int(seconds * 2 / 5)))
    status = Suite(out).run(CALLS[call][1])
    if call == "call3":
        print("lease: done: give the machine back and commit what came back (docs/benchmarks.md)")
        return status
    if (details / "accuracy.md").exists():  # each side's linear top-1 and fastemp - official
        print((details / "accuracy.md").read_text())
    print(
        "lease: next: only if status shows >= 240 s of device time left: CALL_SECONDS=<budget_left_s - 40> bash "
        'benchmarks/gpu_suite.sh --lease call3 "$OUT"; else give the machine back and commit what came back '
        "(docs/benchmarks.md)"
    )
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m fastemp.benchmarks.smoke", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("run", "report"))
    parser.add_argument("item", nargs="?", choices=ITEMS)
    parser.add_argument("--record", required=True, help="the JSON-lines file of the item records")
    parser.add_argument("--out", help="report: the folder of smoke.json and smoke.md")
    parser.add_argument("--items", default=",".join(ITEMS), help="report: the items that were to run")
    parser.add_argument("--dry-run", action="store_true", help="CPU, toy sizes, no compilation (CI)")
    args = parser.parse_args(argv)
    if args.command == "report":
        return report(Path(args.record), Path(args.out), args.items.split(","))
    write_record(args.record, **run_item(args.item, args.dry_run, Path(args.record)), dry_run=args.dry_run)
    return 0  # the record says how it went: the report decides


if __name__ == "__main__":
    raise SystemExit(main())
