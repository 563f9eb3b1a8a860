"""Runs the official EMP-SSL `main.py` from its checkout, unmodified, as `python main.py ARGS` would.

    python official_launcher.py --official-dir DIR [--cifar-md5 FILE] [--seed S] [--cpu-dry-run]
        [--probe-loader SECONDS] -- ARGS...

benchmarks/official_peer.py builds this command and runs it as a subprocess in a scratch folder (main.py
reads ./data/ and writes ./logs/ relative to the working directory, never into the checkout). Standard
library only at import: it runs under whichever interpreter has the official code's dependencies.

Before main.py runs, and without touching any official file, it changes only these things:

--cifar-md5   torchvision's CIFAR10 checks each batch file against the md5 sums of the canonical archive
              and, with download=True (as the official loader asks), downloads the archive when one
              differs. Batch files written from another copy of the pixels (the JPEG copy) always differ,
              so the class's md5 list is replaced by those files' own sums: every file is still verified
              and nothing is downloaded. This changes where the data comes from and nothing else.
--seed        seeds torch, numpy and random first (main.py seeds nothing, so without --seed the run starts
              from torch's default seed, exactly as the official command does).
--cpu-dry-run .cuda() becomes a no-op, so the harness can be exercised on a machine without a GPU. Never a
              peer result: official_peer.py marks such runs as dry runs.
--probe-loader instead of main.py, only its data loading, with its settings (probe_loader below); one JSON line.

Two things that only keep the platform as the official code assumes it: on Linux the multiprocessing start
method is `fork` (its default up to Python 3.13; main.py builds its dataset and model at module level, which
its DataLoader workers must inherit rather than re-run), and Linux ends this process when its parent dies
(PR_SET_PDEATHSIG), so a killed benchmark never leaves an official training run behind on the GPU.
"""

from __future__ import annotations

import os
import sys

# Run as a script, this file's folder (benchmarks/) comes first on sys.path, and its profile.py would
# shadow the standard library's (cProfile imports it): the official code must not see this folder.
_HERE = os.path.dirname(os.path.realpath(__file__))
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != _HERE]

import argparse  # noqa: E402
import json  # noqa: E402
import runpy  # noqa: E402


def die_with_parent() -> None:
    """SIGTERM this process when the process that started it exits (Linux; elsewhere nothing)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def use_prepared_cifar(md5_file: str) -> None:
    """Point torchvision's CIFAR10 integrity check at the prepared batch files' own md5 sums."""
    with open(md5_file) as f:
        sums = json.load(f)
    from torchvision.datasets import CIFAR10

    CIFAR10.train_list = [[name, sums[name]] for name, _ in CIFAR10.train_list]
    CIFAR10.test_list = [[name, sums[name]] for name, _ in CIFAR10.test_list]
    CIFAR10.meta = {**CIFAR10.meta, "md5": sums[CIFAR10.meta["filename"]]}


def seed_everything(seed: int) -> None:
    import random

    import numpy
    import torch

    random.seed(seed)
    numpy.random.seed(seed)
    torch.manual_seed(seed)


def cuda_calls_stay_on_cpu() -> None:
    """Dry runs only: Module.cuda() and Tensor.cuda() return the object unchanged."""
    import torch

    torch.nn.Module.cuda = lambda self, device=None: self
    torch.Tensor.cuda = lambda self, *args, **kwargs: self


def probe_loader(seconds: float, official_args: list[str], cpu: bool) -> dict:
    """main.py's data loading, its lines and settings: file_system sharing, its dataset with --num_patches,
    DataLoader(batch 100, shuffle, drop_last, 16 workers), iterated after CUDA has started (main.py moves the
    model to the GPU before its first batch). Whether the workers start and deliver batches in this sandbox:
    the first batch's seconds, then batches for `seconds` more. A 60 s DataLoader timeout (not main.py's)
    turns workers that never deliver into an error instead of a hang."""
    import time

    import torch
    from dataset.datasets import load_dataset  # the official code's, from its folder (first on sys.path)
    from torch.utils.data import DataLoader

    n = int(official_args[official_args.index("--num_patches") + 1])
    out = {"status": "FAIL", "workers": 16, "batch_size": 100, "num_patches": n, "sharing_strategy": "file_system"}
    try:
        torch.multiprocessing.set_sharing_strategy("file_system")
        loader = DataLoader(
            load_dataset("cifar10", train=True, num_patch=n),
            batch_size=100,
            shuffle=True,
            drop_last=True,
            num_workers=16,
            timeout=60,
        )
        if not cpu:
            torch.zeros(1).cuda()
        out["cuda_started_first"] = not cpu
        start = time.perf_counter()
        first, batches, now = None, 0, 0.0
        for data, _ in loader:
            batches += 1
            now = time.perf_counter() - start
            if first is None:
                first, out["patches_per_batch"] = now, len(data)
            if now >= first + seconds:
                break
        out.update(first_batch_seconds=first, batches=batches, window_seconds=None if first is None else now - first)
        out["images_per_s_after_first"] = (
            (batches - 1) * 100 / (now - first) if first is not None and now > first else None
        )
        out["status"] = "PASS" if batches > 0 else "FAIL"
    except Exception as err:
        out["error"] = f"{type(err).__name__}: {err}".splitlines()[0][:300]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official-dir", required=True)
    parser.add_argument("--cifar-md5")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--cpu-dry-run", action="store_true")
    parser.add_argument("--probe-loader", type=float)
    parser.add_argument("official_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    official_args = args.official_args[1:] if args.official_args[:1] == ["--"] else args.official_args
    die_with_parent()
    if sys.platform.startswith("linux"):
        import multiprocessing

        multiprocessing.set_start_method("fork", force=True)
    official_dir = os.path.abspath(args.official_dir)
    script = os.path.join(official_dir, "main.py")
    # main.py imports its siblings (model/, dataset/, lars.py, ...) from its own folder, which
    # `python main.py` would put first on sys.path (and which PYTHONSAFEPATH=1 would not)
    sys.path.insert(0, official_dir)
    if args.cifar_md5:
        use_prepared_cifar(args.cifar_md5)
    if args.seed is not None:
        seed_everything(args.seed)
    if args.cpu_dry_run:
        cuda_calls_stay_on_cpu()
    if args.probe_loader:
        print(json.dumps(probe_loader(args.probe_loader, official_args, args.cpu_dry_run)), flush=True)
        return
    sys.argv = [script, *official_args]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
