"""`fastemp bench official-peer`: the official EMP-SSL code itself, on the same GPU and data copy as fastemp.

    python -m fastemp.benchmarks.official_peer --official-dir DIR --data TAR --out DIR
        [--epochs 1] [--n 20] [--seed S] [--time-limit S] [--eval-seconds S] [KEY=VALUE ...]
    python -m fastemp.benchmarks.official_peer --official-dir DIR --data TAR --out DIR --probe-loader 5

1. Data. The split is loaded by fastemp's own loader (the same decoder, so the same pixels fastemp trains
   on) and written as CIFAR-10 python batches into a scratch folder, which the official loader
   (torchvision's CIFAR10) reads unmodified; official_launcher.py points its md5 check at those files
   (docs/official_peer.md). A canonical cifar-10-python.tar.gz is extracted as it is, with no shim.
2. Training. The official main.py runs as a subprocess with the README's 1-epoch command
   (`--data cifar10 --epoch 2 --patch_sim 200 --arch resnet18-cifar --num_patches 20 --lr 0.3`: a cosine
   over 2 epochs, whose first-epoch checkpoint the README's 84.2% is read from), and is stopped once
   `--epochs` checkpoints exist. Its progress lines (tqdm on stderr, "At epoch" on stdout) are
   timestamped as they arrive: startup (imports, data, model) is kept apart from the training loop, and
   images/s is measured over the loop's steps after the first progress line (worker start-up and the
   first step excluded), with the whole-loop rate beside it.
3. Evaluation. The saved encoder (a DataParallel state_dict) is scored as `fastemp eval --weights FILE
   --format official` scores it (fastemp.weights: strict, by name) under the config's eval section
   (default: the official protocol's values); `--override eval.KEY=VALUE` selects another.

Results: <out>/official_peer.json and .md, rewritten after every phase, every training epoch and every 30 s
of training ("status": RUNNING, then PASS, FAIL or TIMEOUT; "partial": true until it passed), and
<out>/official_peer.log, the official process's output line by line as it arrives, timestamped: a run that
fails, runs out of --time-limit or is killed by SIGTERM keeps what it measured. --time-limit bounds all of it:
training stops --eval-seconds before the limit (the latest checkpoint is then evaluated, if any), and whatever
runs at the limit is stopped. Exit status 0 only on PASS.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import pickle
import queue
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from fastemp.errors import UserError

from . import common

NAME = "official_peer"
OFFICIAL_REPO = "tsb0601/EMP-SSL"
# what main.py imports, directly or through func.py / model / dataset (module names as imported)
OFFICIAL_REQUIREMENTS = ("torchvision", "torchmetrics", "sklearn", "tqdm", "matplotlib", "PIL", "numpy")
OFFICIAL_FILES = ("main.py", "model/model.py", "dataset/datasets.py", "dataset/aug.py", "lars.py", "loss.py", "func.py")
OFFICIAL_BATCH_SIZE = 100  # main.py's --bs default; the README's command keeps it
OFFICIAL_TRAIN_IMAGES = 50_000  # main.py's cosine length is (50000 // bs) * --epoch, whatever the data
README_SCHEDULE_EPOCHS = 2  # the README's "1 epoch" command is `--epoch 2`, evaluated after its first epoch
CANONICAL_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR_FOLDER = "cifar-10-batches-py"
LAUNCHER = Path(__file__).with_name("official_launcher.py")
# ESTIMATE, not a measurement: the official protocol (60,000 images x 128 patches forward, 100 probe epochs) in
# fastemp's evaluator on an H200 ~60-100 s, plus compiling the encoder; a measured value replaces it (--eval-seconds)
DEFAULT_EVAL_SECONDS = 150.0
PROBE_FIRST_BATCH_SECONDS = 60.0  # --probe-loader: how long the workers may take to deliver their first batch


class PeerError(UserError, RuntimeError):
    """The official peer run cannot start or finish; one line saying what to do."""


# ------------------------------------------------------------------------------ the official command


def official_arguments(n_patches: int, schedule_epochs: int) -> list[str]:
    """main.py's arguments: the README's CIFAR-10 command, with its patch count and schedule length."""
    return [
        "--data",
        "cifar10",
        "--epoch",
        str(schedule_epochs),
        "--patch_sim",
        "200",
        "--arch",
        "resnet18-cifar",
        "--num_patches",
        str(n_patches),
        "--lr",
        "0.3",
    ]


def check_official_dir(path: Path) -> dict[str, str]:
    """sha256 of the official files the run uses; PeerError when `path` is not such a checkout."""
    if not path.is_dir():
        raise PeerError(
            f"--official-dir {path} does not exist; fetch {OFFICIAL_REPO} outside this project "
            "(e.g. git clone into .official/) and pass its folder"
        )
    missing = [f for f in OFFICIAL_FILES if not (path / f).is_file()]
    if missing:
        raise PeerError(
            f"--official-dir {path} is not a checkout of {OFFICIAL_REPO} (no {', '.join(missing)}); "
            "pass the folder that holds its main.py"
        )
    return {f: hashlib.sha256((path / f).read_bytes()).hexdigest() for f in OFFICIAL_FILES}


IMPORT_PROBE = """
import importlib, json, sys
missing, versions = [], {}
for name in sys.argv[1:]:
    try:
        versions[name] = str(getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as err:  # missing, or present but broken (e.g. a torchvision built for another torch)
        missing.append(f"{name} ({type(err).__name__})")
print(json.dumps({"missing": missing, "versions": versions}))
"""


def probe_imports(python: str, modules: tuple[str, ...] = ("torch", *OFFICIAL_REQUIREMENTS)) -> dict:
    """{"missing": ["name (error)"], "versions": {name: version}} of `python` importing each module."""
    try:
        out = subprocess.run([python, "-c", IMPORT_PROBE, *modules], capture_output=True, text=True, timeout=300)
        found = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError) as err:
        raise PeerError(f"cannot run the interpreter {python} ({err}); pass --python with a working one") from None
    except (ValueError, IndexError):
        found = None
    if found is None:
        raise PeerError(
            f"the interpreter {python} failed to check its modules ({last_line(out.stderr)}); "
            "pass --python with a working one"
        )
    return found


def last_line(text: str) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


# ------------------------------------------------------------------------------ data


def is_canonical_archive(path: Path) -> bool:
    return path.is_file() and path.name == CANONICAL_ARCHIVE


def check_data_path(path: Path) -> None:
    if not path.exists():
        raise PeerError(
            f"--data {path} does not exist; pass the CIFAR-10 JPEG copy (an ImageFolder .tar.gz or "
            f"folder) or {CANONICAL_ARCHIVE}"
        )
    if not (path.is_dir() or path.name.lower().endswith((".tar", ".tar.gz", ".tgz"))):
        raise PeerError(
            f"--data {path} is neither a folder nor a .tar/.tar.gz/.tgz archive; pass the CIFAR-10 "
            f"JPEG copy (ImageFolder) or {CANONICAL_ARCHIVE}"
        )


def data_overrides(path: Path) -> list[str]:
    """fastemp's data.* settings for --data: the canonical python archive, else an ImageFolder."""
    if is_canonical_archive(path):
        return ["data.source=cifar10", f"data.root={path.parent}", "data.download=false"]
    return ["data.source=imagefolder", f"data.path={path}"]


def evenly_spaced(count: int, total: int) -> torch.Tensor:
    """`count` indices spread over 0..total-1 (every class of a class-sorted folder keeps its share)."""
    if count <= 0 or count >= total:
        return torch.arange(total)
    return torch.linspace(0, total - 1, count).round().long()


def subset(images, count: int):
    """The first `count` evenly spaced images of an ImageSet (all of them when count is 0)."""
    from fastemp.data import ImageSet

    if not count:
        return images
    index = evenly_spaced(count, len(images)).to(images.labels.device)
    return ImageSet(
        images.images[index].contiguous(),
        images.labels[index].contiguous(),
        images.classes,
        f"{images.description}, evenly spaced subset of {index.numel()}",
    )


def _cifar_rows(images: np.ndarray) -> np.ndarray:
    """(N, 32, 32, 3) uint8 -> CIFAR's (N, 3072) rows: the R, G and B planes, each row-major."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(images.shape[0], -1))


def write_cifar_batches(train, test, folder: Path) -> dict[str, str]:
    """CIFAR-10 python batches (data_batch_1..5, test_batch, batches.meta) of two ImageSets; {file: md5}."""
    for split, s in (("train", train), ("test", test)):
        if tuple(s.images.shape[1:]) != (32, 32, 3):
            raise PeerError(
                f"the {split} images are {tuple(s.images.shape[1:])}, the official CIFAR loader needs "
                "32x32x3; keep data.image_size=32"
            )
    folder.mkdir(parents=True, exist_ok=True)
    train_x, train_y = train.images.cpu().numpy(), train.labels.cpu().tolist()
    contents = {}
    for i, idx in enumerate(np.array_split(np.arange(len(train_y)), 5), start=1):
        contents[f"data_batch_{i}"] = {
            "batch_label": f"training batch {i} of 5",
            "data": _cifar_rows(train_x[idx]),
            "labels": [train_y[j] for j in idx],
        }
    contents["test_batch"] = {
        "batch_label": "testing batch 1 of 1",
        "data": _cifar_rows(test.images.cpu().numpy()),
        "labels": test.labels.cpu().tolist(),
    }
    contents["batches.meta"] = {
        "label_names": list(train.classes),
        "num_vis": 3072,
        "num_cases_per_batch": int(np.ceil(len(train_y) / 5)),
    }
    sums = {}
    for name, value in contents.items():
        blob = pickle.dumps(value, protocol=2)
        (folder / name).write_bytes(blob)
        sums[name] = hashlib.md5(blob).hexdigest()
    return sums


def extract_canonical(archive: Path, root: Path) -> None:
    """Unpack cifar-10-python.tar.gz under root (it holds cifar-10-batches-py/), as torchvision would."""
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(root, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))


# ------------------------------------------------------------------------------ progress and timing

PROGRESS = re.compile(r"^\s*(\d+)it \[")  # tqdm over enumerate(dataloader): "123it [00:05, 24.1it/s]"
EPOCH_END = re.compile(r"At epoch: (\d+) loss similarity is (\S+) ,loss TCR is: (\S+) and learning rate is: (\S+)")


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


class OfficialClock:
    """Timings of the official run from its output lines, each stamped when it arrived.

    Per epoch: the loop starts at tqdm's first line (0 steps: printed before the first batch is asked
    for); the steady window runs from the first line with steps done to the last line seen (tqdm's
    closing line at the end of the epoch), so worker start-up and the first step stay out of it.
    """

    def __init__(self, launched: float, batch_size: int = OFFICIAL_BATCH_SIZE):
        self.launched, self.batch_size = launched, batch_size
        self.epochs: list[dict] = []

    def feed(self, t: float, line: str) -> dict | None:
        """Take one output line; return the epoch record when the line ends an epoch."""
        progress = PROGRESS.match(line)
        if progress:
            steps = int(progress.group(1))
            current = self.epochs[-1] if self.epochs else None
            if current is None or current.get("done") or steps < current["_last"][1]:
                current = {"epoch": len(self.epochs), "_start": t, "_first": None, "_last": (t, 0)}
                self.epochs.append(current)
            if steps > 0 and current["_first"] is None:
                current["_first"] = (t, steps)
            current["_last"] = (t, steps)
        end = EPOCH_END.search(line)  # on its own line after tqdm's closing newline, or glued to tqdm's text
        if end and self.epochs:
            current = self.epochs[-1]
            current.update(
                done=True,
                checkpoint_epoch=int(end.group(1)),
                loss_similarity=_number(end.group(2)),
                loss_tcr=_number(end.group(3)),
                lr_after=_number(end.group(4)),
            )
            return self.summary(current)
        return None

    def summary(self, epoch: dict) -> dict:
        """An epoch's public numbers (seconds, steps, images/s), complete or not."""
        start, (last_t, steps) = epoch["_start"], epoch["_last"]
        out = {k: v for k, v in epoch.items() if not k.startswith("_")}
        out.update(
            done=bool(epoch.get("done")),
            steps=steps,
            loop_seconds=last_t - start,
            images_per_s_whole_loop=steps * self.batch_size / (last_t - start) if last_t > start else None,
        )
        first = epoch["_first"]
        if first is not None and steps > first[1] and last_t > first[0]:
            out.update(
                steady_steps=steps - first[1],
                steady_seconds=last_t - first[0],
                images_per_s=(steps - first[1]) * self.batch_size / (last_t - first[0]),
                first_steps_seconds=first[0] - start,
            )
        else:
            out.update(steady_steps=0, steady_seconds=None, images_per_s=None, first_steps_seconds=None)
        return out

    def report(self) -> dict:
        return {
            "startup_seconds": self.epochs[0]["_start"] - self.launched if self.epochs else None,
            "epochs": [self.summary(e) for e in self.epochs],
        }


