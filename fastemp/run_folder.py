"""A run folder's safety: checked before it is used, held by one process at a time, replaced by --force only
once the new run has a checkpoint (LOCK, REPLACED below). What a run writes into its folder is fastemp.runs';
docs/reliability.md says what each message means."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path

from .config import Config, ConfigError, save_config
from .errors import UserError
from .validate import check_output_path

LOCK = ".lock"  # flock'ed for the life of the process that writes the folder; holds that process's pid and host
REPLACED = "replaced-run"  # under --force: the old run, kept until the new run's first checkpoint
MOVED = ".moved"  # in REPLACED: the old run is wholly there (without it, a move was interrupted)
RUN_FILES = {"config.yaml", "metrics.jsonl", "checkpoint.pt", "summary.json", "losses.png", "eval.json", LOCK}
RUN_FILES |= {"backbone.safetensors", "encoder.safetensors"}  # fastemp export's default outputs
RUN_FILES |= {"metrics.csv", "evaluations.csv"}  # train.loggers (fastemp/loggers.py), and its folders:
RUN_FOLDERS = {"tensorboard", "wandb"}

_locks: dict[Path, int] = {}  # resolved run folder -> the descriptor that holds its lock


def _is_run_file(name: str) -> bool:
    """A file fastemp writes into a run folder, or the temp file of one of its atomic writes."""
    return name in RUN_FILES or (name.endswith(".tmp") and name[:-4] in RUN_FILES)


def _contents(path: Path) -> list[Path]:
    """What a run folder holds besides its lock and a replaced run."""
    return [p for p in path.iterdir() if p.name not in (LOCK, REPLACED)]


def check_run_dir(path: str | Path, force: bool = False) -> Path:
    """The run folder `path`, after checking it may be used (docs/reliability.md); changes nothing on disk.
    A symlink is followed: the run lives in its target."""
    path = Path(path)
    absolute = path.expanduser().absolute()
    try:
        limit = os.pathconf(next(p for p in absolute.parents if p.is_dir()), "PC_NAME_MAX")
    except (OSError, ValueError, StopIteration):
        limit = 255
    long = next((len(os.fsencode(part)) for part in absolute.parts if len(os.fsencode(part)) > limit), None)
    if long:
        raise UserError(
            f"--out {path}: a name in it is {long} bytes, over the filesystem's limit of {limit}; "
            "choose a shorter --out (or name)"
        )
    if path.is_symlink() and not path.exists():
        raise UserError(
            f"--out {path} is a symlink to {os.readlink(path)}, which does not exist; create that "
            "folder, or choose another --out"
        )
    resolved = path.expanduser().resolve()
    cwd = Path.cwd().resolve()
    if resolved in (cwd, *cwd.parents, Path.home().resolve(), Path(resolved.anchor)):
        raise UserError(
            f"--out {path} is the working directory, an ancestor of it, the home folder or /; "
            "a run needs a folder of its own, e.g. --out runs/NAME"
        )
    check_output_path(path, "--out")  # not a file, not under one, in a writable folder
    if path.is_dir():
        check_files(path, "the command")
        probe_lock(path)
        _check_replaceable(path, force)
    return path


def check_files(run_dir: Path, command: str, writes: str = "") -> None:
    """UserError when a name fastemp reads or writes in run_dir is not a file (a folder, a broken link, ...), or,
    when the command writes there (`writes`: why), when run_dir or a run file in it is read-only."""
    odd = sorted(p.name for p in run_dir.iterdir() if p.name in RUN_FILES and not p.is_file())
    if odd:
        raise UserError(
            f"{run_dir / odd[0]} is not a file (a folder, a broken link, ...), but fastemp reads or writes that "
            f"file there; move it away (or restore the file), then run {command} again"
        )
    paths = [run_dir, *(p for p in run_dir.iterdir() if _is_run_file(p.name) and p.is_file())]
    read_only = next((p for p in paths if writes and not os.access(p, os.W_OK)), None)
    if read_only is not None:
        raise UserError(
            f"{read_only} is read-only and {writes}; make it writable (chmod -R u+w {run_dir}), or copy the "
            "folder and use the copy"
        )


def _check_replaceable(path: Path, force: bool) -> None:
    if not _contents(path) and not (path / REPLACED).exists():
        return
    if not force:
        raise UserError(
            f"run folder {path} exists and is not empty; pass --force to replace it, or choose another --out"
        )
    ours = [p for p in _contents(path) if (p.is_file() and _is_run_file(p.name)) or p.name in RUN_FOLDERS]
    foreign = sorted(p.name for p in _contents(path) if p not in ours)
    if foreign or not ((path / "config.yaml").is_file() or (path / REPLACED / "config.yaml").is_file()):
        what = f"holds {', '.join(foreign[:3])}" if foreign else "has no config.yaml"
        raise UserError(
            f"--force refuses to replace {path}: it {what}, so it is not a fastemp run "
            "folder; move those files away or choose another --out"
        )


# -------------------------------------------------------------------------------- the lock


def _in_use(run_dir: Path, fd: int) -> UserError:
    """The error naming the process whose pid and host the lock file `fd` holds."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode())
        owner = f"{info['command']} (pid {info['pid']} on {info['host']}, since {info['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        owner = "another process"
    return UserError(
        f"run folder {run_dir} is in use by {owner}; wait for it to finish or stop it, then try again, "
        "or choose another folder"
    )


