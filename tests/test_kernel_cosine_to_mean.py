"""The fused Triton cosine-to-mean kernel: what `fastemp check`'s cosine_to_mean case does not cover.

The kernel against the float64 reference over its grid of shapes, dtypes and strided views is the check case
(fastemp/check/loss.py, run on the CPU by tests/check/test_cases.py); here: fp16 and the torch twin through the
same rows, the interpreter's native bf16 path, upstream-gradient scaling, zero rows, bad inputs, launch
parameters. Runs the kernel under TRITON_INTERPRET=1 on CPU (tests/conftest.py sets it), or natively on CUDA when
the suite is run there with TRITON_INTERPRET=0. Tolerances: docs/check.md. Every output buffer is allocated
NaN-filled, so an element the kernel fails to write cannot pass.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastemp.kernels.cosine_to_mean as ctm
from fastemp.check.core import BF16_TOL, FP32_TOL, Context, grad_of, projections
from fastemp.check.loss import cosine_rows
from fastemp.check.reference import reference_invariance_loss
from fastemp.kernels.cosine_to_mean import cosine_to_mean, launch_params, triton_usable

DEVICE = torch.device("cuda" if torch.cuda.is_available() and not ctm._INTERPRETED else "cpu")

needs_kernel = pytest.mark.skipif(
    not triton_usable(DEVICE), reason="Triton kernel unusable here (no CUDA, TRITON_INTERPRET unset at import)"
)


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||; the absolute error where ref is exactly zero (d = 1: the gradient is 0)."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert out.shape == ref.shape and torch.isfinite(ref).all()
    scale = ref.norm()
    return ((out - ref).norm() / (scale if scale > 0 else 1.0)).item()


def cosine_to_mean_torch(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's semantics in eager torch (fp32 math, gradient through autograd), zero rows included."""
    z = F.normalize(p.float(), dim=-1, eps=ctm.NORM_EPS)
    zbar = z.mean(dim=0)
    zbar_norm = zbar.norm(dim=-1)
    loss = -zbar_norm.mean()
    with torch.no_grad():
        u = zbar / zbar_norm.clamp_min(ctm._ZBAR_TINY)[:, None]
        cos = (z * u).sum(dim=-1)
    return loss, cos


def make_input(shape, dtype=torch.float32) -> torch.Tensor:
    """The check's projector-like inputs (fastemp.check.core.projections)."""
    return projections(Context(DEVICE, False, torch.Generator().manual_seed(0)), *shape).to(dtype)


def reference_grad(p: torch.Tensor) -> torch.Tensor:
    """dL/dp in float64 on p's exact values."""
    return grad_of(lambda q: reference_invariance_loss(F.normalize(q, dim=-1)), p.double())[1]


