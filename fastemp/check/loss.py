"""`fastemp check`: the loss fast paths against their float64 references -- the Triton cosine-to-mean
kernel, the batched-Cholesky total coding rate, and the whole projection loss (unfused and fused)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import losses
from ..config import LossConfig
from . import reference
from .core import (
    BF16_FUSED_TOL,
    BF16_TOL,
    DTYPES,
    FP32_TOL,
    SOLVE_TOL,
    CheckResult,
    Context,
    compare,
    grad_of,
    projections,
    skipped,
    unit_rows,
)

# ------------------------------------------------------------------------------ cosine-to-mean


def _cosine_reference(p: torch.Tensor):
    """float64 loss, gradient and cosines on p's exact (possibly bf16-rounded) values."""
    p64 = p.detach().double()
    loss, grad = grad_of(lambda q: reference.reference_invariance_loss(F.normalize(q, dim=-1)), p64)
    return loss, grad, reference.reference_cosines(F.normalize(p64, dim=-1))


def check_cosine_to_mean(ctx: Context) -> list[CheckResult]:
    from ..kernels import cosine_to_mean as ctm

    if not ctm.triton_usable(ctx.device):
        why = (
            "Triton is not installed"
            if not ctm.HAVE_TRITON
            else "set TRITON_INTERPRET=1 (before Python starts) to run the kernel in Triton's CPU interpreter"
            if ctx.device.type == "cpu"
            else "CUDA is not available"
        )
        return [skipped("cos_to_mean", why)]
    if ctx.cuda:  # the full grid
        shapes = [(n, b, d) for n in (2, 20, 200) for b in (1, 100) for d in (1024, 1000, 33)]
        if ctx.quick:
            shapes = [(20, 100, 1024), (200, 1, 33), (2, 100, 1000)]
    else:  # the interpreter runs one program per image at a few ms each: B = 1 for most shapes
        shapes = [(n, 1, d) for n in (2, 20, 200) for d in (1024, 1000, 33)] + [(2, 100, 1024), (20, 100, 33)]
        if ctx.quick:
            shapes = [(20, 1, 1000), (200, 1, 33), (2, 100, 1024)]
    rows = []
    for shape in shapes:
        base = projections(ctx, *shape)
        for name, dtype in DTYPES.items():
            p = base.to(dtype)
            ref_loss, ref_grad, ref_cos = _cosine_reference(p)
            q = p.clone().requires_grad_(True)
            loss, cos = ctm.cosine_to_mean(q)
            loss.backward()
            grad_tol = FP32_TOL if dtype == torch.float32 else BF16_TOL
            rows += [
                compare("cos_to_mean loss", shape, name, loss, ref_loss, FP32_TOL),
                compare("cos_to_mean cos", shape, name, cos, ref_cos, FP32_TOL),
                compare("cos_to_mean grad", shape, name, q.grad, ref_grad, grad_tol),
            ]
    return rows


# ------------------------------------------------------------------------------ TCR


def check_total_coding_rate(ctx: Context) -> list[CheckResult]:
    """R(Z_i) and its gradient (under random per-group upstream weights), B < d and B > d."""
    if ctx.cuda:
        shapes = [(20, 100, 1024), (20, 100, 1000), (4, 512, 256), (8, 2048, 64), (200, 100, 1024)]
        if ctx.quick:
            shapes = [(20, 100, 1024), (4, 512, 256)]
    else:  # float64 d x d logdet costs ~0.1 s per group at d = 1024 on two cores
        shapes = [(2, 100, 1024), (3, 64, 1000), (4, 300, 64), (6, 20, 33)]
        if ctx.quick:
            shapes = [(2, 100, 1024), (4, 300, 64)]
    rows = []
    for shape in shapes:
        base = unit_rows(ctx, *shape)
        weights = (0.5 + torch.rand(shape[0], generator=ctx.gen)).to(ctx.device)
        for name, dtype in DTYPES.items():
            z = base.to(dtype)
            ref, ref_grad = grad_of(reference.reference_total_coding_rate, z.double(), weights.double())
            got, grad = grad_of(losses.total_coding_rate, z, weights)
            side = "B<d" if shape[1] < shape[2] else "B>d"
            rows += [
                compare("tcr value", shape, name, got, ref, FP32_TOL, note=side),
                compare(
                    "tcr grad",
                    shape,
                    name,
                    grad,
                    ref_grad,
                    SOLVE_TOL if dtype == torch.float32 else BF16_TOL,
                    note=side,
                ),
            ]
    return rows


# ------------------------------------------------------------------------------ full loss


def check_projection_loss(ctx: Context) -> list[CheckResult]:
    from ..kernels.cosine_to_mean import triton_usable

    if ctx.cuda:
        shapes = [(20, 100, 1024), (2, 100, 1000), (200, 100, 1024)]
        if ctx.quick:
            shapes = [(20, 100, 1024)]
    else:
        shapes = [(4, 32, 64), (20, 10, 33), (2, 50, 1024)]
        if ctx.quick:
            shapes = [(4, 32, 64)]
    cfg = LossConfig()
    fused_ok = triton_usable(ctx.device)
    rows = [] if fused_ok else [skipped("loss fused", "the Triton kernel cannot run here (see cos_to_mean)")]

    def ref_fn(q):
        return reference.reference_emp_ssl_loss(F.normalize(q, dim=-1), cfg.eps, cfg.invariance_weight, cfg.tcr_weight)

    for shape in shapes:
        base = projections(ctx, *shape)
        for name, dtype in DTYPES.items():
            p = base.to(dtype)
            ref, ref_grad = grad_of(ref_fn, p.double())
            for fused in (False, True) if fused_ok else (False,):
                op = "loss fused" if fused else "loss unfused"
                got, grad = grad_of(lambda q, f=fused: losses.projection_loss_terms(q, cfg, fused=f).total, p)
                grad_tol = SOLVE_TOL if dtype == torch.float32 else BF16_FUSED_TOL if fused else BF16_TOL
                rows += [
                    compare(f"{op} total", shape, name, got, ref, FP32_TOL),
                    compare(f"{op} grad", shape, name, grad, ref_grad, grad_tol),
                ]
    return rows
