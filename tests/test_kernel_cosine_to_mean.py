"""The fused Triton cosine-to-mean kernel vs the float64 reference.

Runs the kernel under TRITON_INTERPRET=1 on CPU (tests/conftest.py sets it), or natively on CUDA when
the suite is run there with TRITON_INTERPRET=0. Errors are relative norms ||out - ref|| / ||ref||:
  * fp32 inputs: loss, cos and dL/dp < 1e-5 (fp32 math vs float64).
  * bf16 inputs, compared with the reference on the bf16-rounded input upcast to float64: loss and cos
    < 1e-5 (the kernel's math is fp32, outputs are fp32); dL/dp < 2^-8 = 3.9e-3 because dp is stored
    in bf16 (the grad of a bf16 leaf is bf16), i.e. at most one bf16 rounding per element.
Every output buffer is allocated NaN-filled, so an element the kernel fails to write cannot pass.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastemp.kernels.cosine_to_mean as ctm
from fastemp.check.reference import reference_cosines, reference_invariance_loss
from fastemp.kernels.cosine_to_mean import cosine_to_mean, launch_params, triton_usable

FP32_TOL = 1e-5
BF16_GRAD_TOL = 2.0**-8

if ctm._INTERPRETED:
    DEVICE = torch.device("cpu")
elif torch.cuda.is_available():
    DEVICE = torch.device("cuda")
else:
    DEVICE = torch.device("cpu")

needs_kernel = pytest.mark.skipif(
    not triton_usable(DEVICE), reason="Triton kernel unusable here (no CUDA, TRITON_INTERPRET unset at import)"
)

# (n, B, d): B = 1; d = 1, 7, 33, 100, 1000 (not powers of two) and 1024, 4096; n up to 200 with several
# row tiles (n=200, d=33 -> 2 tiles of 128 rows; n=20, d=1024 -> 3 tiles of 8, the last one half masked).
SHAPES = [(2, 1, 7), (20, 3, 100), (5, 4, 1024), (20, 2, 1024), (200, 2, 33), (3, 5, 1000), (3, 4, 1), (6, 2, 4096)]
# d = 1 has n odd: with n even an image can have zbar = 0 exactly, where the reference's cosine is 0/0.


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
    """Patches that share an image direction (realistic cosines), with row norms over ~3 decades."""
    n, b, d = shape
    p = torch.randn(1, b, d) + 0.8 * torch.randn(n, b, d)
    p = p * torch.exp(1.5 * torch.randn(n, b, 1))
    return p.to(dtype=dtype, device=DEVICE).contiguous()


def reference(p: torch.Tensor):
    """float64 reference on p's exact values: loss, grad w.r.t. p, and the per-patch cosines."""
    p64 = p.detach().double().requires_grad_(True)
    z = F.normalize(p64, dim=-1)
    loss = reference_invariance_loss(z)
    (grad,) = torch.autograd.grad(loss, p64)
    with torch.no_grad():
        cos = reference_cosines(z)
    return loss.detach(), grad, cos


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


# ---------------------------------------------------------------------------------------------


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kernel_matches_reference(shape, dtype, poisoned):
    p = make_input(shape, dtype)
    ref_loss, ref_grad, ref_cos = reference(p)
    loss, cos, grad = run_kernel(p)

    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert cos.dtype == torch.float32 and cos.shape == shape[:2] and not cos.requires_grad
    assert grad.dtype == dtype and grad.shape == p.shape
    for t in (loss, cos, grad):
        assert torch.isfinite(t).all(), "NaN poison survived: an output element was never written"
    assert rel(loss, ref_loss) < FP32_TOL
    assert rel(cos, ref_cos) < FP32_TOL
    assert rel(grad, ref_grad) < (FP32_TOL if dtype == torch.float32 else BF16_GRAD_TOL)
    # mean_i cos_ib = |zbar_b| for unit rows, so the logged cosines average to -loss
    assert abs(cos.double().mean().item() + loss.item()) < 1e-6


@needs_kernel
def test_fp16_input(poisoned):
    p = make_input((20, 3, 100), torch.float16)
    ref_loss, ref_grad, ref_cos = reference(p)
    loss, cos, grad = run_kernel(p)
    assert grad.dtype == torch.float16
    assert rel(loss, ref_loss) < FP32_TOL and rel(cos, ref_cos) < FP32_TOL
    assert rel(grad, ref_grad) < 2.0**-11


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_torch_path_matches_reference(shape):
    p = make_input(shape).cpu().requires_grad_(True)
    ref_loss, ref_grad, ref_cos = reference(p)
    loss, cos = cosine_to_mean_torch(p)
    loss.backward()
    assert not cos.requires_grad
    assert rel(loss, ref_loss) < FP32_TOL
    assert rel(cos, ref_cos) < FP32_TOL
    assert rel(p.grad, ref_grad) < FP32_TOL


def test_the_checks_can_fail():
    """A plausible kernel bug, dropping the projection term (dp = -u / (n B |p|)), is flagged."""
    p = make_input((20, 3, 100)).cpu().requires_grad_(True)
    _, ref_grad, _ = reference(p)
    z = p / p.norm(dim=-1, keepdim=True).detach()
    (-z.mean(0).norm(dim=-1).mean()).backward()
    assert rel(p.grad, ref_grad) > 100 * FP32_TOL


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
def test_non_contiguous_input(poisoned):
    """Strided inputs are read in place: an image-major tensor viewed patch-major, and a strided d."""
    base = make_input((3, 20, 100))  # (B, n, d)
    views = [base.transpose(0, 1), make_input((20, 3, 200))[..., ::2]]
    for p in views:
        assert not p.is_contiguous()
        ref_loss, ref_grad, ref_cos = reference(p)
        loss, cos, grad = run_kernel(p)
        assert rel(loss, ref_loss) < FP32_TOL
        assert rel(cos, ref_cos) < FP32_TOL
        assert rel(grad, ref_grad) < FP32_TOL


@needs_kernel
def test_grad_output_scaling_and_no_grad(poisoned):
    p = make_input((20, 3, 100))
    _, ref_grad, _ = reference(p)
    q = p.clone().requires_grad_(True)
    (200.0 * cosine_to_mean(q)[0]).backward()
    assert rel(q.grad, 200.0 * ref_grad) < FP32_TOL

    # bf16: the scale is applied in fp32, then dp rounded once (1/3 is not a bf16 number)
    pb = make_input((20, 3, 100), torch.bfloat16)
    _, ref_grad_b, _ = reference(pb)
    qb = pb.clone().requires_grad_(True)
    (cosine_to_mean(qb)[0] / 3.0).backward()
    assert rel(qb.grad, ref_grad_b / 3.0) < BF16_GRAD_TOL

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
    _, ref_grad, _ = reference(p[:, 2:])
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
