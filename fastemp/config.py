"""Run configuration: dataclasses loaded from YAML, overridden by `dotted.key=value` strings. An unknown key is
an error that suggests the closest valid one; fastemp.config_text turns text into the declared types.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from .config_text import MAX_CONFIG_BYTES, QUOTE_CHARS, Raw, coerce, read_yaml, shown
from .errors import ConfigError


def one_of(*choices: str, protocol: bool = False) -> typing.Any:
    """A string field allowed only the given values, the first being its default: the one place they are written."""
    return field(default=choices[0], metadata={"choices": choices, "protocol": protocol})


def checked(default, rule: tuple, protocol: bool = False) -> typing.Any:
    """A field whose value must pass `rule` (fastemp.validate.check_config); protocol: a key of the evaluation
    protocol (EVAL_PROTOCOLS), whose default is the official code's value."""
    return field(default=default, metadata={"rule": rule, "protocol": protocol})


# What a value must be: (the rule in words, its test[, why]), declared with the field, checked by check_config.
POSITIVE = ("> 0", lambda v: v > 0)
NOT_NEGATIVE = (">= 0", lambda v: v >= 0)
PROBABILITY = ("a probability in [0, 1]", lambda v: 0 <= v <= 1)
MOMENTUM = ("in [0, 1)", lambda v: 0 <= v < 1)
INTERVAL = ("[lo, hi] with 0 < lo <= hi", lambda v: 0 < v[0] <= v[1])


def choices(section: type, name: str) -> tuple[str, ...]:
    return next(f.metadata["choices"] for f in dataclasses.fields(section) if f.name == name)


def check_choice(key: str, value, allowed: typing.Sequence[str]) -> None:
    if value not in allowed:
        hint = _suggest(str(value), allowed) or f"; set {key} to one of them"
        raise ConfigError(f"{key} must be one of {', '.join(allowed)}, got {shown(value)}{hint}")


@dataclass
class DataConfig:
    source: str = one_of("synthetic", "cifar10", "cifar100", "imagefolder", "tinyimagenet")
    root: str = "~/.cache/fastemp/data"  # where cifar archives live (downloaded when missing), and the caches
    path: str = ""  # imagefolder: a folder or .tar[.gz] (train/, test/ or val/); tinyimagenet: tiny-imagenet-200/
    train_path: str = ""  # a folder of unlabelled images training reads instead of the train split (docs/data.md)
    download: bool = True
    image_size: int = checked(32, POSITIVE)  # imagefolder images are resized to this square size once, at load
    synthetic_train: int = checked(5000, POSITIVE)
    synthetic_test: int = checked(1000, POSITIVE)
    synthetic_seed: int = 0
    backend: str = one_of("auto", "torch", "dali", "pillow")  # patch backend (docs/data-backends.md: what auto picks)
    streamed: bool = False  # imagefolder: read the full-size files every epoch (ImageNet) instead of decoding once
    workers: int = checked(8, NOT_NEGATIVE)  # streamed, pillow backend: decoding processes (0: in this process)
    bad_files: str = one_of("stop", "skip")  # streamed: a file failing after listing ends the run, or is replaced
    patch_compile: str = one_of("auto", "on", "off")  # torch backend: the recipe through torch.compile (auto: on CUDA)


@dataclass
class AugmentConfig:
    """Per-patch augmentation; defaults are the official EMP-SSL CIFAR recipe."""

    crop_size: int = checked(32, POSITIVE)  # patch side S (224 for the official ImageNet-100 recipe)
    crop_scale: tuple[float, float] = checked(
        (0.25, 0.25), ("[lo, hi] with 1e-06 <= lo <= hi <= 1.0", lambda v: 1e-6 <= v[0] <= v[1] <= 1)
    )
    crop_ratio: tuple[float, float] = checked((1.0, 1.0), INTERVAL)
    flip_p: float = checked(0.5, PROBABILITY)
    jitter_p: float = checked(0.8, PROBABILITY)
    brightness: float = checked(0.4, NOT_NEGATIVE)
    contrast: float = checked(0.4, NOT_NEGATIVE)
    saturation: float = checked(0.4, NOT_NEGATIVE)
    hue: float = checked(0.2, ("in [0, 0.5]", lambda v: 0 <= v <= 0.5))
    grayscale_p: float = checked(0.2, PROBABILITY)
    blur_p: float = checked(0.1, PROBABILITY)
    blur_sigma: tuple[float, float] = checked((0.1, 2.0), INTERVAL)
    solarize_p: float = checked(0.1, PROBABILITY)
    # on the 0..255 scale: pixels >= threshold are inverted
    solarize_threshold: int = checked(128, ("in 0..256", lambda v: 0 <= v <= 256))
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = checked((0.5, 0.5, 0.5), ("three numbers > 0", lambda v: min(v) > 0))
    interpolation: str = one_of("bilinear", "bicubic")  # crop resize of the streamed backends (resident: bilinear)


