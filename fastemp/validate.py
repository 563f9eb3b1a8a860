"""Start-up validation: every user mistake found before any work, as one line saying how to fix it (the order
of all start-up checks is fastemp.startup's; what the machine must have: fastemp.runtime.resolve)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from .config import Config, ConfigError, check_choice, shown


def _rule(key: str, value, ok: bool, rule: str, why: str = "") -> None:
    if not ok:
        why, value = f" ({why})" if why else "", list(value) if isinstance(value, tuple) else value  # as YAML writes it
        raise ConfigError(f"{key} must be {rule}{why}, got {shown(value)}; set {key} to a value that is {rule}")


def _check_fields(obj, prefix: str = "") -> None:
    for f in dataclasses.fields(obj):
        key, value = prefix + f.name, getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_fields(value, key + ".")
        if "choices" in f.metadata:
            check_choice(key, value, f.metadata["choices"])
        if "rule" in f.metadata:
            rule, test, *why = f.metadata["rule"]
            _rule(key, value, bool(test(value)), rule, *why)


def check_config(cfg: Config) -> None:
    """Every value of cfg passes the rule its field declares (fastemp.config.checked) and is one of its choices
    (one_of); then the rules between values."""
    _check_fields(cfg)
    d, m, lo, o, t, e = cfg.data, cfg.model, cfg.loss, cfg.optim, cfg.train, cfg.eval
    check_backend(d.backend, d.streamed, d.source)
    if m.projector_init:
        from .weights import read_projector

        read_projector(m.projector_init, m)
    _rule(
        "train.batch_size",
        t.batch_size,
        lo.uniformity != "vonmises" or t.batch_size >= 2,
        ">= 2 under loss.uniformity=vonmises",
        "it averages over pairs of images",
    )
    _rule("optim.min_lr", o.min_lr, 0 <= o.min_lr <= o.lr, "in [0, optim.lr]")
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
    _rule(
        "train.checkpoint_activations",
        t.checkpoint_activations,
        not (t.checkpoint_activations and t.grad_chunks != 1),
        "false unless train.grad_chunks is 1 (pick one)",
    )
    _rule("eval.stop_at", e.stop_at, not e.stop_at or e.every_steps(1), "0 unless eval.every is set", "it stops there")


def check_backend(backend: str, streamed: bool, source: str = "imagefolder") -> None:
    """data.backend, data.streamed and data.source fit together (each one of its choices: check_config)."""
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


def check_data(cfg: Config, train_images: int, probe: bool = False) -> None:
    """train.batch_size (before any model is built), or with probe eval.probe_batch_size (the probe drops its last
    partial batch), against the loaded training split."""
    key, batch = (
        ("eval.probe_batch_size", cfg.eval.probe_batch_size) if probe else ("train.batch_size", cfg.train.batch_size)
    )
    if batch > train_images:
        why = ", so the probe would never train" if probe else ""
        raise ConfigError(f"{key}={batch} exceeds the {train_images} training images{why}; set {key} <= {train_images}")
