"""Shared benchmark plumbing: clocks, medians, peak FLOP/s, MFU, memory, targets, result files.

Clocks: fastemp.clock.Clock, the library's one clock (CUDA events on CUDA, perf_counter on the CPU, one
synchronize when read); a benchmark times nothing by itself.

MFU. achieved TFLOP/s = patches/s x FLOPs per training patch (fastemp.model.flops_per_patch:
3.47 GFLOP for the standard model on 32x32 patches: convolutions and linear layers, forward and
backward). These are model FLOPs: recomputation (gradient cache pass 2's forward, activation
checkpointing) is not counted, as usual for MFU. MFU = achieved / peak, where the peak is a large
square matmul measured on the same device in the same run (bf16 on GPU, fp32 on CPU); the
datasheet peak is shown beside it when the device is in DATASHEET_TFLOPS.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import itertools
import re
import resource
import statistics
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

from fastemp import runs
from fastemp.clock import Clock
from fastemp.data import load_split

# Dense (no sparsity) BF16 tensor-core TFLOP/s from NVIDIA's product datasheets. Matched against
# torch.cuda.get_device_name() in order: the first pattern that matches wins.
DATASHEET_SOURCE = "NVIDIA datasheet, dense BF16 tensor-core TFLOP/s (no sparsity)"
DATASHEET_TFLOPS: tuple[tuple[str, str, float], ...] = (
    (r"H100.*PCIe", "H100 PCIe", 756.0),
    (r"H100.*NVL", "H100 NVL", 835.0),
    (r"H100", "H100 SXM", 989.0),
    (r"H200", "H200", 989.0),
    (r"A100", "A100", 312.0),
    (r"RTX 4090", "GeForce RTX 4090", 165.0),
    (r"\bL4\b", "L4", 121.0),
)

# What the project promises (H100 or H200, CIFAR-10, B=100); every report says where it stands on each.
TARGETS = {
    "n20_patches_per_s": 90_000.0,  # end to end, n=20, B=100 (~39% of a measured 798 TFLOP/s bf16 matmul)
    "time_to_85_seconds": 30.0,  # training seconds to 85% linear-probe top-1 (official protocol, final epoch), n=20
    "n200_epoch_seconds": 120.0,  # one CIFAR-10 epoch (50,000 images) at n=200
    "n200_memory_gib": 78.0,  # n=200 fits on one 80 GB card
}


# -------------------------------------------------------------------------------------- basics


def median(values: Iterable[float]) -> float:
    """Median of a non-empty sequence of numbers."""
    values = list(values)
    if not values:
        raise ValueError("median of no values")
    return float(statistics.median(values))


def synchronize(device: torch.device) -> None:
    """Wait for all queued work on `device` (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def parse_list(text: str | None, kind: Callable = str) -> list | None:
    """'20,200' -> [20, 200]; None or '' -> None (the axis keeps the config's value)."""
    if text is None or str(text).strip() == "":
        return None
    return [kind(item.strip()) for item in str(text).split(",") if item.strip()]


def grid(axes: dict[str, Sequence]) -> list[dict]:
    """Cartesian product of named axes, in the order given: [{'n': 20, 'b': 100}, ...]."""
    names = list(axes)
    return [dict(zip(names, values)) for values in itertools.product(*(axes[k] for k in names))]


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def command_line() -> str:
    return " ".join(["fastemp", *sys.argv[1:]]) if sys.argv and sys.argv[0].endswith("fastemp") else " ".join(sys.argv)


# -------------------------------------------------------------------------------------- clocks


def time_calls(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> list[float]:
    """Seconds per call of fn() for `iters` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    clock = Clock(device)
    clock.mark("start")
    for _ in range(iters):
        fn()
        clock.mark("call")
    return [seconds for _, seconds in clock.intervals()]


# ---------------------------------------------------------------------------------- peak, MFU


def datasheet_peak(device_name: str) -> tuple[str, float] | None:
    """(label, dense bf16 TFLOP/s) for a known GPU name, else None."""
    for pattern, label, tflops in DATASHEET_TFLOPS:
        if re.search(pattern, device_name or ""):
            return label, tflops
    return None


def measure_matmul_tflops(device: torch.device, size: int | None = None, iters: int = 10) -> dict:
    """The peak this run compares against: median TFLOP/s of a size^3 matmul (bf16 GPU, fp32 CPU)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    size = size or (8192 if device.type == "cuda" else 1024)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    out = torch.empty(size, size, device=device, dtype=dtype)
    seconds = median(time_calls(lambda: torch.matmul(a, b, out=out), device, warmup=3, iters=iters))
    return {
        "measured_tflops": 2.0 * size**3 / seconds / 1e12,
        "dtype": str(dtype).replace("torch.", ""),
        "matmul_size": size,
        "iters": iters,
    }


def peak_info(device: torch.device, device_name: str, size: int | None = None) -> dict:
    """Measured matmul peak plus the datasheet value beside it (None when the device is unknown)."""
    info = measure_matmul_tflops(device, size)
    sheet = datasheet_peak(device_name) if device.type == "cuda" else None
    info.update(
        datasheet_label=sheet[0] if sheet else None,
        datasheet_tflops=sheet[1] if sheet else None,
        datasheet_source=DATASHEET_SOURCE if sheet else None,
    )
    return info


def achieved_tflops(patches_per_s: float, flops_per_patch: float) -> float:
    """Model TFLOP/s actually delivered: patches/s x FLOPs per training patch / 1e12."""
    return patches_per_s * flops_per_patch / 1e12


def mfu(patches_per_s: float, flops_per_patch: float, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilization in [0, 1]: achieved TFLOP/s over a peak (None without a peak)."""
    if not peak_tflops or peak_tflops <= 0:
        return None
    return achieved_tflops(patches_per_s, flops_per_patch) / peak_tflops


# -------------------------------------------------------------------------------------- memory


class PeakMemory:
    """Peak memory over a region: torch.cuda.max_memory_allocated on GPU, ru_maxrss delta on CPU.

    ru_maxrss is the process's high-water mark, so on the CPU the delta is a lower bound (0 when an
    earlier region already went higher); `source` says which one a number is.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.source = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "ru_maxrss delta (lower bound)"
        self.start_rss = 0

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.start_rss = _rss_bytes()

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return max(0, _rss_bytes() - self.start_rss)


def _rss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def large_n_option(chunks: int, bn_groups: int, n: int, checkpoint_activations: bool) -> str:
    """How a step ran its patch groups, for tables: the gradient cache's chunks, ghost BatchNorm, or neither."""
    ghost = f"BatchNorm per {n // bn_groups} patch groups" if bn_groups > 1 else ""
    if chunks > 1:
        return f"grad cache x{chunks}" + (f", {ghost}" if ghost else "")
    if checkpoint_activations:
        return "act. checkpoint"
    return f"one pass, {ghost}" if ghost else "-"


def free_device_memory(device: torch.device) -> None:
    """Drop cached blocks and compiled graphs between sweep points (fresh start per point)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    try:
        torch._dynamo.reset()  # else recompilations pile up across points and hit the cache limit
    except Exception:  # pragma: no cover - dynamo missing on exotic builds
        pass


def is_out_of_memory(err: BaseException) -> bool:
    """CUDA OOM, including the ones that surface as RuntimeError (cuDNN, inductor autotuning)."""
    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(err, oom) or "out of memory" in str(err).lower()


class DatasetCache:
    """Each (data config, split, device) loaded once: every Trainer of a sweep is handed the same split."""

    def __init__(self):
        self.splits: dict = {}

    def load(self, cfg, split: str, device: torch.device | str = "cpu"):
        key = (dataclasses.astuple(cfg), split, str(torch.device(device)))
        if key not in self.splits:
            self.splits[key] = load_split(cfg, split, device)
        return self.splits[key]


# -------------------------------------------------------------------------------------- targets


def target_row(
    name: str,
    description: str,
    threshold: float,
    measured: float | None,
    higher_is_better: bool,
    on_target_hardware: bool,
    note: str = "",
) -> dict:
    """One line of 'where this run stands': measured vs threshold, met is None when not measured."""
    met = None
    if measured is not None:
        met = bool(measured >= threshold) if higher_is_better else bool(measured <= threshold)
    return {
        "name": name,
        "description": description,
        "threshold": threshold,
        "measured": measured,
        "met": met,
        "on_target_hardware": on_target_hardware,
        "note": note,
    }


def on_h100(environment: dict) -> bool:
    """Whether the targets' hardware ran: an H100, or an H200 (the H100's compute, more memory)."""
    return any(card in str(environment.get("device_name", "")) for card in ("H100", "H200"))


# -------------------------------------------------------------------------------------- results


def device_slug(environment: dict) -> str:
    """Folder name for a device: 'cpu', or e.g. 'h100-80gb-hbm3' from 'NVIDIA H100 80GB HBM3'."""
    if not str(environment.get("device", "cpu")).startswith("cuda"):
        return "cpu"
    name = re.sub(r"^nvidia\s+", "", str(environment.get("device_name", "gpu")).strip(), flags=re.I)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def default_out_dir(environment: dict) -> Path:
    """benchmarks/results/<device>/, relative to the current directory (the repo root)."""
    return Path("benchmarks") / "results" / device_slug(environment)


def fmt(value, digits: int = 3) -> str:
    """A table cell: numbers with sensible precision, None as 'n/a'."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != value:
            return "nan"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence]) -> str:
    """A GitHub markdown table; cells go through fmt()."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def device_label(environment: dict) -> str:
    """'NVIDIA H100 80GB HBM3', or for the CPU its model name ('cpu' when unknown)."""
    if str(environment.get("device", "cpu")).startswith("cuda"):
        return str(environment.get("device_name"))
    return f"CPU: {environment.get('cpu_model') or environment.get('device_name') or 'unknown'}"


def environment_markdown(environment: dict) -> str:
    keys = [
        "device_name",
        "device",
        "cpu_model",
        "driver",
        "cuda",
        "torch",
        "triton",
        "dali",
        "python",
        "cpu_threads",
        "commit",
    ]
    return "\n".join(f"- {k}: {environment.get(k)}" for k in keys if k in environment)


def targets_markdown(targets: list[dict]) -> str:
    if not targets:
        return ""
    rows = [
        [
            t["description"],
            t["threshold"],
            t["measured"],
            {True: "met", False: "NOT met", None: "not measured"}[t["met"]],
            "yes" if t["on_target_hardware"] else "no (targets are for H100)",
            t["note"],
        ]
        for t in targets
    ]
    return "## Targets\n\n" + markdown_table(["target", "threshold", "measured", "status", "on H100", "note"], rows)


def results_target(
    out: str | None, name: str, device: str, force: bool, suffixes: Sequence[str] = (".json", ".md")
) -> tuple[Path, str]:
    """(folder, file stem) for a benchmark's results, decided BEFORE measuring so that no measured
    number is lost and no committed result is overwritten by accident: when <stem><suffix> exists
    and force is false, the stem gets the first free '-2', '-3', ... and a note says so."""
    if out:
        folder = Path(out)
    else:
        from fastemp.runtime import resolve_device

        dev = resolve_device(device)
        name_of = torch.cuda.get_device_name(dev) if dev.type == "cuda" else ""
        folder = default_out_dir({"device": str(dev), "device_name": name_of})
    from fastemp.validate import check_output_path

    check_output_path(folder, "--out")
    stem, k = name, 2
    while not force and any((folder / f"{stem}{s}").exists() for s in suffixes):
        stem, k = f"{name}-{k}", k + 1
    if stem != name:
        print(
            f"fastemp bench: {folder / name}{suffixes[0]} exists; results will go to {folder / stem}{suffixes[0]} "
            "(--force replaces the existing file)",
            file=sys.stderr,
            flush=True,
        )
    return folder, stem


def write_results(out_dir: Path, name: str, result: dict, markdown: str) -> tuple[Path, Path]:
    """<out_dir>/<name>.json (every number; strict JSON, no NaN) and <name>.md; returns both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    runs.write_json(json_path, result)
    md_path.write_text(markdown.rstrip() + "\n")
    return json_path, md_path


def cpu_model() -> str | None:
    """The processor's marketing name from /proc/cpuinfo (Linux), else None."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def base_result(benchmark: str, environment: dict) -> dict:
    """The fields every result file starts with."""
    environment = {**environment, "device_slug": device_slug(environment), "cpu_model": cpu_model()}
    return {
        "benchmark": benchmark,
        "schema_version": 1,
        "created": now_iso(),
        "command": command_line(),
        "environment": environment,
    }
