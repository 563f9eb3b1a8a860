"""The loss: what `fastemp check`'s tcr and loss cases do not cover.

The TCR, the whole projection loss (unfused, fused, von Mises) against the float64 references over a grid of
shapes and dtypes are check cases (fastemp/check/loss.py, run on the CPU by tests/check/test_cases.py). Here:
the same rows at other eps and scales and in float64 (exact), closed forms, dtypes, NaN handling."""

import math

import pytest
import torch
import torch.nn.functional as F

from fastemp.check.loss import loss_rows, tcr_rows
from fastemp.check.reference import reference_total_coding_rate, reference_vonmises_uniformity
from fastemp.config import LossConfig
from fastemp.losses import (
    invariance_loss,
    projection_loss_terms,
    total_coding_rate,
    vonmises_uniformity,
)


def unit(n, b, d, dtype=torch.float64):
    return F.normalize(torch.randn(n, b, d, dtype=dtype), dim=-1)


def rel(a, b):
    """Relative error; near-zero references (d=1 has an identically zero gradient) count absolutely."""
    return ((a.double() - b.double()).norm() / max(b.double().norm().item(), 1e-2)).item()


def test_total_coding_rate_closed_form():
    # rows e_1..e_B: Z^T Z is a projection of rank B, so R = B/2 * log(1 + d/(B eps))
    n, b, d, eps = 2, 6, 20, 0.2
    z = torch.zeros(n, b, d)
    z[:, torch.arange(b), torch.arange(b)] = 1.0
    expected = b / 2 * math.log(1 + d / (b * eps))
    assert torch.allclose(total_coding_rate(z, eps), torch.full((n,), expected), rtol=1e-6)


def test_total_coding_rate_any_scale_and_eps():
    """Not unit rows (the formula still holds) and other eps, through the check's tcr rows (values, gradients)."""
    z = torch.randn(3, 9, 30) * 0.3
    for eps in (0.05, 1.0):
        rows = tcr_rows(z, torch.rand(3), eps)
        assert all(r.status == "pass" for r in rows), rows


def test_total_coding_rate_under_autocast_is_fp32():
    z = unit(4, 16, 64).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = total_coding_rate(z)
    assert got.dtype == torch.float32
    assert rel(got, reference_total_coding_rate(z.double())) < 1e-5  # fp32 math on the bf16-rounded input


def test_total_coding_rate_failure_is_nan_not_wrong():
    z = unit(3, 8, 16).float()
    z[1, 2, 3] = float("nan")
    rate = total_coding_rate(z)
    assert torch.isnan(rate[1])
    assert torch.isfinite(rate[[0, 2]]).all()


def test_mean_cosine_is_norm_of_mean_for_unit_rows():
    z = unit(7, 5, 33)
    assert torch.allclose(-invariance_loss(z), z.mean(0).norm(dim=-1).mean(), atol=1e-12)


def test_terms_are_negative_and_weighted():
    z = unit(5, 32, 64).float()
    terms = projection_loss_terms(z, LossConfig(eps=0.2, invariance_weight=200.0, tcr_weight=1.0))
    assert -1.0 <= terms.invariance.item() < 0 and terms.tcr.item() < 0
    assert torch.allclose(terms.total, 200 * terms.invariance + terms.tcr)


@pytest.mark.parametrize(
    "dtype, working", [(torch.float64, torch.float64), (torch.float32, torch.float32), (torch.bfloat16, torch.float32)]
)
def test_loss_works_in_at_least_fp32(dtype, working):
    """bf16 and fp32 outputs are scored in fp32, a float64 model (the references) gets a float64 loss and gradient."""
    p = torch.randn(4, 12, 40, dtype=dtype).requires_grad_()
    total = projection_loss_terms(p, LossConfig(), fused=False).total
    (grad,) = torch.autograd.grad(total, p)
    assert total.dtype == working and grad.dtype == dtype


VONMISES = LossConfig(uniformity="vonmises", vonmises_weight=1.5, vonmises_t=2.0)


@pytest.mark.parametrize("cfg", [LossConfig(), VONMISES], ids=["tcr", "vonmises"])
@pytest.mark.parametrize("shape", [(4, 12, 40), (3, 5, 17), (2, 2, 7)])
def test_loss_in_float64_is_the_formula(cfg, shape):
    """In float64, the whole loss (value, gradient) is the reference formula to 1e-12 (the check's loss rows), so
    a comparison against the official code is not capped at fp32's 1e-7; the logged von Mises term too."""
    p = torch.randn(*shape, dtype=torch.float64) * 3
    rows = loss_rows(p, cfg)
    assert len(rows) == 2 and all(r.err < 1e-12 for r in rows), rows
    logged = projection_loss_terms(p, cfg, fused=False).tcr
    if cfg.uniformity == "vonmises":
        assert abs(logged.item() - reference_vonmises_uniformity(F.normalize(p, dim=-1), 2.0).item()) < 1e-12


def test_vonmises_closed_forms_and_a_finite_gradient_at_distance_zero():
    # two images with unit means at 90 degrees: |a - b|^2 = 2, so log exp(-t * 2) = -2t
    z = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)
    assert vonmises_uniformity(z, t=2.0).item() == pytest.approx(-4.0, abs=1e-12)
    # every image mean equal: log 1 = 0 and a zero gradient (a sqrt of the distance would give NaN here)
    same = unit(3, 1, 8).expand(3, 6, 8).clone().requires_grad_()
    value = vonmises_uniformity(same, t=2.0)
    (grad,) = torch.autograd.grad(value, same)
    assert value.item() == pytest.approx(0.0, abs=1e-12) and torch.isfinite(grad).all() and grad.abs().max() < 1e-12
    # bf16 input under autocast: fp32 working precision
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert vonmises_uniformity(unit(2, 5, 8).bfloat16()).dtype == torch.float32
