"""Run configuration: dataclasses loaded from YAML, overridden by `dotted.key=value` strings.

Every key is checked: a misspelt or unknown key is an error that names it and suggests the
closest valid one, so a typo can never silently fall back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from .errors import UserError


class ConfigError(UserError, ValueError):
    """A config file or override that does not fit the schema."""


def one_of(*choices: str) -> typing.Any:
    """A string field allowed only the given values, the first being its default. The schema is the one
    place the choices are written: validation (fastemp.validate) and every reader take them from here."""
    return field(default=choices[0], metadata={"choices": choices})


def choices(section: type, name: str) -> tuple[str, ...]:
    """The allowed values of an enumerated field, e.g. choices(DataConfig, "source")."""
    return next(f.metadata["choices"] for f in dataclasses.fields(section) if f.name == name)


@dataclass
class DataConfig:
    source: str = one_of("synthetic", "cifar10", "cifar100", "imagefolder", "tinyimagenet")
    root: str = "~/.cache/fastemp/data"  # where cifar archives live (downloaded when missing), and the caches
    path: str = ""  # imagefolder: a folder or .tar[.gz] (train/, test/ or val/); tinyimagenet: tiny-imagenet-200/
    train_path: str = ""  # a folder of unlabelled images training reads instead of the train split (docs/data.md)
    download: bool = True
    image_size: int = 32  # imagefolder images are resized to this square size once, at load
    synthetic_train: int = 5000
    synthetic_test: int = 1000
    synthetic_seed: int = 0
    backend: str = one_of("auto", "torch", "dali", "pillow")  # patch backend (docs/data-backends.md: what auto picks)
    streamed: bool = False  # imagefolder: read the full-size files every epoch (ImageNet) instead of decoding once
    workers: int = 8  # streamed data on the pillow backend: decoding processes (0 = in the training process)
    patch_compile: str = one_of("auto", "on", "off")  # torch backend: the recipe through torch.compile (auto: on CUDA)


@dataclass
class AugmentConfig:
    """Per-patch augmentation; defaults are the official EMP-SSL CIFAR recipe."""

    crop_size: int = 32  # patch side S (224 for the official ImageNet-100 recipe)
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
    interpolation: str = one_of("bilinear", "bicubic")  # crop resize of the streamed backends (resident: bilinear)


@dataclass
class ModelConfig:
    width: int = 64  # ResNet-18 base width (64 = the standard network)
    stem: str = one_of(
        "cifar", "imagenet"
    )  # cifar: 3x3 stride-1 conv, no maxpool; imagenet: 7x7 stride-2 conv + maxpool
    hidden_dim: int = 4096  # projector hidden size; h (the evaluation feature) has this size
    z_dim: int = 1024
    compile: str = one_of(
        "auto", "none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"
    )  # auto: default mode on CUDA, none on CPU
    precision: str = one_of("auto", "fp32", "bf16")  # auto: bf16 on CUDA, fp32 on CPU
    channels_last: bool = True  # NHWC activations: cuDNN's and oneDNN's fast layout (2x fwd+bwd on a 2-core CPU)
    sync_bn: bool = True  # under torchrun: BatchNorm statistics over the global batch (off: each rank's shard)
    cudnn_benchmark: bool = False  # CUDA: cuDNN autotunes each convolution's algorithm (fastemp tune measures it)


@dataclass
class LossConfig:
    eps: float = 0.2
    invariance_weight: float = 200.0
    tcr_weight: float = 1.0
    fused: str = one_of(
        "auto", "on", "off"
    )  # auto: Triton kernel on CUDA, torch on CPU; on: CPU needs TRITON_INTERPRET=1


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


# Evaluation protocols by name (eval.protocol). "official" is the official EMP-SSL evaluation (evaluate.py +
# func.py of tsb0601/EMP-SSL; docs/evaluation.md cites the line of every value); "cheap" keeps everything but
# the two costs (patches per image, probe epochs) for quick curves. Any other combination is "custom".
_OFFICIAL_EVAL = {
    "mode": "patches",
    "patches": 128,
    "probe_epochs": 100,
    "probe_lr": 0.03,
    "probe_momentum": 0.9,
    "probe_weight_decay": 5e-5,
    "probe_batch_size": 100,
    "knn_k": 20,
    "knn_temperature": 0.07,
}
EVAL_PROTOCOLS: dict[str, dict] = {
    "official": _OFFICIAL_EVAL,
    "cheap": {**_OFFICIAL_EVAL, "patches": 16, "probe_epochs": 20},
}
EVAL_PROTOCOL_NAMES = (*EVAL_PROTOCOLS, "custom")


@dataclass
class EvalConfig:
    """How a trained encoder is scored. `protocol` names the values of the protocol keys (EVAL_PROTOCOLS):
    setting it to official or cheap sets all of them; changing one of them makes it the name that fits
    (custom when none does). batch_size, knn, random_init and at_end are not part of a protocol."""

    protocol: str = ""  # official | cheap | custom; "" = the name that fits the values (official by default)
    mode: str = one_of(
        "patches", "plain"
    )  # patches: mean of h over `patches` augmented patches; plain: the whole image once
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

    def __post_init__(self):
        fits = eval_protocol_name(self)
        if self.protocol in ("", "custom"):
            self.protocol = fits
        elif self.protocol in EVAL_PROTOCOLS and self.protocol != fits:
            raise ValueError(
                f"EvalConfig(protocol={self.protocol!r}) with the values of {fits!r}; "
                f"build it with eval_config({self.protocol!r}, ...)"
            )


def eval_protocol_name(cfg: EvalConfig) -> str:
    """The protocol whose values cfg has (official, cheap), or custom."""
    for name, values in EVAL_PROTOCOLS.items():
        if all(getattr(cfg, key) == value for key, value in values.items()):
            return name
    return "custom"


def eval_config(protocol: str = "official", base: EvalConfig | None = None, **changes) -> EvalConfig:
    """The EvalConfig of a named protocol (the other keys from `base`), with `changes` on top (relabelled
    when they leave the protocol)."""
    if protocol not in EVAL_PROTOCOLS:
        raise ConfigError(
            f"eval.protocol must be one of {', '.join(EVAL_PROTOCOLS)}, got {protocol!r}; use one of them"
        )
    kept = dataclasses.asdict(base) if base is not None else {}
    return EvalConfig(**{**kept, **EVAL_PROTOCOLS[protocol], **changes, "protocol": ""})


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


# A config holds ~100 values; an alias graph that expands past this many nodes is an alias bomb
# (10 lines of nested aliases expand to ~10^9 values), refused before anything walks or prints it.
MAX_EXPANDED_NODES = 100_000
QUOTE_CHARS = 80  # error messages quote at most this much of a value
INT_LIMIT = 2**63


def shown(value) -> str:
    """repr(value) cut to QUOTE_CHARS, without rendering more of a nested value than that."""
    import reprlib

    short = reprlib.Repr()
    short.maxlevel, short.maxlist, short.maxtuple, short.maxdict = 3, 8, 8, 8
    short.maxstring = short.maxother = QUOTE_CHARS
    text = short.repr(value)
    return text if len(text) <= QUOTE_CHARS else text[:QUOTE_CHARS] + "..."


class _YamlRefused(yaml.YAMLError):
    """A YAML document that parses but is refused: a repeated key, an alias bomb."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def _expanded_size(node, sizes: dict) -> int:
    """Nodes in the tree the alias graph `node` expands to (memoised per node: linear in the graph)."""
    if id(node) in sizes:
        if sizes[id(node)] is None:
            raise _YamlRefused("a YAML alias refers to itself (a recursive value); write the value out")
        return sizes[id(node)]
    sizes[id(node)] = None  # in progress: meeting it again is a cycle
    children = node.value if isinstance(node.value, list) else []
    total = 1
    for child in children:
        for item in child if isinstance(child, tuple) else (child,):
            total += _expanded_size(item, sizes)
            if total > MAX_EXPANDED_NODES:
                raise _YamlRefused(
                    f"YAML aliases expand to more than {MAX_EXPANDED_NODES:,} values (an alias bomb?); "
                    "write the config without nested aliases"
                )
    sizes[id(node)] = total
    return total


