"""Command line: `fastemp train | resume | eval | check | bench | tune` (also `python -m fastemp`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import distributed
from .config import ConfigError, load_config, save_config


def _print_summary(summary: dict) -> None:
    keys = ["steps", "train_seconds", "images_per_s", "final_loss", "final_loss_sim", "final_loss_tcr",
            "linear_top1", "best_top1_on_test", "knn_top1", "random_init_linear_top1", "random_init_knn_top1"]
    for key in keys:
        if key in summary:
            value = summary[key]
            print(f"  {key:24s} {value:.4f}" if isinstance(value, float) else f"  {key:24s} {value}")


def cmd_train(args) -> int:
    from . import runs
    from .train import run_training

    cfg = load_config(args.config, args.overrides)
    distributed.require_divisible(cfg.train.batch_size)

    def create():  # rank 0 only: the other ranks get its folder, or its error
        run_dir = runs.create_run_dir(args.out or Path("runs") / cfg.name, force=args.force)
        save_config(cfg, run_dir / "config.yaml")
        return run_dir

    run_dir = distributed.run_on_main(create)
    summary = run_training(cfg, run_dir, progress=not args.no_progress)
    if distributed.is_main():
        print(f"run folder: {run_dir}")
        _print_summary(summary)
    return 0


def cmd_resume(args) -> int:
    from .train import run_training

    run_dir = Path(args.run_dir)
    if not (run_dir / "checkpoint.pt").is_file():
        raise ConfigError(f"{run_dir} has no checkpoint.pt to resume from")
    cfg = load_config(run_dir / "config.yaml")
    summary = run_training(cfg, run_dir, resume=True, progress=not args.no_progress)
    if distributed.is_main():
        print(f"run folder: {run_dir}")
        _print_summary(summary)
    return 0


def cmd_eval(args) -> int:
    from . import runs
    from .train import Trainer

    run_dir = Path(args.run_dir)
    overrides = list(args.overrides)
    if args.knn:
        overrides.append("eval.knn=true")
    if args.eval_patches is not None:
        overrides += ["eval.mode=patches", f"eval.patches={args.eval_patches}"]
    if args.plain:
        overrides.append("eval.mode=plain")
    cfg = load_config(run_dir / "config.yaml", overrides)
    trainer = Trainer(cfg, None, progress=False)
    trainer.load_checkpoint(run_dir / "checkpoint.pt")
    result = {"step": trainer.step, "eval_mode": cfg.eval.mode, "eval_patches": cfg.eval.patches,
              "probe_epochs": cfg.eval.probe_epochs, **trainer.evaluate()}
    if distributed.is_main():
        runs.write_json(run_dir / "eval.json", result)
        print(json.dumps(result, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastemp", description="EMP-SSL training, evaluation and benchmarks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a run (default config: quickstart, synthetic data)")
    p.add_argument("--config", default="quickstart", help="YAML file or built-in name (quickstart, cifar10_n20_1ep, ...)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.epochs=2")
    p.add_argument("--out", help="run folder (default: runs/<config name>)")
    p.add_argument("--force", action="store_true", help="overwrite an existing run folder")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("resume", help="continue a run from its last checkpoint")
    p.add_argument("run_dir")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("eval", help="linear probe (and kNN) on a run's checkpoint")
    p.add_argument("run_dir")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. eval.probe_epochs=10")
    p.add_argument("--knn", action="store_true", help="also run the weighted kNN (k=20, T=0.07)")
    p.add_argument("--eval-patches", type=int, help="average h over K augmented patches per image")
    p.add_argument("--plain", action="store_true", help="features of the whole un-augmented image")
    p.set_defaults(func=cmd_eval)

    for register in _extensions():
        register(sub)
    return parser


def _extensions():
    """Subcommands that live beside their implementation (check, bench, tune)."""
    from .check import register_cli as check_cli
    from fastemp.benchmarks.cli import register_cli as bench_cli

    return [check_cli, bench_cli]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # overrides may come after options (`eval RUN --knn eval.probe_epochs=10`): argparse leaves those over
    args, rest = parser.parse_known_args(argv)
    late = [a for a in rest if "=" in a and not a.startswith("-")]
    if len(late) < len(rest) or (late and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if late:
        args.overrides = list(args.overrides) + late
    try:
        distributed.init_from_env()  # under torchrun: join the process group; otherwise nothing
        return args.func(args)
    except (ConfigError, FileExistsError, distributed.DistributedError) as err:
        print(f"fastemp: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # data errors etc.: one line for the user, not a traceback
        from .data import DataError

        if isinstance(err, DataError):
            print(f"fastemp: error: {err}", file=sys.stderr)
            return 2
        raise
    finally:
        distributed.shutdown()
