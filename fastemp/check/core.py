"""`fastemp check` building blocks: the result row, the per-check context (device, grid, random stream), the
comparisons that make a row, the tolerances, and the random inputs shared by the checks (docs/check.md says
why each tolerance has its value)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

FP32_TOL = 1e-5  # fp32 math vs float64: values; gradients of the cosine kernel
SOLVE_TOL = 1e-4  # gradients through the Cholesky solve
BF16_TOL = 2.0**-8  # anything stored in bf16 (one rounding <= 2^-9)
BF16_FUSED_TOL = 2.0**-7  # the fused loss's bf16 gradient: up to three roundings (docs/check.md)
FP64_TOL = 1e-9  # the same maths in float64 (compiled vs eager on CPU, ghost BN vs the gradient cache)
COMPILE_BF16_FACTOR = 2.0  # CUDA, bf16 autocast: compiled's error vs float64 <= 2 x eager's error ...
COMPILE_BF16_FLOOR = 1e-4  # ... + this (an eager error near 0 would leave no room for fp32 reordering)
AUGMENT_TOL = 0.01  # absolute, on normalised pixel values (std ~0.45): see check_augment_stats
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class CheckResult:
    op: str
    shape: str
    dtype: str
    err: float  # the pass criterion (relative-norm error unless the note says otherwise)
    tol: float
    max_abs: float
    max_rel: float
    status: str  # "pass" | "FAIL" | "skipped"
    note: str = ""

    @property
    def failed(self) -> bool:
        return self.status == "FAIL"


@dataclass
class Context:
    """What every check gets: the device, the grid size, and its own random stream (from the run's seed)."""

    device: torch.device
    quick: bool
    gen: torch.Generator  # CPU generator: the same seed gives the same inputs on any device

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def grid(self, cuda: list, cpu: list, quick_cuda: list | None = None, quick_cpu: list | None = None) -> list:
        """The check's grid on this device: the CUDA or the CPU one, under --quick its quick one (default: the
        first entry)."""
        full, quick = (cuda, quick_cuda) if self.cuda else (cpu, quick_cpu)
        return (full[:1] if quick is None else quick) if self.quick else full

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen)

    def seed(self) -> int:
        """A seed drawn from the check's stream (model initialisation, augmentation calls)."""
        return int(torch.randint(0, 2**31 - 1, (1,), generator=self.gen))


# ------------------------------------------------------------------------------ rows


def fmt_shape(shape) -> str:
    return "x".join(str(s) for s in shape) if isinstance(shape, (tuple, list, torch.Size)) else str(shape)


def row(op: str, shape, dtype: str, err: float, tol: float, max_abs=math.nan, max_rel=math.nan, note="") -> CheckResult:
    """A row from its criterion: pass iff err is finite and <= tol (NaN never passes)."""
    ok = math.isfinite(err) and err <= tol
    return CheckResult(op, fmt_shape(shape), dtype, err, tol, max_abs, max_rel, "pass" if ok else "FAIL", note)


def skipped(op: str, reason: str, shape="-", dtype: str = "-") -> CheckResult:
    return CheckResult(op, fmt_shape(shape), dtype, math.nan, math.nan, math.nan, math.nan, "skipped", reason)


