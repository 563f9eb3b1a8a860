"""The README's performance table, generated from the committed results (never typed by hand).

    python -m fastemp.benchmarks.report [--results benchmarks/results] [--readme README.md] [--check]
    fastemp bench report ...                                   (the same)

Reads benchmarks/results/<device>/throughput*.json and time_to_accuracy*.json and writes the
tables between the README markers (results named *_check.json are pipeline checks of a harness at toy
sizes, not measurements, and stay out of the tables)

    <!-- perf-table:start -->
    <!-- perf-table:end -->

If the README has no markers, the tables are printed instead (nothing is written). --check exits
with status 1 when the README's section differs from what the results give.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from .common import device_label, fmt, large_n_option, markdown_table

START, END = "<!-- perf-table:start -->", "<!-- perf-table:end -->"


def load_results(results_dir: Path) -> list[tuple[Path, dict]]:
    """(path, result) for every *.json result under results_dir/<device>/, sorted by path."""
    out = []
    for path in sorted(Path(results_dir).glob("*/*.json")):
        if path.stem.endswith("_check"):
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(data, dict) and "benchmark" in data:
            out.append((path, data))
    return out


def _pct(x):
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _mem(point: dict, env: dict) -> str:
    nbytes = point.get("peak_memory_bytes")
    if nbytes is None:
        return "n/a"
    if str(env.get("device", "")).startswith("cuda"):
        return f"{nbytes / 2**30:.1f}"
    return f">= {nbytes / 2**30:.2f} (RSS)"  # a process's RSS growth: a lower bound of what the step needs


def _short_data(description: str) -> str:
    """'imagefolder (/x/cifar10-jpeg.tar.gz, decoded ...), train, 50000 images, ...' -> 'imagefolder cifar10-jpeg.tar.gz, 50000 images'."""
    source = description.split(" ", 1)[0]
    detail = re.match(r"\S+ \(([^,)]*)", description)
    if detail and "/" in detail.group(1):
        source += " " + detail.group(1).rsplit("/", 1)[-1]
    images = re.search(r"(\d+) images", description)
    return f"{source}, {images.group(1)} images" if images else source


def _large_n(r: dict, point: dict) -> str:
    train = r["config"]["train"]
    return large_n_option(
        point.get("grad_chunks_used", point["grad_chunks"]),  # results before it was recorded: the request
        point.get("bn_groups", 0),
        point["n_patches"],
        bool(train.get("checkpoint_activations")),
    )


def throughput_rows(results: list[tuple[Path, dict]], root: Path) -> list[list]:
    """One row per measured throughput point."""
    rows = []
    for path, r in results:
        if r["benchmark"] != "throughput":
            continue
        env, peak = r["environment"], r["peak"]
        for p in r["points"]:
            if p["status"] != "ok":
                continue
            rows.append(
                [
                    device_label(env),
                    _short_data(r["data"]),
                    p["n_patches"],
                    p["batch_size"],
                    p["resolved"]["backend"],
                    p["resolved"]["compile"],
                    p["resolved"]["precision"],
                    _large_n(r, p),
                    p["images_per_s"],
                    p["patches_per_s"],
                    p["achieved_tflops"],
                    f"{_pct(p['mfu'])} of {fmt(peak['measured_tflops'])}",
                    _mem(p, env),
                    fmt(p.get("speedup_vs_baseline")),
                    _rel(path, root),
                ]
            )
    return rows


def tta_rows(results: list[tuple[Path, dict]], root: Path) -> list[list]:
    """One row per time-to-accuracy run."""
    rows = []
    for path, r in results:
        if r["benchmark"] != "time_to_accuracy":
            continue
        proto = r["protocol"]
        rows.append(
            [
                device_label(r["environment"]),
                _short_data(r["data"]),
                r["n_patches"],
                f"{r['target']:.0%}",
                fmt(r["train_seconds"]) if r["reached"] else _short_of_target(r),
                fmt(r["epochs"]),
                _protocol(proto),
                _rel(path, root),
            ]
        )
    return rows


def _short_of_target(r: dict) -> str:
    """'not reached (best 79.6% in 43 s of a 3-epoch schedule; 70% at 7.2 s, 75% at 14.3 s)'."""
    if r.get("best_linear_top1") is None:
        return "not reached"
    last = r["evals"][-1] if r.get("evals") else None
    best = f"best {r['best_linear_top1']:.1%}" + (f" in {last['train_seconds_excl_first_step']:.0f} s" if last else "")
    if r.get("epochs_scheduled"):
        best += f" of a {r['epochs_scheduled']:g}-epoch schedule"
    reached = [
        f"{m['top1']:.0%} at {m['train_seconds']:.1f} s"
        for m in r.get("milestones", [])
        if m["train_seconds"] is not None and m["top1"] < r["target"]
    ]
    return f"not reached ({best}" + (f"; {', '.join(reached)})" if reached else ")")


def _protocol(proto: dict) -> str:
    what = "whole image" if proto["eval_mode"] == "plain" else f"mean of {proto['eval_patches']} patches"
    return f"linear probe on h ({what}), {proto['probe_epochs']} probe epochs"


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def render_tables(results_dir: Path, root: Path | None = None) -> str:
    """The markdown that goes between the markers."""
    results = load_results(results_dir)
    root = root or Path(results_dir).resolve().parents[1]
    lines = ["_Generated by `python -m fastemp.benchmarks.report` from benchmarks/results/; do not edit by hand._", ""]
    rows = throughput_rows(results, root)
    if rows:
        lines += [
            "Throughput (end to end, median step; MFU against a matmul measured in the same run, bf16 on GPU, "
            "fp32 on CPU; CPU numbers are noisy, shared cores):",
            "",
            markdown_table(
                [
                    "device",
                    "data",
                    "n",
                    "B",
                    "backend",
                    "compile",
                    "precision",
                    "large n",
                    "images/s",
                    "patches/s",
                    "TFLOP/s",
                    "MFU",
                    "peak GiB",
                    "x baseline",
                    "source",
                ],
                rows,
            ),
            "",
        ]
    rows = tta_rows(results, root)
    if rows:
        lines += [
            "Time to accuracy (training seconds, first step/compile excluded, evaluation excluded):",
            "",
            markdown_table(["device", "data", "n", "target", "train s", "epochs", "evaluation", "source"], rows),
            "",
        ]
    if len(lines) == 2:
        lines.append("No results yet.")
    return "\n".join(lines).rstrip() + "\n"


def splice(readme: str, tables: str) -> str | None:
    """README text with the section between the markers replaced; None when the markers are missing."""
    start, end = readme.find(START), readme.find(END)
    if start < 0 or end < start:
        return None
    return readme[: start + len(START)] + "\n" + tables + readme[end:]


def update_readme(results_dir: Path, readme: Path, check: bool = False) -> int:
    """Write (or with check, verify) the README section; print the tables when there are no markers."""
    tables = render_tables(results_dir, Path(readme).resolve().parent)
    text = readme.read_text() if readme.is_file() else ""
    new = splice(text, tables)
    if new is None:
        print(f"{readme} has no '{START}' ... '{END}' markers; the table is:\n")
        print(tables)
        return 1 if check else 0
    if check:
        if new != text:
            print(f"{readme}: the performance table is out of date; run python -m fastemp.benchmarks.report")
            return 1
        return 0
    if new != text:
        readme.write_text(new)
    print(f"updated {readme}")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", default="benchmarks/results", help="results folder (default: benchmarks/results)")
    p.add_argument("--readme", default="README.md", help="README to update (default: README.md)")
    p.add_argument("--check", action="store_true", help="exit 1 if the README table is out of date")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastemp.benchmarks.report", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    return update_readme(Path(args.results), Path(args.readme), args.check)


if __name__ == "__main__":
    sys.exit(main())