@pytest.fixture
def poisoned(monkeypatch):
    """Make every kernel output buffer start as NaN (instead of uninitialised memory)."""

    def alloc(*shape, dtype=None, device=None):
        return torch.full(*shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(ctm, "_alloc", alloc)


def run_kernel(p: torch.Tensor):
    p = p.detach().clone().requires_grad_(True)
    loss, cos = cosine_to_mean(p)
    loss.backward()
    return loss, cos, p.grad


def all_pass(rows):
    assert rows and all(r.status == "pass" for r in rows), "\n".join(map(str, rows))


@needs_kernel
def test_fp16_input(poisoned):
    """fp16 (no card trains in it; the kernel takes it): the check's rows, the gradient at one fp16 rounding."""
    all_pass(cosine_rows(make_input((20, 3, 100), torch.float16)))


@pytest.mark.parametrize(
    "shape", [(2, 1, 7), (20, 3, 100), (3, 4, 1), (6, 2, 4096)], ids=lambda s: "x".join(map(str, s))
)
def test_torch_path_matches_reference(shape):
    """cosine_to_mean_torch (the kernel's plain-torch twin) through the check's cos_to_mean rows."""
    all_pass(cosine_rows(make_input(shape).cpu(), impl=cosine_to_mean_torch))


@needs_kernel
def test_native_low_precision_kernel(monkeypatch, poisoned):
    """bf16 loads/stores inside the kernel itself (the GPU path), not the interpreter's fp32 upcast.

    The interpreter rounds fp32 -> bf16 toward zero where the GPU rounds to nearest even, so dp may
    differ from the upcast path's torch-rounded dp by one bf16 ulp; loss and cos must match exactly.
    """
    monkeypatch.setattr(ctm, "INTERPRETER_UPCAST", False)
    p = make_input((20, 2, 1024), torch.bfloat16)
    loss, cos, grad = run_kernel(p)
    monkeypatch.setattr(ctm, "INTERPRETER_UPCAST", True)
    loss_u, cos_u, grad_u = run_kernel(p)
    assert grad.dtype == torch.bfloat16 and torch.isfinite(grad).all()
    assert torch.equal(loss, loss_u) and torch.equal(cos, cos_u)
    ulps = (grad.view(torch.int16).int() - grad_u.view(torch.int16).int()).abs()
    assert ulps.max().item() <= 1


@needs_kernel
def test_grad_output_scaling_and_no_grad(poisoned):
    p = make_input((20, 3, 100))
    ref_grad = reference_grad(p)
    q = p.clone().requires_grad_(True)
    (200.0 * cosine_to_mean(q)[0]).backward()
    assert rel(q.grad, 200.0 * ref_grad) < FP32_TOL

    # bf16: the scale is applied in fp32, then dp rounded once (1/3 is not a bf16 number)
    pb = make_input((20, 3, 100), torch.bfloat16)
    ref_grad_b = reference_grad(pb)
    qb = pb.clone().requires_grad_(True)
    (cosine_to_mean(qb)[0] / 3.0).backward()
    assert rel(qb.grad, ref_grad_b / 3.0) < BF16_TOL

    # no gradient wanted: no dp buffer, same values
    loss_ng, cos_ng = cosine_to_mean(p)
    with torch.no_grad():
        loss_nog, _ = cosine_to_mean(p.clone().requires_grad_(True))
    loss, cos, _ = run_kernel(p)
    assert not loss_ng.requires_grad and not loss_nog.requires_grad
    assert torch.equal(loss_ng, loss) and torch.equal(cos_ng, cos) and torch.equal(loss_nog, loss)


@needs_kernel
def test_zero_rows_follow_f_normalize(poisoned):
    """Zero rows: z = 0, cos = 0, gradient as F.normalize's autograd (the torch path); an all-zero
    image gives zbar = 0 and a finite (zero-direction) gradient."""
    p = make_input((6, 3, 33))
    p[2, 0] = 0.0
    p[:, 1] = 0.0  # image 1: every patch zero
    loss, cos, grad = run_kernel(p)
    q = p.clone().requires_grad_(True)
    loss_t, cos_t = cosine_to_mean_torch(q)
    loss_t.backward()
    assert torch.isfinite(grad).all() and torch.isfinite(cos).all()
    assert cos[2, 0] == 0 and (cos[:, 1] == 0).all()
    assert rel(loss, loss_t) < FP32_TOL and rel(cos, cos_t) < FP32_TOL
    assert rel(grad, q.grad) < FP32_TOL
    # rows that are not zero still match the float64 reference computed without the zero rows' image
    ref_grad = reference_grad(p[:, 2:])
    assert rel(grad[:, 2:], ref_grad / 3) < FP32_TOL  # B = 3 vs 1 in the 1/(nB) factor


@needs_kernel
def test_rejects_bad_inputs():
    with pytest.raises(ValueError, match=r"\(n, B, d\)"):
        cosine_to_mean(torch.randn(4, 8, device=DEVICE))
    with pytest.raises(ValueError, match="n, B, d >= 1"):
        cosine_to_mean(torch.randn(0, 2, 8, device=DEVICE))
    with pytest.raises(TypeError, match="float64"):
        cosine_to_mean(torch.randn(2, 2, 8, dtype=torch.float64, device=DEVICE))


def test_launch_params():
    assert launch_params(20, 1024) == (8, 1024, 8)  # 8K-element tiles, 8 warps on H100
    assert launch_params(20, 4096) == (2, 4096, 8)
    assert launch_params(200, 33) == (128, 64, 8)
    assert launch_params(2, 7) == (2, 8, 1)
    for n, d in [(1, 1), (3, 1000), (200, 100), (20, 16384)]:
        block_n, block_d, warps = launch_params(n, d)
        assert block_d >= d and block_d & (block_d - 1) == 0 and 1 <= warps <= 16 and block_n >= 1
