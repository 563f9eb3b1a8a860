"""The data a run trained on: each loaded split's fingerprint and contents (fastemp.data), stored in every
checkpoint and compared on resume and eval (and across torchrun ranks), and the files data.bad_files=skip skipped.
The fingerprint says what the data is, not where: the same files at another path resume with a note."""

from __future__ import annotations

from pathlib import Path

from . import distributed
from .config import Config, flat_dict, to_dict
from .data.listing import what_changed
from .errors import DataError

DATA_PATHS = ("data.path", "data.train_path")
HOW_READ = ("data.workers", "data.bad_files", "data.backend", "data.download", "data.patch_compile")  # not which images


def loaded_splits(trainer) -> dict:
    """{split: data set} of every split the trainer has loaded: train (what training reads), and probe_train
    (when it is another split) and test once loaded."""
    loaded = vars(trainer)
    sets = {"train": trainer.train_set, "probe_train": loaded.get("probe_train_set"), "test": loaded.get("test_set")}
    return {split: s for split, s in sets.items() if s is not None and (split == "train" or s is not trainer.train_set)}


def identity(trainer) -> dict:
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
    report = {"data_fingerprints": {split: v["fingerprint"] for split, v in identity(trainer).items()}}
    return {**report, "skipped_files": skipped} if skipped else report


def check(trainer, state: dict, path: Path, resuming: bool = True) -> str | None:
    """The data the trainer loaded is the checkpoint's, split by split: DataError saying what changed when not;
    the same data at another path is a note. A checkpoint written before fingerprints passes, and so does an
    evaluation whose config changes a data.* key that picks the images (another dataset or fewer images: on
    purpose)."""
    then, before, now = state.get("data") or {}, flat_dict(state["config"]), flat_dict(to_dict(trainer.cfg))
    changed = [k for k in now if k.startswith("data.") and k not in HOW_READ and before.get(k, now[k]) != now[k]]
    if not then or not resuming and changed:
        return None
    moved = [k for k in DATA_PATHS if before.get(k, now[k]) != now[k]]
    for split, now_id in identity(trainer).items():
        old = then.get(split)
        if old and old["fingerprint"] != now_id["fingerprint"]:
            raise DataError(
                f"the {split} split of {data_location(trainer.cfg)} is not the data of {path}: "
                f"{what_changed(old['contents'], now_id['contents'])} (fingerprint {now_id['fingerprint']}, "
                f"then {old['fingerprint']}); restore that data, or point data.path in {path.parent / 'config.yaml'} at it"
            )
    moves = ", ".join(f"{k} {before[k]} -> {now[k]}" for k in moved)
    return f"the data moved ({moves}): the same files, so the run goes on there" if moved else None


def data_location(cfg: Config) -> str:
    return cfg.data.train_path or cfg.data.path or f"data.source={cfg.data.source}"
