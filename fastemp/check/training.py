"""`fastemp check`: the training step's fast paths against the plain step -- torch.compile vs eager, the two-pass
gradient cache vs one autograd graph, activation checkpointing vs plain, ghost BatchNorm in one pass vs the
gradient cache -- and LARS's fast updates against the per-tensor rule."""

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
from .core import BF16_TOL, FP32_TOL, FP64_TOL, SOLVE_TOL, CheckResult, Context, compare, compare_with_baseline, skipped

SMALL = dict(width=4, hidden_dim=32, z_dim=16)  # the gradient cache, checkpointing and ghost BN models


def seeded(seed: int, make: Callable[[], nn.Module]) -> nn.Module:  # two calls: the same initial weights
    torch.manual_seed(seed)
    return make()


def encoder(ctx: Context, seed: int, dtype=torch.float32, sizes: dict = SMALL) -> nn.Module:
    return seeded(seed, lambda: model_lib.EMPEncoder(**sizes)).to(ctx.device, dtype).train()


def model_state(model: nn.Module) -> dict:
    """The parameter gradients by name and the BatchNorm running statistics, in float64."""
    return {
        "grads": {name: q.grad.detach().double() for name, q in model.named_parameters()},
        "stats": torch.cat([b.detach().double().flatten() for name, b in model.named_buffers() if "running" in name]),
    }


def model_rows(
    prefix: str, shape, dtype: str, got: nn.Module, ref: nn.Module, tols: tuple, note="", stats="BN stats"
) -> list[CheckResult]:
    """The rows "<prefix> grads" and "<prefix> <stats>" (the running statistics) of a model against the reference
    model, at tols = (gradients, statistics)."""
    got, ref = model_state(got), model_state(ref)
    return [
        compare(f"{prefix} grads", shape, dtype, got["grads"], ref["grads"], tols[0], note=note),
        compare(f"{prefix} {stats}", shape, dtype, got["stats"], ref["stats"], tols[1], note=note),
    ]


class FeaturesAndProjection(nn.Module):
    """EMPEncoder.forward returning (h, p): one compiled graph gives both."""

    def __init__(self, encoder: model_lib.EMPEncoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder.encode(x)
        return h, self.encoder.projection(h)


def train_steps(forward: Callable, model: nn.Module, xs: list[torch.Tensor], n: int, amp_dtype=None) -> dict:
    """A forward/backward of the float64 reference loss (no rounding added) on each input in turn, the running
    statistics carrying over: every step's h, p, gradients and running statistics, side by side."""
    steps = []
    for x in xs:
        model.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=amp_dtype) if amp_dtype else nullcontext():
            h, p = forward(x)
        reference.reference_loss(p.double().view(n, -1, p.shape[-1]), LossConfig()).backward()
        steps.append({"h": h.detach().double(), "p": p.detach().double(), **model_state(model)})
    merged = {key: torch.cat([s[key].flatten() for s in steps]) for key in ("h", "p", "stats")}
    return {**merged, "grads": {k: torch.cat([s["grads"][k].flatten() for s in steps]) for k in steps[0]["grads"]}}


def compile_rows(ctx: Context, case: dict, compile_fn: Callable = torch.compile) -> list[CheckResult]:
    """Two training steps of compile_fn(model) vs the eager model, new input values each step (the tests pass
    compile_fn = identity to run the CUDA branch on the CPU). Without autocast (float64): compiled vs eager at
    FP64_TOL. Under autocast both against an eager float64 copy: compare_with_baseline."""
    fmt = torch.channels_last if case.get("channels_last") else torch.contiguous_format
    eager = encoder(ctx, ctx.seed(), case["dtype"], case["model"]).to(memory_format=fmt)
    compiled_model, exact_model = copy.deepcopy(eager), copy.deepcopy(eager).double()  # before any step
    n, shape = case["n"], (case["n"] * case["batch"], 3, case["size"], case["size"])
    xs = [ctx.randn(*shape).to(ctx.device, case["dtype"]).contiguous(memory_format=fmt) for _ in range(2)]
    got = train_steps(compile_fn(FeaturesAndProjection(compiled_model)), compiled_model, xs, n, case["amp"])
    ref = train_steps(FeaturesAndProjection(eager), eager, xs, n, case["amp"])
    note = "2 steps"
    ops = {"h": "compile h", "p": "compile p", "grads": "compile grads", "stats": "compile BN stats"}
    if not case["amp"]:
        return [compare(op, shape, "fp64", got[key], ref[key], FP64_TOL, note=note) for key, op in ops.items()]
    exact = train_steps(FeaturesAndProjection(exact_model), exact_model, [x.double() for x in xs], n)
    return [
        compare_with_baseline(op, shape, "bf16-amp", got[key], ref[key], exact[key], "eager", note)
        for key, op in ops.items()
    ]