class _StrictLoader(yaml.BaseLoader):
    """BaseLoader that refuses repeated keys (at any level) and alias graphs that expand too far."""

    def construct_document(self, node):
        _expanded_size(node, {})
        return super().construct_document(node)

    def construct_mapping(self, node, deep=False):
        first_line: dict = {}
        for key_node, _ in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key is None:
                continue
            if key in first_line:
                raise _YamlRefused(
                    f"duplicate key '{shown(key)[1:-1]}' at line {key_node.start_mark.line + 1} "
                    f"(first at line {first_line[key]}); keep one of them"
                )
            first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def _read_yaml(text: str, where: str):
    """YAML with every scalar kept as text (BaseLoader): the schema, not YAML 1.1's guesses, decides
    types, so `1e-3` is a number, `on` stays the string 'on' and `2024` can be a name. A repeated key
    or an alias bomb is an error, not a silent last-wins or minutes of expansion."""
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except _YamlRefused as err:
        raise ConfigError(f"{where}: {err.message}") from None
    except RecursionError:
        raise ConfigError(f"{where}: YAML nested too deeply for a config; write sections one level deep") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}: YAML syntax error{at} ({problem[:QUOTE_CHARS]}); fix the YAML") from None


BOOLEAN_WORDS = {
    "true": True,
    "on": True,
    "yes": True,
    "1": True,
    "false": False,
    "off": False,
    "no": False,
    "0": False,
}


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
            raise ConfigError(
                f"{where}: expected a list of {len(args)} numbers, got {shown(value)}; "
                f"write it as [{', '.join('x' for _ in args)}]"
            )
        return tuple(_coerce(v, a, where) for v, a in zip(value, args))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in BOOLEAN_WORDS:
            return BOOLEAN_WORDS[value.strip().lower()]
        raise ConfigError(f"{where}: expected true/false, got {shown(value)}; write true or false")
    if tp is int:
        given = value
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
            raise ConfigError(f"{where}: expected an integer, got {shown(value)}; write a whole number such as 8")
        if not -INT_LIMIT < value < INT_LIMIT:  # torch and numpy take 64-bit integers
            raise ConfigError(
                f"{where}: {shown(given)} is out of range; write a whole number between -2^63 and 2^63 (e.g. 8)"
            )
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {shown(value)}; write a number such as 0.3 or 1e-3")
        if not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {shown(value)}; write a finite number")
        return float(value)
    if tp is str:
        if isinstance(value, (dict, list, tuple)) or value is None:
            raise ConfigError(f"{where}: expected a string, got {shown(value)}; write plain text")
        return str(value)
    raise TypeError(f"unsupported config type {tp}")  # a schema bug, not a user error


