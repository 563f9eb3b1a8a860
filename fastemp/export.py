"""`fastemp export RUN [--part backbone|encoder]`: a run's trained weights as one safetensors file, loadable
without fastemp (the backbone under torchvision's names); the parts and metadata are in docs/export.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import checkpoint, runs
from .errors import UserError

FORMAT = "fastemp-export-1"
PARTS = ("backbone", "encoder")
TORCHVISION_WIDTH = 64  # torchvision's resnet18 has no other width


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


def export_run(run_dir: Path, part: str = "backbone", out: Path | None = None, force: bool = False) -> list[str]:
    """Write RUN/checkpoint.pt's `part` as safetensors to `out` (default RUN/<part>.safetensors), atomically;
    return the lines to print."""
    from .validate import check_output_path

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} does not exist; give the --out folder of a fastemp train run")
    out = Path(out) if out else run_dir / f"{part}.safetensors"
    if out.exists() and not force:
        raise UserError(f"{out} exists; pass --force to overwrite it, or choose another --out")
    check_output_path(out, "--out", is_file=True)
    state = checkpoint.read(run_dir / "checkpoint.pt")
    summary, evaluation = _json_file(run_dir / "summary.json"), _json_file(run_dir / "eval.json")
    tensors = export_tensors(state["model"], part)
    metadata = {
        "format": FORMAT,
        "part": part,
        "config": json.dumps(state["config"]),
        "step": str(state["step"]),
        "commit": str(((summary or {}).get("environment") or {}).get("commit", "unknown")),
        "export_commit": runs.git_commit(),
        "results": json.dumps({"summary": summary, "eval": evaluation}),
    }
    from safetensors.torch import save_file

    with runs.atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    model = state["config"]["model"]
    lines = [f"wrote {out}: {part}, {len(tensors)} tensors, step {state['step']}"]
    if model["width"] != TORCHVISION_WIDTH:
        lines.append(
            f"note: model.width={model['width']}, and torchvision's resnet18 has width 64 only: load the backbone "
            f"into a ResNet-18 of width {model['width']} (fastemp.model.ResNet18Cifar({model['width']}, "
            f"{model['stem']!r}) has the same names)"
        )
    elif part == "backbone":
        cifar = "conv1=nn.Conv2d(3, 64, 3, 1, 1, bias=False), maxpool=nn.Identity(), "
        recipe = f"torchvision.models.resnet18() with {cifar if model['stem'] == 'cifar' else ''}fc=nn.Identity()"
        lines.append(f"loads with strict=True into {recipe} (docs/export.md)")
    return lines


def cmd_export(args) -> int:
    for line in export_run(Path(args.run_dir), args.part, args.out and Path(args.out), args.force):
        print(line)
    return 0


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