def check_compile(ctx: Context) -> list[CheckResult]:
    if ctx.quick:
        return [skipped("compile", "--quick skips compilation")]
    if ctx.cuda:  # the real model as the trainer runs it
        case = dict(model={}, n=4, batch=32, size=32, dtype=torch.float32, amp=torch.bfloat16, channels_last=True)
    else:  # a tiny model in float64: in fp32 a ReLU flipped by compiled-vs-eager rounding moves a gradient by percents
        case = dict(model=dict(width=8, hidden_dim=64, z_dim=32), n=4, batch=8, size=16, dtype=torch.float64, amp=None)
    return compile_rows(ctx, case)


def _emp_loss(p: torch.Tensor):
    return losses.projection_loss_terms(p, LossConfig(), fused=False)


def _small_input(ctx: Context) -> tuple[int, int, torch.Tensor]:
    n, batch = (8, 8) if ctx.cuda else (6, 4)
    return n, batch, ctx.randn(n * batch, 3, 16, 16).to(ctx.device)


def check_gradient_cache(ctx: Context) -> list[CheckResult]:
    """Two-pass gradient cache vs one autograd graph with the same chunk-wise BatchNorm (fp32, small model);
    1 chunk is the plain step, and chunks that do not divide n hold unequal numbers of patch groups."""
    n, batch, x = _small_input(ctx)
    seed, shape = ctx.seed(), tuple(x.shape)
    rows = []
    for chunks in ctx.grid(cuda=[3, 1, 8], cpu=[3, 1, 2, 4]):
        ref, got = encoder(ctx, seed), encoder(ctx, seed)
        ref_total = _emp_loss(
            torch.cat([ref(x[a:b]) for a, b in gradcache.chunk_bounds(n, batch, chunks)]).view(n, batch, -1)
        ).total
        ref_total.backward()
        total = gradcache.gradient_cache_step(got, x, n, chunks, _emp_loss, nullcontext()).total
        note = f"{chunks} chunks"
        rows.append(compare("gradcache loss", shape, "fp32", total, ref_total, FP32_TOL, note=note))
        rows += model_rows("gradcache", shape, "fp32", got, ref, (SOLVE_TOL, FP32_TOL), note)
    return rows


def check_activation_checkpointing(ctx: Context) -> list[CheckResult]:
    """Activation checkpointing (model.backbone.checkpoint_activations) vs plain (fp32, small model), two steps:
    the running statistics after the second show that the recomputation restored BatchNorm's momentum."""
    n, batch, x = _small_input(ctx)
    xs = [x, ctx.randn(*x.shape).to(ctx.device)]
    plain = encoder(ctx, ctx.seed())
    ckpt = copy.deepcopy(plain)
    ckpt.backbone.checkpoint_activations = True
    for m in (plain, ckpt):
        for x in xs:  # the gradients add up over the two steps
            _emp_loss(m(x).view(n, batch, -1)).total.backward()
    return model_rows("checkpoint", tuple(x.shape), "fp32", ckpt, plain, (SOLVE_TOL, FP32_TOL), "2 steps")