def split_output(rest: str, rest_time: float, chunk: str, now: float) -> tuple[list[tuple[float, str]], str, float]:
    """Complete lines of a stream chunk, each with the time its text arrived, and the unfinished rest.

    tqdm starts each line with \r and ends it only with the next write, so a line is stamped when its
    text arrived (rest_time for text carried over from an earlier chunk), not when its terminator did.
    """
    parts = re.split(r"[\r\n]", rest + chunk)
    if len(parts) == 1:
        return [], parts[0], now if chunk else rest_time
    first = now if chunk[:1] not in ("\r", "\n") else rest_time  # did this chunk add text to the pending line?
    stamped = [(first, parts[0])] + [(now, part) for part in parts[1:-1]]
    return [(t, part) for t, part in stamped if part.strip()], parts[-1], now


def _pump(stream, lines: queue.Queue) -> None:
    """Reader thread: each output line with its arrival time; None at the end of the stream."""
    rest, rest_time = "", time.perf_counter()
    for chunk in iter(lambda: os.read(stream.fileno(), 65536), b""):
        done, rest, rest_time = split_output(rest, rest_time, chunk.decode("utf-8", "replace"), time.perf_counter())
        for item in done:
            lines.put(item)
    if rest.strip():
        lines.put((rest_time, rest))
    lines.put(None)


