"""Command line: `fastemp train | resume | eval | check | bench | tune` (also `python -m fastemp`)."""

from __future__ import annotations

import argparse
import errno
import json
import shlex
import sys
from pathlib import Path

from . import distributed
from .config import ConfigError, load_config, save_config
from .memory import check_run_memory


def _print_summary(summary: dict) -> None:
    keys = [
        "steps",
        "train_seconds",
        "images_per_s",
        "final_loss",
        "final_loss_sim",
        "final_loss_tcr",
        "linear_top1",
        "best_top1_on_test",
        "knn_top1",
        "random_init_linear_top1",
        "random_init_knn_top1",
    ]
    for key in keys:
        if key in summary:
            value = summary[key]
            print(f"  {key:24s} {value:.4f}" if isinstance(value, float) else f"  {key:24s} {value}")


def _set_progress(args) -> bool:
    """Bars on a terminal, unless --no-progress; under torchrun on rank 0 only (evaluation's bars too)."""
    from . import progress

    return progress.decide(not args.no_progress and distributed.is_main())


def _retry_command(args, force: bool = True) -> str:
    """The command line that ran, with --force when asked: a command that starts the run again."""
    argv = list(args.argv) + (["--force"] if force and "--force" not in args.argv else [])
    world = distributed.world_size()
    launcher = f"torchrun --nproc-per-node={world} -m fastemp" if world > 1 else "fastemp"
    return f"{launcher} {shlex.join(argv)}"


def cmd_train(args) -> int:
    from . import runs
    from .data import absolute_paths
    from .errors import UserError, one_line
    from .train import Trainer, run_training
    from .validate import check_config, check_probe

    cfg = load_config(args.config, args.overrides)
    absolute_paths(cfg.data)  # config.yaml names the data wherever the run is resumed from
    distributed.check_same_config(cfg)
    check_config(cfg)
    runtime = _resolve(cfg)  # before any rank allocates a device buffer
    check_run_memory(cfg, train=True, evaluate=cfg.eval.at_end)
    # rank 0 alone touches the run folder; the other ranks get its path, or its error
    run_dir = distributed.run_on_main(lambda: runs.check_run_dir(args.out or Path("runs") / cfg.name, force=args.force))
    # validation and data loading write nothing: a run that fails them leaves no folder behind
    trainer = Trainer(cfg, run_dir, progress=_set_progress(args), runtime=runtime)
    if cfg.eval.at_end:
        check_probe(cfg, len(trainer.probe_train_set))
        _ = trainer.test_set  # both splits before training: a missing test split fails now, not after the run

    def start() -> None:
        # lock the folder for the life of this process; under --force the old run moves into
        # RUN/replaced-run and stays there until this run's first checkpoint
        runs.begin_run(run_dir, args.force, "fastemp train")
        try:
            save_config(cfg, run_dir / "config.yaml")
        except OSError as err:
            (run_dir / "config.yaml").unlink(missing_ok=True)
            back = runs.restore_replaced(run_dir)
            kept = f"{run_dir} again holds the run --force was replacing, unchanged" if back else "nothing was kept"
            raise UserError(
                f"could not write {run_dir / 'config.yaml'}: {err.strerror or err} ({kept}); free space "
                f"or make {run_dir} writable, then run {_retry_command(args, force=back)}"
            ) from None

    distributed.run_on_main(start)
    try:
        summary = run_training(cfg, run_dir, progress=trainer.progress, trainer=trainer)
    except BaseException as err:
        if distributed.is_main():
            outcome = runs.outcome_of_failed_run(run_dir, _retry_command(args))
            if outcome and isinstance(err, UserError):
                err.args = (f"{one_line(err)}; {outcome}",)
        raise
    if distributed.is_main():
        print(f"run folder: {run_dir}")
        _print_summary(summary)
    return 0


def _resolve(cfg, training: bool = True):
    """The run's Runtime (what "auto" means here), said in one line on rank 0 when training (eval's output
    is its JSON alone)."""
    from .runtime import resolve

    runtime = resolve(cfg, training=training)
    if training and distributed.is_main():
        print(f"runtime: {runtime.describe()}", flush=True)
    return runtime


def _run_config(run_dir: Path, overrides=()):
    from .validate import check_config

    if not run_dir.is_dir():
        raise ConfigError(f"run folder {run_dir} does not exist; give the --out folder of a fastemp train run")
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(
            f"{run_dir} has no config.yaml, so it is not a run folder; give the --out folder of a fastemp train run"
        )
    cfg = load_config(run_dir / "config.yaml", overrides)
    distributed.check_same_config(cfg)
    check_config(cfg)
    return cfg


def _settle(run_dir: Path, command: str) -> None:
    """Under the lock, finish what a --force that died left in run_dir; when that put an old run
    back, stop: the run this command was meant for no longer exists."""
    from . import runs
    from .errors import UserError

    if not (run_dir / runs.REPLACED).is_dir():
        return
    runs.lock_run_dir(run_dir, command)
    restored = runs.settle_replaced(run_dir)
    if restored:
        raise UserError(
            f"{restored}; run fastemp {command.split()[-1]} {run_dir} again to use that run, or rerun "
            "the fastemp train --force command to replace it"
        )