@dataclass
class ModelConfig:
    width: int = checked(64, POSITIVE)  # ResNet-18 base width (64 = the standard network)
    stem: str = one_of("cifar", "imagenet")  # cifar: 3x3 stride-1 conv, no maxpool; imagenet: torchvision's
    hidden_dim: int = checked(4096, POSITIVE)  # projector hidden size; h (the evaluation feature) has this size
    z_dim: int = checked(1024, POSITIVE)
    # auto: default mode on CUDA, none on CPU
    compile: str = one_of("auto", "none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
    precision: str = one_of("auto", "fp32", "bf16")  # auto: bf16 on CUDA, fp32 on CPU
    channels_last: bool = True  # NHWC activations: cuDNN's and oneDNN's fast layout (2x fwd+bwd on a 2-core CPU)
    sync_bn: bool = True  # under torchrun: BatchNorm statistics over the global batch (off: each rank's shard)
    cudnn_benchmark: bool = False  # CUDA: cuDNN autotunes each convolution's algorithm (fastemp tune measures it)
    projector_init: str = ""  # an encoder export (fastemp export RUN --part encoder): its projection layers start here
    freeze_projector: bool = False  # the projection layers (h -> z) take no gradient (kachayev/ssl-in-one-epoch)


@dataclass
class LossConfig:
    eps: float = checked(0.2, POSITIVE)
    invariance_weight: float = checked(200.0, NOT_NEGATIVE)
    tcr_weight: float = checked(1.0, NOT_NEGATIVE)
    uniformity: str = one_of("tcr", "vonmises")  # vonmises: log mean exp(-t |zbar_a - zbar_b|^2) over image pairs
    vonmises_weight: float = checked(1.0, NOT_NEGATIVE)
    vonmises_t: float = checked(2.0, POSITIVE)
    fused: str = one_of("auto", "on", "off")  # auto: Triton kernel on CUDA; on: the CPU needs TRITON_INTERPRET=1


@dataclass
class OptimConfig:
    lr: float = checked(0.3, POSITIVE)
    momentum: float = checked(0.9, MOMENTUM)
    nesterov: bool = True
    weight_decay: float = checked(1e-4, NOT_NEGATIVE)
    lars_eta: float = checked(0.005, POSITIVE)
    lars_clip: bool = True
    warmup_steps: int = checked(0, NOT_NEGATIVE)  # the official code has none
    min_lr: float = 0.0
    fused_update: str = one_of("auto", "on", "off")  # LARS + SGD as one compiled pass per tensor (auto: when compiled)


@dataclass
class TrainConfig:
    # one patch per image makes the invariance term a constant (every patch is its image's mean)
    n_patches: int = checked(20, (">= 2", lambda v: v >= 2, "the invariance term needs two patches per image"))
    batch_size: int = checked(100, POSITIVE)
    epochs: int = checked(1, POSITIVE)
    max_steps: int = checked(0, NOT_NEGATIVE)  # 0 = epochs * steps_per_epoch; the cosine schedule spans the run
    grad_chunks: int = checked(1, NOT_NEGATIVE)  # >1: gradient cache over this many chunks; 0: from free memory
    bn_groups: int = 0  # BatchNorm statistics per group of n/bn_groups patch groups (ghost BN); 0: per grad chunk
    checkpoint_activations: bool = False  # recompute each ResNet stage in backward (full-batch BatchNorm)
    seed: int = checked(0, NOT_NEGATIVE)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    log_every: int = checked(10, POSITIVE)
    ckpt_every: int = checked(0, NOT_NEGATIVE)  # 0 = only at the end
    loggers: str = ""  # besides metrics.jsonl, comma-separated: tensorboard, csv, wandb (fastemp/loggers.py)


EVAL_EVERY = re.compile(r"(\d+)|(\d*\.?\d+)ep")  # eval.every: steps, or a fraction of an epoch
EVERY = (
    "a number of steps such as 250 or of epochs such as 0.5ep (0: never)",
    lambda v: EVAL_EVERY.fullmatch(v.strip()),
)


@dataclass
class EvalConfig:
    """How a trained encoder is scored. `eval.protocol=NAME` is a preset of every protocol key (EVAL_PROTOCOLS);
    `protocol` is computed from the values, never stored."""

    # patches: mean of h over `patches` augmented patches; plain: the whole image once
    mode: str = one_of("patches", "plain", protocol=True)
    patches: int = checked(128, POSITIVE, protocol=True)
    batch_size: int = checked(100, POSITIVE)  # images per feature-extraction batch
    probe_epochs: int = checked(100, POSITIVE, protocol=True)
    probe_lr: float = checked(0.03, POSITIVE, protocol=True)
    probe_momentum: float = checked(0.9, MOMENTUM, protocol=True)
    probe_weight_decay: float = checked(5e-5, NOT_NEGATIVE, protocol=True)
    probe_batch_size: int = checked(100, POSITIVE, protocol=True)
    knn: bool = False
    knn_k: int = checked(20, POSITIVE, protocol=True)
    knn_temperature: float = checked(0.07, POSITIVE, protocol=True)
    random_init: bool = False  # also probe a randomly initialised encoder, for scale
    at_end: bool = True  # evaluate when training finishes
    # features: h; proj: the unit projection z, pooled; backbone: the backbone's pooled output
    embedding: str = one_of("features", "proj", "backbone", protocol=True)
    # also evaluate during training, every N steps (250) or epoch fraction (0.5ep); 0: never
    every: str = checked("0", EVERY)
    # with `every`: training ends at the first evaluation whose linear_top1 reaches this
    stop_at: float = checked(0.0, ("a linear top-1 in [0, 1] (0: train to the end)", lambda v: 0 <= v <= 1))

    @property
    def protocol(self) -> str:
        """The protocol whose values these are (official, cheap), or custom."""
        values = dataclasses.asdict(self).items()
        return next((name for name, preset in EVAL_PROTOCOLS.items() if preset.items() <= values), "custom")

    @property
    def scheduled(self) -> bool:
        """Whether the run evaluates: at the end, or every eval.every steps."""
        return self.at_end or self.every_steps(1) > 0

    def every_steps(self, steps_per_epoch: int) -> int:
        """`every` in steps: N, or a fraction F of an epoch written Fep (at least one step); 0: never."""
        steps, epochs = EVAL_EVERY.fullmatch(self.every.strip()).groups()
        return int(steps) if steps else (max(1, round(float(epochs) * steps_per_epoch)) if float(epochs) else 0)


# Evaluation protocols by name. "official" (the protocol keys' defaults) is the official EMP-SSL evaluation
# (evaluate.py + func.py of tsb0601/EMP-SSL; docs/evaluation.md cites the line of every value); "cheap" keeps
# everything but the two costs (patches per image, probe epochs) for quick curves. Any other is "custom".
_OFFICIAL_EVAL = {f.name: f.default for f in dataclasses.fields(EvalConfig) if f.metadata.get("protocol")}
EVAL_PROTOCOLS: dict[str, dict] = {
    "official": _OFFICIAL_EVAL,
    "cheap": {**_OFFICIAL_EVAL, "patches": 16, "probe_epochs": 20},
}


@dataclass
class Config:
    name: str = checked(
        "run", ("a non-empty folder name without '/'", lambda v: v.strip() and "/" not in v and v not in (".", ".."))
    )
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


def _apply(obj, values: dict, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    if isinstance(obj, EvalConfig) and "protocol" in values:
        # eval.protocol=NAME first (keys beside it change it): every protocol key takes NAME's value; custom, as
        # config files of earlier versions wrote it, keeps the values as they are
        name, values = str(values["protocol"]), {k: v for k, v in values.items() if k != "protocol"}
        check_choice(f"{prefix}protocol", name, (*EVAL_PROTOCOLS, "custom"))
        vars(obj).update(EVAL_PROTOCOLS.get(name, {}))
    for key, value in values.items():
        where = f"{prefix}{key}"[:QUOTE_CHARS]
        if key not in hints:
            hint = _suggest(key, hints) or f"; valid keys here: {', '.join(hints)}"
            raise ConfigError(f"unknown config key '{where}'{hint}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if isinstance(value, Raw):
                value = read_yaml(value, where)
            if not isinstance(value, dict):
                raise ConfigError(
                    f"{where}: expected a section (mapping), got {shown(value)}; set its keys, e.g. {where}.<key>=value"
                )
            _apply(current, value, where + ".")
        else:
            setattr(obj, key, coerce(value, hints[key], where))


def apply_overrides(cfg: Config, overrides: typing.Sequence[str]) -> Config:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {shown(item)} is not of the form section.key=value; write e.g. train.epochs=2")
        key, raw = item.split("=", 1)
        nested: dict = Raw(raw.strip())  # type: ignore[assignment]
        for part in reversed(key.strip().split(".")):
            nested = {part: nested}
        _apply(cfg, nested)
    return cfg


def to_dict(cfg: Config) -> dict:
    """Sections as dicts of plain values (tuples as lists), as YAML and JSON write them."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def flat_dict(cfg_dict: dict) -> dict:
    """A `to_dict` result as one level of `section.key` entries (top-level values stay as they are)."""
    out = {}
    for key, value in cfg_dict.items():
        out.update({f"{key}.{k}": v for k, v in value.items()} if isinstance(value, dict) else {key: value})
    return out


def _builtin_dir() -> Path:
    return Path(str(resources.files("fastemp.configs")))


def resolve_config_path(spec: str) -> Path:
    """The YAML file `--config spec` names. A spec with a folder part or a .yaml/.yml suffix is a path, and only
    ever that file (or, without a suffix, SPEC.yaml / SPEC.yml): never a built-in. A bare NAME is the file
    NAME[.yaml|.yml] here or the built-in NAME; both at once is an error that lists both."""
    path = Path(spec).expanduser()
    yaml_suffix = path.suffix in (".yaml", ".yml")
    is_path = "/" in spec or os.sep in spec or yaml_suffix
    suffixed = [] if yaml_suffix else [path.with_name(path.name + s) for s in (".yaml", ".yml")]
    files = [path] if path.is_file() else [p for p in suffixed if p.is_file()]
    builtin = _builtin_dir() / f"{path.name}.yaml"
    if not is_path and builtin.is_file() and files and not builtin.samefile(files[0]):
        raise ConfigError(
            f"--config {spec} names both the file {files[0]} and the built-in config {spec} ({builtin}); "
            f"write ./{files[0].name} for the file, or the built-in's path"
        )
    if len(files) > 1:
        raise ConfigError(f"--config {spec} names both {files[0]} and {files[1]}; write the one you mean")
    if files:
        return files[0]
    if is_path:
        stem = path.stem if yaml_suffix else path.name
        hint = f", or use the built-in with --config {stem}" if (_builtin_dir() / f"{stem}.yaml").is_file() else ""
        raise ConfigError(f"config file not found: {spec}; check the path{hint}")
    if not builtin.is_file():
        names = sorted(p.name[:-5] for p in _builtin_dir().glob("*.yaml"))
        hint = _suggest(spec, names) or "; use a YAML path or a built-in"
        raise ConfigError(f"no config file or built-in config '{spec}'{hint} (built-ins: {', '.join(names)})")
    return builtin


def load_config(spec: str | Path = "quickstart", overrides: typing.Sequence[str] = ()) -> Config:
    """Load a YAML config (a path or a built-in name) and apply `section.key=value` overrides."""
    path = resolve_config_path(str(spec))
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:  # before reading: a config is a few KiB, never a huge file
            raise ConfigError(
                f"config file {path} is {path.stat().st_size:,} bytes, over the limit of {MAX_CONFIG_BYTES:,} for "
                "a config (they hold about 100 values); check that --config names a config"
            )
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read the config file {path} ({err}); check the path") from None
    values = read_yaml(text, str(path))
    if values is None or values == "":
        raise ConfigError(
            f"config file {path} is empty; write the sections to change "
            "(e.g. `train:` with `epochs: 2`) or use a built-in such as --config quickstart"
        )
    if not isinstance(values, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of sections; write e.g. `train:` then indented keys"
        )
    values.setdefault("name", path.stem)
    return config_from_dict(values, overrides)


def config_from_dict(values: dict, overrides: typing.Sequence[str] = ()) -> Config:
    """A Config from sections of values (a `to_dict` result: the config a checkpoint or an export carries)."""
    cfg = Config()
    _apply(cfg, values)
    return apply_overrides(cfg, overrides)


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