def run_official(
    command: list[str], cwd: Path, epochs: int, time_limit: float | None, log_path: Path, on_progress
) -> dict:
    """Run the official training until `epochs` epochs have ended (then stop it), it exits, or time runs out.

    on_progress(report) is called at every epoch end and every 30 s with the clock's report so far.
    """
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    launched = time.perf_counter()
    clock = OfficialClock(launched)
    lines: queue.Queue = queue.Queue()
    tail: list[str] = []
    status, deadline = "running", launched + time_limit if time_limit else None
    with open(log_path, "w", buffering=1) as log:  # line by line: a kill keeps every line that arrived

        def take(t: float, line: str) -> dict | None:
            log.write(f"{t - launched:10.3f} {line}\n")
            if not PROGRESS.match(line):
                tail[:] = (tail + [line])[-20:]
            return clock.feed(t, line)

        child = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        reader = threading.Thread(target=_pump, args=(child.stdout, lines), daemon=True)
        reader.start()
        last_report = launched
        try:
            while status == "running":
                try:
                    item = lines.get(timeout=1.0)
                except queue.Empty:
                    item = ()
                if item is None:
                    break
                ended = take(*item) if item else None
                if ended is not None:
                    on_progress(clock.report())
                    if ended["checkpoint_epoch"] + 1 >= epochs:
                        status = "ok"
                now = time.perf_counter()
                if status == "running" and deadline and now > deadline:
                    status = "timeout"
                if now - last_report > 30:
                    on_progress(clock.report())
                    last_report = now
        finally:
            stop(child)
            reader.join(timeout=10)
            while not lines.empty():  # what arrived while it was being stopped (tqdm's unfinished last line)
                item = lines.get()
                if item is not None:
                    take(*item)
            on_progress(clock.report())  # also when a time limit or a signal ends it here
    code = child.returncode
    if status == "running":  # the stream ended: the run finished or failed
        status = "ok" if code == 0 and clock.epochs and clock.epochs[-1].get("done") else "error"
    return {
        **clock.report(),
        "status": status,
        "exit_code": code,
        "output_tail": tail[-5:],
        "wall_seconds": time.perf_counter() - launched,
    }


