"""The official code (tsb0601/EMP-SSL) from the git-ignored checkout .official/, for the tests that compare
against it; each skips cleanly without the checkout (as in CI) or without a working torchvision."""

import importlib
import sys
from pathlib import Path

import pytest
import torch

OFFICIAL = Path(__file__).resolve().parents[1] / ".official"


def official_module(name: str):
    """A module of the checkout (model.model, lars, loss), or a skip."""
    if not (OFFICIAL / "main.py").is_file():
        pytest.skip(f"no official checkout at {OFFICIAL}")
    if name.startswith("model"):
        try:
            import torchvision  # noqa: F401
        except Exception as err:  # missing, or a build that does not match this torch
            pytest.skip(f"torchvision does not import ({type(err).__name__})")
    sys.path.insert(0, str(OFFICIAL))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(OFFICIAL))
        top = name.split(".")[0]
        for loaded in [m for m in sys.modules if m == top or m.startswith(top + ".")]:
            del sys.modules[loaded]


def official_encoder_class():
    """model.model.encoder of the checkout, or a skip."""
    return official_module("model.model").encoder


def moments(t: torch.Tensor) -> tuple[float, float]:
    """Standard deviation and kurtosis (uniform 1.8, normal 3.0) of a tensor's values."""
    t = t.detach().double().flatten()
    centred = t - t.mean()
    return t.std().item(), ((centred**4).mean() / (centred**2).mean() ** 2).item()