def cmd_resume(args) -> int:
    from . import checkpoint, runs
    from .train import Trainer, run_training

    run_dir = Path(args.run_dir)

    def claim() -> None:
        if run_dir.is_dir():
            runs.require_writable(run_dir, "resume writes checkpoint.pt and metrics.jsonl there")
            runs.probe_lock(run_dir)
            _settle(run_dir, "fastemp resume")

    distributed.run_on_main(claim)
    cfg = _run_config(run_dir)
    runtime = _resolve(cfg)
    check_run_memory(cfg, train=True, evaluate=cfg.eval.at_end)
    path = run_dir / "checkpoint.pt"
    state = checkpoint.read(path)
    checkpoint.check_resume(cfg, state, run_dir)
    note = checkpoint.check_layout(cfg, state, distributed.world_size(), path)
    runs.read_metrics(run_dir)  # a corrupt metrics.jsonl is an error now, not after the run
    distributed.run_on_main(lambda: runs.lock_run_dir(run_dir, "fastemp resume") and None)
    if note and distributed.is_main():
        print(note)
    trainer = Trainer(cfg, run_dir, progress=_set_progress(args), runtime=runtime)
    summary = run_training(cfg, run_dir, resume=True, progress=trainer.progress, trainer=trainer)
    if distributed.is_main():
        print(f"run folder: {run_dir}")
        _print_summary(summary)
    return 0


def cmd_eval(args) -> int:
    from . import checkpoint, runs
    from .errors import UserError
    from .train import Trainer
    from .validate import check_probe

    run_dir = Path(args.run_dir)
    overrides = list(args.overrides)
    if args.knn:
        overrides.append("eval.knn=true")
    if args.eval_patches is not None:
        overrides += ["eval.mode=patches", f"eval.patches={args.eval_patches}"]
    if args.plain:
        overrides.append("eval.mode=plain")

    def claim() -> None:
        if run_dir.is_dir():
            runs.probe_lock(run_dir)
            _settle(run_dir, "fastemp eval")

    distributed.run_on_main(claim)
    cfg = _run_config(run_dir, overrides)
    check_run_memory(cfg, train=False, evaluate=True)
    path = run_dir / "checkpoint.pt"
    checkpoint.check_architecture(cfg, checkpoint.read(path), path)
    # eval writes eval.json: it holds the folder's lock, unless the folder is read-only (then nobody writes it)
    distributed.run_on_main(lambda: runs.lock_run_dir(run_dir, "fastemp eval", read_only_ok=True) and None)
    trainer = Trainer(cfg, None, progress=_set_progress(args), runtime=_resolve(cfg, training=False))
    check_probe(cfg, len(trainer.probe_train_set))
    _ = trainer.test_set
    trainer.load_checkpoint(path)
    result = {
        "step": trainer.step,
        "eval_mode": cfg.eval.mode,
        "eval_patches": cfg.eval.patches,
        "probe_epochs": cfg.eval.probe_epochs,
        **trainer.evaluate(),
    }
    if distributed.is_main():
        print(json.dumps(result, indent=2))  # first: a folder that cannot take eval.json loses nothing
        try:
            runs.write_json(run_dir / "eval.json", result)
        except OSError as err:
            raise UserError(
                f"could not write {run_dir / 'eval.json'}: {err.strerror or err}; the evaluation is "
                f"printed above, make {run_dir} writable to keep it there"
            ) from None
    return 0


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other user error (argparse prints usage + error)
        self.exit(2, f"fastemp: error: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
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
    p.add_argument("--no-progress", action="store_true", help="no progress bars (they are off when not a terminal)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("resume", help="continue a run from its last checkpoint")
    p.add_argument("run_dir")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (they are off when not a terminal)")
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("eval", help="linear probe (and kNN) on a run's checkpoint")
    p.add_argument("run_dir")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. eval.probe_epochs=10")
    p.add_argument("--knn", action="store_true", help="also run the weighted kNN (k=20, T=0.07)")
    p.add_argument("--eval-patches", type=int, help="average h over K augmented patches per image")
    p.add_argument("--plain", action="store_true", help="features of the whole un-augmented image")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (they are off when not a terminal)")
    p.set_defaults(func=cmd_eval)

    for register in _extensions():
        register(sub)
    return parser


def _extensions():
    """Subcommands that live beside their implementation (check, bench, tune)."""
    from fastemp.benchmarks.cli import register_cli as bench_cli

    from .check import register_cli as check_cli

    return [check_cli, bench_cli]


def user_error_message(err: BaseException) -> str | None:
    """The one line to print for a user error; None for a bug (which keeps its traceback)."""
    from .errors import UserError, one_line

    if isinstance(err, UserError):
        return one_line(err)
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return f"disk full writing {err.filename or 'a file'}; free space on that disk and run again"
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    # overrides may come after options (`eval RUN --knn eval.probe_epochs=10`): argparse leaves those over
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
        message = user_error_message(distributed.explain(err) or err)
        if message is None or debug:
            from .errors import one_line

            # under torchrun rank 0 names this rank's failure in one line; its traceback follows here
            distributed.report_error(
                f"failed with {type(err).__name__}: {one_line(err)[:160]} (its traceback is in that rank's output)"
            )
            raise
        if distributed.report_error(message):  # under torchrun: one line for the run, not one per rank
            print(f"fastemp: error: {message}", file=sys.stderr)
        return 2
    finally:
        from . import runs

        runs.unlock_all()
        distributed.shutdown()