def check_ghost_batchnorm(ctx: Context) -> list[CheckResult]:
    """Ghost BatchNorm (train.bn_groups) in one pass, and inside gradient-cache chunks, vs the gradient cache with
    one chunk per group (small model, float64: docs/check.md); then its bf16 path vs float64 per group."""
    n, batch, x = _small_input(ctx)
    x, seed, shape = x.double(), ctx.seed(), tuple(x.shape)
    rows = []
    # (BatchNorm groups, the gradient-cache chunks they are spread over, channels_last)
    for groups, chunks, channels_last in ctx.grid(
        cuda=[(2, 1, False), (4, 1, True), (8, 4, True)], cpu=[(2, 1, False), (3, 1, True), (6, 3, False)]
    ):
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        ref, got = encoder(ctx, seed, torch.float64), encoder(ctx, seed, torch.float64).to(memory_format=fmt)
        ref_total = gradcache.gradient_cache_step(ref, x, n, groups, _emp_loss, nullcontext()).total
        model_lib.set_batchnorm_groups(got, groups // chunks)
        xf = x.contiguous(memory_format=fmt)  # one chunk: one pass, as the trainer runs it
        total = gradcache.gradient_cache_step(got, xf, n, chunks, _emp_loss, nullcontext()).total
        note = f"{groups} groups" + (f" in {chunks} chunks" if chunks > 1 else "") + (", channels_last" * channels_last)
        rows.append(compare("ghost BN loss", shape, "fp64", total, ref_total, FP64_TOL, note=note))
        rows += model_rows("ghost BN", shape, "fp64", got, ref, (FP64_TOL, FP64_TOL), note, stats="stats")
    bn = model_lib.BatchNorm2d(16).to(ctx.device)
    with torch.no_grad():
        bn.weight.copy_(ctx.randn(16)), bn.bias.copy_(ctx.randn(16))
    bn.groups = 4
    xb = (ctx.randn(32, 16, 8, 8) * 3 + 1).to(ctx.device, torch.bfloat16)
    args = (None, None, bn.weight.double(), bn.bias.double(), True)
    ref = torch.cat([F.batch_norm(c.double(), *args) for c in xb.chunk(bn.groups)])
    rows.append(compare("ghost BN bf16", tuple(xb.shape), "bf16", bn(xb), ref, BF16_TOL, note="4 groups, vs float64"))
    return rows


def lars_net() -> nn.Module:
    """Every kind of tensor the trainer's model has (conv and linear weights, biases, both BatchNorms), and few of
    them (torch.compile's time grows with the tensor count)."""
    layers = [nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.Conv2d(8, 16, 1), nn.Flatten()]
    return nn.Sequential(*layers, nn.Linear(16, 5), nn.BatchNorm1d(5), nn.Linear(5, 7))


def lars_rows(ctx: Context, seed: int, optim, fused: bool, dtype=torch.float32, layout=torch.channels_last) -> list:
    """LARS's eager multi-tensor update ("lars") or its compiled one ("lars fused", optim.fused_update) vs
    ReferenceLARS under an OptimConfig: 4 steps, random gradients over three decades, one LARS weight's gradient
    zero in the second step (left alone: no decay either). CUDA: the standard model; CPU: lars_net."""
    from ..config import ModelConfig
    from ..lars import build_lars
    from ..model import build_model

    make = (lambda: build_model(ModelConfig())) if ctx.cuda else lars_net
    models = [seeded(seed, make).to(ctx.device, dtype).to(memory_format=layout) for _ in range(2)]
    opts = reference.reference_lars(models[0], optim), build_lars(models[1], optim, fused_update=fused)
    zero = [k for k, q in enumerate(models[0].parameters()) if q.ndim > 1][1]
    for step, lr in enumerate((0.3, 0.25, 0.1, 0.05)):
        for opt in opts:
            for group in opt.param_groups:
                group["lr"] = lr
        for k, (a, b) in enumerate(zip(models[0].parameters(), models[1].parameters())):
            scale = 0.0 if (k, step) == (zero, 1) else 10.0 ** (k % 3 - 2)
            a.grad = torch.empty_like(a).copy_(ctx.randn(*a.shape) * scale)  # the parameter's layout
            b.grad = a.grad.clone(memory_format=torch.preserve_format)
        for opt in opts:
            opt.step()
    op, shape = "lars fused" if fused else "lars", f"{sum(q.numel() for q in models[0].parameters())} params"
    note = f"4 steps, weight decay {optim.weight_decay:g}, clip {'on' if optim.lars_clip else 'off'}"
    name = {torch.float32: "fp32", torch.float64: "fp64"}[dtype]
    params = [dict(m.named_parameters()) for m in models]
    bufs = [{k: o.state[q]["momentum_buffer"] for k, q in p.items()} for o, p in zip(opts, params)]
    return [
        compare(f"{op} params", shape, name, params[1], params[0], FP32_TOL, note=note),
        compare(f"{op} momentum", shape, name, bufs[1], bufs[0], FP32_TOL, note=note),
    ]


def check_lars(ctx: Context) -> list[CheckResult]:
    """lars_rows, eager and fused, for the default hyperparameters and for clip off with a large weight decay."""
    from ..config import OptimConfig

    seed, rows = ctx.seed(), []
    for fused in (False, True):
        if fused and ctx.quick:
            rows.append(skipped("lars fused", "--quick skips compilation"))
            continue
        for optim in (OptimConfig(), OptimConfig(weight_decay=5e-2, lars_clip=False)):
            rows += lars_rows(ctx, seed, optim, fused)
    return rows
