"""`fastemp bench {throughput, time-to-accuracy, accuracy, kernels, data, report}` and `fastemp tune`.

Every benchmark writes <out>/<name>.json (every number, the environment and the config) and
<out>/<name>.md; <out> defaults to benchmarks/results/<device>/ under the current directory. An
existing result is never overwritten without --force: the new one gets <name>-2, -3, ...
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from fastemp import distributed
from fastemp.config import load_config
from fastemp.errors import UserError
from fastemp.runtime import resolve
from fastemp.validate import check_config

from . import common

SWEEP_HELP = "comma-separated values (default: the config's)"


def _list_of(kind, what: str, example: str, zero_ok: bool = False):
    """An argparse type: the text, once every comma-separated item parses as `kind` and is > 0 (>= 0 with
    zero_ok), else a one-line error."""
    bound = ">= 0" if zero_ok else "> 0"

    def parse(text: str) -> str:
        try:
            values = common.parse_list(text, kind) or []
        except ValueError:
            values = [-1]
        if not all(v > 0 or (zero_ok and v == 0) for v in values):
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {what} {bound} such as {example}, got {text[:80]!r}"
            )
        return text

    return parse


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number > 0, got {text[:80]!r}")
    return value


INTEGERS, NUMBERS = _list_of(int, "whole numbers", "20,200"), _list_of(float, "numbers", "0.7,0.8")
CHUNKS = _list_of(int, "whole numbers", "0,10", zero_ok=True)  # gradient-cache chunks: 0 = chosen from free memory


def _threads(args) -> None:
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


def _load(args):
    _threads(args)
    overrides = list(args.overrides)
    if getattr(args, "device", None):
        overrides.append(f"train.device={args.device}")
    cfg = load_config(args.config, overrides)
    check_config(cfg)
    resolve(cfg)  # the machine has what the config asks for: a one-line error now, not one per point
    return cfg


def _target(args, device: str, suffixes=(".json", ".md")) -> tuple[Path, str]:
    return common.results_target(args.out, args.name, device, args.force, suffixes)


def _partial_writer(out: Path, name: str, to_markdown):
    """Writes a benchmark's result so far after each finished piece: a run cut at a time limit keeps
    every number it measured (the file says "partial": true until the run completes)."""

    def write(result: dict) -> None:
        if distributed.is_main():
            common.write_results(out, name, result, to_markdown(result))

    return write


def _written(paths) -> None:
    for path in paths:
        print(f"wrote {path}")


def _status(rows) -> int:
    """1 when a point failed with an error (an out-of-memory point is a result, not a failure)."""
    return 1 if any(r.get("status") == "error" for r in rows) else 0


# ------------------------------------------------------------------------------ commands


def cmd_throughput(args) -> int:
    from .throughput import run_throughput, throughput_markdown

    base = _load(args)
    out, name = _target(args, base.train.device)
    axes = {
        "n_patches": common.parse_list(args.n, int),
        "batch_size": common.parse_list(args.batch, int),
        "backend": common.parse_list(args.backend),
        "compile": common.parse_list(args.compile),
        "precision": common.parse_list(args.precision),
        "grad_chunks": common.parse_list(args.grad_chunks, int),
    }
    result = run_throughput(
        base,
        axes,
        base.train.device,
        args.warmup,
        args.steps,
        args.split_steps,
        args.baseline,
        args.baseline_workers,
        args.baseline_steps,
        args.peak_size,
        on_progress=_partial_writer(out, name, throughput_markdown),
    )
    markdown = throughput_markdown(result)
    if distributed.is_main():  # under torchrun every rank measured; rank 0 reports
        print(markdown)
        _written(common.write_results(out, name, result, markdown))
    return _status(result["points"] + result["baselines"])


def cmd_time_to_accuracy(args) -> int:
    from .time_to_accuracy import plot_accuracy, run_time_to_accuracy, tta_markdown

    args.overrides = [f"eval.protocol={args.protocol}", *args.overrides]  # explicit eval keys still win
    cfg = _load(args)
    out, name = _target(args, cfg.train.device, (".json", ".md", ".png"))
    milestones = common.parse_list(args.milestones, float) or []
    result = run_time_to_accuracy(
        cfg,
        args.target,
        args.eval_every,
        args.max_wall_seconds,
        milestones,
        on_progress=_partial_writer(out, name, tta_markdown),
        compare_protocol=args.compare_protocol,
    )
    markdown = tta_markdown(result)
    print(markdown)
    paths = common.write_results(out, name, result, markdown)
    png = plot_accuracy(result, out / f"{name}.png")
    _written([*paths, png] if png else paths)
    return 0


def cmd_accuracy(args) -> int:
    from .accuracy import accuracy_markdown, parse_seeds, read_result, run_accuracy, select_rows

    _threads(args)
    if args.list_rows:
        for row in select_rows(None):
            print(f"{row.name}: {row.note}")
        return 0
    try:
        rows = select_rows(common.parse_list(args.rows), args.variant or ())
        seeds = parse_seeds(args.seeds)
    except ValueError as err:
        raise UserError(f"{err}; see fastemp bench accuracy --list-rows") from None
    overrides = [*args.overrides, *([f"train.device={args.device}"] if args.device else [])]
    for _, variant in args.variant or ():  # a typo is one line now, not an error row after an hour
        load_config("quickstart", [*overrides, *variant.split()])
    device = load_config("quickstart", overrides).train.device
    out, name = common.results_target(args.out, args.name, device, args.force or args.accumulate)
    previous = read_result(out / f"{name}.json") if args.accumulate else None
    if args.accumulate and previous is None and (out / f"{name}.json").exists():
        raise UserError(f"--accumulate: {out / name}.json is not a readable results file; move it away or fix it")
    result = run_accuracy(
        rows,
        seeds,
        overrides,
        {"cifar10": args.cifar10, "cifar100": args.cifar100},
        args.budget,
        on_progress=_partial_writer(out, name, accuracy_markdown),
        previous=previous,
    )
    markdown = accuracy_markdown(result)
    print(markdown)
    _written(common.write_results(out, name, result, markdown))
    return 1 if any(r.get("status") == "error" for r in result["rows"]) else 0


def cmd_profile(args) -> int:
    from .profile import profile_markdown, profile_steps

    cfg = _load(args)
    out, name = _target(args, cfg.train.device)
    result = profile_steps(cfg, args.warmup, args.steps, args.top, args.trace)
    markdown = profile_markdown(result)
    print(markdown)
    _written(common.write_results(out, name, result, markdown))
    return 0


def cmd_kernels(args) -> int:
    from .kernels_bench import kernels_markdown, run_kernels

    _threads(args)
    out, name = _target(args, args.device)
    result = run_kernels(
        args.device,
        common.parse_list(args.n, int),
        common.parse_list(args.batch, int),
        common.parse_list(args.dim, int),
        args.warmup,
        args.iters,
        not args.no_compile,
        not args.no_augmentation,
        args.images,
        args.baseline_aug_patches,
    )
    markdown = kernels_markdown(result)
    print(markdown)
    _written(common.write_results(out, name, result, markdown))
    return _status(result["rows"] + result["augmentation"])


def cmd_data(args) -> int:
    from .data_bench import data_markdown, run_data_bench

    _threads(args)
    out, name = _target(args, args.device)
    result = run_data_bench(
        args.device,
        common.parse_list(args.sources, int),
        args.n,
        args.batch,
        args.workers,
        args.warmup,
        args.steps,
        args.classes,
        args.per_class,
        args.patch,
        args.compile,
        args.overrides,
        args.folder_root,
        on_progress=_partial_writer(out, name, data_markdown),
    )
    markdown = data_markdown(result)
    print(markdown)
    _written(common.write_results(out, name, result, markdown))
    return _status(result["rows"])


def cmd_report(args) -> int:
    from .report import update_readme

    return update_readme(Path(args.results), Path(args.readme), args.check)


def cmd_tune(args) -> int:
    from .tune import run_tune, tune_markdown, tuned_config, write_tuned_yaml

    base = _load(args)
    requested = Path(args.out)
    folder, stem = common.results_target(
        str(requested.parent),
        requested.stem,
        base.train.device,
        args.force,
        (requested.suffix or ".yaml", ".json", ".md"),
    )
    out = folder / f"{stem}{requested.suffix}"
    axes = {
        "n_patches": common.parse_list(args.n, int),
        "batch_size": common.parse_list(args.batch, int),
        "backend": common.parse_list(args.backend),
        "compile": common.parse_list(args.compile),
        "precision": None,
        "grad_chunks": common.parse_list(args.grad_chunks, int),
    }
    if axes["batch_size"] is None:
        axes["batch_size"] = [base.train.batch_size, 2 * base.train.batch_size]
    if axes["backend"] is None:
        axes["backend"] = [base.data.backend]
    cuda = _on_cuda(base.train.device)
    if axes["compile"] is None:
        axes["compile"] = ["default", "max-autotune-no-cudagraphs", "reduce-overhead"] if cuda else ["none"]
    settings = {
        "cudnn_benchmark": common.parse_list(args.cudnn_benchmark) or (["off", "on"] if cuda else None),
        "patch_compile": common.parse_list(args.patch_compile),
    }
    result = run_tune(
        base,
        axes,
        base.train.device,
        args.memory_budget_gib,
        args.warmup,
        args.steps,
        settings,
        on_point=lambda partial: common.write_results(out.parent, out.stem, partial, tune_markdown(partial)),
    )
    markdown = tune_markdown(result)
    print(markdown)
    common.write_results(out.parent, out.stem, result, markdown)
    if result["best"] is None:
        print("fastemp tune: no point ran within the memory budget; nothing written to", out)
        return 1
    write_tuned_yaml(tuned_config(base, result["best"]), result["best"], result["environment"], out)
    print(f"wrote {out} ({result['best']['images_per_s']:.1f} images/s); train with: fastemp train --config {out}")
    return 0


def _on_cuda(device: str) -> bool:
    from fastemp.runtime import resolve_device

    return resolve_device(device).type == "cuda"


# ------------------------------------------------------------------------------ parsers


def _common_config_args(p: argparse.ArgumentParser, default_config: str) -> None:
    p.add_argument("--config", default=default_config, help=f"YAML file or built-in name (default: {default_config})")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. data.source=synthetic")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (default: the config's train.device)")
    _threads_arg(p)


def _threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=_positive_int, help="torch CPU threads (e.g. 1 on a busy shared machine)")


def _output_args(p: argparse.ArgumentParser, name: str) -> None:
    p.add_argument("--out", help="output folder (default: benchmarks/results/<device>)")
    p.add_argument("--name", default=name, help=f"file name stem (default: {name})")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace existing result files (default: write <name>-2, -3, ... beside them)",
    )


def register_cli(subparsers) -> None:
    """Add `bench` (throughput, time-to-accuracy, kernels, data, report) and `tune` to fastemp's CLI."""
    bench = subparsers.add_parser("bench", help="benchmarks: throughput, time-to-accuracy, kernels, data, report")
    sub = bench.add_subparsers(dest="bench_command", required=True)

    p = sub.add_parser(
        "throughput",
        help="images/s, MFU, memory and step split over a sweep (+ baseline)",
        description="Data content does not change throughput: data.source=synthetic avoids a "
        "download. MFU uses fastemp.model.flops_per_patch.",
    )
    _common_config_args(p, "cifar10_n20_1ep")
    p.add_argument("--n", type=INTEGERS, help="n_patches: " + SWEEP_HELP)
    p.add_argument("--batch", type=INTEGERS, help="batch sizes: " + SWEEP_HELP)
    p.add_argument("--backend", help="patch backends (torch, dali, auto): " + SWEEP_HELP)
    p.add_argument("--compile", help="compile modes (none, default, max-autotune, ...): " + SWEEP_HELP)
    p.add_argument("--precision", help="precisions (bf16, fp32, auto): " + SWEEP_HELP)
    p.add_argument("--grad-chunks", type=CHUNKS, help="gradient-cache chunks (0: from free memory): " + SWEEP_HELP)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps after the first (compile) step")
    p.add_argument("--steps", type=int, default=20, help="timed end-to-end steps (median; default 20)")
    p.add_argument("--split-steps", type=int, default=20, help="instrumented steps for the split (0: skip)")
    p.add_argument("--baseline", action="store_true", help="also measure the reference-style baseline")
    p.add_argument(
        "--baseline-workers",
        type=int,
        default=min(16, os.cpu_count() or 1),
        help="DataLoader workers of the baseline (default: min(16, cores))",
    )
    p.add_argument("--baseline-steps", type=int, help="timed baseline steps (default: max(20, 2 x workers))")
    p.add_argument("--peak-size", type=int, help="matmul size for the measured peak (default 8192 GPU, 1024 CPU)")
    _output_args(p, "throughput")
    p.set_defaults(func=cmd_throughput)

    p = sub.add_parser("time-to-accuracy", help="training seconds until the linear probe reaches --target")
    _common_config_args(p, "cifar10_n20_10ep")
    p.add_argument("--target", type=float, default=0.85, help="linear-probe top-1 to reach (default 0.85)")
    p.add_argument("--eval-every", type=int, help="training steps between evaluations (default: half an epoch)")
    p.add_argument(
        "--max-wall-seconds",
        type=float,
        help="stop (target not reached) before the next chunk of training and evaluation would end past "
        "this much wall time; the results are still written",
    )
    p.add_argument(
        "--milestones",
        type=NUMBERS,
        help="lower accuracies whose first-reached times are reported too, e.g. 0.7,0.75,0.8",
    )
    p.add_argument(
        "--protocol",
        choices=("official", "cheap"),
        default="official",
        help="evaluation protocol (default official; docs/evaluation.md); eval.* overrides refine it",
    )
    p.add_argument(
        "--compare-protocol",
        choices=("official", "cheap"),
        help="also score every evaluated checkpoint under this protocol: the offset on the same weights",
    )
    _output_args(p, "time_to_accuracy")
    p.set_defaults(func=cmd_time_to_accuracy)

    p = sub.add_parser(
        "accuracy",
        help="the official table's rows over seeds, beside the official figures",
        description="Rows: fastemp bench accuracy --list-rows. Evaluation: each row's eval protocol "
        "(official by default; docs/evaluation.md).",
    )
    p.add_argument("overrides", nargs="*", help="section.key=value overrides for every row, e.g. model.width=16")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (default: the configs' train.device)")
    _threads_arg(p)
    p.add_argument("--rows", help="comma-separated row names (default: all); see --list-rows")
    p.add_argument("--list-rows", action="store_true", help="print the rows and what each reproduces, then exit")
    p.add_argument(
        "--seeds",
        default="3",
        help="a count (seeds 0..N-1), a comma-separated list, or next:K (the K lowest seeds each row has not "
        "measured in the --accumulate file) (default 3)",
    )
    p.add_argument(
        "--accumulate",
        action="store_true",
        help="add to <out>/<name>.json (seeds already there under the same config are not run again)",
    )
    p.add_argument(
        "--budget", type=float, help="wall seconds: seeds predicted (from warm steps) to end past it are skipped"
    )
    p.add_argument(
        "--variant",
        nargs=2,
        action="append",
        metavar=("LABEL", "OVERRIDES"),
        help="run every row again with these overrides as ROW+LABEL, e.g. --variant fp32 "
        '"model.precision=fp32 model.compile=none" (repeatable)',
    )
    p.add_argument(
        "--cifar10",
        help="CIFAR-10: the JPEG copy (.tar.gz or folder, ImageFolder layout) or the folder "
        "or path of cifar-10-python.tar.gz (default: the archive under data.root)",
    )
    p.add_argument("--cifar100", help="CIFAR-100, likewise (its rows are skipped when there is none)")
    _output_args(p, "accuracy")
    p.set_defaults(func=cmd_accuracy)

    p = sub.add_parser("kernels", help="cosine-to-mean, TCR and augmentation backends in isolation")
    p.add_argument("--device", default="auto")
    _threads_arg(p)
    p.add_argument("--n", type=INTEGERS, default="20,50,200", help="patches per image (default 20,50,200)")
    p.add_argument("--batch", type=INTEGERS, default="100,256", help="images per batch (default 100,256)")
    p.add_argument("--dim", type=INTEGERS, default="1024", help="projection dimension d (default 1024)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=20, help="timed calls per measurement (median)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    p.add_argument("--no-augmentation", action="store_true", help="skip the augmentation backends")
    p.add_argument("--images", type=int, default=10_000, help="random 32x32 images for the augmentation runs")
    p.add_argument("--baseline-aug-patches", type=int, default=200, help="patches for the per-patch CPU rate")
    _output_args(p, "kernels")
    p.set_defaults(func=cmd_kernels)

    p = sub.add_parser(
        "data",
        help="the data path: Pillow workers vs DALI vs resident images vs the step alone",
        description="Synthetic JPEG folders at each source size (made here, no download); "
        "see fastemp/benchmarks/data_bench.py and docs/data-backends.md.",
    )
    p.add_argument("overrides", nargs="*", help="config overrides of the step, e.g. model.width=8")
    p.add_argument("--device", default="auto")
    _threads_arg(p)
    p.add_argument("--sources", default="32,64,400", help="source image sizes in px (default 32,64,400)")
    p.add_argument("--patch", type=int, help="patch size for every source (default: 32 up to 64 px sources, else 224)")
    p.add_argument("--n", type=int, default=20, help="patches per image (default 20)")
    p.add_argument("--batch", type=int, default=100, help="images per step (default 100)")
    p.add_argument(
        "--workers",
        type=int,
        default=min(16, os.cpu_count() or 1),
        help="Pillow worker processes (default: min(16, cores))",
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed calls/steps per arm (default 2)")
    p.add_argument("--steps", type=int, default=10, help="timed calls/steps per arm (default 10)")
    p.add_argument("--classes", type=int, default=10, help="classes of each synthetic folder (default 10)")
    p.add_argument("--per-class", type=int, default=20, help="training images per class (at least 2 batches in all)")
    p.add_argument("--compile", default="none", help="model.compile of the step (default none)")
    p.add_argument("--folder-root", help="where the temporary JPEG folders go (default: the system temp dir)")
    _output_args(p, "data")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("profile", help="where a training step's time goes, op by op (torch.profiler)")
    _common_config_args(p, "cifar10_n20_1ep")
    p.add_argument("--warmup", type=int, default=3, help="untraced steps after the first (compile) step")
    p.add_argument("--steps", type=int, default=5, help="traced steps (default 5)")
    p.add_argument("--top", type=int, default=25, help="ops listed (default 25)")
    p.add_argument("--trace", help="also write the Chrome trace (JSON) here")
    _output_args(p, "profile")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("report", help="regenerate the README performance table from benchmarks/results")
    from .report import add_arguments

    add_arguments(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "official-peer",
        help="the official EMP-SSL code trained on this GPU and data, evaluated by fastemp (docs/official_peer.md)",
    )
    from .official_peer import add_arguments as add_peer_arguments
    from .official_peer import run_from_args as cmd_official_peer

    add_peer_arguments(p)
    p.set_defaults(func=cmd_official_peer)

    p = subparsers.add_parser(
        "tune",
        help="find the fastest settings for this card; write them as a config",
        description="Objective: end-to-end images/s at your n (n is swept only with --n: "
        "it changes the method). See fastemp/benchmarks/tune.py.",
    )
    _common_config_args(p, "cifar10_n20_1ep")
    p.add_argument(
        "--batch", type=INTEGERS, help="batch sizes (default: the config's B and 2B; B changes the method too)"
    )
    p.add_argument("--n", type=INTEGERS, help="n_patches to try (opt-in; default: the config's only)")
    p.add_argument("--backend", help="patch backends (default: every available one)")
    p.add_argument(
        "--compile",
        help="compile modes (default on CUDA: default,max-autotune-no-cudagraphs,reduce-overhead; none on CPU)",
    )
    p.add_argument(
        "--cudnn-benchmark", help="model.cudnn_benchmark values (default: off,on on CUDA; the config's on CPU)"
    )
    p.add_argument("--patch-compile", help="data.patch_compile values, e.g. off,on (default: the config's)")
    p.add_argument(
        "--grad-chunks",
        type=CHUNKS,
        help="gradient-cache chunks (default: the config's; more when over budget; 0: from free memory)",
    )
    p.add_argument("--memory-budget-gib", type=float, help="peak-memory budget (default: 90%% of the card)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=20, help="timed steps per point")
    p.add_argument("--out", default="tuned.yaml", help="the config to write (default: tuned.yaml; JSON beside it)")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an existing config and its JSON (default: write tuned-2.yaml, ... beside them)",
    )
    p.set_defaults(func=cmd_tune)
