"""What a run writes: its metrics, its summary (strict JSON) and the environment it ran in, and its loss plot
(the folder's files: docs/reliability.md; the folder itself is fastemp.run_folder's).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import platform
import subprocess
from pathlib import Path

import torch

from .errors import UserError

METRICS = "metrics.jsonl"  # a run's records, one JSON line each (fastemp.loggers writes them)


@contextlib.contextmanager
def atomic_path(path: Path, suffix: str = ".tmp"):
    """A temporary name (path + suffix) to write `path` under, renamed to `path` when the block ends, removed when
    it fails (Ctrl-C too): a full disk or a kill never leaves the file half written."""
    tmp = path.with_name(path.name + suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def append_line(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_lines(path: Path) -> list[dict]:
    """A JSON-lines file's records ([] when missing); a partial last line (a kill mid-write) is dropped."""
    path = Path(path)
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise UserError(f"{path} line {i + 1} is not JSON; delete that line (or the file) and try again") from None
    return records


def truncate_metrics(run_dir: Path, after_step: int) -> None:
    """Drop metric lines past `after_step` (a resumed run re-logs the steps it redoes)."""
    kept = [r for r in read_lines(Path(run_dir) / METRICS) if r.get("step", 0) <= after_step]
    with atomic_path(Path(run_dir) / METRICS) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))


def finite_or_none(obj):
    """A copy of a JSON-ready structure with NaN/inf floats replaced by None (strict JSON)."""
    return json.loads(json.dumps(obj), parse_constant=lambda _: None)  # NaN, Infinity, -Infinity


def write_json(path: Path, obj: dict) -> None:
    """Strict JSON (a NaN, e.g. images/s of a run too short to time, becomes null), written atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(finite_or_none(obj), indent=2, allow_nan=False) + "\n")


def git_commit() -> str:
    """The commit of the fastemp checkout (with '+dirty' when modified), or 'unknown'; FASTEMP_COMMIT wins (a
    working tree copied to another machine has no .git to ask)."""
    if os.environ.get("FASTEMP_COMMIT"):
        return os.environ["FASTEMP_COMMIT"]
    repo = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10, check=True).stdout

    try:
        dirty = git("status", "--porcelain", "--untracked-files=no").strip()
        return git("rev-parse", "HEAD").strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):  # no git, or not a checkout
        return "unknown"


def environment(device: torch.device) -> dict:
    """Versions and hardware, recorded beside every absolute number."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), None)
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "commit": git_commit(),
        "device": str(device),
        "device_name": cpu or platform.processor() or platform.machine(),
        "cpu_model": cpu,  # the host's, beside a GPU's name too
    }
    for key, module in (("triton", "triton"), ("dali", "nvidia.dali")):
        try:
            env[key] = importlib.import_module(module).__version__
        except Exception:
            env[key] = None
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            env["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
        except (OSError, subprocess.SubprocessError, IndexError):
            env["driver"] = None
    return env


def plot_losses(run_dir: Path) -> None:
    """losses.png from metrics.jsonl; nothing when matplotlib is not installed or nothing was logged."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [r for r in read_lines(Path(run_dir) / METRICS) if "loss" in r]
    if not rows:
        return
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for ax, key, title in zip(
        axes, ["loss", "loss_sim", "loss_tcr"], ["total", "invariance (-mean cos to image mean)", "TCR (-mean R)"]
    ):
        ax.plot(steps, [r[key] for r in rows])
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(Path(run_dir) / "losses.png", dpi=110)
    plt.close(fig)
