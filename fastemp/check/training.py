"""`fastemp check`: the training-step fast paths against the plain step -- torch.compile vs eager,
the two-pass gradient cache vs one autograd graph, activation checkpointing vs plain."""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from .. import gradcache, losses
from .. import model as model_lib
from ..config import LossConfig
from . import reference
from .core import (
    COMPILE_BF16_FACTOR,
    COMPILE_BF16_FLOOR,
    COMPILE_FP64_TOL,
    FP32_TOL,
    SOLVE_TOL,
    CheckResult,
    Context,
    compare,
    compare_with_baseline,
    skipped,
)

# ------------------------------------------------------------------------------ compile


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

    CUDA: the real model as the trainer runs it (bf16 autocast, channels_last). Compiled and eager
    bf16 round at different places, so they are not compared with each other but each with a float64
    eager run of the same weights and input (see compile_rows).
    CPU: a tiny model in float64 (the trainer does not compile on CPU; this checks graph capture,
    decompositions, fusion and BatchNorm buffer updates), compiled vs eager directly. Not fp32: a
    gradient of a ReLU network is discontinuous where a pre-activation crosses 0, and the ~1e-6
    relative differences between compiled and eager fp32 activations flip such a ReLU in about 4 of
    10 random draws at this size; one flip (a pre-activation at 6e-7 std) moved conv1's gradient by
    2.9% in both the compiled model and in an eager float64 model whose ReLU mask was shifted by 1e-6
    std. In float64 the differences are ~1e-16 and no flip happens.
    """
    if device.type == "cuda":
        return dict(model=dict(), n=4, batch=32, size=32, dtype=torch.float32, amp=torch.bfloat16, channels_last=True)
    return dict(
        model=dict(width=8, hidden_dim=64, z_dim=32),
        n=4,
        batch=8,
        size=16,
        dtype=torch.float64,
        amp=None,
        channels_last=False,
    )


def train_step(forward: Callable, encoder: nn.Module, x: torch.Tensor, n: int, amp_dtype=None) -> dict:
    """One forward/backward of the EMP loss (the float64 reference formula on p, so the loss itself
    adds no rounding); returns h, p, the parameter gradients and the BatchNorm running stats."""
    amp = torch.autocast(x.device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    with amp:
        h, p = forward(x)
    z = F.normalize(p.double().view(n, -1, p.shape[-1]), dim=-1)
    reference.reference_emp_ssl_loss(z).backward()
    return {
        "h": h.detach().double(),
        "p": p.detach().double(),
        "grads": {name: q.grad.detach().double() for name, q in encoder.named_parameters()},
        "stats": torch.cat([b.detach().double().flatten() for name, b in encoder.named_buffers() if "running" in name]),
    }


def _flat(grads: dict, names: list[str]) -> torch.Tensor:
    return torch.cat([grads[k].flatten() for k in names])


def _tensor_err(grads: dict, ref_grads: dict, name: str, total: float) -> float:
    """One gradient tensor's error relative to max(its norm, 1e-3 x the total norm): a Linear bias
    before BatchNorm has zero gradient."""
    return (grads[name] - ref_grads[name]).norm().item() / max(ref_grads[name].norm().item(), 1e-3 * total)


def _grad_row(
    op: str, shape, dtype: str, grads: dict, ref_grads: dict, tol: float | None = None, eager_grads: dict | None = None
) -> CheckResult:
    """All parameter gradients as one vector, against ref_grads at tol, or (eager_grads given) at most
    COMPILE_BF16_FACTOR x eager's error + floor; the worst single tensor is named in the note."""
    names = list(ref_grads)
    total = _flat(ref_grads, names).norm().item()
    worst = max(names, key=lambda k: _tensor_err(grads, ref_grads, k, total))
    note = f"worst tensor {worst}: {_tensor_err(grads, ref_grads, worst, total):.1e}"
    if eager_grads is None:
        row = compare(op, shape, dtype, _flat(grads, names), _flat(ref_grads, names), tol)
        row.note = note + (f"; {row.note}" if row.note else "")
        return row
    note += f" (eager {_tensor_err(eager_grads, ref_grads, worst, total):.1e})"
    return compare_with_baseline(
        op,
        shape,
        dtype,
        _flat(grads, names),
        _flat(eager_grads, names),
        _flat(ref_grads, names),
        COMPILE_BF16_FACTOR,
        COMPILE_BF16_FLOOR,
        "eager",
        note,
    )


