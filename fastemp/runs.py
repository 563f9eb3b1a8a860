"""A run folder: what ran (config), how it went (metrics, plots), where it stands (checkpoint).

    RUN/config.yaml      resolved config
    RUN/metrics.jsonl    one JSON line per logged step
    RUN/checkpoint.pt    last checkpoint (written atomically: tmp file + rename)
    RUN/summary.json     final numbers
    RUN/losses.png       loss terms over steps (when matplotlib is installed)
"""

from __future__ import annotations

import errno
import json
import math
import os
import platform
import shutil
import subprocess
from pathlib import Path

import torch

from .errors import UserError, one_line


RUN_FILES = {"config.yaml", "metrics.jsonl", "checkpoint.pt", "summary.json", "losses.png", "eval.json"}


class RunExistsError(UserError, FileExistsError):
    pass


def _is_run_file(name: str) -> bool:
    """A file fastemp writes into a run folder, or the temp file of one of its atomic writes."""
    return name in RUN_FILES or (name.endswith(".tmp") and name[:-4] in RUN_FILES)


def check_run_dir(path: str | Path, force: bool = False) -> Path:
    """The run folder `path`, after checking it may be used; changes nothing on disk.

    A folder that already holds something is replaced only with --force, and only when it is
    recognisably a fastemp run folder: never the working directory, an ancestor of it, the home
    folder or /, and never a folder with files fastemp did not write."""
    path = Path(path)
    resolved = path.expanduser().resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents or resolved == Path.home().resolve() or resolved == Path(resolved.anchor):
        raise RunExistsError(f"--out {path} is the working directory, an ancestor of it, the home folder or /; "
                             "a run needs a folder of its own, e.g. --out runs/NAME")
    if path.exists() and not path.is_dir():
        raise RunExistsError(f"--out {path} is a file, not a folder; choose another --out")
    if path.is_dir() and any(path.iterdir()):
        if not force:
            raise RunExistsError(f"run folder {path} exists and is not empty; pass --force to replace it, "
                                 "or choose another --out")
        foreign = sorted(p.name for p in path.iterdir() if not (p.is_file() and _is_run_file(p.name)))
        if foreign or not (path / "config.yaml").is_file():
            what = f"holds {', '.join(foreign[:3])}" if foreign else "has no config.yaml"
            raise RunExistsError(f"--force refuses to replace {path}: it {what}, so it is not a fastemp run "
                                 "folder; move those files away or choose another --out")
    return path


def replace_run_dir(path: Path) -> Path | None:
    """Make `path` an empty run folder; an old run there is moved aside (returned) rather than
    deleted, so that discard_old_run removes it only once the new run has started."""
    aside = None
    if path.is_dir() and any(path.iterdir()):
        aside = path.with_name(f".{path.name}.replaced-{os.getpid()}")
        os.replace(path, aside)
    path.mkdir(parents=True, exist_ok=True)
    return aside


def restore_old_run(path: Path, aside: Path | None) -> None:
    """Undo replace_run_dir after a failure before training started."""
    if aside is not None and aside.is_dir():
        shutil.rmtree(path, ignore_errors=True)
        os.replace(aside, path)


def discard_old_run(aside: Path | None) -> None:
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def append_metrics(run_dir: Path, record: dict) -> None:
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(run_dir: Path) -> list[dict]:
    """The logged records; a partial last line (a run killed mid-write) is dropped."""
    path = Path(run_dir) / "metrics.jsonl"
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
            raise UserError(f"{path} line {i + 1} is not JSON; delete that line (or the file) and resume again") from None
    return records


def truncate_metrics(run_dir: Path, after_step: int) -> None:
    """Drop metric lines past `after_step` (a resumed run re-logs the steps it redoes)."""
    kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= after_step]
    (Path(run_dir) / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))


def _disk_full(err: BaseException, where: Path) -> bool:
    # torch's zip writer reports ENOSPC as "unexpected pos" / "failed writing", not as an errno
    text = str(err)
    if getattr(err, "errno", None) == errno.ENOSPC or "No space left" in text or "unexpected pos" in text:
        return True
    try:
        return shutil.disk_usage(where).free < (64 << 20)
    except OSError:
        return False


def atomic_torch_save(obj, path: Path) -> None:
    """Write via a temp file and a rename, so `path` is always the old or the new checkpoint; on
    failure the temp file is removed (it would otherwise keep filling a full disk)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        tmp.unlink(missing_ok=True)
        if _disk_full(err, path.parent):
            raise UserError(f"disk full: could not write {path} (the previous {path.name} is intact); free space "
                            f"on the disk holding {path.parent.resolve()} and run fastemp resume {path.parent}") from err
        raise UserError(f"could not write {path} ({one_line(err)[:160]}); check that the folder is writable") from err


def finite_or_none(obj):
    """A copy of a JSON-ready structure with NaN/inf floats replaced by None (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def write_json(path: Path, obj: dict) -> None:
    """Strict JSON (a NaN, e.g. images/s of a run too short to time, becomes null), written atomically."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(finite_or_none(obj), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


def git_commit() -> str:
    """The commit of the fastemp checkout (with '+dirty' when modified), or 'unknown'.

    FASTEMP_COMMIT, when set, wins: a working tree copied to another machine has no .git to ask.
    """
    if os.environ.get("FASTEMP_COMMIT"):
        return os.environ["FASTEMP_COMMIT"]
    repo = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: torch.device) -> dict:
    """Versions and hardware, recorded beside every absolute number."""
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "commit": git_commit(),
        "device": str(device),
        "device_name": platform.processor() or platform.machine(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    try:
        import nvidia.dali

        env["dali"] = nvidia.dali.__version__
    except Exception:
        env["dali"] = None
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10)
            env["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
        except (OSError, subprocess.SubprocessError, IndexError):
            env["driver"] = None
    return env


def plot_losses(run_dir: Path) -> Path | None:
    """losses.png from metrics.jsonl; None when matplotlib is not installed or nothing was logged."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in read_metrics(run_dir) if "loss" in r]
    if not rows:
        return None
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for ax, key, title in zip(axes, ["loss", "loss_sim", "loss_tcr"],
                              ["total", "invariance (-mean cos to image mean)", "TCR (-mean R)"]):
        ax.plot(steps, [r[key] for r in rows])
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(run_dir) / "losses.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
