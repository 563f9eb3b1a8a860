"""Markdown for every benchmark, and the README's performance table: `fastemp bench report` writes the tables made
from benchmarks/results/<device>/*.json (not *_check.json nor cpu-dry-run/: pipeline checks at toy sizes) between
the README's markers (printed instead when it has none); with --check it exits 1 when they differ."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

START, END = "<!-- perf-table:start -->", "<!-- perf-table:end -->"
# What the project promises (H100 or H200, CIFAR-10, B=100); every report says where it stands on each.
TARGETS = {
    "n20_patches_per_s": (90_000.0, "n=20 end to end patches/s (B=100)"),  # ~39% of a measured 798 TFLOP/s matmul
    "time_to_85_seconds": (30.0, "training seconds to 85% linear probe (n=20)"),  # official protocol, final epoch
    "n200_epoch_seconds": (120.0, "one CIFAR-10 epoch at n=200 (s, 50,000 images)"),
    "n200_memory_gib": (78.0, "n=200 peak memory (GiB)"),  # fits on one 80 GB card
}


def fmt(value) -> str:
    """A table cell: numbers with sensible precision, None as 'n/a'."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return "nan" if value != value else f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
    return str(value)


def pct(x) -> str | None:
    return None if x is None else f"{100 * x:.1f}%"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows])


UNITS = {"ms": lambda s: s * 1e3, "GiB": lambda b: b / 2**30, "kB": lambda b: b / 1e3, "%": pct}


def table(items: Iterable[dict], keys: str, headers: str | None = None) -> str:
    """A markdown table of `items` (dicts), one column per space-separated key (a.b: item["a"]["b"]; key:unit shows
    seconds in ms, bytes in GiB or kB, a fraction in %); headers: '|'-separated (default: the keys; a key with a
    unit: the unit)."""

    def cell(item: dict, key: str):
        key, _, unit = key.partition(":")
        for part in key.split("."):
            item = item.get(part) if isinstance(item, dict) else None
        return UNITS[unit](item) if unit and item is not None else item

    columns = keys.split()
    headers = headers.split("|") if headers else [key.partition(":")[2] or key for key in columns]
    return markdown_table(headers, [[cell(i, k) for k in columns] for i in items])


def device_label(environment: dict) -> str:
    if str(environment.get("device", "cpu")).startswith("cuda"):
        return str(environment.get("device_name"))
    return f"CPU: {environment.get('cpu_model') or environment.get('device_name') or 'unknown'}"


def target_row(name: str, measured, higher_is_better: bool, hardware: bool, note: str = "") -> dict:
    """One line of 'where this run stands' against TARGETS[name]; met is None when not measured."""
    threshold, description = TARGETS[name]
    met = None if measured is None else bool(measured >= threshold if higher_is_better else measured <= threshold)
    row = {"name": name, "description": description, "threshold": threshold, "measured": measured, "met": met}
    return {**row, "on_target_hardware": hardware, "note": note}


def on_h100(environment: dict) -> bool:
    """Whether the targets' hardware ran: an H100, or an H200 (the H100's compute, more memory)."""
    return any(card in str(environment.get("device_name", "")) for card in ("H100", "H200"))


def targets_markdown(targets: list[dict]) -> str:
    status = {True: "met", False: "NOT met", None: "not measured"}
    rows = [{**t, "status": status[t["met"]]} for t in targets]
    keys = "description threshold measured status on_target_hardware note"
    return "## Targets\n\n" + table(rows, keys, "target|threshold|measured|status|on H100|note")


# ------------------------------------------------------------------------------ the README table