def compile_rows(
    ctx: Context, case: dict, compile_fn: Callable[[nn.Module], Callable] = torch.compile
) -> list[CheckResult]:
    """One training step of compile_fn(model) against the eager model (case: see compile_case).

    Without autocast (float64): compiled vs eager at COMPILE_FP64_TOL. Under autocast: a third copy of
    the model runs the step eagerly in float64 without autocast (the same weights, input and initial
    running stats); each row's err is the compiled step's error against it, and the row passes iff
    that is at most COMPILE_BF16_FACTOR x the eager autocast step's error + COMPILE_BF16_FLOOR:
    compilation must not make bf16 worse than eager bf16 is. (The tests pass compile_fn = identity to
    run this on CPU without compiling.)
    """
    fmt = torch.channels_last if case["channels_last"] else torch.contiguous_format
    torch.manual_seed(ctx.seed())
    eager = model_lib.EMPEncoder(**case["model"]).to(ctx.device, case["dtype"]).train()
    eager = eager.to(memory_format=fmt)
    compiled_model = copy.deepcopy(eager)
    exact_model = copy.deepcopy(eager).double()  # copied before any step: the same initial running stats
    n, batch, size = case["n"], case["batch"], case["size"]
    x = ctx.randn(n * batch, 3, size, size).to(ctx.device, case["dtype"]).contiguous(memory_format=fmt)
    shape = (n * batch, 3, size, size)
    got = train_step(compile_fn(FeaturesAndProjection(compiled_model)), compiled_model, x, n, case["amp"])
    ref = train_step(FeaturesAndProjection(eager), eager, x, n, case["amp"])
    if not case["amp"]:
        dtype, tol = "fp64", COMPILE_FP64_TOL
        return [
            compare("compile h", shape, dtype, got["h"], ref["h"], tol),
            compare("compile p", shape, dtype, got["p"], ref["p"], tol),
            _grad_row("compile grads", shape, dtype, got["grads"], ref["grads"], tol),
            compare("compile BN stats", shape, dtype, got["stats"], ref["stats"], tol),
        ]
    exact = train_step(FeaturesAndProjection(exact_model), exact_model, x.double(), n)
    dtype = {torch.bfloat16: "bf16-amp", torch.float16: "fp16-amp"}.get(case["amp"], f"{case['amp']}-amp")

    def row(op, key):
        return compare_with_baseline(
            op, shape, dtype, got[key], ref[key], exact[key], COMPILE_BF16_FACTOR, COMPILE_BF16_FLOOR, "eager"
        )

    return [
        row("compile h", "h"),
        row("compile p", "p"),
        _grad_row("compile grads", shape, dtype, got["grads"], exact["grads"], eager_grads=ref["grads"]),
        row("compile BN stats", "stats"),
    ]


def check_compile(ctx: Context) -> list[CheckResult]:
    if ctx.quick:
        return [skipped("compile", "--quick skips compilation")]
    return compile_rows(ctx, compile_case(ctx.device))


# ------------------------------------------------------------------------------ gradient cache, checkpointing


def _small_model(ctx: Context, seed: int) -> model_lib.EMPEncoder:
    torch.manual_seed(seed)
    return model_lib.EMPEncoder(width=4, hidden_dim=32, z_dim=16).to(ctx.device).train()


def _grads(m: nn.Module) -> torch.Tensor:
    return torch.cat([q.grad.flatten() for q in m.parameters()])


def _stats(m: nn.Module) -> torch.Tensor:
    return torch.cat([b.flatten().float() for name, b in m.named_buffers() if "running" in name])


def _emp_loss(p: torch.Tensor):
    return losses.projection_loss_terms(p, LossConfig(), fused=False)


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
    return [
        compare("gradcache loss", shape, "fp32", terms.total, ref_terms.total, FP32_TOL, note=note),
        compare("gradcache grads", shape, "fp32", _grads(got), _grads(ref), SOLVE_TOL, note=note),
        compare("gradcache BN stats", shape, "fp32", _stats(got), _stats(ref), FP32_TOL, note=note),
    ]


