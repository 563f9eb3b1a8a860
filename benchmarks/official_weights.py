"""The official checkpoint scored by fastemp's evaluator, in one call: `evaluate_official(checkpoint, cfg, train,
test)`. The mapping official -> fastemp names lives here until the library owns it (fastemp/weights.py, for
`fastemp eval --weights FILE --format official`); then this file is that call and nothing else.

Official: nn.DataParallel(encoder) of model/model.py, saved by main.py as save_models/<epoch>.pt: torchvision's
resnet18 with a 3x3 conv1 and maxpool/fc = Identity (no tensors) as `backbone`, then `pre_feature` (Linear, BN1d,
ReLU) and `projection` (Linear, BN1d, ReLU, Linear). fastemp.model.EMPEncoder keeps torchvision's layer names.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from fastemp.errors import UserError


class MappingError(UserError, RuntimeError):
    """The official state_dict does not map one-to-one onto fastemp's model."""


def _module_table() -> list[tuple[str, str]]:
    """(official module, fastemp module) for every module that holds tensors, in model order."""
    rows = [("module.backbone.conv1", "backbone.conv1"), ("module.backbone.bn1", "backbone.bn1")]
    for layer in range(1, 5):
        for block in range(2):
            parts = ["conv1", "bn1", "conv2", "bn2"] + (
                ["downsample.0", "downsample.1"] if layer > 1 and block == 0 else []
            )
            rows += [(f"module.backbone.layer{layer}.{block}.{p}", f"backbone.layer{layer}.{block}.{p}") for p in parts]
    heads = ("pre_feature.0", "pre_feature.1", "projection.0", "projection.1", "projection.3")
    return rows + [(f"module.{name}", name) for name in heads]


MODULE_TABLE: tuple[tuple[str, str], ...] = tuple(_module_table())


def map_official_state_dict(official: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> dict:
    """fastemp names for every official tensor through MODULE_TABLE; strict: every official tensor maps to a
    fastemp tensor of the same shape and every fastemp tensor gets exactly one (MappingError, one line, else)."""
    table, mapped, claimed, problems = dict(MODULE_TABLE), {}, set(), []
    for key, tensor in official.items():
        module, _, leaf = key.rpartition(".")
        name = f"{table.get(module)}.{leaf}"
        claimed.add(name)
        if module not in table:
            problems.append(f"official tensor {key} is in no row of the mapping table")
        elif name not in target:
            problems.append(f"{key} -> {name}, which fastemp's model lacks")
        elif tuple(tensor.shape) != tuple(target[name].shape):
            problems.append(f"{key} has shape {tuple(tensor.shape)}, fastemp's {name} {tuple(target[name].shape)}")
        else:
            mapped[name] = tensor
    problems += [f"fastemp tensor {k} has no official source" for k in target if k not in claimed]
    if problems:
        more = f" (and {len(problems) - 2} more)" if len(problems) > 2 else ""
        raise MappingError(
            f"the official checkpoint does not map onto fastemp's model: {'; '.join(problems[:2])}{more}; is it "
            "main.py's save_models/<epoch>.pt of --arch resnet18-cifar?"
        )
    return mapped


def evaluate_official(checkpoint: Path, cfg, train, test) -> dict:
    """fastemp's evaluation (Trainer.evaluate under cfg.eval) of the official encoder saved at `checkpoint`."""
    from fastemp.train import Trainer

    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as err:  # unreadable, truncated, not a torch file
        raise UserError(
            f"cannot read the official checkpoint {checkpoint} ({type(err).__name__}); rerun its training"
        ) from None
    if not isinstance(state, Mapping):
        raise UserError(f"{checkpoint} holds a {type(state).__name__}, not main.py's state_dict")
    trainer = Trainer(cfg, None, progress=False, train_set=train, test_set=test)
    trainer.model.load_state_dict(map_official_state_dict(state, trainer.model.state_dict()))
    results = trainer.evaluate()
    return {**results, "mapped_tensors": len(state), "precision": trainer.runtime.precision}
