"""Checkpoints: what one holds, how it is written and read (once per command: plain data under
`torch.load(weights_only=True)`, verified by its `sha256`), and whether it fits a config, a world size, a
model and the data now loaded, each mismatch one line (docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import pickle
import re
import shutil
from pathlib import Path

import torch

from . import distributed, runs
from .config import Config, ConfigError, flat_dict, to_dict
from .data.listing import what_changed
from .errors import DataError, UserError, one_line

FORMAT = 2  # 2: weights_only plain data, with `sha256` and `layout`
REQUIRED = ("model", "optimizer", "step", "clock", "config", "rng_cpu", "layout", "sha256")

# Keys a resumed run may change without mixing two runs (docs/reliability.md): where data and
# outputs live, where it runs, how often it logs and checkpoints, the speed-only compile settings (they
# change float rounding at most), and all of evaluation. Anything
# else (n, B, lr, schedule length, data, model, augmentation) would make the summary describe a
# run that never happened.
RESUME_SAFE_KEYS = (
    "name",
    "data.root",
    "data.download",
    "data.workers",
    "data.bad_files",  # what a file that fails does; the steps before it read the same images either way
    "train.device",
    "train.log_every",
    "train.ckpt_every",
    "train.loggers",
    "model.compile",
    "model.cudnn_benchmark",
    "data.patch_compile",
    "optim.fused_update",
    "model.projector_init",  # read at start-up only; a resumed run's projector comes from its checkpoint
    "eval.*",
)
ARCHITECTURE_KEYS = ("model.width", "model.stem", "model.hidden_dim", "model.z_dim")
# The data a run trained on is stored as each loaded split's fingerprint (what the data is, not where: the same
# files at another path resume with a note) and compared on resume and eval and across torchrun ranks.
DATA_PATHS = ("data.path", "data.train_path")
HOW_READ = ("data.workers", "data.bad_files", "data.backend", "data.download", "data.patch_compile")  # not which images


class CheckpointError(UserError):
    """A checkpoint that cannot be used: missing, empty, corrupt, unsafe, non-finite or for another config."""


# -------------------------------------------------------------------------------- integrity


def _feed(h, obj) -> None:
    """Hash obj in a canonical form: the same content gives the same bytes, whatever the dict order."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for key in sorted(obj, key=repr):
            _feed(h, key)
            _feed(h, obj[key])
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}".encode())
        for item in obj:
            _feed(h, item)
    elif obj is None or isinstance(obj, (bool, int, float, str)):
        h.update(f"{type(obj).__name__}:{obj!r};".encode())
    else:
        raise TypeError(f"a checkpoint holds only plain data, not {type(obj).__name__}")


def digest(state: dict) -> str:
    """sha256 of every entry of state but `sha256` itself."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in state.items() if k != "sha256"})
    return h.hexdigest()


# -------------------------------------------------------------------------------- layout


def layout(cfg: Config, world: int) -> dict:
    """How a run's batch is split: what decides which images one BatchNorm call sees (all B images of a chunk
    with model.sync_bn or one process, else each rank's B/K; the rest is in the checkpoint's config)."""
    return {
        "world_size": world,
        "sync_bn": bool(cfg.model.sync_bn),
        "bn_images": cfg.train.batch_size if cfg.model.sync_bn or world == 1 else cfg.train.batch_size // world,
    }


def check_layout(cfg: Config, state: dict, world: int, path: Path) -> str | None:
    """None when the checkpoint's world size is this one; a note when another world size resumes
    the same recipe; CheckpointError when it would change BatchNorm's groups mid-run."""
    then, now = state["layout"], layout(cfg, world)
    k = then["world_size"]
    if k == world:
        return None
    if then["bn_images"] != now["bn_images"]:
        raise CheckpointError(
            f"{path} was written by {k} process(es) with model.sync_bn={str(then['sync_bn']).lower()}: BatchNorm "
            f"normalised over {then['bn_images']} images per call, on {world} it would be {now['bn_images']}, a "
            f"different recipe mid-run; resume it with {k} process(es) "
            f"({distributed.launcher(k)} resume {path.parent})"
        )
    return (
        f"resuming {path} (written by {k} process(es)) on {world}: BatchNorm still normalises over "
        f"{now['bn_images']} images per call and every rank draws its rows of the same global batch, so the "
        "recipe is unchanged (float sums may differ in the last bits)"
    )


