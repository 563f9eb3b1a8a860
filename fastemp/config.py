"""Run configuration: dataclasses loaded from YAML, overridden by `dotted.key=value` strings.

Every key is checked: a misspelt or unknown key is an error that names it and suggests the
closest valid one, so a typo can never silently fall back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from .errors import UserError


class ConfigError(UserError, ValueError):
    """A config file or override that does not fit the schema."""


@dataclass
class DataConfig:
    source: str = "synthetic"  # synthetic | cifar10 | cifar100 | imagefolder
    root: str = "~/.cache/fastemp/data"  # where cifar archives live (downloaded when missing)
    path: str = ""  # imagefolder: a directory or a .tar/.tar.gz with train/<class>/* and test/<class>/*
    download: bool = True
    image_size: int = 32  # imagefolder images are resized to this square size once, at load
    synthetic_train: int = 5000
    synthetic_test: int = 1000
    synthetic_seed: int = 0
    backend: str = "auto"  # patch backend: auto (= torch, the faster one measured on GPU) | torch | dali
    patch_compile: str = "auto"  # torch backend: the recipe through torch.compile: auto (on CUDA) | on | off


@dataclass
class AugmentConfig:
    """Per-patch augmentation; defaults are the official EMP-SSL CIFAR recipe."""

    crop_size: int = 32
    crop_scale: tuple[float, float] = (0.25, 0.25)
    crop_ratio: tuple[float, float] = (1.0, 1.0)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.2
    grayscale_p: float = 0.2
    blur_p: float = 0.1
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.1
    solarize_threshold: int = 128  # on the 0..255 scale: pixels >= threshold are inverted
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)


@dataclass
class ModelConfig:
    width: int = 64  # ResNet-18 base width (64 = the standard network)
    hidden_dim: int = 4096  # projector hidden size; h (the evaluation feature) has this size
    z_dim: int = 1024
    compile: str = "auto"  # auto (default mode on CUDA, off on CPU) | none | default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    channels_last: bool = True  # NHWC activations: cuDNN's and oneDNN's fast layout (2x fwd+bwd on a 2-core CPU)
    sync_bn: bool = True  # under torchrun: BatchNorm statistics over the global batch (off: each rank's shard)
    cudnn_benchmark: bool = False  # CUDA: cuDNN autotunes each convolution's algorithm (fastemp tune measures it)


@dataclass
class LossConfig:
    eps: float = 0.2
    invariance_weight: float = 200.0
    tcr_weight: float = 1.0
    fused: str = "auto"  # auto (Triton kernel on CUDA, torch on CPU) | on (CPU needs TRITON_INTERPRET=1) | off


@dataclass
class OptimConfig:
    lr: float = 0.3
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    lars_eta: float = 0.005
    lars_clip: bool = True
    warmup_steps: int = 0  # the official code has none
    min_lr: float = 0.0


@dataclass
class TrainConfig:
    n_patches: int = 20
    batch_size: int = 100
    epochs: int = 1
    max_steps: int = 0  # 0 = epochs * steps_per_epoch; the cosine schedule spans the whole run
    grad_chunks: int = 1  # >1: two-pass gradient cache over this many chunks of patch groups; 0: from free memory
    bn_groups: int = 0  # BatchNorm statistics per group of n/bn_groups patch groups (ghost BN); 0: per grad chunk
    checkpoint_activations: bool = False  # recompute each ResNet stage in backward (full-batch BatchNorm)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    log_every: int = 10
    ckpt_every: int = 0  # 0 = only at the end


@dataclass
class EvalConfig:
    mode: str = "patches"  # patches (mean of h over `patches` augmented patches) | plain (the whole image once)
    patches: int = 128
    batch_size: int = 100  # images per feature-extraction batch
    probe_epochs: int = 100
    probe_lr: float = 0.03
    probe_momentum: float = 0.9
    probe_weight_decay: float = 5e-5
    probe_batch_size: int = 100
    knn: bool = False
    knn_k: int = 20
    knn_temperature: float = 0.07
    random_init: bool = False  # also probe a randomly initialised encoder, for scale
    at_end: bool = True  # evaluate when training finishes


@dataclass
class Config:
    name: str = "run"
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _suggest(key: str, valid: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""


class _Raw(str):
    """An override's text, parsed only once the declared type of its key is known."""


def _read_yaml(text: str, where: str):
    """YAML with every scalar kept as text (BaseLoader): the schema, not YAML 1.1's guesses, decides
    types, so `1e-3` is a number, `on` stays the string 'on' and `2024` can be a name."""
    try:
        return yaml.load(text, Loader=yaml.BaseLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}: YAML syntax error{at} ({problem}); fix the YAML") from None