def compare(
    op: str, shape, dtype: str, out: torch.Tensor, ref: torch.Tensor, tol: float, floor: float = 1e-12, note: str = ""
) -> CheckResult:
    """One row: the relative-norm error of out vs ref (float64), pass iff everything is finite and it is <= tol."""
    out, ref = out.detach().double(), ref.detach().double().to(out.device)
    if out.shape != ref.shape:
        return row(op, shape, dtype, math.nan, tol, note=f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    diff = (out - ref).abs()
    ref_abs = ref.abs()
    err = (diff.norm() / ref.norm().clamp_min(floor)).item()
    max_rel = (diff / ref_abs.clamp_min(max(1e-3 * ref_abs.max().item(), floor))).max().item()
    for name, t in (("output", out), ("reference", ref)):
        if not torch.isfinite(t).all():
            err, note = math.nan, f"non-finite {name}" + (f"; {note}" if note else "")
            break
    return row(op, shape, dtype, err, tol, diff.max().item(), max_rel, note)


def tensor_errors(out: dict, ref: dict) -> dict:
    """Each named tensor's relative-norm error against max(its norm, 1e-3 x the norm of all of them): a bias
    before BatchNorm has a zero gradient."""
    floor = max(1e-3 * _flat(ref, list(ref)).norm().item(), 1e-12)
    return {k: (out[k].double() - r.double()).norm().item() / max(r.norm().item(), floor) for k, r in ref.items()}


def compare_tensors(op: str, shape, dtype: str, out: dict, ref: dict, tol: float, note: str = "") -> CheckResult:
    """One row over named tensors (gradients, parameters, optimizer state): err is the worst tensor's error
    (tensor_errors), so a bug in one small tensor is not diluted by the large ones; the note names it."""
    names = list(ref)
    flat = compare(op, shape, dtype, _flat(out, names), _flat(ref, names), tol)
    if not math.isfinite(flat.err):  # mis-shaped or non-finite
        return flat
    errors = tensor_errors(out, ref)
    worst = max(names, key=lambda k: errors[k] if math.isfinite(errors[k]) else math.inf)
    note = f"worst tensor {worst}" + (f"; {note}" if note else "")
    return row(op, shape, dtype, max(flat.err, errors[worst]), tol, flat.max_abs, flat.max_rel, note)


def _flat(tensors: dict, names: list[str]) -> torch.Tensor:
    return torch.cat([tensors[k].detach().double().flatten() for k in names])


def compare_with_baseline(
    op: str,
    shape,
    dtype: str,
    out: torch.Tensor,
    baseline: torch.Tensor,
    ref: torch.Tensor,
    baseline_name: str = "baseline",
    note: str = "",
) -> CheckResult:
    """One row for a fast path that may round but must not round worse than a baseline: out and baseline both
    approximate ref (e.g. compiled bf16 and eager bf16 vs float64). err = the relative-norm error of out vs ref;
    pass iff everything is finite and err <= COMPILE_BF16_FACTOR x baseline's error + COMPILE_BF16_FLOOR. The
    note gives the baseline's error."""
    base = compare(op, shape, dtype, baseline, ref, math.inf)
    got = compare(op, shape, dtype, out, ref, COMPILE_BF16_FACTOR * base.err + COMPILE_BF16_FLOOR)
    extra = f"{baseline_name} err {base.err:.2e}"
    if base.failed:  # a non-finite or mis-shaped baseline or reference leaves nothing to compare with
        got.status = "FAIL"
        extra += f" ({base.note})"
    got.note = extra + (f"; {got.note}" if got.note else "") + (f"; {note}" if note else "")
    return got


def grad_of(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(value, d(value . weights)/dx) for a leaf copy of x."""
    x = x.detach().clone().requires_grad_(True)
    value = fn(x)
    target = value.sum() if weights is None else (value * weights.to(value.dtype)).sum()
    (grad,) = torch.autograd.grad(target, x)
    return value.detach(), grad


# ------------------------------------------------------------------------------ inputs


def projections(ctx: Context, n: int, b: int, d: int) -> torch.Tensor:
    """Raw projector-like outputs p (n, B, d) in fp32: the patches of an image share a direction
    (cosines ~0.6), row norms spread over ~2 decades; never zero."""
    p = ctx.randn(1, b, d) + 0.8 * ctx.randn(n, b, d)
    return (p * torch.exp(ctx.randn(n, b, 1))).to(ctx.device)


def unit_rows(ctx: Context, n: int, b: int, d: int) -> torch.Tensor:
    """Unit-norm rows (n, B, d) as the TCR sees them: different images, mildly correlated."""
    z = ctx.randn(n, b, d) + 0.3 * ctx.randn(n, 1, d)
    return F.normalize(z, dim=-1).to(ctx.device)
