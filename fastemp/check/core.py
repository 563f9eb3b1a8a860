"""`fastemp check` building blocks: the row, the per-check context, the comparisons that make a row, the
tolerances (docs/check.md says why each has its value) and the random inputs the checks share."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

FP32_TOL = 1e-5  # fp32 math vs float64: values; gradients of the cosine kernel
SOLVE_TOL = 1e-4  # gradients through the Cholesky solve
BF16_TOL = 2.0**-8  # anything stored in bf16 (one rounding <= 2^-9)
BF16_FUSED_TOL = 2.0**-7  # the fused loss's bf16 gradient: up to three roundings
FP64_TOL = 1e-9  # the same maths in float64 (compiled vs eager on CPU, ghost BN vs the gradient cache)
COMPILE_BF16_FACTOR = 2.0  # CUDA, bf16 autocast: compiled's error vs float64 <= 2 x eager's error ...
COMPILE_BF16_FLOOR = 1e-4  # ... + this (an eager error near 0 would leave no room for fp32 reordering)
AUGMENT_TOL = 0.01  # absolute, on normalised pixel values (std ~0.45)


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
        """This device's grid; under --quick its quick one (default: the first entry)."""
        full, quick = (cuda, quick_cuda) if self.cuda else (cpu, quick_cpu)
        return (full[:1] if quick is None else quick) if self.quick else full

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen)

    def seed(self) -> int:
        return int(torch.randint(0, 2**31 - 1, (1,), generator=self.gen))


def row(op: str, shape, dtype: str, err: float, tol: float, max_abs=math.nan, max_rel=math.nan, note="") -> CheckResult:
    """A row from its criterion: pass iff err is finite and <= tol (NaN never passes)."""
    shape = "x".join(str(s) for s in shape) if isinstance(shape, (tuple, list, torch.Size)) else str(shape)
    ok = math.isfinite(err) and err <= tol
    return CheckResult(op, shape, dtype, err, tol, max_abs, max_rel, "pass" if ok else "FAIL", note)


def skipped(op: str, reason: str) -> CheckResult:
    return CheckResult(op, "-", "-", math.nan, math.nan, math.nan, math.nan, "skipped", reason)


def compare(op: str, shape, dtype: str, out, ref, tol: float, floor: float = 1e-12, note: str = "") -> CheckResult:
    """One row: the relative-norm error of out vs ref in float64, pass iff everything is finite and it is <= tol.
    Named tensors (dicts: gradients, parameters, optimizer state): the larger of that and the worst tensor's
    error (worst_tensor), named in the note, so a bug in one small tensor is not diluted by the large ones."""
    if isinstance(ref, dict):
        flat = compare(op, shape, dtype, _flat(out, ref), _flat(ref, ref), tol)
        if not math.isfinite(flat.err):  # mis-shaped or non-finite
            return flat
        worst, worst_err = worst_tensor(out, ref)
        note = f"worst tensor {worst}" + (f"; {note}" if note else "")
        return row(op, shape, dtype, max(flat.err, worst_err), tol, flat.max_abs, flat.max_rel, note)
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


def worst_tensor(out: dict, ref: dict) -> tuple[str, float]:
    """The named tensor with the largest relative-norm error against max(its norm, 1e-3 x the norm of all of them)
    (a bias before BatchNorm has a zero gradient), and that error."""
    floor = max(1e-3 * _flat(ref, ref).norm().item(), 1e-12)
    errors = {k: (out[k].double() - r.double()).norm().item() / max(r.norm().item(), floor) for k, r in ref.items()}
    worst = max(errors, key=lambda k: errors[k] if math.isfinite(errors[k]) else math.inf)
    return worst, errors[worst]


def _flat(tensors: dict, names) -> torch.Tensor:
    return torch.cat([tensors[k].detach().double().flatten() for k in names])


def compare_with_baseline(
    op: str, shape, dtype: str, out, baseline, ref, baseline_name: str, note: str = ""
) -> CheckResult:
    """One row for a fast path that may round but not worse than a baseline (compiled vs eager bf16, both vs
    float64 ref): pass iff err(out) <= COMPILE_BF16_FACTOR x err(baseline) + COMPILE_BF16_FLOOR, all finite.
    Named tensors (dicts) are compared as one; the note names out's worst tensor (worst_tensor)."""
    if isinstance(ref, dict):
        worst, worst_err = worst_tensor(out, ref)
        note = f"worst tensor {worst}: {worst_err:.1e}" + (f"; {note}" if note else "")
        out, baseline, ref = (_flat(t, ref) for t in (out, baseline, ref))
    base = compare(op, shape, dtype, baseline, ref, math.inf)
    got = compare(op, shape, dtype, out, ref, COMPILE_BF16_FACTOR * base.err + COMPILE_BF16_FLOOR)
    extra = f"{baseline_name} err {base.err:.2e}"
    if base.status == "FAIL":  # a non-finite or mis-shaped baseline or reference leaves nothing to compare with
        got.status = "FAIL"
        extra += f" ({base.note})"
    got.note = extra + (f"; {got.note}" if got.note else "") + (f"; {note}" if note else "")
    return got


def grad_of(fn: Callable, x: torch.Tensor, weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(value, d(value . weights)/dx) for a leaf copy of x."""
    x = x.detach().clone().requires_grad_(True)
    value = fn(x)
    target = value.sum() if weights is None else (value * weights.to(value.dtype)).sum()
    (grad,) = torch.autograd.grad(target, x)
    return value.detach(), grad


def projections(ctx: Context, n: int, b: int, d: int) -> torch.Tensor:
    """Projector-like p (n, B, d) in fp32: an image's patches share a direction (cosines ~0.6), row norms spread
    over ~2 decades, never zero."""
    p = ctx.randn(1, b, d) + 0.8 * ctx.randn(n, b, d)
    return (p * torch.exp(ctx.randn(n, b, 1))).to(ctx.device)


def unit_rows(ctx: Context, n: int, b: int, d: int) -> torch.Tensor:
    """Unit-norm rows (n, B, d) as the TCR sees them: different images, mildly correlated."""
    z = ctx.randn(n, b, d) + 0.3 * ctx.randn(n, 1, d)
    return F.normalize(z, dim=-1).to(ctx.device)