def read_result(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _short_data(description: str) -> str:
    """'imagefolder (/x/cifar10-jpeg.tar.gz, ...), train, 50000 images, ...' -> 'imagefolder cifar10-jpeg.tar.gz, 50000 images'."""
    source = description.split(" ", 1)[0]
    detail = re.match(r"\S+ \(([^,)]*)", description)
    if detail and "/" in detail.group(1):
        source += " " + detail.group(1).rsplit("/", 1)[-1]
    images = re.search(r"(\d+) images", description)
    return f"{source}, {images.group(1)} images" if images else source


POINT_HEADERS = "n|B|backend|compile|precision|large n|images/s|patches/s|TFLOP/s|MFU|peak GiB|x baseline"


def point_cells(result: dict, p: dict) -> list:
    """A measured throughput point of `result` as the README table and throughput.md show it (POINT_HEADERS); large
    n: how the step ran its patch groups (the gradient cache's chunks, ghost BatchNorm, activation checkpoints)."""
    chunks = p.get("grad_chunks_used", p["grad_chunks"])  # results before it was recorded: the request
    groups = p.get("bn_groups", 0)
    ghost = f"BatchNorm per {p['n_patches'] // groups} patch groups" if groups > 1 else ""
    if chunks > 1:
        large_n = f"grad cache x{chunks}" + (f", {ghost}" if ghost else "")
    elif result["config"]["train"].get("checkpoint_activations"):
        large_n = "act. checkpoint"
    else:
        large_n = f"one pass, {ghost}" if ghost else "-"
    gib = p["peak_memory_bytes"] / 2**30  # on the CPU the growth of the RSS: a lower bound
    memory = f"{gib:.1f}" if str(result["environment"]["device"]).startswith("cuda") else f">= {gib:.2f} (RSS)"
    resolved, mfu = p["resolved"], f"{pct(p['mfu']) or 'n/a'} of {fmt(result['peak']['measured_tflops'])}"
    setting = [p["n_patches"], p["batch_size"], resolved["backend"], resolved["compile"], resolved["precision"]]
    speed = [p["images_per_s"], p["patches_per_s"], p["achieved_tflops"], mfu]
    return [*setting, large_n, *speed, memory, p.get("speedup_vs_baseline")]


def time_to_target(r: dict) -> str:
    """A time-to-accuracy result's training seconds to its target, or how far short it stayed: 'not reached (best
    79.6% in 43 s of a 3-epoch schedule; 70% at 7.2 s, 75% at 14.3 s)'."""
    if r["reached"]:
        return fmt(r["train_seconds"])
    if r.get("best_linear_top1") is None:
        return "not reached"
    seconds = r["evals"][-1]["train_seconds_excl_first_step"]
    best = f"best {r['best_linear_top1']:.1%} in {seconds:.0f} s of a {r['epochs_scheduled']:g}-epoch schedule"
    reached = [
        f"{m['top1']:.0%} at {m['train_seconds']:.1f} s"
        for m in r["milestones"]
        if m["train_seconds"] is not None and m["top1"] < r["target"]
    ]
    cut = ", stopped at the wall-clock limit" if r.get("stopped_at_wall_limit") else ""
    return f"not reached ({best}{cut}" + (f"; {', '.join(reached)})" if reached else ")")


def protocol_label(proto: dict) -> str:
    what = "whole image" if proto["eval_mode"] == "plain" else f"mean of {proto['eval_patches']} patches"
    return f"linear probe on h ({what}), {proto['probe_epochs']} probe epochs"


SECTIONS = {  # benchmark -> the caption of its README table and its columns between device|data and source
    "throughput": (
        "Throughput (end to end, median step; MFU against a matmul measured in the same run, bf16 on GPU, fp32 on CPU; "
        "CPU numbers are noisy, shared cores):",
        POINT_HEADERS,
    ),
    "time_to_accuracy": (
        "Time to accuracy (training seconds, first step/compile excluded, evaluation excluded):",
        "n|target|train s|epochs|evaluation",
    ),
}


def render_tables(results_dir: Path, root: Path | None = None) -> str:
    """The README's tables: a row per throughput point and per time-to-accuracy result in results_dir/<device>/."""
    root = Path(root or Path(results_dir).resolve().parents[1]).resolve()
    rows = {benchmark: [] for benchmark in SECTIONS}
    for path in sorted(Path(results_dir).resolve().glob("*/*.json")):
        toy = path.stem.endswith("_check") or path.parent.name == "cpu-dry-run"  # the suite's SUITE_DRY_RUN=1 folder
        r = None if toy else read_result(path)
        if not isinstance(r, dict) or r.get("benchmark") not in rows:
            continue
        if r["benchmark"] == "throughput":
            cells = [point_cells(r, p) for p in r["points"] if p["status"] == "ok"]
        else:
            cells = [
                [r["n_patches"], f"{r['target']:.0%}", time_to_target(r), r["epochs"], protocol_label(r["protocol"])]
            ]
        where = [device_label(r["environment"]), _short_data(r["data"])]
        rows[r["benchmark"]] += [[*where, *c, os.path.relpath(path, root)] for c in cells]
    lines = ["_Generated by `fastemp bench report` from benchmarks/results/; do not edit by hand._", ""]
    for benchmark, (caption, headers) in SECTIONS.items():
        if rows[benchmark]:
            lines += [caption, "", markdown_table(f"device|data|{headers}|source".split("|"), rows[benchmark]), ""]
    return "\n".join(lines).rstrip() + "\n"


def update_readme(results_dir: Path, readme: Path, check: bool = False) -> int:
    tables = render_tables(results_dir, Path(readme).resolve().parent)
    text = readme.read_text() if readme.is_file() else ""
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        print(f"{readme} has no '{START}' ... '{END}' markers; the table is:\n\n{tables}")
        return 1 if check else 0
    new = text[: start + len(START)] + "\n" + tables + text[end:]
    if check:
        if new != text:
            print(f"{readme}: the performance table is out of date; run fastemp bench report")
        return int(new != text)
    if new != text:
        readme.write_text(new)
    print(f"updated {readme}")
    return 0


def add_arguments(p) -> None:
    p.add_argument("--results", default="benchmarks/results", help="results folder (default: benchmarks/results)")
    p.add_argument("--readme", default="README.md", help="README to update (default: README.md)")
    p.add_argument("--check", action="store_true", help="exit 1 if the README table is out of date")
    p.set_defaults(func=lambda args: update_readme(Path(args.results), Path(args.readme), args.check))