BOOLEAN_WORDS = {"true": True, "on": True, "yes": True, "1": True, "false": False, "off": False, "no": False, "0": False}


def _coerce(value, tp, where: str):
    """Convert a value (text from YAML or an override, or already typed) to the annotated type."""
    if isinstance(value, _Raw):
        if tp is str:
            return str(value)
        value = _read_yaml(value, where)
    origin = typing.get_origin(tp)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} numbers, got {value!r}; "
                              f"write it as [{', '.join('x' for _ in args)}]")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in BOOLEAN_WORDS:
            return BOOLEAN_WORDS[value.strip().lower()]
        raise ConfigError(f"{where}: expected true/false, got {value!r}; write true or false")
    if tp is int:
        if isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                try:
                    value = float(value.strip())
                except ValueError:
                    pass
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}; write a whole number such as 8")
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}; write a number such as 0.3 or 1e-3")
        if not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}; write a finite number")
        return float(value)
    if tp is str:
        if isinstance(value, (dict, list, tuple)) or value is None:
            raise ConfigError(f"{where}: expected a string, got {value!r}; write plain text")
        return str(value)
    raise TypeError(f"unsupported config type {tp}")  # a schema bug, not a user error


def _apply(obj, values: dict, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    for key, value in values.items():
        where = f"{prefix}{key}"
        if key not in hints:
            hint = _suggest(key, hints) or f"; valid keys here: {', '.join(hints)}"
            raise ConfigError(f"unknown config key '{where}'{hint}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if isinstance(value, _Raw):
                value = _read_yaml(value, where)
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: expected a section (mapping), got {value!r}; set its keys, e.g. {where}.<key>=value")
            _apply(current, value, where + ".")
        else:
            setattr(obj, key, _coerce(value, hints[key], where))


def _parse_override(item: str) -> tuple[list[str], object]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form section.key=value; write e.g. train.epochs=2")
    key, raw = item.split("=", 1)
    return key.strip().split("."), _Raw(raw.strip())


def apply_overrides(cfg: Config, overrides: typing.Sequence[str]) -> Config:
    for item in overrides:
        path, value = _parse_override(item)
        nested: dict = value  # type: ignore[assignment]
        for part in reversed(path):
            nested = {part: nested}
        _apply(cfg, nested)
    return cfg


def to_dict(cfg: Config) -> dict:
    def plain(v):
        return list(v) if isinstance(v, tuple) else v

    return {
        f.name: (
            {k: plain(v) for k, v in dataclasses.asdict(getattr(cfg, f.name)).items()}
            if dataclasses.is_dataclass(getattr(cfg, f.name))
            else getattr(cfg, f.name)
        )
        for f in dataclasses.fields(cfg)
    }


def builtin_config_path(name: str) -> Path:
    """Path of a config shipped with the package (configs/NAME.yaml)."""
    path = Path(str(resources.files("fastemp.configs").joinpath(f"{name}.yaml")))
    if not path.is_file():
        names = sorted(p.name[:-5] for p in Path(str(resources.files("fastemp.configs"))).glob("*.yaml"))
        raise ConfigError(f"no config file or built-in config '{name}'{_suggest(name, names) or '; use a YAML path or a built-in'} (built-ins: {', '.join(names)})")
    return path


def resolve_config_path(spec: str) -> Path:
    """A path to a YAML file, or the name of a built-in config (e.g. 'quickstart')."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    if path.suffix in (".yaml", ".yml") and "/" in spec:
        raise ConfigError(f"config file not found: {spec}; check the path or use a built-in name such as quickstart")
    return builtin_config_path(path.stem)


def load_config(spec: str | Path = "quickstart", overrides: typing.Sequence[str] = ()) -> Config:
    """Load a YAML config (a path or a built-in name) and apply `section.key=value` overrides."""
    path = resolve_config_path(str(spec))
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read the config file {path} ({err}); check the path") from None
    values = _read_yaml(text, str(path))
    if values is None or values == "":
        raise ConfigError(f"config file {path} is empty; write the sections to change "
                          "(e.g. `train:` with `epochs: 2`) or use a built-in such as --config quickstart")
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections; write e.g. `train:` then indented keys")
    values.setdefault("name", path.stem)
    cfg = Config()
    _apply(cfg, values)
    return apply_overrides(cfg, overrides)


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