def probe_lock(run_dir: Path) -> None:
    """UserError when a live process holds run_dir; changes nothing (not even the lock file)."""
    try:
        fd = os.open(run_dir / LOCK, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return  # no lock file: nobody has written the folder through fastemp since it was made
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _in_use(run_dir, fd) from None
    finally:
        os.close(fd)  # also drops the shared lock


def lock_run_dir(run_dir: Path, command: str, read_only_ok: bool = False) -> None:
    """Hold run_dir's lock until this process exits (the kernel drops a flock when its holder dies: a killed
    holder's lock is free at once); none when read_only_ok and the folder cannot be written."""
    key = run_dir.resolve()
    if key in _locks:
        return
    try:
        fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as err:
        if not (read_only_ok and err.errno in (errno.EACCES, errno.EPERM, errno.EROFS)):
            raise
        probe_lock(run_dir)  # a read-only folder: nobody can write it, but a live holder is still named
        return
    for _ in range(5):  # for ~0.1 s: another command's probe_lock holds a shared flock for microseconds
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            time.sleep(0.02)
    else:
        err = _in_use(run_dir, fd)
        os.close(fd)
        raise err
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": command,
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    with contextlib.suppress(OSError):  # a full disk: the lock holds all the same, the message just cannot name us
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
    _locks[key] = fd


def unlock_all() -> None:
    """Release every run folder this process holds (its command is over; the process may go on)."""
    while _locks:
        os.close(_locks.popitem()[1])


# -------------------------------------------------------------------------------- --force


def begin_run(run_dir: Path, force: bool, cfg: Config, retry: str) -> None:
    """Create and lock run_dir for a new run of cfg; under --force move the old run into run_dir/replaced-run
    (never rename the folder: a mount point or a symlink's target works); write config.yaml. retry: the command
    that starts the run again."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock_run_dir(run_dir, "fastemp train")
    except OSError as err:
        raise UserError(
            f"cannot create the run folder {run_dir}: {err.strerror or err}; choose an --out in a writable folder"
        ) from None
    settle_replaced(run_dir)
    _check_replaceable(run_dir, force)  # again, under the lock: another process may have written meanwhile
    aside = run_dir / REPLACED
    old = _contents(run_dir)
    if old:
        aside.mkdir()
        for p in old:
            os.replace(p, aside / p.name)
        (aside / MOVED).touch()
    try:
        save_config(cfg, run_dir / "config.yaml")
    except OSError as err:
        (run_dir / "config.yaml").unlink(missing_ok=True)
        back = restore_replaced(run_dir)
        kept = f"{run_dir} again holds the run --force was replacing, unchanged" if back else "nothing was kept"
        raise UserError(
            f"could not write {run_dir / 'config.yaml'}: {err.strerror or err} ({kept}); free space "
            f"or make {run_dir} writable, then run {retry}"
        ) from None


def discard_replaced(run_dir: Path) -> None:
    """The new run has its first checkpoint: the run it replaced is no longer needed."""
    aside = Path(run_dir) / REPLACED
    if not aside.is_dir():
        return
    for p in aside.iterdir():  # MOVED goes last: a kill midway leaves a discard that settle_replaced finishes
        if p.name != MOVED:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    (aside / MOVED).unlink(missing_ok=True)
    aside.rmdir()


def restore_replaced(run_dir: Path) -> bool:
    """Put the run that --force moved aside back in place of the new run's files; False if there is none."""
    aside = run_dir / REPLACED
    if not aside.is_dir():
        return False
    if (aside / MOVED).exists():  # the new run's files go first; then the old run's come back
        for p in _contents(run_dir):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        (aside / MOVED).unlink()
    for p in aside.iterdir():  # without MOVED every file here or in run_dir is the old run's
        os.replace(p, run_dir / p.name)
    aside.rmdir()
    return True


def settle_replaced(run_dir: Path) -> bool:
    """Finish what a --force that died (kill -9, power loss) left, under the lock: True when that put the old
    run back."""
    if (run_dir / REPLACED / MOVED).exists() and (run_dir / "checkpoint.pt").is_file():
        discard_replaced(run_dir)  # the new run reached its first checkpoint
        return False
    return restore_replaced(run_dir)


def outcome_of_failed_run(run_dir: Path, retry: str) -> str:
    """After a new run failed: put back the run it replaced if it has no checkpoint yet, and say
    what is on disk now and the command that tries again."""
    if (run_dir / "checkpoint.pt").is_file():
        return ""
    if restore_replaced(run_dir):
        return (
            f"nothing of the new run was kept: {run_dir} again holds the run --force was replacing, unchanged; "
            f"to try again: {retry}"
        )
    return f"{run_dir} holds this run's config.yaml and metrics but no checkpoint; to try again: {retry}"


def claim(run_dir: Path, command: str, writes: str = "") -> None:
    """Before a run folder's config is read: a folder that is not a run folder, or that another process holds, is
    refused at once, and what an interrupted --force left is settled under the lock; when that put an old run
    back, stop: the run this command was meant for no longer exists. writes: why the folder must be writable, if
    it must. The command takes the lock itself once its checks pass (an eval that fails them blocks nobody)."""
    if not (run_dir / "config.yaml").is_file() and not (run_dir / REPLACED).is_dir():
        what = "does not exist" if not run_dir.is_dir() else "has no config.yaml, so it is not a run folder"
        raise ConfigError(f"{run_dir} {what}; give the --out folder of a fastemp train run")
    check_files(run_dir, f"{command} {run_dir}", f"{writes} there" if writes else "")
    probe_lock(run_dir)
    if (run_dir / REPLACED).is_dir():
        lock_run_dir(run_dir, command)
        if settle_replaced(run_dir):
            raise UserError(
                f"{run_dir} again holds the run that an interrupted fastemp train --force was replacing (the new run "
                f"stopped before its first checkpoint, so nothing of it was kept); run {command} {run_dir} again to "
                "use that run, or rerun the fastemp train --force command to replace it"
            )
