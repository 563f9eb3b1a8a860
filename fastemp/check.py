"""`fastemp check`: every fast path against its reference, on fresh random inputs, on this machine.

    fastemp check [--device cuda|cpu] [--json FILE] [--quick] [--seed N] [--only NAME,...]

For users who regression-test the kernels on their card. Each run draws a new seed (printed and
written to the JSON; `--seed` replays a run), runs the checks below over a grid of shapes and
dtypes, prints one table row per compared quantity and exits 1 if any row fails.

    cosine_to_mean  Triton cosine-to-mean kernel: loss, cosines, dL/dp vs float64 reference
    tcr             batched-Cholesky total coding rate: R(Z_i) and dR/dZ vs float64 literal logdet
    loss            projection_loss_terms (unfused and fused) vs reference_emp_ssl_loss(F.normalize(p))
    compile         torch.compile(model) vs eager: h, p, parameter gradients, BatchNorm running stats
    augment         DALI vs torch patch backend: per-channel mean / std of the same patches
    gradcache       two-pass gradient cache vs one autograd graph with the same chunk-wise BatchNorm
    checkpoint      activation checkpointing vs plain

Pass criterion of a row (column `err`): the relative-norm error ||out - ref|| / max(||ref||, floor)
in float64 (the floor only guards a reference that is exactly zero), except `augment` (absolute
differences of the six channel statistics, see check_augment_stats). `max_abs` and `max_rel` are
elementwise: max |out - ref| and max |out - ref| / max(|ref|, 1e-3 max|ref|). NaN never passes.
A check that cannot run here (no Triton on CPU, no DALI, `--quick`) is reported as `skipped`
with the reason: visible, but not a failure. An exception inside a fast path is a failure.

Tolerances (relative-norm unless noted):
  fp32 math vs float64: values 1e-5; gradients 1e-5 (cosine kernel) and 1e-4 (anything through the
  Cholesky solve, whose condition number reaches ~100 here).
  bf16 inputs are compared with the reference on the bf16-rounded input, so values keep the fp32
  tolerance; gradients w.r.t. a bf16 tensor are stored in bf16: 2^-8 (one rounding is <= 2^-9;
  measured ~1.7e-3). The fused loss's bf16 gradient is rounded up to three times (kernel dp, its
  fp32 scaling, the sum with the TCR gradient at the bf16 leaf; measured ~3e-3): 2^-7.
  compile, CPU: a tiny model in float64, 1e-9 (see compile_case for why not fp32). CUDA: the real
  model under bf16 autocast, eager vs compiled both bf16 but rounding at different places (and
  flipping the ReLUs whose pre-activation lies within that rounding of 0): 3e-2 for h, p and the
  running stats, 1e-1 for the gradients. A wrong op gives errors of order 1.
  augment: absolute 0.01 on the channel means / stds (the tolerance of tests/test_patches_dali.py).
  gradcache / checkpointing (fp32, the same ops in both): gradients 1e-4, loss and running stats 1e-5.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
import traceback
import zlib
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import gradcache, losses, model as model_lib, reference
from .config import AugmentConfig, ConfigError, LossConfig

FP32_TOL = 1e-5  # fp32 math vs float64: values; gradients of the cosine kernel
SOLVE_TOL = 1e-4  # gradients through the Cholesky solve
BF16_TOL = 2.0**-8  # anything stored in bf16 (one rounding <= 2^-9)
BF16_FUSED_TOL = 2.0**-7  # the fused loss's bf16 gradient: up to three roundings (see the docstring)
COMPILE_FP64_TOL = 1e-9  # CPU: compiled vs eager, both float64 (measured <= 5e-13)
COMPILE_BF16_TOL = 3e-2  # CUDA, bf16 autocast: h, p, running stats
COMPILE_BF16_GRAD_TOL = 1e-1  # CUDA, bf16 autocast: gradients (see the module docstring)
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

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen)

    def seed(self) -> int:
        """A seed drawn from the check's stream (model initialisation, augmentation calls)."""
        return int(torch.randint(0, 2**31 - 1, (1,), generator=self.gen))


# ------------------------------------------------------------------------------ comparison


def _fmt_shape(shape) -> str:
    return "x".join(str(s) for s in shape) if isinstance(shape, (tuple, list, torch.Size)) else str(shape)


