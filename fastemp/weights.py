"""Weights in and out of fastemp's EMPEncoder.

`fastemp export RUN [--part backbone|encoder]` writes a run's trained weights as one safetensors file, loadable
without fastemp (the backbone under torchvision's names; the parts and metadata are in docs/export.md).
`fastemp eval --weights FILE --format F` reads weights from a file in a named format, mapped strictly onto the
encoder:

    fastemp      a run's checkpoint.pt (verified by fastemp.checkpoint.read) or a `fastemp export` file
    official     the official main.py's save, nn.DataParallel(encoder).state_dict(): fastemp's names under `module.`
    torchvision  a torchvision resnet18 state_dict, fc dropped: a backbone alone

The architecture is read from the tensors; a misfit is one line naming the missing, unexpected, misshaped keys.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import checkpoint, runs
from .checkpoint import CheckpointError
from .config import Config, ConfigError, ModelConfig, apply_overrides, config_from_dict, load_config
from .errors import UserError, one_line
from .model import build_model
from .validate import check_output_path

EXPORT_FORMAT = "fastemp-export-1"
PARTS = ("backbone", "encoder")
TORCHVISION_WIDTH = 64  # torchvision's resnet18 has no other width
FORMATS = ("fastemp", "official", "torchvision")
# format: (prefix of every name in the file, names dropped, prefix of fastemp's name)
RENAMES = {"official": ("module.", (), ""), "torchvision": ("", ("fc.",), "backbone.")}
FIXES = {
    "fastemp": "give a run's checkpoint.pt or a fastemp export file, or the --format that wrote it",
    "official": "give main.py's save_models/<epoch>.pt (nn.DataParallel(encoder).state_dict()) or another --format",
    "torchvision": "give torchvision.models.resnet18()'s state_dict (fc is ignored) or another --format",
}
DEFAULT_CONFIG = "cifar10_n20_1ep"  # official and torchvision files carry no config: the paper's CIFAR-10 setting


# -------------------------------------------------------------------------------- out: fastemp export


def export_tensors(model_state: dict, part: str) -> dict[str, torch.Tensor]:
    """The tensors of `part` from a model state dict (EMPEncoder's names), contiguous and on the CPU."""
    if part == "backbone":
        model_state = {k.removeprefix("backbone."): v for k, v in model_state.items() if k.startswith("backbone.")}
    return {k: v.detach().cpu().contiguous() for k, v in model_state.items()}


def _json_file(path: Path) -> dict | None:
    """path's JSON, or None when the run has none (or it is not JSON): metadata, the weights are exported anyway."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def cmd_export(args) -> int:
    """`fastemp export RUN`: RUN/checkpoint.pt's --part as safetensors to --out (default RUN/<part>.safetensors),
    written atomically."""
    run_dir, part = Path(args.run_dir), args.part
    if not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} does not exist; give the --out folder of a fastemp train run")
    out = Path(args.out) if args.out else run_dir / f"{part}.safetensors"
    if out.exists() and not args.force:
        raise UserError(f"{out} exists; pass --force to overwrite it, or choose another --out")
    check_output_path(out, "--out", is_file=True)
    state = checkpoint.read(run_dir / "checkpoint.pt")
    summary, evaluation = _json_file(run_dir / "summary.json"), _json_file(run_dir / "eval.json")
    tensors = export_tensors(state["model"], part)
    metadata = {
        "format": EXPORT_FORMAT,
        "part": part,
        "config": json.dumps(state["config"]),
        "step": str(state["step"]),
        "commit": str(((summary or {}).get("environment") or {}).get("commit", "unknown")),
        "export_commit": runs.git_commit(),
        "results": json.dumps({"summary": summary, "eval": evaluation}),
    }
    with runs.atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    model = state["config"]["model"]
    print(f"wrote {out}: {part}, {len(tensors)} tensors, step {state['step']}")
    if model["width"] != TORCHVISION_WIDTH:
        print(
            f"note: model.width={model['width']}, and torchvision's resnet18 has width 64 only: load the backbone "
            f"into a ResNet-18 of width {model['width']} (fastemp.model.ResNet18Cifar({model['width']}, "
            f"{model['stem']!r}) has the same names)"
        )
    elif part == "backbone":
        cifar = "conv1=nn.Conv2d(3, 64, 3, 1, 1, bias=False), maxpool=nn.Identity(), "
        recipe = f"torchvision.models.resnet18() with {cifar if model['stem'] == 'cifar' else ''}fc=nn.Identity()"
        print(f"loads with strict=True into {recipe} (docs/export.md)")
    return 0


# -------------------------------------------------------------------------------- in: fastemp eval --weights


@dataclass
class Weights:
    path: Path
    format: str
    tensors: dict[str, torch.Tensor]  # under EMPEncoder's names; backbone.* alone for a backbone
    prefix: tuple[str, str] = ("", "")  # (the file's, fastemp's): a name shown as the file has it
    config: dict | None = None  # the config a fastemp file carries
    step: int | None = None

    @property
    def backbone_only(self) -> bool:
        return not any(k.startswith("pre_feature.") for k in self.tensors)

    def architecture(self) -> dict:
        """The model.* keys the tensors decide: width and stem from conv1, hidden_dim and z_dim from the projector."""
        arch, t = {}, self.tensors
        if t.get("backbone.conv1.weight", torch.empty(0)).dim() == 4:
            conv = t["backbone.conv1.weight"]
            arch.update(width=conv.shape[0], stem="imagenet" if conv.shape[-1] == 7 else "cifar")
        for key, name in (("hidden_dim", "pre_feature.0.weight"), ("z_dim", "projection.3.weight")):
            if t.get(name, torch.empty(0)).dim() == 2:
                arch[key] = t[name].shape[0]
        return arch

    def shown(self, name: str) -> str:
        return self.prefix[0] + name.removeprefix(self.prefix[1])


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(9)[8:9] == b"{"  # an 8-byte header length, then the JSON header


def _load(path: Path, fix: str) -> tuple[dict, dict]:
    """(tensors, metadata) of a safetensors file, or of a torch file read with weights_only (no metadata)."""
    try:
        if _is_safetensors(path):
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
        return torch.load(path, map_location="cpu", weights_only=True), {}
    except Exception as err:  # weights_only refused an object (nothing of it ran), or not a weights file at all
        objects = "Unsupported global" in str(err)
        why = "holds Python objects, not plain tensors" if objects else f"is not weights ({one_line(err)[:120]})"
        raise CheckpointError(f"{path} {why}; {fix}") from None


def read_weights(path: str | Path, format: str = "fastemp", fix: str = "") -> Weights:
    """The tensors of `path` under fastemp's names (CheckpointError, one line starting with the path, when the file
    is not `format`). fix: what to do instead, when the caller is not `fastemp eval --weights`."""
    path, fix = Path(path).expanduser(), fix or FIXES.get(format, "")
    if format not in FORMATS:
        raise CheckpointError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}; use one of them")
    if not path.is_file():
        raise CheckpointError(f"{path} is not a file; {fix}")
    if format == "fastemp" and not _is_safetensors(path):
        state = checkpoint.read(path, fix)  # verified: checksum, finite weights
        return Weights(path, format, state["model"], config=state["config"], step=state["step"])
    tensors, meta = _load(path, fix)
    if format == "fastemp":
        if meta.get("format") != EXPORT_FORMAT:
            raise CheckpointError(f"{path} is a safetensors file but not a fastemp export; {fix}")
        put = "backbone." if meta.get("part") == "backbone" else ""
        tensors = {put + k: v for k, v in tensors.items()}
        weights = Weights(path, format, tensors, ("", put), json.loads(meta["config"]), int(meta["step"]))
    else:
        if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise CheckpointError(f"{path} holds a {type(tensors).__name__}, not a state_dict of tensors; {fix}")
        carried, dropped, put = RENAMES[format]
        bare = [k for k in tensors if not k.startswith(carried)]
        if bare:
            what = f"{len(bare)} name(s) without the `{carried}` of main.py's nn.DataParallel ({', '.join(bare[:3])})"
            raise CheckpointError(f"{path} has {what}; {fix}")
        tensors = {put + k.removeprefix(carried): v for k, v in tensors.items() if not k.startswith(dropped)}
        weights = Weights(path, format, tensors, (carried, put))
    bad = [k for k, v in weights.tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{path} holds non-finite weights ({weights.shown(bad[0])} and {len(bad) - 1} more)")
    return weights


def check_weights(weights: Weights, model_cfg) -> None:
    """One line naming the missing, unexpected and misshaped keys, as the file names them, when the weights do not
    fit a model of model_cfg (weights_config's); checked without building it."""
    with torch.device("meta"):
        model_state = build_model(model_cfg).state_dict()
    expected = {k: v for k, v in model_state.items() if not weights.backbone_only or k.startswith("backbone.")}
    problems = checkpoint.misfit(expected, weights.tensors, weights.shown)
    if problems:
        arch = ", ".join(f"{k}={v}" for k, v in weights.architecture().items()) or "no backbone.conv1"
        raise CheckpointError(
            f"{weights.path} (--format {weights.format}) does not fit fastemp's encoder ({arch}): "
            f"{problems}; {FIXES[weights.format]}"
        )


def load_weights(model: torch.nn.Module, weights: Weights) -> None:
    """Copy `weights` (check_weights passed) into `model` (an EMPEncoder; its backbone alone for a backbone)."""
    if weights.backbone_only:
        model.backbone.load_state_dict({k.removeprefix("backbone."): v for k, v in weights.tensors.items()})
    else:
        model.load_state_dict(weights.tensors)


def read_projector(path: str, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """model.projector_init: the projection.* tensors of a fastemp encoder export (or a run's checkpoint.pt) of a
    model of cfg's architecture; ConfigError, one line, otherwise."""
    where, fix = "model.projector_init=", "give a file written by fastemp export RUN --part encoder"
    try:
        weights = read_weights(path, "fastemp", fix)
    except CheckpointError as err:
        raise ConfigError(f"{where}{err}") from None
    if weights.backbone_only:
        raise ConfigError(f"{where}{path} is a backbone export, without the projection layers; {fix}")
    for key, value in weights.architecture().items():  # a fastemp file: its tensors' shapes follow from these
        if getattr(cfg, key) != value:
            raise ConfigError(
                f"{where}{path} was exported from a model with model.{key}={value!r}, this run has "
                f"{getattr(cfg, key)!r}; set model.{key}={value} or export a run of this architecture"
            )
    return {k: v for k, v in weights.tensors.items() if k.startswith("projection.")}


def weights_config(weights: Weights, config: str | Path | Config | None = None, overrides: Sequence[str] = ()):
    """The config that scores `weights`: `config` (a built-in name, a YAML file or a Config) or, when None, the
    one a fastemp file carries (else DEFAULT_CONFIG), with overrides. The architecture is the weights' (an
    override that contradicts it is an error), and a backbone alone is scored on its pooled features."""
    if isinstance(config, Config):
        cfg = apply_overrides(copy.deepcopy(config), overrides)
    elif config is None and weights.config is not None:
        cfg = config_from_dict(weights.config, overrides)
    else:
        cfg = load_config(config or DEFAULT_CONFIG, overrides)
    given = {item.split("=", 1)[0].strip(): item for item in overrides}
    for key, value in weights.architecture().items():
        if f"model.{key}" in given and getattr(cfg.model, key) != value:
            raise ConfigError(f"{weights.path} holds a model with model.{key}={value}; drop {given[f'model.{key}']}")
        setattr(cfg.model, key, value)
    cfg.model.projector_init = ""  # the weights hold the projection layers
    if weights.backbone_only:
        if "eval.embedding" in given and cfg.eval.embedding != "backbone":
            raise ConfigError(
                f"{weights.path} holds a backbone alone, scored on its pooled features (eval.embedding=backbone); "
                f"drop {given['eval.embedding']}"
            )
        cfg.eval.embedding = "backbone"
    return cfg


def register_cli(subparsers) -> None:
    """Add `export` to the fastemp command line (fastemp/cli.py)."""
    p = subparsers.add_parser("export", help="write a run's backbone or encoder as safetensors (docs/export.md)")
    p.add_argument("run_dir")
    p.add_argument(
        "--part",
        choices=PARTS,
        default="backbone",
        help="backbone: torchvision's names; encoder: + pre_feature, projection",
    )
    p.add_argument("--out", help="the file to write (default: RUN/<part>.safetensors)")
    p.add_argument("--force", action="store_true", help="overwrite --out when it exists")
    p.set_defaults(func=cmd_export)
