"""Start-up validation: every user mistake found before any work, as one line saying how to fix it (the order
of all start-up checks is fastemp.startup's; what the machine must have: fastemp.runtime.resolve)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from .config import EVAL_EVERY, Config, ConfigError, DataConfig, check_choice, choices, shown
from .data.listing import LAYOUTS


def _rule(key: str, value, ok: bool, rule: str, why: str = "") -> None:
    if not ok:
        why = f" ({why})" if why else ""
        raise ConfigError(f"{key} must be {rule}{why}, got {shown(value)}; set {key} to a value that is {rule}")


def _positive(section, prefix: str, *names: str, or_zero: bool = False) -> None:
    for name in names:
        value = getattr(section, name)
        _rule(f"{prefix}.{name}", value, value >= 0 if or_zero else value > 0, ">= 0" if or_zero else "> 0")


def check_config(cfg: Config) -> None:
    """Every value of cfg is in range, and every enumerated option one of the choices its schema declares."""
    _rule(
        "name",
        cfg.name,
        bool(cfg.name.strip()) and "/" not in cfg.name and cfg.name not in (".", ".."),
        "a non-empty folder name without '/'",
    )
    d, a, m, lo, o, t, e = cfg.data, cfg.augment, cfg.model, cfg.loss, cfg.optim, cfg.train, cfg.eval
    for name in (f.name for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(getattr(cfg, f.name))):
        section = getattr(cfg, name)
        for f in dataclasses.fields(section):
            if "choices" in f.metadata:
                check_choice(f"{name}.{f.name}", getattr(section, f.name), f.metadata["choices"])

    _positive(d, "data", "image_size")
    _positive(d, "data", "workers", or_zero=True)
    check_backend(d.backend, d.streamed, d.source)
    if d.source == "synthetic":
        _positive(d, "data", "synthetic_train", "synthetic_test")
    if d.source in ("imagefolder", "tinyimagenet") and not d.path.strip():
        raise ConfigError(f"data.source={d.source} needs data.path; set it to the dataset's folder ({LAYOUTS})")

    _positive(a, "augment", "crop_size")
    low, high = a.crop_scale
    _rule("augment.crop_scale", [low, high], 1e-6 <= low <= high <= 1.0, "[lo, hi] with 1e-06 <= lo <= hi <= 1.0")
    for name in ("crop_ratio", "blur_sigma"):
        low, high = getattr(a, name)
        _rule(f"augment.{name}", [low, high], 0 < low <= high, "[lo, hi] with 0 < lo <= hi")
    for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
        value = getattr(a, name)
        _rule(f"augment.{name}", value, 0 <= value <= 1, "a probability in [0, 1]")
    _positive(a, "augment", "brightness", "contrast", "saturation", or_zero=True)
    _rule("augment.hue", a.hue, 0 <= a.hue <= 0.5, "in [0, 0.5]")
    _rule("augment.solarize_threshold", a.solarize_threshold, 0 <= a.solarize_threshold <= 256, "in 0..256")
    _rule("augment.std", list(a.std), all(s > 0 for s in a.std), "three numbers > 0")

    _positive(m, "model", "width", "hidden_dim", "z_dim")
    if m.projector_init:
        from .weights import read_projector

        read_projector(m.projector_init, m)

    _positive(lo, "loss", "eps", "vonmises_t")
    _rule(
        "train.batch_size",
        t.batch_size,
        lo.uniformity != "vonmises" or t.batch_size >= 2,
        ">= 2 under loss.uniformity=vonmises",
        "it averages over pairs of images",
    )
    _positive(lo, "loss", "invariance_weight", "tcr_weight", "vonmises_weight", or_zero=True)

    _positive(o, "optim", "lr", "lars_eta")
    _rule("optim.momentum", o.momentum, 0 <= o.momentum < 1, "in [0, 1)")
    _positive(o, "optim", "weight_decay", "warmup_steps", or_zero=True)
    _rule("optim.min_lr", o.min_lr, 0 <= o.min_lr <= o.lr, "in [0, optim.lr]")

    # one patch per image makes the invariance term a constant (every patch is its image's mean)
    _rule("train.n_patches", t.n_patches, t.n_patches >= 2, ">= 2", "the invariance term needs two patches per image")
    _positive(t, "train", "batch_size", "epochs", "log_every")
    _rule("train.grad_chunks", t.grad_chunks, t.grad_chunks >= 0, ">= 0 (0: chosen from free memory)")
    _rule(
        "train.bn_groups",
        t.bn_groups,
        t.bn_groups >= 0 and (t.bn_groups == 0 or t.n_patches % t.bn_groups == 0),
        "0 or a divisor of train.n_patches",
    )
    _rule(
        "train.grad_chunks",
        t.grad_chunks,
        t.grad_chunks > 0 or t.bn_groups > 0,
        "> 0 when train.bn_groups is 0",
        "the chunks then decide the BatchNorm groups, so they cannot depend on memory",
    )
    _rule(
        "train.grad_chunks",
        t.grad_chunks,
        t.bn_groups == 0 or t.grad_chunks == 0 or t.bn_groups % t.grad_chunks == 0,
        "0 or a divisor of train.bn_groups",
        "each chunk holds whole BatchNorm groups",
    )
    _positive(t, "train", "max_steps", "ckpt_every", "seed", or_zero=True)
    _rule(
        "train.checkpoint_activations",
        t.checkpoint_activations,
        not (t.checkpoint_activations and t.grad_chunks != 1),
        "false unless train.grad_chunks is 1 (pick one)",
    )

    _positive(
        e, "eval", "patches", "batch_size", "probe_epochs", "probe_lr", "probe_batch_size", "knn_k", "knn_temperature"
    )
    _rule("eval.probe_momentum", e.probe_momentum, 0 <= e.probe_momentum < 1, "in [0, 1)")
    _positive(e, "eval", "probe_weight_decay", or_zero=True)
    every = "a number of steps such as 250 or of epochs such as 0.5ep (0: never)"
    _rule("eval.every", e.every, EVAL_EVERY.fullmatch(e.every.strip()) is not None, every)
    _rule("eval.stop_at", e.stop_at, 0 <= e.stop_at <= 1, "a linear top-1 in [0, 1] (0: train to the end)")
    _rule("eval.stop_at", e.stop_at, not e.stop_at or e.every_steps(1), "0 unless eval.every is set", "it stops there")


def check_backend(backend: str, streamed: bool, source: str = "imagefolder") -> None:
    """data.backend, data.streamed and data.source fit together (check_config and runtime.choose_backend)."""
    check_choice("data.backend", backend, choices(DataConfig, "backend"))
    if streamed and source not in ("imagefolder", "tinyimagenet"):
        raise ConfigError(
            f"data.streamed=true reads image files, but data.source={source}; "
            "use data.source=imagefolder or tinyimagenet with a folder, or data.streamed=false"
        )
    if streamed and backend == "torch":
        raise ConfigError(
            "data.backend=torch needs the images resident in memory, but data.streamed=true; "
            "use data.backend=auto, dali or pillow, or data.streamed=false"
        )
    if not streamed and backend in ("dali", "pillow"):
        raise ConfigError(
            f"data.backend={backend} reads image files: use data.streamed=true with an ImageFolder of JPEGs "
            "(e.g. the CIFAR-10 JPEG copy, extracted), or data.backend=torch"
        )


def check_output_path(path: str | Path, flag: str, is_file: bool = False) -> None:
    """The output folder `path` (or the folder of the output file `path`) exists or can be made: its
    nearest existing ancestor is a writable folder, not a file. Checked before any measuring, so a
    typo in an output path costs nothing."""
    path = Path(path).expanduser()
    if is_file and path.is_dir():
        raise ConfigError(f"{flag} {path} is a folder; give a file name such as {path / 'result.json'}")
    for parent in (path.parent, *path.parent.parents) if is_file else (path, *path.parents):
        if parent.exists():
            if not parent.is_dir():
                what = f"{path} is a file" if parent == path else f"{path} lies under {parent}, which is a file"
                raise ConfigError(f"{flag} {what}, not a folder; choose another {flag}")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ConfigError(f"{flag} {path}: {parent} is not writable; choose another {flag}")
            return


def _fits_training_split(key: str, batch: int, train_images: int, why: str = "") -> None:
    if batch > train_images:
        raise ConfigError(f"{key}={batch} exceeds the {train_images} training images{why}; set {key} <= {train_images}")


def check_data(cfg: Config, train_images: int) -> None:
    """The batch size against the loaded training split (before any model is built)."""
    _fits_training_split("train.batch_size", cfg.train.batch_size, train_images)


def check_probe(cfg: Config, train_images: int) -> None:
    """The linear probe would never take a step (it drops the last partial batch)."""
    why = ", so the probe would never train"
    _fits_training_split("eval.probe_batch_size", cfg.eval.probe_batch_size, train_images, why)