def compare(op: str, shape, dtype: str, out: torch.Tensor, ref: torch.Tensor, tol: float,
            floor: float = 1e-12, note: str = "") -> CheckResult:
    """One table row: relative-norm error of out vs ref (float64), pass iff finite and <= tol."""
    shape = _fmt_shape(shape)
    out, ref = out.detach().double(), ref.detach().double().to(out.device)
    if out.shape != ref.shape:
        return CheckResult(op, shape, dtype, math.nan, tol, math.nan, math.nan, "FAIL",
                           f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    diff = (out - ref).abs()
    ref_abs = ref.abs()
    err = (diff.norm() / ref.norm().clamp_min(floor)).item()
    max_abs = diff.max().item()
    max_rel = (diff / ref_abs.clamp_min(max(1e-3 * ref_abs.max().item(), floor))).max().item()
    finite = bool(torch.isfinite(out).all()) and bool(torch.isfinite(ref).all())
    if not finite:
        note = ("non-finite output" if not torch.isfinite(out).all() else "non-finite reference") + \
            (f"; {note}" if note else "")
    ok = finite and math.isfinite(err) and err <= tol
    return CheckResult(op, shape, dtype, err, tol, max_abs, max_rel, "pass" if ok else "FAIL", note)


def skipped(op: str, reason: str, shape="-", dtype: str = "-") -> CheckResult:
    return CheckResult(op, _fmt_shape(shape), dtype, math.nan, math.nan, math.nan, math.nan, "skipped", reason)


def _grad_of(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
             weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
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


# ------------------------------------------------------------------------------ 1. cosine-to-mean


def _cosine_reference(p: torch.Tensor):
    """float64 loss, gradient and cosines on p's exact (possibly bf16-rounded) values."""
    p64 = p.detach().double()
    loss, grad = _grad_of(lambda q: reference.reference_invariance_loss(F.normalize(q, dim=-1)), p64)
    return loss, grad, reference.reference_cosines(F.normalize(p64, dim=-1))


def check_cosine_to_mean(ctx: Context) -> list[CheckResult]:
    from .kernels import cosine_to_mean as ctm

    if not ctm.triton_usable(ctx.device):
        why = ("Triton is not installed" if not ctm.HAVE_TRITON else
               "set TRITON_INTERPRET=1 (before Python starts) to run the kernel in Triton's CPU interpreter"
               if ctx.device.type == "cpu" else "CUDA is not available")
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
            rows += [compare("cos_to_mean loss", shape, name, loss, ref_loss, FP32_TOL),
                     compare("cos_to_mean cos", shape, name, cos, ref_cos, FP32_TOL),
                     compare("cos_to_mean grad", shape, name, q.grad, ref_grad, grad_tol)]
    return rows


# ------------------------------------------------------------------------------ 2. TCR


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
            ref, ref_grad = _grad_of(reference.reference_total_coding_rate, z.double(), weights.double())
            got, grad = _grad_of(losses.total_coding_rate, z, weights)
            side = "B<d" if shape[1] < shape[2] else "B>d"
            rows += [compare("tcr value", shape, name, got, ref, FP32_TOL, note=side),
                     compare("tcr grad", shape, name, grad, ref_grad,
                             SOLVE_TOL if dtype == torch.float32 else BF16_TOL, note=side)]
    return rows


# ------------------------------------------------------------------------------ 3. full loss


def check_projection_loss(ctx: Context) -> list[CheckResult]:
    from .kernels.cosine_to_mean import triton_usable

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
        return reference.reference_emp_ssl_loss(F.normalize(q, dim=-1), cfg.eps, cfg.invariance_weight,
                                                cfg.tcr_weight)

    for shape in shapes:
        base = projections(ctx, *shape)
        for name, dtype in DTYPES.items():
            p = base.to(dtype)
            ref, ref_grad = _grad_of(ref_fn, p.double())
            for fused in (False, True) if fused_ok else (False,):
                op = "loss fused" if fused else "loss unfused"
                got, grad = _grad_of(lambda q: losses.projection_loss_terms(q, cfg, fused=fused).total, p)
                grad_tol = SOLVE_TOL if dtype == torch.float32 else BF16_FUSED_TOL if fused else BF16_TOL
                rows += [compare(f"{op} total", shape, name, got, ref, FP32_TOL),
                         compare(f"{op} grad", shape, name, grad, ref_grad, grad_tol)]
    return rows


# ------------------------------------------------------------------------------ 4. compile


class FeaturesAndProjection(nn.Module):
    """EMPEncoder.forward returning (h, p): the same modules and ops as model(x), h kept as an output
    so one compiled graph gives both."""

    def __init__(self, encoder: model_lib.EMPEncoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder.encode(x)
        return h, self.encoder.projection(h)


def compile_case(device: torch.device) -> dict:
    """The model and input of the compile check.

    CUDA: the real model as the trainer runs it (bf16 autocast, channels_last).
    CPU: a tiny model in float64 (the trainer does not compile on CPU; this checks graph capture,
    decompositions, fusion and BatchNorm buffer updates). Not fp32: a gradient of a ReLU network is
    discontinuous where a pre-activation crosses 0, and the ~1e-6 relative differences between
    compiled and eager fp32 activations flip such a ReLU in about 4 of 10 random draws at this size;
    one flip (a pre-activation at 6e-7 std) moved conv1's gradient by 2.9% in both the compiled model
    and in an eager float64 model whose ReLU mask was shifted by 1e-6 std. In float64 the differences
    are ~1e-16 and no flip happens.
    """
    if device.type == "cuda":
        return dict(model=dict(), n=4, batch=32, size=32, dtype=torch.float32, amp=torch.bfloat16,
                    channels_last=True)
    return dict(model=dict(width=8, hidden_dim=64, z_dim=32), n=4, batch=8, size=16, dtype=torch.float64,
                amp=None, channels_last=False)


def train_step(forward: Callable, encoder: nn.Module, x: torch.Tensor, n: int, amp_dtype=None) -> dict:
    """One forward/backward of the EMP loss (the float64 reference formula on p, so the loss itself
    adds no rounding); returns h, p, the parameter gradients and the BatchNorm running stats."""
    amp = torch.autocast(x.device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    with amp:
        h, p = forward(x)
    z = F.normalize(p.double().view(n, -1, p.shape[-1]), dim=-1)
    reference.reference_emp_ssl_loss(z).backward()
    return {"h": h.detach().double(), "p": p.detach().double(),
            "grads": {name: q.grad.detach().double() for name, q in encoder.named_parameters()},
            "stats": torch.cat([b.detach().double().flatten() for name, b in encoder.named_buffers()
                                if "running" in name])}


def _grad_row(op: str, shape, dtype: str, grads: dict, ref_grads: dict, tol: float) -> CheckResult:
    """All parameter gradients as one vector; the worst single tensor is named in the note (its error
    relative to max(its norm, 1e-3 x the total norm): a Linear bias before BatchNorm has zero gradient)."""
    names = list(ref_grads)
    total = torch.cat([ref_grads[k].flatten() for k in names]).norm().item()

    def err(k):
        return (grads[k] - ref_grads[k]).norm().item() / max(ref_grads[k].norm().item(), 1e-3 * total)

    worst = max(names, key=err)
    row = compare(op, shape, dtype, torch.cat([grads[k].flatten() for k in names]),
                  torch.cat([ref_grads[k].flatten() for k in names]), tol)
    row.note = f"worst tensor {worst}: {err(worst):.1e}" + (f"; {row.note}" if row.note else "")
    return row


def check_compile(ctx: Context) -> list[CheckResult]:
    if ctx.quick:
        return [skipped("compile", "--quick skips compilation")]
    case = compile_case(ctx.device)
    fmt = torch.channels_last if case["channels_last"] else torch.contiguous_format
    torch.manual_seed(ctx.seed())
    eager = model_lib.EMPEncoder(**case["model"]).to(ctx.device, case["dtype"]).train()
    eager = eager.to(memory_format=fmt)
    compiled_model = copy.deepcopy(eager)
    n, batch, size = case["n"], case["batch"], case["size"]
    x = ctx.randn(n * batch, 3, size, size).to(ctx.device, case["dtype"]).contiguous(memory_format=fmt)
    got = train_step(torch.compile(FeaturesAndProjection(compiled_model)), compiled_model, x, n, case["amp"])
    ref = train_step(FeaturesAndProjection(eager), eager, x, n, case["amp"])
    if case["amp"]:
        dtype, tol, grad_tol = "bf16-amp", COMPILE_BF16_TOL, COMPILE_BF16_GRAD_TOL
    else:
        dtype, tol, grad_tol = "fp64", COMPILE_FP64_TOL, COMPILE_FP64_TOL
    shape = (n * batch, 3, size, size)
    return [compare("compile h", shape, dtype, got["h"], ref["h"], tol),
            compare("compile p", shape, dtype, got["p"], ref["p"], tol),
            _grad_row("compile grads", shape, dtype, got["grads"], ref["grads"], grad_tol),
            compare("compile BN stats", shape, dtype, got["stats"], ref["stats"], tol)]


# ------------------------------------------------------------------------------ 5. augmentation


def smooth_images(ctx: Context, count: int, size: int = 32) -> torch.Tensor:
    """uint8 (N, H, W, 3) natural-ish images: smooth random colour fields, some saturated (the recipe
    of tests/test_patches_dali.py), on the check's device."""
    low = torch.rand(count, 3, 6, 6, generator=ctx.gen) * 1.2 - 0.1
    img = F.interpolate(low, size=size, mode="bilinear", align_corners=False)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().to(ctx.device)


def channel_stats(patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean r, g, b, std r, g, b) over every pixel of every patch, and their standard
    errors estimated from the per-patch values (patches are independent draws), float64."""
    x = patches.detach().double().cpu().transpose(0, 1).reshape(3, patches.shape[0], -1)  # (3, P, pixels)
    mean = x.mean((1, 2))
    std = x.var((1, 2)).sqrt()
    per_patch_mean = x.mean(2)  # (3, P)
    per_patch_var = ((x - mean[:, None, None]) ** 2).mean(2)
    p = x.shape[1]
    se_mean = per_patch_mean.std(1) / math.sqrt(p)
    se_std = per_patch_var.std(1) / math.sqrt(p) / (2 * std)  # delta method: d std = d var / (2 std)
    return torch.cat([mean, std]), torch.cat([se_mean, se_std])


def _stats_note(got: torch.Tensor, ref: torch.Tensor) -> str:
    return "dali/torch mean rgb, std rgb: " + " ".join(f"{a:+.3f}/{b:+.3f}" for a, b in zip(got.tolist(), ref.tolist()))


def check_augment_stats(ctx: Context) -> list[CheckResult]:
    """DALI vs torch patches of the same images, default recipe (tolerances of tests/test_patches_dali.py).

    paired: the same seed. DALI draws its parameters with the torch backend's sample_params on a CPU
      generator, so the torch backend run on a CPU copy of the images uses identical parameters; the
      documented semantic differences (fixed jitter order, reflect-101 blur borders) move the channel
      statistics by ~0.002-0.005, so |dali - torch| <= 0.01 (absolute, normalised pixel scale).
    independent: the torch backend with another seed on the check's device; |dali - torch| must be
      within 5 standard errors (from the per-patch values) + 0.01; err is the worst |diff| / that bound.
    """
    from .patches import dali_available

    if not dali_available():
        return [skipped("augment dali-vs-torch", "nvidia.dali does not import")]
    from .patches_dali import DaliPatches
    from .patches_torch import TorchPatches

    aug = AugmentConfig()
    batch, n = 16, (50 if ctx.quick else 100)
    images = smooth_images(ctx, batch)
    index = torch.arange(batch, device=ctx.device)
    seed, other_seed = ctx.seed(), ctx.seed()
    dali, se_dali = channel_stats(DaliPatches(images, aug, seed=seed)(index, n, seed))
    paired, _ = channel_stats(TorchPatches(images.cpu(), aug)(index.cpu(), n, seed))
    indep, se_indep = channel_stats(TorchPatches(images, aug)(index, n, other_seed))
    shape = (n * batch, 3, aug.crop_size, aug.crop_size)
    rows = []
    diff = (dali - paired).abs()
    err = diff.max().item()
    rows.append(CheckResult("augment paired", _fmt_shape(shape), "fp32", err, AUGMENT_TOL, err, math.nan,
                            "pass" if math.isfinite(err) and err <= AUGMENT_TOL else "FAIL",
                            "abs diff of channel mean/std, same seed; " + _stats_note(dali, paired)))
    bound = 5 * torch.sqrt(se_dali**2 + se_indep**2) + AUGMENT_TOL
    diff = (dali - indep).abs()
    err = (diff / bound).max().item()
    rows.append(CheckResult("augment independent", _fmt_shape(shape), "fp32", err, 1.0, diff.max().item(), math.nan,
                            "pass" if math.isfinite(err) and err <= 1.0 else "FAIL",
                            "|diff| / (5 SE + 0.01), other seed; " + _stats_note(dali, indep)))
    return rows


# ------------------------------------------------------------------------------ 6. gradient cache


def _small_model(ctx: Context, seed: int) -> model_lib.EMPEncoder:
    torch.manual_seed(seed)
    return model_lib.EMPEncoder(width=4, hidden_dim=32, z_dim=16).to(ctx.device).train()


def _grads(m: nn.Module) -> torch.Tensor:
    return torch.cat([q.grad.flatten() for q in m.parameters()])


def _stats(m: nn.Module) -> torch.Tensor:
    return torch.cat([b.flatten().float() for name, b in m.named_buffers() if "running" in name])


def _emp_loss(p: torch.Tensor):
    return losses.projection_loss_terms(p.float(), LossConfig(), fused=False)


def _small_case(ctx: Context):
    n, batch = (8, 8) if ctx.cuda else (6, 4)
    return n, batch, ctx.randn(n * batch, 3, 16, 16).to(ctx.device), ctx.seed()


def check_gradient_cache(ctx: Context) -> list[CheckResult]:
    """Two-pass gradient cache vs one autograd graph with the same chunk-wise BatchNorm (fp32, small model)."""
    n, batch, x, seed = _small_case(ctx)
    chunks = 3
    ref, got = _small_model(ctx, seed), _small_model(ctx, seed)
    p = torch.cat([ref(x[lo:hi]) for lo, hi in gradcache.chunk_bounds(n, batch, chunks)])
    ref_terms = _emp_loss(p.view(n, batch, -1))
    ref_terms.total.backward()
    terms = gradcache.gradient_cache_step(got, x, n, chunks, _emp_loss, nullcontext())
    shape, note = tuple(x.shape), f"{chunks} chunks"
    return [compare("gradcache loss", shape, "fp32", terms.total, ref_terms.total, FP32_TOL, note=note),
            compare("gradcache grads", shape, "fp32", _grads(got), _grads(ref), SOLVE_TOL, note=note),
            compare("gradcache BN stats", shape, "fp32", _stats(got), _stats(ref), FP32_TOL, note=note)]


def check_checkpointing(ctx: Context) -> list[CheckResult]:
    """Activation checkpointing (model.backbone.checkpoint_activations) vs plain (fp32, small model)."""
    n, batch, x, seed = _small_case(ctx)
    plain = _small_model(ctx, seed)
    ckpt = copy.deepcopy(plain)
    ckpt.backbone.checkpoint_activations = True
    for m in (plain, ckpt):
        _emp_loss(m(x).view(n, batch, -1)).total.backward()
    shape = tuple(x.shape)
    return [compare("checkpoint grads", shape, "fp32", _grads(ckpt), _grads(plain), SOLVE_TOL),
            compare("checkpoint BN stats", shape, "fp32", _stats(ckpt), _stats(plain), FP32_TOL)]


# ------------------------------------------------------------------------------ driver

CHECKS: dict[str, Callable[[Context], list[CheckResult]]] = {
    "cosine_to_mean": check_cosine_to_mean,
    "tcr": check_total_coding_rate,
    "loss": check_projection_loss,
    "compile": check_compile,
    "augment": check_augment_stats,
    "gradcache": check_gradient_cache,
    "checkpoint": check_checkpointing,
}


def new_seed() -> int:
    return int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF


def run_checks(device: str | torch.device, quick: bool = False, seed: int | None = None,
               only: Sequence[str] | None = None,
               report: Callable[[CheckResult], None] | None = None,
               timings: dict[str, float] | None = None) -> list[CheckResult]:
    """Run the checks (all, or those named in `only`) on `device`; `report` sees each row as it is
    made, `timings` (if given) receives each check's seconds.

    The caller's RNG state is left untouched. An exception inside a check becomes a FAIL row.
    """
    device = torch.device(device)
    unknown = sorted(set(only or ()) - set(CHECKS))
    if unknown:
        raise ConfigError(f"unknown check(s) {', '.join(unknown)} (choose from {', '.join(CHECKS)})")
    seed = new_seed() if seed is None else seed
    results: list[CheckResult] = []
    cuda_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        for name, check in CHECKS.items():
            if only and name not in only:
                continue
            # each check draws from its own stream: `--seed S --only NAME` replays NAME's inputs exactly
            stream = (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63
            ctx = Context(device, quick, torch.Generator().manual_seed(stream))
            t0 = time.perf_counter()
            try:
                rows = check(ctx)
            except Exception as err:  # a crash in a fast path is a failure, with its traceback shown
                traceback.print_exc(file=sys.stderr)
                rows = [CheckResult(name, "-", "-", math.nan, math.nan, math.nan, math.nan, "FAIL",
                                    f"{type(err).__name__}: {err}".splitlines()[0][:200])]
            if timings is not None:
                timings[name] = round(time.perf_counter() - t0, 3)
            for row in rows:
                if report:
                    report(row)
            results += rows
    return results


# ------------------------------------------------------------------------------ output

_COLUMNS = [("op", 24), ("shape", 16), ("dtype", 8), ("err", 9), ("tol", 9), ("max_abs", 9), ("max_rel", 9),
            ("result", 7)]


def _num(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.2e}"


def format_header() -> str:
    return " ".join(f"{name:<{width}}" for name, width in _COLUMNS) + " note"


def format_row(r: CheckResult) -> str:
    cells = [r.op, r.shape, r.dtype, _num(r.err), _num(r.tol), _num(r.max_abs), _num(r.max_rel), r.status]
    if r.status == "FAIL" and math.isnan(r.err):
        cells[3] = "nan"
    return " ".join(f"{c:<{w}}" for c, (_, w) in zip(cells, _COLUMNS)) + (f" {r.note}" if r.note else "")


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    return value


def check_environment(device: torch.device) -> dict:
    from .runs import environment

    env = environment(device)
    env["triton_interpret"] = os.environ.get("TRITON_INTERPRET", "0")
    return env


def cmd_check(args) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda, but CUDA is not available (use --device cpu)")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    only = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else None
    seed = new_seed() if args.seed is None else args.seed
    env = check_environment(device)
    print(f"fastemp check on {env['device_name']} ({device}); torch {env['torch']}, triton {env['triton']}, "
          f"DALI {env['dali']}; TRITON_INTERPRET={env['triton_interpret']}")
    print(f"seed {seed} (replay with --seed {seed})")
    print(format_header())
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    results = run_checks(device, quick=args.quick, seed=seed, only=only,
                         report=lambda r: print(format_row(r), flush=True), timings=timings)
    seconds = time.perf_counter() - t0
    counts = {s: sum(r.status == s for r in results) for s in ("pass", "FAIL", "skipped")}
    ok = counts["FAIL"] == 0
    print(f"{'OK' if ok else 'FAILED'}: {counts['pass']} passed, {counts['FAIL']} failed, "
          f"{counts['skipped']} skipped in {seconds:.1f} s")
    if args.json:
        doc = {"passed": ok, "seed": seed, "device": str(device), "device_name": env["device_name"],
               "torch": env["torch"], "triton": env["triton"], "dali": env["dali"], "quick": bool(args.quick),
               "only": only, "seconds": seconds, "check_seconds": timings, "counts": counts, "environment": env,
               "results": [{k: _json_safe(v) for k, v in asdict(r).items()} for r in results]}
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {path}")
    return 0 if ok else 1


def register_cli(subparsers) -> None:
    """Add `check` to the fastemp command line (fastemp/cli.py)."""
    p = subparsers.add_parser("check", help="check every fast path against its reference on this machine",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when available, else cpu")
    p.add_argument("--json", metavar="FILE", help="also write the table, versions and seed as JSON")
    p.add_argument("--quick", action="store_true", help="fewer shapes, no torch.compile")
    p.add_argument("--seed", type=int, help="replay a run's random inputs (default: a fresh seed)")
    p.add_argument("--only", metavar="NAMES", help=f"comma-separated subset of: {', '.join(CHECKS)}")
    p.set_defaults(func=cmd_check)