def check_activation_checkpointing(ctx: Context) -> list[CheckResult]:
    """Activation checkpointing (model.backbone.checkpoint_activations) vs plain (fp32, small model)."""
    n, batch, x, seed = _small_case(ctx)
    plain = _small_model(ctx, seed)
    ckpt = copy.deepcopy(plain)
    ckpt.backbone.checkpoint_activations = True
    for m in (plain, ckpt):
        _emp_loss(m(x).view(n, batch, -1)).total.backward()
    shape = tuple(x.shape)
    return [
        compare("checkpoint grads", shape, "fp32", _grads(ckpt), _grads(plain), SOLVE_TOL),
        compare("checkpoint BN stats", shape, "fp32", _stats(ckpt), _stats(plain), FP32_TOL),
    ]


def check_ghost_batchnorm(ctx: Context) -> list[CheckResult]:
    """One pass with ghost BatchNorm (train.bn_groups) vs the two-pass gradient cache with the same groups
    (small model): the n=200 one-pass path against the one it replaces. In float64: with groups this small
    a channel's variance can be tiny, and BatchNorm's backward then amplifies fp32 rounding (and the ReLU
    masks it flips) far past any fixed tolerance, while the two computations are exactly the same maths."""
    n, batch, x, seed = _small_case(ctx)
    groups = 2
    ref, got = _small_model(ctx, seed).double(), _small_model(ctx, seed).double()
    x = x.double()
    ref_terms = gradcache.gradient_cache_step(ref, x, n, groups, _emp_loss, nullcontext())
    model_lib.set_batchnorm_groups(got, groups)
    terms = _emp_loss(got(x).view(n, batch, -1))
    terms.total.backward()
    shape, note = tuple(x.shape), f"{groups} groups"
    return [
        compare("ghost BN loss", shape, "fp64", terms.total, ref_terms.total, COMPILE_FP64_TOL, note=note),
        compare("ghost BN grads", shape, "fp64", _grads(got), _grads(ref), COMPILE_FP64_TOL, note=note),
        compare("ghost BN stats", shape, "fp64", _stats(got), _stats(ref), COMPILE_FP64_TOL, note=note),
    ]


def check_lars_fused(ctx: Context) -> list[CheckResult]:
    """LARS's compiled one-pass update (the Trainer's whenever the model is compiled) vs the plain per-tensor
    rule + torch SGD (check.reference.ReferenceLARS): the standard model's parameters, random gradients,
    3 steps (fp32).
    CUDA only: compiling it on a CPU takes a minute (tests/test_lars.py runs it there)."""
    from ..config import ModelConfig, OptimConfig
    from ..lars import build_lars

    if not ctx.cuda:
        return [skipped("lars fused", "compiled LARS is checked on CUDA; tests/test_lars.py covers the CPU")]
    if ctx.quick:
        return [skipped("lars fused", "--quick skips compilation")]
    seed = ctx.seed()
    models = []
    for _ in range(2):
        torch.manual_seed(seed)
        models.append(model_lib.build_model(ModelConfig()).to(ctx.device).to(memory_format=torch.channels_last))
    o = OptimConfig()
    eager = reference.reference_lars(models[0], o)
    fused = build_lars(models[1], o, fused_update=True)
    for lr in (0.3, 0.2, 0.1):
        for opt in (eager, fused):
            for group in opt.param_groups:
                group["lr"] = lr
        for a, b in zip(models[0].parameters(), models[1].parameters()):
            a.grad = torch.empty_like(a).copy_(ctx.randn(*a.shape) * 1e-2)  # the parameter's layout
            b.grad = a.grad.clone(memory_format=torch.preserve_format)
        eager.step()
        fused.step()
    flat = [torch.cat([q.detach().flatten() for q in m.parameters()]) for m in models]
    bufs = [
        torch.cat([o.state[q]["momentum_buffer"].flatten() for q in m.parameters()])
        for o, m in ((eager, models[0]), (fused, models[1]))
    ]
    shape = f"{flat[0].numel()} params"
    return [
        compare("lars fused params", shape, "fp32", flat[1], flat[0], FP32_TOL, note="3 steps"),
        compare("lars fused momentum", shape, "fp32", bufs[1], bufs[0], FP32_TOL, note="3 steps"),
    ]


