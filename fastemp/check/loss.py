"""`fastemp check`: the loss fast paths against their float64 references -- the Triton cosine-to-mean kernel,
the batched-Cholesky total coding rate, and the whole projection loss (unfused, fused, von Mises uniformity).
The `*_rows` functions compare one input; the tests call them too, for inputs no card needs (fp16, other eps)."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from .. import losses
from ..config import LossConfig
from . import reference
from .core import (
    BF16_FUSED_TOL,
    BF16_TOL,
    FP32_TOL,
    FP64_TOL,
    SOLVE_TOL,
    CheckResult,
    Context,
    compare,
    grad_of,
    projections,
    skipped,
    unit_rows,
)

# the gradient's tolerance by the dtype it is stored in (fp16 keeps 11 bits: one rounding <= 2^-12)
GRAD_TOL = {torch.float32: FP32_TOL, torch.bfloat16: BF16_TOL, torch.float16: 2.0**-11, torch.float64: FP64_TOL}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def grid_inputs(ctx: Context, shapes: list, make) -> list[torch.Tensor]:
    """make(ctx, *shape) over the grid, in fp32 and bf16: both round the same fp32 draw."""
    draws = [make(ctx, *shape) for shape in shapes]
    return [p.to(dtype) for p in draws for dtype in (torch.float32, torch.bfloat16)]


def cosine_rows(p: torch.Tensor, view=None, note: str = "", impl=None) -> list[CheckResult]:
    """The kernel's (or impl's) loss, cosines and dL/dp on p, or on view(p) (strides the kernel must read in
    place), vs float64 on the exact same values."""
    from ..kernels.cosine_to_mean import cosine_to_mean

    view, cosine_to_mean = view or (lambda t: t), impl or cosine_to_mean
    p64 = view(p.detach()).double()
    ref_loss, ref_grad = grad_of(lambda q: reference.reference_invariance_loss(F.normalize(q, dim=-1)), p64)
    ref_cos = reference.reference_cosines(F.normalize(p64, dim=-1))
    leaf = p.detach().clone().requires_grad_(True)
    loss, cos = cosine_to_mean(view(leaf))
    (grad,) = torch.autograd.grad(loss, leaf)
    shape, name = tuple(p64.shape), DTYPE_NAMES[p.dtype]
    # a gradient row's scale is 1 / (n B |p|); with d = 1 the gradient is 0 and fp32 leaves ~1e-8 of it
    floor = 0.1 * (1 / (p64.norm(dim=-1) * shape[0] * shape[1])).norm().item()
    return [
        compare("cos_to_mean loss", shape, name, loss, ref_loss, FP32_TOL, note=note),
        compare("cos_to_mean cos", shape, name, cos, ref_cos, FP32_TOL, note=note),
        compare("cos_to_mean grad", shape, name, view(grad), ref_grad, GRAD_TOL[p.dtype], floor, note),
    ]


def check_cosine_to_mean(ctx: Context) -> list[CheckResult]:
    from ..kernels import cosine_to_mean as ctm

    if not ctm.triton_usable(ctx.device):
        why = "set TRITON_INTERPRET=1 (before Python starts) to run the kernel in Triton's CPU interpreter"
        why = why if ctx.device.type == "cpu" else "CUDA is not available"
        return [skipped("cos_to_mean", why if ctm.HAVE_TRITON else "Triton is not installed")]
    # d not a power of two (1000, 33, 7, 1: one masked tile), several row tiles (n = 200), d = 4096; d = 1 with n
    # odd (n even can give an image zbar = 0 exactly, where the reference cosine is 0/0)
    shapes = ctx.grid(
        cuda=[(n, b, d) for n in (2, 20, 200) for b in (1, 100) for d in (1024, 1000, 33)] + [(3, 4, 1), (6, 2, 4096)],
        quick_cuda=[(20, 100, 1024), (200, 1, 33), (2, 100, 1000)],
        # the interpreter runs one program per image at tens of ms each: B small (B = 100 tests nothing B = 10 does not)
        cpu=[(n, 1, d) for n in (2, 20, 200) for d in (1024, 1000, 33)]
        + [(2, 10, 1024), (20, 10, 33), (2, 1, 7), (20, 3, 100), (5, 4, 1024), (3, 4, 1), (6, 2, 4096)],
        quick_cpu=[(20, 1, 1000), (200, 1, 33), (2, 10, 1024)],
    )
    rows = [r for p in grid_inputs(ctx, shapes, projections) for r in cosine_rows(p)]
    if not ctx.quick:  # read in place: an image-major tensor viewed patch-major, and a strided d
        rows += cosine_rows(projections(ctx, 3, 20, 100), lambda t: t.transpose(0, 1), "(B, n, d) viewed patch-major")
        rows += cosine_rows(projections(ctx, 20, 3, 200), lambda t: t[..., ::2], "every other d")
    return rows


def tcr_rows(z: torch.Tensor, weights: torch.Tensor, eps: float = 0.2) -> list[CheckResult]:
    """R(Z_i) and its gradient under per-group upstream weights vs the float64 literal logdet."""
    ref, ref_grad = grad_of(lambda x: reference.reference_total_coding_rate(x, eps), z.double(), weights.double())
    got, grad = grad_of(lambda x: losses.total_coding_rate(x, eps), z, weights)
    shape, name = tuple(z.shape), DTYPE_NAMES[z.dtype]
    note = "B<d" if shape[1] < shape[2] else "B>d" if shape[1] > shape[2] else "B=d"
    grad_tol = SOLVE_TOL if z.dtype == torch.float32 else GRAD_TOL[z.dtype]
    return [
        compare("tcr value", shape, name, got, ref, FP32_TOL, note=note),
        compare("tcr grad", shape, name, grad, ref_grad, grad_tol, note=note),
    ]


def check_total_coding_rate(ctx: Context) -> list[CheckResult]:
    """B < d, B = d and B > d; d = 1 and d not a power of two."""
    shapes = ctx.grid(
        cuda=[(20, 100, 1024), (20, 100, 1000), (4, 512, 256), (8, 2048, 64), (200, 100, 1024), (2, 7, 7)],
        quick_cuda=[(20, 100, 1024), (4, 512, 256)],
        # float64 d x d logdet costs ~0.1 s per group at d = 1024 on two cores
        cpu=[(2, 100, 1024), (3, 64, 1000), (4, 300, 64), (6, 20, 33), (2, 7, 7), (3, 5, 17), (2, 3, 1)],
        quick_cpu=[(2, 100, 1024), (4, 300, 64)],
    )
    rows = []
    for z in grid_inputs(ctx, shapes, unit_rows):
        rows += tcr_rows(z, (0.5 + torch.rand(z.shape[0], generator=ctx.gen)).to(ctx.device))
    return rows


def loss_rows(p: torch.Tensor, cfg: LossConfig, fused: tuple[bool, ...] = (False,)) -> list[CheckResult]:
    """projection_loss_terms(p).total and its gradient, unfused and/or fused, vs reference_loss: the TCR (op
    "loss unfused" / "loss fused") or the von Mises uniformity (op "loss vonmises", unfused)."""
    ref, ref_grad = grad_of(lambda q: reference.reference_loss(q, cfg), p.double())
    shape, name, rows = tuple(p.shape), DTYPE_NAMES[p.dtype], []
    for fuse in fused:
        got, grad = grad_of(lambda q, fuse=fuse: losses.projection_loss_terms(q, cfg, fused=fuse).total, p)
        op = "loss vonmises" if cfg.uniformity == "vonmises" else "loss fused" if fuse else "loss unfused"
        if p.dtype == torch.float32:  # the TCR's gradient comes through the Cholesky solve
            grad_tol = SOLVE_TOL if cfg.uniformity == "tcr" else FP32_TOL
        else:
            grad_tol = BF16_FUSED_TOL if fuse else GRAD_TOL[p.dtype]
        rows += [
            compare(f"{op} total", shape, name, got, ref, FP32_TOL),
            compare(f"{op} grad", shape, name, grad, ref_grad, grad_tol),
        ]
    return rows


def check_projection_loss(ctx: Context) -> list[CheckResult]:
    from ..kernels.cosine_to_mean import triton_usable

    shapes = ctx.grid(
        cuda=[(20, 100, 1024), (2, 100, 1000), (200, 100, 1024)],
        cpu=[(4, 32, 64), (20, 10, 33), (2, 50, 1024), (4, 40, 12)],
    )
    cfg = LossConfig()
    vonmises = dataclasses.replace(cfg, uniformity="vonmises", vonmises_weight=1.5, vonmises_t=2.0)
    fused_ok = triton_usable(ctx.device)
    rows = [] if fused_ok else [skipped("loss fused", "the Triton kernel cannot run here (see cos_to_mean)")]
    for p in grid_inputs(ctx, shapes, projections):
        rows += loss_rows(p, cfg, (False, True) if fused_ok else (False,))
        rows += loss_rows(p, vonmises)  # the pairwise reference: B(B - 1)/2 pairs
    return rows
