"""Runs the official EMP-SSL `main.py` from its checkout, unmodified, as `python main.py ARGS` would.

    python official_launcher.py --official-dir DIR [--seed S] [--cpu-dry-run] -- ARGS...

official_peer.py runs it in a scratch folder (main.py reads ./data/ and writes ./logs/). Standard library only at
import: it runs under whichever interpreter has the official code's dependencies. What it changes before main.py
runs, and why, is in docs/official_peer.md ("What runs, exactly").
"""

from __future__ import annotations

import os
import sys

# Run as a script, this file's folder (benchmarks/) comes first on sys.path, and its profile.py would
# shadow the standard library's (cProfile imports it): the official code must not see this folder.
_HERE = os.path.dirname(os.path.realpath(__file__))
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != _HERE]

import argparse  # noqa: E402
import contextlib  # noqa: E402
import ctypes  # noqa: E402
import multiprocessing  # noqa: E402
import runpy  # noqa: E402
import signal  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official-dir", required=True)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--cpu-dry-run", action="store_true")
    parser.add_argument("official_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    official_args = args.official_args[1:] if args.official_args[:1] == ["--"] else args.official_args
    with contextlib.suppress(OSError, AttributeError):  # Linux: SIGTERM this process when its parent exits
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG: no orphaned run
    if sys.platform.startswith("linux"):  # main.py builds its dataset at module level: its workers must inherit it
        multiprocessing.set_start_method("fork", force=True)
    script = os.path.join(args.official_dir, "main.py")  # official_peer.py passes the checkout's absolute path
    sys.path.insert(0, args.official_dir)  # main.py imports its siblings, as `python main.py` would find them
    import random

    import numpy
    import torch
    from torchvision.datasets import CIFAR10

    # torchvision's CIFAR10 checks that the prepared batch files exist, not that they have the canonical md5 sums
    # (they differ: it would download the archive)
    CIFAR10.train_list = [[name, None] for name, _ in CIFAR10.train_list]
    CIFAR10.test_list = [[name, None] for name, _ in CIFAR10.test_list]
    CIFAR10.meta = {**CIFAR10.meta, "md5": None}
    if args.seed is not None:  # main.py seeds nothing: without --seed, torch's default seed as in the README
        random.seed(args.seed)
        numpy.random.seed(args.seed)
        torch.manual_seed(args.seed)
    if args.cpu_dry_run:  # never a peer result: .cuda() returns the object unchanged
        torch.nn.Module.cuda = lambda self, device=None: self
        torch.Tensor.cuda = lambda self, *args, **kwargs: self
    sys.argv = [script, *official_args]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
