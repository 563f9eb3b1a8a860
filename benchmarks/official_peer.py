"""`fastemp bench official-peer`: the official EMP-SSL main.py, unmodified, on the same GPU and data copy as
fastemp, its encoder scored by fastemp's evaluator (docs/official_peer.md). official_launcher.py starts it,
official_run.py prepares its data and times its output."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from fastemp.config import load_config
from fastemp.errors import UserError, one_line
from fastemp.validate import check_config

from . import harness
from .accuracy import data_overrides
from .accuracy_report import DEFAULT_EVAL_SECONDS, add_official, plan
from .official_run import BATCH, prepare_data, run_official
from .report import fmt, table

NAME, REPO = "official_peer", "tsb0601/EMP-SSL"
REQUIREMENTS = ("torch", "torchvision", "torchmetrics", "sklearn", "tqdm", "matplotlib", "PIL", "numpy")  # main.py's
FILES = ("main.py", "model/model.py", "dataset/datasets.py", "dataset/aug.py", "lars.py", "loss.py", "func.py")
# main.py's arguments: the README's CIFAR-10 command with its patch count and schedule length
ARGUMENTS = "--data cifar10 --epoch {epochs} --patch_sim 200 --arch resnet18-cifar --num_patches {n} --lr 0.3"
LAUNCHER = Path(__file__).with_name("official_launcher.py")
IMPORT_PROBE = """import importlib, json, sys
missing, versions = [], {}
for name in sys.argv[1:]:
    try:
        versions[name] = str(getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as err:  # missing, or present but broken (a torchvision built for another torch)
        missing.append(f"{name} ({type(err).__name__})")
print(json.dumps({"missing": missing, "versions": versions}))"""


class Stopped(Exception):
    """--time-limit ran out, or a SIGTERM (a watchdog, `timeout`, a scheduler) arrived."""


def probe_imports(python: str) -> dict:
    """{"missing": ["name (error)"], "versions": {name: version}} of `python` importing what main.py imports."""
    try:
        out = subprocess.run([python, "-c", IMPORT_PROBE, *REQUIREMENTS], capture_output=True, text=True, timeout=300)
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as err:  # cannot run, or printed no JSON
        raise UserError(
            f"the interpreter {python} failed to check its modules ({err}); pass --python with a working one"
        ) from None


def preflight(args) -> tuple[dict, dict]:
    """Every check before anything heavy: (the official files' sha256 sums, its interpreter's versions)."""
    official, data = Path(args.official_dir), Path(args.data)
    missing = ", ".join(f for f in FILES if not (official / f).is_file())
    why = "does not exist" if not official.is_dir() else f"is no checkout of {REPO} (no {missing})" if missing else ""
    if why:
        raise UserError(f"--official-dir {official} {why}; pass a checkout of {REPO} (kept outside the project)")
    if not data.exists() or not (data.is_dir() or data.name.lower().endswith((".tar", ".tar.gz", ".tgz"))):
        why = "does not exist" if not data.exists() else "is neither a folder nor a .tar/.tar.gz/.tgz archive"
        raise UserError(f"--data {data} {why}; pass the CIFAR-10 JPEG copy (ImageFolder) or cifar-10-python.tar.gz")
    if not 1 <= args.epochs <= args.schedule_epochs:
        raise UserError(
            f"--epochs {args.epochs} is outside 1..--schedule-epochs ({args.schedule_epochs}); train one or more"
        )
    if args.work and (Path(args.work) / "logs").exists():
        raise UserError(f"--work {args.work} already holds logs/ of an earlier run; pass an empty or new folder")
    imports = probe_imports(args.python)
    if imports["missing"]:
        raise UserError(
            f"the official code needs {', '.join(imports['missing'])}, which {args.python} cannot import; "
            "install them there (pip install torchvision torchmetrics scikit-learn) or pass --python"
        )
    if not args.cpu_dry_run and not torch.cuda.is_available():
        raise UserError(
            "the official code needs a CUDA GPU (main.py calls .cuda()); run this on a GPU machine, or pass "
            "--cpu-dry-run with tiny --train-images to check the harness"
        )
    return {f: hashlib.sha256((official / f).read_bytes()).hexdigest() for f in FILES}, imports["versions"]


def peer_config(args):
    """fastemp's config of the data and the evaluation (its eval section scores the official encoder)."""
    where = data_overrides("cifar10", str(Path(args.data).resolve()))
    keys = [*args.overrides, *where, f"train.n_patches={args.n}", f"train.batch_size={BATCH}"]
    device = "cpu" if args.cpu_dry_run else args.device
    return load_config(args.config, [*keys, f"train.device={device}", f"train.seed={args.seed or 0}"])


def _stop(signum, frame):
    raise Stopped("--time-limit ran out" if signum == signal.SIGALRM else f"stopped by signal {signum}")


def run_peer(args) -> int:
    """0 when the official run trained and was scored; 1 when it was stopped (what it measured is written)."""
    sums, versions = preflight(args)
    if args.accuracy:  # this run joins that file: its next seed and its measured evaluation time
        planned = plan(Path(args.accuracy))
        args.seed = planned["official_seed"] if args.seed is None else args.seed
        args.eval_seconds = args.eval_seconds or planned["eval_seconds"]
    args.eval_seconds = args.eval_seconds or DEFAULT_EVAL_SECONDS
    cfg, out, wall = peer_config(args), Path(args.out), harness.Wall()
    check_config(cfg)
    results = harness.Results(NAME, markdown, str(out), NAME, cfg.train.device, force=True)
    official = {"repo": REPO, "dir": str(Path(args.official_dir).resolve()), "files_sha256": sums}
    official.update(python=args.python, versions=versions, n_patches=args.n, schedule_epochs=args.schedule_epochs)
    official.update(arguments=ARGUMENTS.format(epochs=args.schedule_epochs, n=args.n).split(), seed=args.seed)
    result = {"status": "RUNNING", "dry_run": bool(args.cpu_dry_run), "time_limit": args.time_limit, "data": {}}
    result.update(eval_seconds_reserved=args.eval_seconds, overrides=args.overrides)
    result["official"] = official
    handlers = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGALRM)}
    if args.time_limit:
        signal.setitimer(signal.ITIMER_REAL, args.time_limit)
    scratch = tempfile.TemporaryDirectory(prefix="fastemp-official-peer-", ignore_cleanup_errors=True)
    work = Path(args.work or scratch.name)
    try:
        results.write(result)
        train, test, result["data"] = prepare_data(args, cfg, work)
        results.write(result)
        limit = args.time_limit - wall.lap() - args.eval_seconds if args.time_limit else None
        if limit is not None and limit <= 0:
            raise Stopped(
                f"no time to train: --time-limit {args.time_limit:g} s leaves none after {args.eval_seconds:g} s kept"
            )
        log = out / f"{NAME}.log"
        seed = ["--seed", str(args.seed)] if args.seed is not None else []
        command = [args.python, str(LAUNCHER), "--official-dir", official["dir"], *seed]
        command += ["--cpu-dry-run"] * args.cpu_dry_run
        official.update(command=[*command, "--", *official["arguments"]], log=str(log))

        def progress(report: dict) -> None:
            result["training"] = {**report, "epochs_requested": args.epochs}
            results.write(result)

        training = run_official(official["command"], work, args.epochs, limit, log, progress)
        progress(training)
        if training["status"] == "error":
            tail = training["output_tail"][-1] if training["output_tail"] else "no output"
            raise UserError(f"the official run failed (exit {training['exit_code']}): {tail}; see {log}")
        saved = [(int(p.stem), p) for p in work.glob("logs/*/*/save_models/*.pt") if p.stem.isdigit()]
        saved = sorted(s for s in saved if s[0] < args.epochs)
        if training["status"] == "ok" and not saved:
            raise UserError(
                f"the official run ended without save_models/{args.epochs - 1}.pt under {work}/logs; see {log}"
            )
        if saved:  # after a training timeout: the latest epoch it saved; scored as `fastemp eval --weights` would
            from fastemp.startup import evaluate_weights

            (epoch, checkpoint), _ = saved[-1], wall.lap()
            scores = evaluate_weights(checkpoint, "official", cfg, progress=False, train_set=train, test_set=test)
            result["evaluation"] = {**scores, "eval_seconds": wall.lap(), "eval_config": dataclasses.asdict(cfg.eval)}
            result["evaluation"].update(checkpoint=str(checkpoint), epochs_trained=epoch + 1, config=args.config)
        result["status"] = "PASS" if training["status"] == "ok" else "TIMEOUT"
        if training["status"] != "ok":
            result["error"] = f"training stopped {limit:.0f} s in, keeping {args.eval_seconds:g} s for the evaluation"
        return int(results.write(result, final=result["status"] == "PASS")["status"] != "PASS")
    except BaseException as err:  # the limit, SIGTERM, a one-line error, Ctrl-C or a crash: written down first
        result["status"] = "TIMEOUT" if isinstance(err, Stopped) else "FAIL"
        result["error"] = one_line(f"{type(err).__name__}: {err}")[:300]
        results.write(result)
        if not isinstance(err, (Stopped, KeyboardInterrupt)):
            raise
        print(f"fastemp: official-peer stopped ({err or 'interrupted'}); see {results.json}", file=sys.stderr)
        return 1
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        scratch.cleanup()
        if args.accuracy:
            add_official(Path(args.accuracy), out / f"{NAME}.json")


