"""The GPU suite's first part: every GPU path once, one PASS/FAIL/SKIP line each, and the verdict on which fast
paths an accuracy run may use.

    python3 -m fastemp.benchmarks.smoke run ITEM --record FILE [--dry-run]
    python3 -m fastemp.benchmarks.smoke report --record FILE --out DIR

benchmarks/gpu_suite.sh runs each item in its own process under its own time limit (a hung item
costs its limit, never the whole call) and appends one JSON line per item to FILE; a process killed
at its limit gets its FAIL line from the shell. `report` turns the lines into DIR/smoke.json
("benchmark": "smoke", with the "gate"), prints one line per item and exits 1 on any FAIL.

Items (ITEMS below, in order of what an accuracy run needs first):
    environment      device, driver, torch / triton / DALI / numpy versions
    check            `fastemp check` on the device, in order of need (CHECK_GROUPS): the loss at the accuracy run's
                     shape, every fast path the accuracy recipe takes, compiled, then the large-n paths; each row is
                     appended to FILE's rows file as it is made
    official_loader  the official code's DataLoader as its main.py sets it up (16 workers, file_system sharing,
                     after CUDA) on the CIFAR-10 JPEG copy, for a few seconds (official_peer.py --probe-loader)
    train            3 steps of the accuracy recipe (n=20, B=100; on the CIFAR-10 JPEG copy when given, so its
                     compilations are those the accuracy run needs), compiled + channels_last + bf16 + fused loss
                     + fused LARS; the first step (compilation) is reported apart
    large_n          one n=200 x B=100 step with cifar10_n200_1ep's large-n option and its peak memory (eager)
    dali             DALI vs torch patch statistics (same pixels) and two training steps with DALI patches of a small
                     JPEG folder (streamed); SKIP without DALI

The gate (lease_gate): a gating row that failed, or did not pass (cut by a time limit, skipped), switches its fast
path off for the accuracy run by its override (GATE); a path without a switch stops the accuracy run. A failed
train item switches compilation and the fused loss off; a failed official_loader keeps the official run out.

--dry-run runs the same code on the CPU at toy sizes (width 8, n=4, B=16, no compilation): what CI
uses to exercise the suite end to end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
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

ITEMS = ("environment", "check", "official_loader", "train", "large_n", "dali")
N200_MEMORY_GIB = common.TARGETS["n200_memory_gib"]
# (checks, quick) in order of need: the loss at the accuracy run's shape (quick covers n=20, B=100, d=1024), the
# fast paths an n=20 accuracy run takes, compiled, then the large-n paths it does not take
CHECK_GROUPS = (
    (("tcr", "loss", "cosine_to_mean"), True),
    (("prefetch", "patches", "lars", "eval_forward", "compile"), False),
    (("ghostbn",), False),
    (("gradcache", "checkpoint"), True),
)
# CPU (dry run): the compiled rows would take minutes, and the CPU takes none of those paths
DRY_CHECK_GROUPS = ((("tcr", "loss"), True), (("prefetch", "eval_forward", "ghostbn"), False), (("gradcache",), True))
# (row op prefix, the override that keeps its path out of the accuracy run or None: stop, the Runtime field that
# says the run takes the path at all (None: always))
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


class Skip(Exception):
    """The item cannot run here (e.g. DALI missing): reported as SKIP with the reason."""


def _device(dry_run: bool) -> torch.device:
    if dry_run:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("CUDA is not available to torch (run with --dry-run on a machine without a GPU)")
    return torch.device("cuda")


def _config(spec: str, dry_run: bool, overrides: list[str], real_data: bool = False):
    """A shipped recipe on synthetic data, shrunk for --dry-run; real_data: on the CIFAR-10 JPEG copy when given
    (FASTEMP_CIFAR10_JPEG), so that its shapes, and so its compiled kernels, are those of the accuracy run."""
    jpeg = os.environ.get("FASTEMP_CIFAR10_JPEG", "")
    data = (
        ["data.source=imagefolder", f"data.path={Path(jpeg).resolve()}"]
        if real_data and not dry_run and Path(jpeg).is_file()
        else ["data.source=synthetic", "data.synthetic_train=200", "data.synthetic_test=100"]
    )
    base = [*data, "eval.at_end=false", "train.log_every=1"]
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


def rows_path(record: Path) -> Path:
    """Where the check item appends its rows as they are made (beside the item records)."""
    return Path(record).with_name(Path(record).stem + "_check_rows.jsonl")


def item_check(dry_run: bool, record: Path) -> tuple[str, dict]:
    from fastemp.check import run_checks
    from fastemp.config import load_config
    from fastemp.runtime import resolve

    device = _device(dry_run)
    runtime = resolve(load_config("cifar10_n20_1ep", [f"train.device={device}"]), device, training=False)
    path = rows_path(record)
    with open(path, "w") as f:  # first line: which paths the accuracy recipe takes here
        f.write(json.dumps({"runtime": runtime.resolved()}) + "\n")

    def report(r) -> None:
        row = {k: getattr(r, k) for k in ("op", "shape", "dtype", "err", "tol", "status", "note")}
        with open(path, "a") as f:
            f.write(json.dumps(runs.finite_or_none(row)) + "\n")

    groups = DRY_CHECK_GROUPS if dry_run else CHECK_GROUPS
    rows = [r for only, quick in groups for r in run_checks(device, quick=quick, only=only, report=report)]
    failed = [f"{r.op} {r.shape} {r.dtype} err {r.err:.2e} > tol {r.tol:.1e}" for r in rows if r.status == "FAIL"]
    counts = {s: sum(r.status == s for r in rows) for s in ("pass", "FAIL", "skipped")}
    full = [name for only, quick in groups if not quick for name in only]
    details = {"counts": counts, "failed": failed, "full": full}
    if failed:
        raise AssertionError(f"{counts['FAIL']} of {len(rows)} rows failed: " + "; ".join(failed[:4]))
    return f"{counts['pass']} rows passed, {counts['skipped']} skipped ({', '.join(full)} in full)", details


def item_official_loader(dry_run: bool) -> tuple[str, dict]:
    import tempfile

    from .official_peer import add_arguments, probe_loader

    official = os.environ.get("FASTEMP_OFFICIAL_DIR") or ("" if dry_run else ".official")
    data = os.environ.get("FASTEMP_CIFAR10_JPEG", "")
    if not official or not (Path(official) / "main.py").is_file():
        raise Skip(f"no official checkout ({official or 'dry run: FASTEMP_OFFICIAL_DIR unset'})")
    if not Path(data).is_file():
        raise Skip("no CIFAR-10 JPEG copy (FASTEMP_CIFAR10_JPEG)")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = ["--official-dir", official, "--data", data, "--out", tempfile.gettempdir()]
    argv += ["--probe-loader", os.environ.get("SMOKE_LOADER_SECONDS", "5")]
    argv += ["--python", os.environ.get("FASTEMP_OFFICIAL_PYTHON") or sys.executable]
    if dry_run:
        argv += ["--cpu-dry-run", "--train-images", "200", "--test-images", "20"]
    result = probe_loader(parser.parse_args(argv))
    if result["status"] != "PASS":
        raise AssertionError(f"the official DataLoader did not deliver: {result.get('error')}")
    return (
        f"16 workers (file_system sharing{', after CUDA' if result.get('cuda_started_first') else ', CPU'}): first "
        f"batch after {result['first_batch_seconds']:.1f} s, "
        f"{result['batches']} batches in {result['window_seconds']:.1f} s more"
    ), result


def item_train(dry_run: bool) -> tuple[str, dict]:
    cfg = _config("cifar10_n20_1ep", dry_run, [], real_data=True)
    result = _steps(cfg, 3)
    result["data"] = cfg.data.path or "synthetic"
    if not dry_run:
        wanted = {"compile": "default", "precision": "bf16", "channels_last": True, "fused_loss": True}
        wanted.update(patch_compile=True, fused_update=True)
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
    "official_loader": item_official_loader,
    "train": item_train,
    "large_n": item_large_n,
    "dali": item_dali,
}


def run_item(name: str, dry_run: bool, record: Path) -> dict:
    """One item as a record: {item, status PASS/FAIL/SKIP, reason, seconds, details}."""
    start = time.perf_counter()
    try:
        reason, details = RUNNERS[name](dry_run, record) if name == "check" else RUNNERS[name](dry_run)
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


def lease_gate(records: list[dict], rows_file: Path) -> dict:
    """What an accuracy run after this smoke may use: the overrides that switch off each fast path it takes
    whose check rows failed or never passed (GATE), why it must not run at all (a path without a switch), and
    whether to try the official code (not after its DataLoader failed or could not start here)."""
    lines = []
    for line in rows_file.read_text().splitlines() if rows_file.exists() else []:
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # cut by a kill
    runtime = lines[0].get("runtime") if lines else None  # None: the check item never started
    rows = lines[1:]
    overrides, notes, stop = [], [], []
    for prefix, switch, field in GATE:
        if runtime is not None and field is not None and runtime.get(field) in (False, "none"):
            continue  # the accuracy run does not take this path here
        mine = [r for r in rows if r["op"].startswith(prefix)]
        failed = any(r["status"] == "FAIL" for r in mine)
        if failed or not any(r["status"] == "pass" for r in mine):
            why = f"{prefix}: {'FAIL' if failed else 'not verified'}"
            if switch is None:
                stop.append(f"{why}, and it has no off switch")
            elif switch not in overrides:
                overrides.append(switch)
            notes.append(f"{why} -> {switch or 'stop'}")
    items = {r["item"]: r for r in records}
    train = items.get("train")
    if train and train["status"] == "FAIL" and not train["reason"].startswith("timed out"):
        overrides += [o for o in ("model.compile=none", "loss.fused=off") if o not in overrides]
        notes.append(f"train: FAIL ({train['reason'][:120]}) -> model.compile=none loss.fused=off")
    loader = items.get("official_loader")
    peer = "run"
    if loader and loader["status"] in ("FAIL", "SKIP") and not loader["reason"].startswith("timed out"):
        peer = f"skip: the official DataLoader probe said {loader['status']} ({loader['reason'][:160]})"
    return {"overrides": overrides, "stop": "; ".join(stop) or None, "peer": peer, "notes": notes}


def format_line(record: dict) -> str:
    return f"smoke {record['item']:<15} {record['status']:<4} {record['seconds']:6.1f} s  {record['reason']}"


def smoke_markdown(result: dict) -> str:
    rows = [[r["item"], r["status"], f"{r['seconds']:.1f}", r["reason"]] for r in result["items"]]
    gate = result["gate"]
    return "\n".join(
        [
            f"# Smoke: {common.device_label(result['environment'])}",
            "",
            f"- {result['verdict']}: {result['counts']['PASS']} PASS, {result['counts']['FAIL']} FAIL, "
            f"{result['counts']['SKIP']} SKIP in {result['seconds']:.1f} s",
            f"- accuracy run: {'STOP: ' + gate['stop'] if gate['stop'] else 'go'}; overrides "
            f"{' '.join(gate['overrides']) or 'none'}; official run: {gate['peer']}",
            *(f"  - {n}" for n in gate["notes"]),
            "",
            common.markdown_table(["item", "status", "seconds", "what"], rows),
            "",
            "## Environment",
            "",
            common.environment_markdown(result["environment"]),
        ]
    )


def report(record_path: Path, out_dir: Path, items: list[str] = ITEMS) -> int:
    records = read_records(record_path)
    missing = [name for name in items if name not in {r["item"] for r in records}]
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
        "gate": lease_gate(records, rows_path(record_path)),
    }
    gate = result["gate"]
    print(f"smoke: {result['verdict']} ({counts['PASS']} PASS, {counts['FAIL']} FAIL, {counts['SKIP']} SKIP)")
    print(
        f"smoke gate: {'STOP: ' + gate['stop'] if gate['stop'] else 'go'}; overrides "
        f"{' '.join(gate['overrides']) or 'none'}; official run: {gate['peer']}"
    )
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
    p.add_argument("--items", default=",".join(ITEMS), help="the items that were to run (default: all)")
    args = parser.parse_args(argv)
    if args.command == "report":
        return report(Path(args.record), Path(args.out), args.items.split(","))
    record = run_item(args.item, args.dry_run, Path(args.record))
    with open(args.record, "a") as f:
        f.write(json.dumps(runs.finite_or_none(record)) + "\n")
    print(format_line(record), flush=True)
    return 1 if record["status"] == "FAIL" else 0


if __name__ == "__main__":
    raise SystemExit(main())