# -------------------------------------------------------------------------------- writing


def _disk_full(err: BaseException, where: Path) -> bool:
    # torch's zip writer reports ENOSPC as "unexpected pos" / "failed writing", not as an errno
    text = str(err)
    if getattr(err, "errno", None) == errno.ENOSPC or "No space left" in text or "unexpected pos" in text:
        return True
    try:
        return shutil.disk_usage(where).free < (64 << 20)
    except OSError:
        return False


def save(state: dict, path: Path) -> None:
    """Write state (plus its format and digest) via a temp file, fsync and a rename (runs.atomic_path), so `path`
    is always the old or the new checkpoint."""
    state = {**state, "format": FORMAT}
    state["sha256"] = digest(state)
    had = path.is_file()
    try:
        with runs.atomic_path(path) as tmp, open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as err:
        kept, then = (
            (f"the previous {path.name} is intact", f"run fastemp resume {path.parent}")
            if had
            else ("no checkpoint of this run exists yet", "start the run again")
        )
        full = _disk_full(err, path.parent)
        what = f"disk full: could not write {path}" if full else f"could not write {path}: {one_line(err)[:160]}"
        fix = f"free space on the disk holding {path.parent.resolve()}" if full else f"make {path.parent} writable"
        raise UserError(f"{what} ({kept}); {fix}, then {then}") from err
    with contextlib.suppress(OSError):  # the rename is durable only once the folder's entry is on disk
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# -------------------------------------------------------------------------------- reading


def _redo(path: Path) -> str:
    run = path.parent
    return f"start the run again with fastemp train --config {run / 'config.yaml'} --out {run} --force"