def stop(child: subprocess.Popen) -> None:
    """End the official process (its DataLoader workers notice their parent is gone and exit)."""
    if child.poll() is None:
        child.terminate()
        try:
            child.wait(timeout=20)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


# ------------------------------------------------------------------------------ evaluation


def evaluate_official(checkpoint: Path, cfg, train, test, progress: bool = True) -> dict:
    """fastemp's evaluation of the official encoder saved at `checkpoint` under cfg.eval: the library's
    `fastemp eval --weights CHECKPOINT --format official` (fastemp.startup.evaluate_weights), on these splits."""
    from fastemp.startup import evaluate_weights

    start = time.perf_counter()
    metrics = evaluate_weights(checkpoint, "official", cfg, progress=progress, train_set=train, test_set=test)
    return {
        **metrics,
        "eval_seconds": time.perf_counter() - start,
        "checkpoint": str(checkpoint),
        "mapped_tensors": metrics["tensors"],
    }


def latest_checkpoint(work: Path, up_to: int) -> Path | None:
    """The latest of main.py's save_models/<epoch>.pt (epoch <= up_to) under ./logs/<dir>/<run name>/."""
    found = [(int(p.stem), p) for p in work.glob("logs/*/*/save_models/*.pt") if p.stem.isdigit()]
    found = [(epoch, p) for epoch, p in found if epoch <= up_to]
    return max(found)[1] if found else None


# ------------------------------------------------------------------------------ report


