"""Every `fastemp check` case on the CPU at its CPU sizes: each fast path against its reference is written once,
in fastemp/check/, and run here (a failure replays with `fastemp check --device cpu --seed 2024 --only NAME`).

Every row must pass, and each case must make the rows listed here, so a case that silently stops making rows
fails. The kernel's output buffers start NaN-filled (`poisoned`), so an element it never writes cannot pass.
tests/check/test_check.py shows that the rows fail when their fast path is broken.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

import fastemp.kernels.cosine_to_mean as ctm
from fastemp import check
from fastemp import lars as lars_module
from fastemp.patches import dali_available

SEED = 2024

# rows per op at the CPU sizes: cos_to_mean 16 shapes x 2 dtypes + 2 strided; tcr 7 x 2; loss 4 x 2;
# gradcache 4 chunk counts; ghost BN 3 layouts; lars 2 hyperparameter sets
EXPECTED = {
    "cosine_to_mean": {"cos_to_mean loss": 34, "cos_to_mean cos": 34, "cos_to_mean grad": 34},
    "tcr": {"tcr value": 14, "tcr grad": 14},
    "loss": {f"loss {kind} {q}": 8 for kind in ("unfused", "fused", "vonmises") for q in ("total", "grad")},
    "compile": {"compile h": 1, "compile p": 1, "compile grads": 1, "compile BN stats": 1},
    "augment": {"augment paired": 1, "augment independent": 1},
    "patches": {"patches compiled": 1, "patches compiled solarized": 1},
    "gradcache": {"gradcache loss": 4, "gradcache grads": 4, "gradcache BN stats": 4},
    "checkpoint": {"checkpoint grads": 1, "checkpoint BN stats": 1},
    "ghostbn": {"ghost BN loss": 3, "ghost BN grads": 3, "ghost BN stats": 3, "ghost BN bf16": 1},
    "lars": {"lars params": 2, "lars momentum": 2, "lars fused params": 2, "lars fused momentum": 2},
    "prefetch": {"prefetch taken": 1, "prefetch other key": 1},
    "eval_forward": {"eval forward h": 1},
}


@pytest.fixture
def poisoned(monkeypatch):
    """Every output buffer of the cosine-to-mean kernel starts as NaN (instead of uninitialised memory)."""
    monkeypatch.setattr(
        ctm,
        "_alloc",
        lambda *shape, dtype=None, device=None: torch.full(*shape, float("nan"), dtype=dtype, device=device),
    )


def run_case(name: str) -> list[check.CheckResult]:
    rows = check.run_checks("cpu", seed=SEED, only=[name])
    failed = [check.format_row(r) for r in rows if r.status != "pass"]
    assert not failed, "\n".join(failed)
    assert Counter(r.op for r in rows) == EXPECTED[name]
    return rows


def test_every_case_is_tested():
    assert set(EXPECTED) == set(check.CHECKS)


@pytest.mark.parametrize("name", [name for name in check.CHECKS if name not in ("compile", "lars")])
def test_case_passes_on_cpu(name, poisoned):
    if name == "augment" and not dali_available():
        pytest.skip("nvidia.dali does not import")
    rows = run_case(name)
    if name == "cosine_to_mean":  # n over several row tiles, d masked and not, every dtype
        grid = {(r.shape, r.dtype) for r in rows}
        assert {s.split("x")[0] for s, _ in grid} >= {"2", "20", "200"}
        assert {s.split("x")[2] for s, _ in grid} >= {"1", "7", "33", "1000", "1024", "4096"}
        assert {d for _, d in grid} == {"fp32", "bf16"}
    if name == "tcr":
        assert {r.note for r in rows} == {"B<d", "B=d", "B>d"}


def test_compile_case_one_graph_and_no_recompiles():
    """The compiled model: no graph break (one graph), and its second step (new values, same shapes) reuses it."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    run_case("compile")
    assert counters["stats"]["unique_graphs"] == 1
    assert sum(counters["recompiles"].values()) == 0


@pytest.mark.parametrize("segments", [False, True], ids=["0-d factors", "segment views"])
def test_lars_case_in_both_factor_forms(segments, monkeypatch):
    """Eager LARS hands foreach its per-tensor factors as 0-d tensors (CPU) or segment views (CUDA): both here."""
    monkeypatch.setattr(lars_module, "segment_factors_on", lambda device: segments)
    run_case("lars")