def read(path: Path, fix: str = "") -> dict:
    """A verified checkpoint's state (on the CPU), or CheckpointError saying what is wrong with the file and then
    `fix` (default: how to start its run again). Read once per command: the comparisons with the config and the
    trainer's restore use this same state."""
    fix = fix or _redo(path)
    if not path.is_file():
        raise CheckpointError(
            f"{path} not found: the run stopped before its first checkpoint (or never started), "
            f"so there is nothing to resume or evaluate; {fix}"
        )
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes); {fix}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # weights_only refused an object: nothing of it was run
        found = re.search(r"WeightsUnpickler error: ([^.]*)", str(err))  # e.g. "Unsupported global: GLOBAL exec ..."
        what = found.group(1).strip()[:120] if found else "an object weights_only refuses"
        raise CheckpointError(
            f"{path} holds Python objects that are not plain data ({what}) and was not loaded: "
            f"fastemp never writes those and loading one could run code; {fix}"
        ) from None
    except Exception as err:  # truncated zip, not a checkpoint
        raise CheckpointError(f"{path} is corrupt or truncated ({one_line(err)[:160]}); {fix}") from None
    version = state.get("format") if isinstance(state, dict) else None
    if isinstance(version, int) and version > FORMAT:
        raise CheckpointError(
            f"{path} has checkpoint format {version}, written by a newer fastemp (this one reads format {FORMAT} "
            "and older); upgrade fastemp to read it"
        )
    missing = [k for k in REQUIRED if not isinstance(state, dict) or k not in state]
    if missing:
        why = (
            "it has no checksum: written by a fastemp before checksums, or not by fastemp"
            if isinstance(state, dict) and "model" in state
            else "not a fastemp checkpoint"
        )
        raise CheckpointError(f"{path} lacks {', '.join(missing)} ({why}); {fix}")
    try:
        ok = digest(state) == state["sha256"]
    except TypeError:
        ok = False
    if not ok:
        raise CheckpointError(
            f"{path} is corrupt: its sha256 does not match its contents (a changed byte on disk "
            f"or in transit); use a good copy of the file, or {fix}"
        )
    bad = [k for k, v in state["model"].items() if not isinstance(v, torch.Tensor)]
    if bad or not isinstance(state["step"], int) or state["step"] < 0:
        raise CheckpointError(f"{path} has a malformed {'model entry ' + bad[0] if bad else 'step'}; {fix}")
    bad = [k for k, v in state["model"].items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{path} holds non-finite weights ({bad[0]} and {len(bad) - 1} more); {fix}")
    return state


def misfit(expected: dict, got: dict, shown=str) -> str:
    """'' when `got` holds exactly `expected`'s tensors (names and shapes: loading casts the dtype); else the
    missing, unexpected and misshaped ones, the first few named (as `shown` writes a name)."""
    misshaped = [k for k, v in expected.items() if k in got and got[k].shape != v.shape]
    shapes = {k: f" {tuple(got[k].shape)} (model {tuple(expected[k].shape)})" for k in misshaped}
    problems = []
    for what, keys in (
        ("missing", [k for k in expected if k not in got]),
        ("unexpected", [k for k in got if k not in expected]),
        ("misshaped", misshaped),
    ):
        named = [shown(k) + shapes.get(k, "") for k in keys[:3]]
        if keys:
            problems.append(f"{what} {', '.join(named)}{f' and {len(keys) - 3} more' if len(keys) > 3 else ''}")
    return "; ".join(problems)


# -------------------------------------------------------------------------------- config comparison


def _changed(cfg: Config, state: dict, compared) -> list[tuple[str, object, object]]:
    """(key, the checkpoint's value, the config's) for each key `compared(key)` selects whose value changed (both
    as to_dict writes them: a float read back from config.yaml is the float written, YAML keeping its repr)."""
    now, then = flat_dict(to_dict(cfg)), flat_dict(state["config"])
    return [(k, then[k], now[k]) for k in now if k in then and compared(k) and now[k] != then[k]]


def _safe(key: str) -> bool:
    return any(key == s or (s.endswith(".*") and key.startswith(s[:-1])) for s in RESUME_SAFE_KEYS)


def check_resume(cfg: Config, state: dict, path: Path) -> None:
    """Refuse to resume when config.yaml changed a key that is not safe to change mid-run. The data paths may
    change when the checkpoint has the data's fingerprints (check_data_matches then compares the data itself)."""
    changed = _changed(cfg, state, lambda k: not (_safe(k) or ("data" in state and k in DATA_PATHS)))
    if changed:
        what = ", ".join(f"{k} ({then!r} -> {now!r})" for k, then, now in changed[:3])
        raise ConfigError(
            f"config.yaml of {path} no longer matches its checkpoint: {what}; put the old values "
            "back, or start a new run with fastemp train (resume may change only "
            f"{', '.join(RESUME_SAFE_KEYS)})"
        )


def check_architecture(cfg: Config, state: dict, path: Path) -> None:
    """Refuse to load weights into a model of another shape."""
    changed = _changed(cfg, state, ARCHITECTURE_KEYS.__contains__)
    if changed:
        what = ", ".join(f"{k}={then!r} (config says {now!r})" for k, then, now in changed)
        raise ConfigError(f"{path} was trained with {what}; drop the override or restore those keys in config.yaml")


# -------------------------------------------------------------------------------- the data


def loaded_splits(trainer) -> dict:
    """{split: data set} of every split the trainer has loaded: train (what training reads), and probe_train
    (when it is another split) and test once loaded."""
    loaded = vars(trainer)
    sets = {"train": trainer.train_set, "probe_train": loaded.get("probe_train_set"), "test": loaded.get("test_set")}
    return {split: s for split, s in sets.items() if s is not None and (split == "train" or s is not trainer.train_set)}


def data_identity(trainer) -> dict:
    """{split: {fingerprint, contents}} of the loaded splits (fastemp.data: what the data is, not where)."""
    return {
        split: {"fingerprint": s.fingerprint, "contents": s.contents} for split, s in loaded_splits(trainer).items()
    }


def skipped_files(trainer) -> dict:
    """Every file skipped so far (data.bad_files=skip) on any rank, in training or evaluation: {path: why}."""
    mine = {p: why for s in loaded_splits(trainer).values() for p, why in getattr(s, "skipped", {}).items()}
    return dict(sorted({p: why for part in distributed.gather_objects(mine) for p, why in part.items()}.items()))


def data_report(trainer) -> dict:
    """What summary.json and eval.json say of the data: each split's fingerprint, and the files skipped if any."""
    skipped = skipped_files(trainer)
    report = {"data_fingerprints": {split: v["fingerprint"] for split, v in data_identity(trainer).items()}}
    return {**report, "skipped_files": skipped} if skipped else report


def check_data_matches(trainer, state: dict, path: Path, resuming: bool = True) -> str | None:
    """The data the trainer loaded is the checkpoint's, split by split: DataError saying what changed when not;
    the same data at another path is a note. A checkpoint written before fingerprints passes, and so does an
    evaluation whose config changes a data.* key that picks the images (another dataset or fewer images: on
    purpose)."""
    then = state.get("data") or {}
    changed = _changed(trainer.cfg, state, lambda k: k.startswith("data.") and k not in HOW_READ)
    if not then or not resuming and changed:
        return None
    for split, now in data_identity(trainer).items():
        old = then.get(split)
        if old and old["fingerprint"] != now["fingerprint"]:
            raise DataError(
                f"the {split} split of {data_location(trainer.cfg)} is not the data of {path}: "
                f"{what_changed(old['contents'], now['contents'])} (fingerprint {now['fingerprint']}, "
                f"then {old['fingerprint']}); restore that data, or point data.path in {path.parent / 'config.yaml'} at it"
            )
    moves = ", ".join(f"{k} {then_} -> {now_}" for k, then_, now_ in changed if k in DATA_PATHS)
    return f"the data moved ({moves}): the same files, so the run goes on there" if moves else None


def data_location(cfg: Config) -> str:
    return cfg.data.train_path or cfg.data.path or f"data.source={cfg.data.source}"


# -------------------------------------------------------------------------------- the trainer's state


def trainer_state(trainer) -> dict:
    """Everything a resumed run needs to continue bit-identically."""
    return {
        "model": trainer.model.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "step": trainer.step,
        "clock": (trainer.warmup_seconds, trainer.train_seconds, trainer.timed_images),
        "config": to_dict(trainer.cfg),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "layout": layout(trainer.cfg, trainer.runtime.world_size),
        "data": data_identity(trainer),
        "skipped_files": skipped_files(trainer),
    }


def restore(trainer, state: dict, path: Path) -> None:
    """Restore the trainer from the state `read` returned for path, or CheckpointError when it does not fit the
    trainer's model or optimizer."""
    problems = misfit(trainer.model.state_dict(), state["model"])
    if problems:
        raise CheckpointError(f"{path} does not fit the model: {problems}; {_redo(path)}")
    trainer.model.load_state_dict(state["model"])
    try:  # the buffers' shapes are the parameters': the model fits, and the digest says fastemp wrote them together
        trainer.optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError, TypeError, RuntimeError) as err:
        raise CheckpointError(
            f"{path} has optimizer state this optimizer cannot take ({one_line(err)[:120]}); {_redo(path)}"
        ) from None
    trainer.step = state["step"]
    trainer.warmup_seconds, trainer.train_seconds, trainer.timed_images = state["clock"]
    torch.set_rng_state(state["rng_cpu"])
    if state["rng_cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    trainer.saved_step = trainer.step
    getattr(trainer.train_set, "skipped", {}).update(state.get("skipped_files") or {})