def markdown(result: dict) -> str:
    official, training, evaluation = result["official"], result.get("training") or {}, result.get("evaluation") or {}
    lines = ["- **CPU dry run of the harness: not a peer result**"] if result.get("dry_run") else []
    lines += [
        f"- status {result.get('status')}: `python main.py {' '.join(official['arguments'])}`, seed {official['seed']} "
        f"(None: unseeded, as the README); data: {result['data'].get('copy')}",
        f"- trained {training.get('epochs_trained', 0)} of the schedule's {official['schedule_epochs']} epochs, "
        f"n={official['n_patches']}, B={BATCH}; startup {fmt(training.get('startup_seconds'))} s (not in images/s)",
        "",
        table(training.get("epochs", []), "epoch steps loop_seconds images_per_s images_per_s_whole_loop lr_after"),
    ]
    if evaluation:
        lines += ["", f"## fastemp's evaluation of the official encoder ({Path(evaluation['checkpoint']).name})", ""]
        lines.append(table([evaluation], "linear_top1 best_top1_on_test knn_top1 eval_config.patches eval_seconds"))
    lines += ["", f"error: {result['error']}"] if result.get("error") else []
    return harness.page(result, "Official EMP-SSL code, peer run", *lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    options = (
        ("--official-dir", str, None, f"a checkout of {REPO} (kept outside the project)"),
        ("--data", str, None, "the CIFAR-10 JPEG copy (ImageFolder .tar.gz or folder) or cifar-10-python.tar.gz"),
        ("--out", str, None, f"folder for {NAME}.json, .md and .log (written as the run goes)"),
        ("--epochs", int, 1, "epochs to train of the schedule (default 1); the last one's checkpoint is evaluated"),
        ("--schedule-epochs", int, 2, "main.py's --epoch, the cosine's length (default 2: the README's)"),
        ("--n", int, 20, "patches per image, main.py's --num_patches (default 20)"),
        ("--seed", int, None, "seed torch/numpy/random before main.py and fastemp's evaluation (default: unseeded)"),
        ("--time-limit", float, None, "seconds for data, training and evaluation (all of it)"),
        ("--eval-seconds", float, None, "seconds kept for the evaluation (default: from --accuracy, else 150)"),
        ("--accuracy", str, None, "the `bench accuracy` results file this run joins (seed, evaluation time)"),
        ("--config", str, "cifar10_n20_1ep", "fastemp config whose eval section scores the official encoder"),
        ("--device", str, "auto", "device of fastemp's evaluation"),
        ("--python", str, sys.executable, "interpreter with the official code's dependencies (default: this one)"),
        ("--work", str, None, "scratch folder for the official run's data and checkpoints (default: temporary)"),
        ("--train-images", int, 0, "dry runs: an evenly spaced subset (0: all)"),
        ("--test-images", int, 0, "dry runs: an evenly spaced subset (0: all)"),
    )
    for flag, kind, default, text in options:
        required = flag in ("--official-dir", "--data", "--out")
        p.add_argument(flag, type=kind, default=default, help=text, required=required)
    p.add_argument("overrides", nargs="*", help="config overrides of the evaluation (the same ones fastemp's runs got)")
    p.add_argument("--cpu-dry-run", action="store_true", help="run the official code on the CPU (never a peer result)")
    p.set_defaults(func=run_peer)