# ------------------------------------------------------------------------------ evaluation forward


def eval_case(device: torch.device) -> dict:
    """The eval_forward check's sizes: CUDA, the standard model at the official protocol's forward shape, compiled
    in bf16 as evaluation runs it there; CPU, a tiny model in fp32 eager, as evaluation runs it here."""
    from ..config import EvalConfig

    if device.type == "cuda":
        return dict(model={}, count=200, eval=EvalConfig(), compiled=True)
    return dict(
        model=dict(width=8, hidden_dim=64, z_dim=32), count=12, eval=EvalConfig(patches=4, batch_size=5), compiled=False
    )


def check_eval_forward(ctx: Context) -> list[CheckResult]:
    """The evaluation's features (fastemp.evaluate.extract_features: patches, the encoder in eval mode, the
    mean over each image's patches) as the runtime runs them, against a plain fp32 eager loop over the same
    patches and weights (NCHW, no TF32, written out here).

    CUDA: the standard model as evaluation runs it after a compiled bf16 training -- bf16 autocast,
    channels_last, the encoder and the patch recipe compiled -- at the official protocol's shape (128 patches
    x 100 images a forward). Compiled and eager bf16 round at different places, so the row passes when the
    compiled error is at most COMPILE_BF16_FACTOR x the eager bf16 error + floor (as the compile rows).
    CPU: what evaluation runs here (fp32, eager; a tiny model), against the loop at FP32_TOL; the bf16
    compiled forward is CUDA's.
    BatchNorm's running statistics are set from one batch of patches first, so eval-mode activations keep
    the scale a trained network's have."""
    from ..config import AugmentConfig
    from ..evaluate import extract_features
    from ..patches.torch_backend import TorchPatches
    from .augment import smooth_images

    case = eval_case(ctx.device)
    if case["compiled"] and ctx.quick:
        return [skipped("eval forward", "--quick skips compilation")]
    count, cfg, compiled = case["count"], case["eval"], case["compiled"]
    aug, seed = AugmentConfig(), ctx.seed()
    images = smooth_images(ctx, count)
    recipe = TorchPatches(images, aug, compile_recipe=compiled)
    torch.manual_seed(ctx.seed())
    model = model_lib.EMPEncoder(**case["model"]).to(ctx.device)
    with torch.no_grad():  # running statistics = one batch's statistics
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = 1.0
        model.train()(recipe(torch.arange(min(count, 100), device=ctx.device), 4, seed - 1))
    model.eval()
    loop = []
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # true fp32 convolutions
        for start in range(0, count, cfg.batch_size):
            index = torch.arange(start, min(start + cfg.batch_size, count), device=ctx.device)
            h = model.encode(recipe(index, cfg.patches, seed + start).contiguous())
            loop.append(h.view(cfg.patches, index.numel(), -1).mean(0))
    ref = torch.cat(loop)
    shape = (count, cfg.patches, 3, aug.crop_size, aug.crop_size)

    def features(**kwargs) -> torch.Tensor:
        return extract_features(model, images, cfg, aug, seed=seed, compile_recipe=compiled, **kwargs)

    if not compiled:
        return [compare("eval forward h", shape, "fp32", features(), ref, FP32_TOL, note="CPU: fp32 eager")]
    model = model.to(memory_format=torch.channels_last)
    bf16 = dict(autocast_dtype=torch.bfloat16, channels_last=True)
    return [
        compare_with_baseline(
            "eval forward h",
            shape,
            "bf16-amp",
            features(**bf16, compile_mode="default"),
            features(**bf16),
            ref,
            COMPILE_BF16_FACTOR,
            COMPILE_BF16_FLOOR,
            "eager bf16",
            "compiled, channels_last; ref fp32 eager NCHW",
        )
    ]