def peer_markdown(result: dict) -> str:
    """The human-readable report of a (possibly partial) result."""
    fmt, official = common.fmt, result["official"]
    training, evaluation = result.get("training") or {}, result.get("evaluation") or {}
    seeded = f" (seeded {official['seed']})" if official.get("seed") is not None else " (unseeded, as the README)"
    lines = [
        f"# Official EMP-SSL code, peer run ({result.get('status')})",
        "",
        f"- device: {common.device_label(result['environment'])}",
        f"- official code: {OFFICIAL_REPO}, `python main.py {' '.join(official['arguments'])}`{seeded}; "
        f"its interpreter: {', '.join(f'{k} {v}' for k, v in official.get('versions', {}).items()) or 'n/a'}",
        f"- data: {result['data'].get('copy')}; {result['data'].get('description', '')}",
        f"- trained {training.get('epochs_trained', 0)} of the schedule's {official['schedule_epochs']} epochs, "
        f"n={official['n_patches']}, B={OFFICIAL_BATCH_SIZE}; startup {fmt(training.get('startup_seconds'))} s "
        "(imports, data, model, DataLoader workers; not in images/s)",
    ]
    if result.get("dry_run"):
        lines.insert(2, "- **CPU dry run of the harness: not a peer result**")
    keys = ("epoch", "steps", "loop_seconds", "images_per_s", "images_per_s_whole_loop", "loss_similarity")
    keys += ("loss_tcr", "lr_after")
    rows = [[e.get(k) for k in keys] for e in training.get("epochs", [])]
    if rows:
        headers = "epoch|steps|loop s|images/s (steady)|images/s (whole loop)|loss sim|loss TCR|lr after".split("|")
        lines += ["", common.markdown_table(headers, rows)]
    if evaluation:
        ev = evaluation.get("eval_config", {})
        values = [evaluation.get(k) for k in ("linear_top1", "best_top1_on_test", "knn_top1")]
        values += [ev.get("patches"), ev.get("probe_epochs"), evaluation.get("eval_seconds")]
        headers = "linear top-1 (final probe epoch)|best epoch on test|kNN top-1|eval patches|probe epochs|eval s"
        lines += [
            "",
            f"## fastemp's evaluation of the official encoder ({Path(str(evaluation.get('checkpoint'))).name})",
            "",
            common.markdown_table(headers.split("|"), [values]),
        ]
    if result.get("error"):
        lines += ["", f"error: {result['error']}"]
    lines += ["", "## Environment", "", common.environment_markdown(result["environment"])]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ the command


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--official-dir", required=True, help=f"a checkout of {OFFICIAL_REPO} (kept outside the project)")
    p.add_argument(
        "--data", required=True, help=f"the CIFAR-10 JPEG copy (ImageFolder .tar.gz or folder) or {CANONICAL_ARCHIVE}"
    )
    p.add_argument(
        "--out", required=True, help=f"folder for {NAME}.json, .md and .log (written as the run goes, never moved)"
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=1,
        help="epochs to train of the schedule (default 1); the last one's checkpoint is evaluated",
    )
    p.add_argument(
        "--schedule-epochs",
        type=int,
        default=README_SCHEDULE_EPOCHS,
        help="main.py's --epoch, the cosine's length (default 2: the README's 1-epoch command)",
    )
    p.add_argument("--n", type=int, default=20, help="patches per image, main.py's --num_patches (default 20)")
    p.add_argument(
        "--seed",
        type=int,
        help="seed torch/numpy/random before main.py and fastemp's evaluation (default: unseeded, as the official "
        "command: torch's fixed default seed, so give runs that should differ their own seeds)",
    )
    p.add_argument(
        "--time-limit",
        type=float,
        help="seconds for all of it, data, training and evaluation: training stops --eval-seconds before the "
        "limit (the latest checkpoint is then evaluated), and whatever runs at the limit is stopped (TIMEOUT)",
    )
    p.add_argument(
        "--eval-seconds",
        type=float,
        help=f"what the evaluation is expected to take, kept free of training under --time-limit (default: measured "
        f"in --accuracy's file, else {DEFAULT_EVAL_SECONDS:g}: the official protocol on an H100/H200 with compilation)",
    )
    p.add_argument(
        "--accuracy",
        help="the `bench accuracy` results file this run joins: without --seed the next seed no official run there "
        "passed with, without --eval-seconds the evaluation time measured there; the run (any status) is added to it",
    )
    p.add_argument(
        "--config",
        default="cifar10_n20_1ep",
        help="fastemp config whose eval section evaluates the official encoder (default cifar10_n20_1ep)",
    )
    p.add_argument(
        "--override",
        action="append",
        default=[],
        help="config override for the evaluation, e.g. eval.patches=16 (repeatable)",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        help="more section.key=value overrides (the same ones fastemp's runs got, e.g. model.compile=none)",
    )
    p.add_argument("--device", default="auto", help="device of fastemp's evaluation (default: cuda when present)")
    p.add_argument(
        "--python", default=sys.executable, help="interpreter with the official code's dependencies (default: this one)"
    )
    p.add_argument(
        "--work",
        help="scratch folder for the official run's data and checkpoints (default: a temporary folder, removed at "
        "the end)",
    )
    p.add_argument("--no-eval", action="store_true", help="time the training only")
    p.add_argument(
        "--probe-loader",
        type=float,
        metavar="SECONDS",
        help="instead of a run: start main.py's DataLoader as main.py does (16 workers, file_system sharing, "
        "after CUDA) on the prepared data and report whether its workers deliver batches for SECONDS",
    )
    p.add_argument("--train-images", type=int, default=0, help="dry runs: an evenly spaced subset (0: all)")
    p.add_argument("--test-images", type=int, default=0, help="dry runs: an evenly spaced subset (0: all)")
    p.add_argument(
        "--cpu-dry-run",
        action="store_true",
        help="run the official code on the CPU to check the harness (tiny subsets; never a peer result)",
    )
    p.add_argument("--no-progress", action="store_true")


