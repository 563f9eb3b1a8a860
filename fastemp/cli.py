"""Command line: `fastemp train | resume | eval | export | check | bench | tune` (also `python -m fastemp`)."""

from __future__ import annotations

import argparse
import errno
import shlex
import sys
from pathlib import Path

from . import distributed, watchdog
from .config import load_config
from .errors import UserError, one_line

# what the CLI prints of summary.json: the run's length, speed, losses and accuracies
SHOWN = ("steps", "train_seconds", "images_per_s", "final_loss", "final_loss_sim", "final_loss_tcr", "linear_top1")
SHOWN += ("best_top1_on_test", "knn_top1", "random_init_linear_top1", "random_init_knn_top1")


def _print_summary(run_dir, summary: dict) -> None:
    if distributed.is_main():
        print(f"run folder: {run_dir}")
        for key in (k for k in SHOWN if k in summary):
            value = summary[key]
            print(f"  {key:24s} {value:.4f}" if isinstance(value, float) else f"  {key:24s} {value}")


def cmd_train(args) -> int:
    from .startup import run_training

    cfg = load_config(args.config, args.overrides)
    run_dir = args.out or Path("runs") / cfg.name
    argv = args.argv + (["--force"] if "--force" not in args.argv else [])  # the command that starts it again
    retry = f"{distributed.launcher(distributed.world_size())} {shlex.join(argv)}"
    summary = run_training(cfg, run_dir, force=args.force, progress=not args.no_progress, retry=retry)
    _print_summary(run_dir, summary)
    return 0


def cmd_resume(args) -> int:
    from .startup import resume_training

    _print_summary(args.run_dir, resume_training(args.run_dir, progress=not args.no_progress))
    return 0


def cmd_eval(args) -> int:
    from .startup import evaluate_run, evaluate_weights

    overrides, run_dir = args.overrides, args.run_dir
    if args.weights and run_dir and "=" in run_dir:  # argparse took the first override for the run folder
        overrides, run_dir = [run_dir, *overrides], None
    if bool(run_dir) == bool(args.weights):
        raise UserError("fastemp eval takes a run folder or --weights FILE (one of them); see fastemp eval --help")
    if not args.weights and (args.format or args.config or args.out):
        raise UserError("--format, --config and --out go with --weights FILE; fastemp eval RUN writes RUN/eval.json")
    if args.weights:
        fmt, progress = args.format or "fastemp", not args.no_progress
        evaluate_weights(args.weights, fmt, args.config, overrides, out=args.out, progress=progress, echo=True)
    else:
        evaluate_run(run_dir, overrides, progress=not args.no_progress, echo=True)
    return 0


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other user error (argparse prints usage + error)
        self.exit(2, f"fastemp: error: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    from .weights import FORMATS

    parser = _Parser(prog="fastemp", description="EMP-SSL training, evaluation and benchmarks")
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of an error (accepted anywhere on the command line)"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a run (default config: quickstart, synthetic data)")
    p.add_argument(
        "--config", default="quickstart", help="YAML file or built-in name (quickstart, cifar10_n20_1ep, ...)"
    )
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.epochs=2")
    p.add_argument("--out", help="run folder (default: runs/<config name>)")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an existing run folder (only a fastemp run folder; the old run is kept in "
        "RUN/replaced-run until the new run's first checkpoint, and put back if it fails before)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars (on a terminal) or lines (in a log)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("resume", help="continue a run from its last checkpoint")
    p.add_argument("run_dir")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (on a terminal) or lines (in a log)")
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("eval", help="linear probe (and kNN) on a run's checkpoint, or on any weights (--weights)")
    p.add_argument("run_dir", nargs="?", help="a run folder (writes RUN/eval.json)")
    p.add_argument(
        "--weights", help="score this file instead: a checkpoint, an export, official or torchvision weights"
    )
    p.add_argument("--format", choices=FORMATS, help="what wrote --weights (default: fastemp)")
    p.add_argument("--config", help="with --weights: data and evaluation (default: the file's, else cifar10_n20_1ep)")
    p.add_argument("--out", help="with --weights: also write the result (JSON) to this file")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. eval.knn=true eval.patches=16")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (on a terminal) or lines (in a log)")
    p.set_defaults(func=cmd_eval)

    from fastemp.benchmarks.cli import register_cli as bench_cli  # subcommands beside their implementation

    from .check import register_cli as check_cli
    from .weights import register_cli as export_cli

    for register in (check_cli, bench_cli, export_cli):
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    # overrides may come after options (`eval RUN --no-progress eval.knn=true`): argparse leaves those over
    args, rest = parser.parse_known_args(argv)
    late = [a for a in rest if "=" in a and not a.startswith("-")]
    if len(late) < len(rest) or (late and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if late:
        args.overrides = list(args.overrides) + late
    args.argv = argv
    try:
        distributed.init_from_env()  # under torchrun: join the process group; otherwise nothing
        return args.func(args)
    except Exception as err:
        known = distributed.explain(err) or err  # the one line to print for a user error; None for a bug
        message = one_line(known) if isinstance(known, UserError) else None
        if isinstance(known, OSError) and known.errno == errno.ENOSPC:
            message = f"disk full writing {known.filename or 'a file'}; free space on that disk and run again"
        if message is None or debug:
            # under torchrun rank 0 names this rank's failure in one line; its traceback follows here
            watchdog.report_error(
                f"failed with {type(err).__name__}: {one_line(err)[:160]} (its traceback is in that rank's output)"
            )
            raise
        if watchdog.report_error(message):  # under torchrun: one line for the run, not one per rank
            print(f"fastemp: error: {message}", file=sys.stderr)
        return getattr(err, "exit_code", 2)  # fastemp.stop.Interrupted: 128 + the signal's number
    except KeyboardInterrupt:  # Ctrl-C where no run is there to stop cleanly (fastemp.stop)
        print("fastemp: error: interrupted by SIGINT", file=sys.stderr)
        return 130
    finally:
        distributed.shutdown()
