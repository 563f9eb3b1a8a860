"""The official main.py's data and process: both splits through fastemp's loader, written as the CIFAR-10 python
batches its loader reads (prepare_data); its output read as it arrives, every line logged and stamped with the
host's clock (outside the official process, when its lines arrive is all there is to time it by), its timings read
from those stamps (timings), and the process stopped at the epoch wanted, at a time limit or with its parent.
"""

from __future__ import annotations

import os
import pickle
import re
import select
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from fastemp.data import ImageSet, load_split, load_train_images
from fastemp.errors import UserError
from fastemp.runtime import resolve_device

from .accuracy import data_names

PROGRESS = re.compile(r"^\s*(\d+)it \[")  # tqdm over enumerate(dataloader): "123it [00:05, 24.1it/s]"
# main.py prints the losses' .item() and the learning rate: Python floats
EPOCH_END = re.compile(r"At epoch: (\d+) loss similarity is (\S+) ,loss TCR is: (\S+) and learning rate is: (\S+)")
BATCH = 100  # main.py's --bs default; the README's command keeps it


def timings(stamped: list[tuple[float, str]], launched: float) -> dict:
    """The official run's timings from tqdm's and the epoch ends' lines among its stamped lines. Per epoch the loop
    starts at tqdm's first line (0 steps: printed before the first batch is asked for); the steady window runs from
    the first line with steps done to the last line seen, so worker start-up and the first step stay out of it."""
    epochs, bars = [], []  # per epoch: what main.py printed at its end; its progress lines as (time, steps done)
    for t, line in stamped:
        progress, end = PROGRESS.match(line), EPOCH_END.search(line)  # an end may be glued to tqdm's text
        if progress:
            steps = int(progress.group(1))
            if not epochs or epochs[-1]["done"] or steps < bars[-1][-1][1]:
                epochs.append({"epoch": len(epochs), "done": False})
                bars.append([])
            bars[-1].append((t, steps))
        if end and epochs:
            numbers = dict(zip(("loss_similarity", "loss_tcr", "lr_after"), map(float, end.groups()[1:])))
            epochs[-1].update(done=True, **numbers)
    for epoch, bar in zip(epochs, bars):
        (start, _), (last, steps) = bar[0], bar[-1]
        first, before = next((line for line in bar if line[1] > 0), bar[-1])  # the first line with steps done
        steady = steps > before and last > first
        whole_loop = steps * BATCH / (last - start) if last > start else None
        epoch.update(steps=steps, loop_seconds=last - start, images_per_s_whole_loop=whole_loop)
        epoch.update(steady_steps=steps - before if steady else 0, steady_seconds=last - first if steady else None)
        epoch["images_per_s"] = (steps - before) * BATCH / (last - first) if steady else None
    done = [e for e in epochs if e["done"]]
    headline = (done or epochs or [{}])[-1]  # the last epoch that ended, else the one running
    out = {"startup_seconds": bars[0][0][0] - launched if bars else None, "epochs": epochs, "epochs_trained": len(done)}
    return out | {key: headline.get(key) for key in ("images_per_s", "images_per_s_whole_loop")}


def split_output(rest: str, rest_time: float, chunk: str, now: float) -> tuple[list[tuple[float, str]], str, float]:
    """Complete lines of a stream chunk, each stamped when its text arrived, and the unfinished rest. tqdm starts a
    line with \\r and ends it only with its next write, so text carried over keeps the time it arrived."""
    *lines, rest = re.split(r"[\r\n]", rest + chunk)
    first = now if chunk[:1] not in ("\r", "\n") else rest_time  # did this chunk add text to the pending line?
    stamped = [(first if i == 0 else now, line) for i, line in enumerate(lines) if line.strip()]
    return stamped, rest, now if chunk else rest_time