def _config(args, device: str):
    from fastemp.config import load_config
    from fastemp.validate import check_config

    overrides = [
        *args.override,
        *args.overrides,
        *data_overrides(Path(args.data).resolve()),
        f"train.device={device}",
        f"train.n_patches={args.n}",
        f"train.batch_size={OFFICIAL_BATCH_SIZE}",
        f"train.seed={args.seed if args.seed is not None else 0}",
    ]
    cfg = load_config(args.config, overrides)
    check_config(cfg)
    return cfg


def preflight(args) -> tuple[dict[str, str], dict[str, str]]:
    """Every check before anything heavy starts: (the official files' sha256 sums, its interpreter's versions)."""
    sums = check_official_dir(Path(args.official_dir))
    check_data_path(Path(args.data))
    if args.epochs < 1 or args.epochs > args.schedule_epochs:
        raise PeerError(
            f"--epochs {args.epochs} is outside 1..--schedule-epochs ({args.schedule_epochs}); "
            "train at least one epoch of the schedule"
        )
    if args.work and (Path(args.work) / "logs").exists():
        raise PeerError(f"--work {args.work} already holds logs/ of an earlier run; pass an empty or new folder")
    imports = probe_imports(args.python)
    if imports["missing"]:
        raise PeerError(
            f"the official code needs {', '.join(imports['missing'])}, which {args.python} cannot "
            "import; install them there (pip install torchvision torchmetrics scikit-learn) or pass "
            "--python"
        )
    if not args.cpu_dry_run and not torch.cuda.is_available():
        raise PeerError(
            "the official code needs a CUDA GPU (main.py calls .cuda()); run this on a GPU machine, or "
            "pass --cpu-dry-run with tiny --train-images to check the harness"
        )
    return sums, imports["versions"]


class Stopped(Exception):
    """--time-limit ran out, or a SIGTERM (a watchdog, `timeout`, a scheduler) arrived."""


def _stop(signum, frame):
    raise Stopped("--time-limit ran out" if signum == signal.SIGALRM else f"stopped by signal {signum}")