def _apply(obj, values: dict, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    if isinstance(obj, EvalConfig) and "protocol" in values:  # the preset first; keys beside it change it
        values = {"protocol": values["protocol"], **{k: v for k, v in values.items() if k != "protocol"}}
    for key, value in values.items():
        where = f"{prefix}{key}"[:QUOTE_CHARS]
        if key not in hints:
            hint = _suggest(key, hints) or f"; valid keys here: {', '.join(hints)}"
            raise ConfigError(f"unknown config key '{where}'{hint}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if isinstance(value, _Raw):
                value = _read_yaml(value, where)
            if not isinstance(value, dict):
                raise ConfigError(
                    f"{where}: expected a section (mapping), got {shown(value)}; set its keys, e.g. {where}.<key>=value"
                )
            _apply(current, value, where + ".")
        else:
            setattr(obj, key, _coerce(value, hints[key], where))
            if isinstance(obj, EvalConfig) and key == "protocol":
                _use_protocol(obj, where)
    if isinstance(obj, EvalConfig):
        obj.protocol = eval_protocol_name(obj)


def _use_protocol(cfg: EvalConfig, where: str) -> None:
    """eval.protocol=NAME: every protocol key takes NAME's value (custom keeps the values as they are)."""
    if cfg.protocol not in EVAL_PROTOCOL_NAMES:
        hint = _suggest(cfg.protocol, EVAL_PROTOCOL_NAMES) or f"; use one of {', '.join(EVAL_PROTOCOL_NAMES)}"
        raise ConfigError(f"{where} must be one of {', '.join(EVAL_PROTOCOL_NAMES)}, got {cfg.protocol!r}{hint}")
    for key, value in EVAL_PROTOCOLS.get(cfg.protocol, {}).items():
        setattr(cfg, key, value)


def _parse_override(item: str) -> tuple[list[str], object]:
    if "=" not in item:
        raise ConfigError(f"override {shown(item)} is not of the form section.key=value; write e.g. train.epochs=2")
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


def flat_dict(cfg_dict: dict) -> dict:
    """A `to_dict` result as one level of `section.key` entries (top-level values stay as they are)."""
    out = {}
    for key, value in cfg_dict.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def _builtin_dir() -> Path:
    return Path(str(resources.files("fastemp.configs")))


def builtin_config_path(name: str) -> Path:
    """Path of a config shipped with the package (configs/NAME.yaml)."""
    path = _builtin_dir() / f"{name}.yaml"
    if not path.is_file():
        names = sorted(p.name[:-5] for p in _builtin_dir().glob("*.yaml"))
        raise ConfigError(
            f"no config file or built-in config '{name}'{_suggest(name, names) or '; use a YAML path or a built-in'} (built-ins: {', '.join(names)})"
        )
    return path


def resolve_config_path(spec: str) -> Path:
    """The YAML file `--config spec` names. A spec with a folder part or a .yaml/.yml suffix is a path, and only
    ever that file (or, without a suffix, SPEC.yaml / SPEC.yml): never a built-in. A bare NAME is the file
    NAME[.yaml|.yml] here or the built-in NAME; both at once is an error that lists both."""
    path = Path(spec).expanduser()
    is_path = "/" in spec or os.sep in spec or path.suffix in (".yaml", ".yml")
    exact = [path] if path.is_file() else []
    suffixed = [] if path.suffix in (".yaml", ".yml") else [path.with_name(path.name + s) for s in (".yaml", ".yml")]
    files = exact or [p for p in suffixed if p.is_file()]
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
        stem = path.name[: -len(path.suffix)] if path.suffix in (".yaml", ".yml") else path.name
        hint = f", or use the built-in with --config {stem}" if (_builtin_dir() / f"{stem}.yaml").is_file() else ""
        raise ConfigError(f"config file not found: {spec}; check the path{hint}")
    return builtin_config_path(spec)


def load_config(spec: str | Path = "quickstart", overrides: typing.Sequence[str] = ()) -> Config:
    """Load a YAML config (a path or a built-in name) and apply `section.key=value` overrides."""
    path = resolve_config_path(str(spec))
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read the config file {path} ({err}); check the path") from None
    values = _read_yaml(text, str(path))
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
    cfg = Config()
    _apply(cfg, values)
    return apply_overrides(cfg, overrides)


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