def run_official(command: list[str], cwd: Path, epochs: int, time_limit: float | None, log: Path, on_progress) -> dict:
    """Run the official training until `epochs` epochs have ended (then stop it), it exits, or the time limit;
    on_progress(report) at every epoch end, every 30 s and at the end. Every line goes to `log` as it arrives."""
    launched = time.perf_counter()
    stamped, status, rest, rest_time = [], "running", "", launched  # rest: the unfinished line
    deadline, reported = launched + time_limit if time_limit else None, launched
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "w", buffering=1) as out:  # line by line: a kill keeps every line that arrived

        def feed(chunk: str, now: float) -> None:
            """Log and keep each line the chunk completes; an epoch's end is reported (and may end the run)."""
            nonlocal status, rest, rest_time
            lines, rest, rest_time = split_output(rest, rest_time, chunk, now)
            for t, line in lines:
                out.write(f"{t - launched:10.3f} {line}\n")
                stamped.append((t, line))
                end = EPOCH_END.search(line)
                if end:
                    on_progress(timings(stamped, launched))
                    status = "ok" if status == "running" and int(end.group(1)) + 1 >= epochs else status

        def read(wait: float) -> bool:
            """Take the lines that arrive within `wait` seconds; False once the output has ended."""
            if not select.select([child.stdout], [], [], wait)[0]:
                return True
            chunk = os.read(child.stdout.fileno(), 65536)
            feed(chunk.decode("utf-8", "replace"), time.perf_counter())
            return bool(chunk)

        popen = dict(cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        with subprocess.Popen(command, **popen) as child:  # its exit closes the pipe and reaps the process
            try:
                while status == "running" and read(1.0):
                    now = time.perf_counter()
                    status = "timeout" if status == "running" and deadline and now > deadline else status
                    if now - reported > 30:
                        on_progress(timings(stamped, launched))
                        reported = now
            finally:  # stop it (a no-op once it has exited): its DataLoader workers notice their parent is gone
                child.terminate()
                try:
                    child.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    child.kill()
                drained = time.perf_counter() + 10  # what arrives while it stops (tqdm's unfinished last line)
                while time.perf_counter() < drained and read(1.0):
                    pass
                feed("\n", time.perf_counter())  # the unfinished line, stamped when its text arrived
                on_progress(timings(stamped, launched))  # also when a time limit or a signal ends it here
    report = timings(stamped, launched)
    if status == "running":  # the output ended: the run finished or failed
        status = "ok" if child.returncode == 0 and report["epochs"] and report["epochs"][-1]["done"] else "error"
    tail = [line for _, line in stamped if not PROGRESS.match(line)][-5:]  # the last lines other than tqdm's
    report.update(status=status, exit_code=child.returncode, output_tail=tail)
    return {**report, "wall_seconds": time.perf_counter() - launched}


def subset(images, count: int):
    """`count` evenly spaced images of an ImageSet (every class of a class-sorted folder keeps its share); 0: all."""
    if not count or count >= len(images):
        return images
    index = torch.linspace(0, len(images) - 1, count).round().long().to(images.labels.device)
    description = f"{images.description}, evenly spaced subset of {count}"
    return ImageSet(images.images[index].contiguous(), images.labels[index].contiguous(), images.classes, description)


def write_cifar_batches(train, test, folder: Path) -> None:
    """CIFAR-10 python batches (data_batch_1..5, test_batch, batches.meta) of two ImageSets."""
    if tuple(train.images.shape[1:]) != (32, 32, 3) or tuple(test.images.shape[1:]) != (32, 32, 3):
        raise UserError("the official CIFAR loader needs 32x32x3 images; keep data.image_size=32")
    folder.mkdir(parents=True, exist_ok=True)

    def rows(images) -> np.ndarray:  # (N, 32, 32, 3) uint8 -> CIFAR's (N, 3072): the R, G, B planes, row-major
        return images.permute(0, 3, 1, 2).reshape(len(images), -1).cpu().numpy()

    def dump(name: str, **contents) -> None:
        (folder / name).write_bytes(pickle.dumps(contents, protocol=2))

    x, y = rows(train.images), train.labels.cpu().tolist()
    for i, idx in enumerate(np.array_split(np.arange(len(y)), 5), start=1):
        dump(f"data_batch_{i}", batch_label=f"training batch {i} of 5", data=x[idx], labels=[y[j] for j in idx])
    dump("test_batch", batch_label="testing batch 1 of 1", data=rows(test.images), labels=test.labels.cpu().tolist())
    dump("batches.meta", label_names=list(train.classes), num_vis=3072, num_cases_per_batch=-(-len(y) // 5))


def prepare_data(args, cfg, work: Path):
    """Both splits through fastemp's loader, laid out for main.py under <work>/data/CIFAR10/: (train, test, info)."""
    device = resolve_device(cfg.train.device)  # auto: CUDA when present
    train = subset(load_train_images(cfg.data, device), args.train_images)  # what fastemp trains on
    test = subset(load_split(cfg.data, "test", device), args.test_images)
    if len(train) < BATCH:
        raise UserError(
            f"{len(train)} training images are fewer than main.py's batch of {BATCH}; use --train-images >= {BATCH}"
        )
    write_cifar_batches(train, test, work / "data" / "CIFAR10" / "cifar-10-batches-py")
    info = {"path": str(Path(args.data).resolve()), "copy": data_names(cfg.data)[1], "train_images": len(train)}
    info.update(test_images=len(test), classes=train.classes, description=train.description)
    return train, test, info