def run_official_peer(args) -> dict:
    from fastemp import runs
    from fastemp.runtime import resolve_device

    sums, versions = preflight(args)
    if args.accuracy:  # this run joins that file: its next seed and measured evaluation time
        from .accuracy import plan

        planned = plan(Path(args.accuracy))
        args.seed = planned["official_seed"] if args.seed is None else args.seed
        args.eval_seconds = args.eval_seconds or planned["eval_seconds"]
    args.eval_seconds = args.eval_seconds or DEFAULT_EVAL_SECONDS
    device = resolve_device("cpu" if args.cpu_dry_run else args.device)
    cfg = _config(args, str(device))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.perf_counter() + args.time_limit if args.time_limit else None
    result = common.base_result(NAME, runs.environment(device))
    result.update(
        partial=True,
        status="RUNNING",
        dry_run=bool(args.cpu_dry_run),
        time_limit=args.time_limit,
        eval_seconds_reserved=None if args.no_eval else args.eval_seconds,
        overrides=[*args.override, *args.overrides],
        data={},
        official={
            "repo": OFFICIAL_REPO,
            "dir": str(Path(args.official_dir).resolve()),
            "files_sha256": sums,
            "python": args.python,
            "versions": versions,
            "arguments": official_arguments(args.n, args.schedule_epochs),
            "readme_command": "python main.py " + " ".join(official_arguments(20, 2)),
            "n_patches": args.n,
            "schedule_epochs": args.schedule_epochs,
            "epochs_requested": args.epochs,
            "seed": args.seed,
            "batch_size": OFFICIAL_BATCH_SIZE,
            "cosine_steps": (OFFICIAL_TRAIN_IMAGES // OFFICIAL_BATCH_SIZE) * args.schedule_epochs,
        },
    )

    def write(final: bool = False) -> None:
        result["partial"] = not final
        common.write_results(out, NAME, result, peer_markdown(result))

    handlers = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGALRM)}
    if args.time_limit:
        signal.setitimer(signal.ITIMER_REAL, args.time_limit)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="fastemp-official-peer-"))
    try:
        write()
        train, test, result["data"] = prepare_data(args, cfg, device, work)
        write()
        reserve = 0.0 if args.no_eval else args.eval_seconds
        training_limit = deadline - time.perf_counter() - reserve if deadline else None
        if training_limit is not None and training_limit <= 0:
            raise Stopped(f"no time to train: --time-limit {args.time_limit:g} s leaves none after {reserve:g} s kept")
        training = train_official(args, work, result, write, training_limit)
        checkpoint = latest_checkpoint(work, args.epochs - 1)
        if training["status"] == "ok" and checkpoint is None:
            raise PeerError(
                f"the official run ended without save_models/{args.epochs - 1}.pt under {work}/logs; "
                f"see {out / NAME}.log"
            )
        if checkpoint is not None and not args.no_eval:  # after a training timeout: the latest epoch it saved
            result["evaluation"] = {
                **evaluate_official(checkpoint, cfg, train, test, not args.no_progress),
                "epochs_trained": int(checkpoint.stem) + 1,
                "eval_config": dataclasses.asdict(cfg.eval),
                "config": args.config,
                "overrides": [*args.override, *args.overrides],
            }
        result["status"] = "PASS" if training["status"] == "ok" else "TIMEOUT"
        if training["status"] != "ok":
            result["error"] = f"training stopped {training_limit:.0f} s in, keeping {reserve:g} s for the evaluation"
        write(final=result["status"] == "PASS")
    except Stopped as why:
        result.update(status="TIMEOUT", error=str(why))
        write()
        raise
    except BaseException as err:  # a one-line error, Ctrl-C, or a crash: written down before it propagates
        result.update(status="FAIL", error=last_line(f"{type(err).__name__}: {err}"))
        write()
        raise
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
        if args.accuracy:
            from .accuracy import add_official

            add_official(Path(args.accuracy), out / f"{NAME}.json")
    return result


def prepare_data(args, cfg, device: torch.device, work: Path):
    """Both splits through fastemp's loader, laid out for main.py under <work>/data/CIFAR10/: (train, test, info)."""
    from fastemp.data import load_split

    data = Path(args.data).resolve()
    train = subset(load_split(cfg.data, "train", device), args.train_images)
    test = subset(load_split(cfg.data, "test", device), args.test_images)
    if len(train) < OFFICIAL_BATCH_SIZE:
        raise PeerError(
            f"{len(train)} training images are fewer than main.py's batch of {OFFICIAL_BATCH_SIZE}; "
            f"use --train-images >= {OFFICIAL_BATCH_SIZE}"
        )
    root = work / "data" / "CIFAR10"
    canonical = is_canonical_archive(data) and not (args.train_images or args.test_images)
    if canonical:
        extract_canonical(data, root)
        md5_file = None
    else:
        sums = write_cifar_batches(train, test, root / CIFAR_FOLDER)
        md5_file = work / "prepared_md5.json"
        md5_file.write_text(json.dumps(sums, indent=1))
    info = {
        "path": str(data),
        "copy": "canonical cifar-10-python.tar.gz"
        if is_canonical_archive(data)
        else "CIFAR-10 JPEG ImageFolder copy (lossy, q75)"
        if "jpeg" in data.name.lower()
        else "ImageFolder",
        "train_images": len(train),
        "test_images": len(test),
        "classes": train.classes,
        "description": train.description,
        "official_reads": "the canonical archive, extracted"
        if canonical
        else "CIFAR-10 python batches written from fastemp's decoded pixels; torchvision's md5 check pointed at them",
        "md5_file": str(md5_file) if md5_file else None,
    }
    return train, test, info


def launcher_command(args, result: dict) -> list[str]:
    """official_launcher.py with this run's checkout, data check, seed and dry-run flag (main.py's arguments follow)."""
    command = [args.python, str(LAUNCHER), "--official-dir", str(Path(args.official_dir).resolve())]
    if result["data"].get("md5_file"):
        command += ["--cifar-md5", result["data"]["md5_file"]]
    if args.seed is not None:
        command += ["--seed", str(args.seed)]
    return command + (["--cpu-dry-run"] if args.cpu_dry_run else [])


def train_official(args, work: Path, result: dict, write, time_limit: float | None) -> dict:
    command = [*launcher_command(args, result), "--", *official_arguments(args.n, args.schedule_epochs)]
    log = Path(args.out) / f"{NAME}.log"
    result["official"].update(command=command, log=str(log))

    def progress(report: dict) -> None:
        result["training"] = summarize_training(report, args.epochs)
        write()

    report = run_official(command, work, args.epochs, time_limit, log, progress)
    result["training"] = summarize_training(report, args.epochs)
    if report["status"] == "error":
        raise PeerError(
            f"the official run failed (exit {report['exit_code']}): "
            f"{report['output_tail'][-1] if report['output_tail'] else 'no output'}; see {log}"
        )
    return report


def summarize_training(report: dict, epochs: int) -> dict:
    """The training section: the clock's report plus the headline (the last finished epoch's steady images/s)."""
    done = [e for e in report.get("epochs", []) if e.get("done")]
    headline = done[-1] if done else (report.get("epochs") or [{}])[-1]
    return {
        **report,
        "epochs_trained": len(done),
        "epochs_requested": epochs,
        "images_per_s": headline.get("images_per_s"),
        "images_per_s_whole_loop": headline.get("images_per_s_whole_loop"),
    }


def probe_loader(args) -> dict:
    """main.py's DataLoader alone on the prepared data (official_launcher.py --probe-loader): whether its 16
    workers, forked after CUDA started and sharing tensors through the file system, deliver batches here."""
    from fastemp.runtime import resolve_device

    preflight(args)
    device = resolve_device("cpu" if args.cpu_dry_run else args.device)
    cfg = _config(args, str(device))
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="fastemp-official-loader-"))
    try:
        _, _, data = prepare_data(args, cfg, device, work)
        command = [
            *launcher_command(args, {"data": data}),
            "--probe-loader",
            str(args.probe_loader),
            "--",
            *official_arguments(args.n, args.schedule_epochs),
        ]
        limit = args.probe_loader + PROBE_FIRST_BATCH_SECONDS + 60
        try:
            out = subprocess.run(
                command, cwd=work, capture_output=True, text=True, timeout=limit, stdin=subprocess.DEVNULL
            )
        except subprocess.TimeoutExpired:
            return {"status": "FAIL", "error": f"the probe did not end within {limit:g} s"}
        found = [line for line in out.stdout.splitlines() if line.startswith("{")]
        if not found:
            return {"status": "FAIL", "exit_code": out.returncode, "error": last_line(out.stderr + out.stdout)}
        return {"data": data["copy"], **json.loads(found[-1])}
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


def run_from_args(args) -> int:
    """`fastemp bench official-peer`: 0 when the official run trained and (unless --no-eval) was evaluated."""
    if args.probe_loader:
        result = probe_loader(args)
        print(json.dumps(result))
        return 0 if result["status"] == "PASS" else 1
    try:
        result = run_official_peer(args)
    except (Stopped, KeyboardInterrupt) as reason:  # the time limit, SIGTERM or Ctrl-C: the partial result is written
        print(
            f"fastemp: official-peer stopped ({reason or 'interrupted'}); what it measured is in "
            f"{Path(args.out) / (NAME + '.json')}",
            file=sys.stderr,
        )
        return 1
    print(peer_markdown(result))
    print(f"wrote {Path(args.out) / (NAME + '.json')}")
    return 0 if result["status"] == "PASS" else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastemp.benchmarks.official_peer", description=__doc__.splitlines()[0]
    )
    add_arguments(parser)
    args = parser.parse_intermixed_args(argv)
    try:
        return run_from_args(args)
    except Exception as err:
        from fastemp.cli import user_error_message

        message = user_error_message(err)
        if message is None:
            raise
        print(f"fastemp: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
