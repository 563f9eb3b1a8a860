"""LARS over SGD, as the official EMP-SSL code uses it, and the per-iteration cosine schedule. For each weight
with ndim > 1: trust = eta |p| / (|g| + wd |p| + 1e-8), clipped to min(trust / lr, 1), g <- (g + wd p) trust, then
SGD (momentum 0.9, nesterov) without its own weight decay; ndim-1 parameters get neither, nor does a weight whose
norm or gradient norm is zero (as the official wrapper). No host sync; the multi-tensor paths: docs/speed.md.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import OptimConfig


def segment_views(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Views of consecutive segments of `flat` shaped as the (dense) tensors `like`: foreach over both then runs
    as multi-tensor kernels."""
    views, offset = [], flat.storage_offset()
    for t in like:
        views.append(flat.as_strided(t.shape, t.stride(), offset))
        offset += t.numel()
    return views


def segment_factors_on(device: torch.device) -> bool:
    """Per-tensor factors as segment views of one expanded tensor (CUDA: multi-tensor kernels) rather than 0-d
    tensors (elsewhere foreach loops over the tensors anyway; expanding only adds traffic)."""
    return device.type == "cuda"


def fused_lars_sgd(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    bufs: list[torch.Tensor],
    scale: torch.Tensor,
    decay: torch.Tensor,
    neg_lr: torch.Tensor,
    momentum: float,
    nesterov: bool,
) -> None:
    """The whole update in one pass per tensor, for torch.compile to fuse (a zero buffer starts at d, as SGD's):

    d = g * scale_i + p * decay_i;  buf = momentum * buf + d;  p += -lr_i * (d + momentum * buf if nesterov else d)
    """
    d = torch._foreach_add(
        torch._foreach_mul(grads, list(scale.unbind())), torch._foreach_mul(params, list(decay.unbind()))
    )
    torch._foreach_mul_(bufs, momentum)
    torch._foreach_add_(bufs, d)
    step = torch._foreach_add(d, bufs, alpha=momentum) if nesterov else d
    torch._foreach_add_(params, torch._foreach_mul(step, list(neg_lr.unbind())))


class LARS(torch.optim.SGD):
    """`adapt_gradients` then torch's SGD step, or with fused_update one compiled pass per tensor (`fused_lars_sgd`):
    the same update up to rounding, with torch SGD's momentum buffers either way."""

    def __init__(
        self,
        params,
        lr: float = 0.3,
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 1e-4,
        eta: float = 0.005,
        clip: bool = True,
        fused_update: bool = False,
    ):
        super().__init__(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=0.0)
        for group in self.param_groups:
            group.setdefault("lars", True)
            group.setdefault("lars_weight_decay", weight_decay)
        self.eta, self.clip = eta, clip
        # whether every gradient of the last step was finite (0-d bool on the device; None before a step or without
        # gradients), from the norms LARS computes anyway
        self.gradients_finite: torch.Tensor | None = None
        self._sizes: dict[tuple, torch.Tensor] = {}  # per-tensor element counts, copied to the device once
        self._fused = torch.compile(fused_lars_sgd, fullgraph=True, dynamic=False) if fused_update else None

    def _factors(self) -> tuple[list, torch.Tensor | None]:
        """Per group: (group, LARS weights, scale, decay, the other parameters), those with a gradient only, for
        g <- g * scale + p * decay; and whether every gradient is finite (0-d bool on the device; None without
        any): a non-finite entry makes its gradient's norm non-finite, so the verdict costs nothing more."""
        rows, finite = [], []
        for group in self.param_groups:
            with_grad = [p for p in group["params"] if p.grad is not None]
            params = [p for p in with_grad if group["lars"] and p.ndim > 1]
            others = [p for p in with_grad if not (group["lars"] and p.ndim > 1)]
            if others:
                finite.append(torch.stack(torch._foreach_norm([p.grad for p in others], float("inf"))).isfinite().all())
            scale = decay = None
            if params:
                wd = group["lars_weight_decay"]
                p_norm = torch.stack(torch._foreach_norm(params))
                g_norm = torch.stack(torch._foreach_norm([p.grad for p in params]))
                trust = self.eta * p_norm / (g_norm + wd * p_norm + 1e-8)
                if self.clip:
                    trust = torch.clamp(trust / group["lr"], max=1.0)
                active = (p_norm != 0) & (g_norm != 0)
                scale = torch.where(active, trust, torch.ones_like(trust))
                decay = torch.where(active, scale * wd, torch.zeros_like(trust))
                finite.append(g_norm.isfinite().all())
            rows.append((group, params, scale, decay, others))
        return rows, torch.stack(finite).all() if finite else None

    @torch.no_grad()
    def adapt_gradients(self) -> torch.Tensor | None:
        """g <- g * scale + p * decay for each LARS weight; returns whether every gradient was finite (_factors)."""
        rows, finite = self._factors()
        for _, params, scale, decay, _ in rows:
            if not params:
                continue
            grads = [p.grad for p in params]
            if segment_factors_on(grads[0].device):  # each factor repeated over its tensor's elements
                sizes = tuple(p.numel() for p in params)
                if sizes not in self._sizes:  # copied to the device once
                    self._sizes[sizes] = torch.tensor(sizes, dtype=torch.long, device=params[0].device)
                both = torch.stack([scale, decay]).repeat_interleave(self._sizes[sizes], 1, output_size=sum(sizes))
                scales, decays = segment_views(both[0], grads), segment_views(both[1], params)
            else:
                scales, decays = list(scale.unbind()), list(decay.unbind())
            torch._foreach_mul_(grads, scales)
            torch._foreach_add_(grads, torch._foreach_mul(params, decays))
        return finite

    @torch.no_grad()
    def _fused_step(self) -> torch.Tensor | None:
        """Every group's tensors in one compiled call (per-tensor lr; one momentum and nesterov for all)."""
        rows, finite = self._factors()
        every, scales, decays, neg_lrs = [], [], [], []
        for group, params, scale, decay, others in rows:
            if params:
                every, scales, decays = every + params, scales + [scale], decays + [decay]
            if others:  # outside LARS: scale 1, no decay
                ones = torch.ones(len(others), device=others[0].device, dtype=others[0].dtype)
                every, scales, decays = every + others, scales + [ones], decays + [torch.zeros_like(ones)]
            if params or others:  # -lr per tensor, made on the device (no host copy)
                like = every[0]
                neg_lrs.append(
                    torch.full((len(params) + len(others),), -group["lr"], device=like.device, dtype=like.dtype)
                )
        if not every:
            return None
        for p in every:
            if self.state[p].get("momentum_buffer") is None:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        bufs = [self.state[p]["momentum_buffer"] for p in every]
        momentum, nesterov = self.param_groups[0]["momentum"], self.param_groups[0]["nesterov"]
        grads = [p.grad for p in every]
        self._fused(every, grads, bufs, torch.cat(scales), torch.cat(decays), torch.cat(neg_lrs), momentum, nesterov)
        return finite

    @torch.no_grad()
    def step(self, closure=None):
        if self._fused is not None:
            self.gradients_finite = self._fused_step()
            return None
        self.gradients_finite = self.adapt_gradients()
        return super().step(closure)


def lars_param_groups(model: nn.Module) -> list[dict]:
    """Weights (ndim > 1) under LARS with weight decay; biases and norm parameters without either."""
    weights = [p for p in model.parameters() if p.ndim > 1]
    others = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": weights, "lars": True}, {"params": others, "lars": False}]


def lars_hyperparameters(optim: OptimConfig) -> dict:
    """The LARS constructor's keyword arguments from the config (also check.reference.ReferenceLARS's)."""
    return dict(
        lr=optim.lr,
        momentum=optim.momentum,
        nesterov=optim.nesterov,
        weight_decay=optim.weight_decay,
        eta=optim.lars_eta,
        clip=optim.lars_clip,
    )


def build_lars(model: nn.Module, optim: OptimConfig, fused_update: bool = False) -> LARS:
    return LARS(lars_param_groups(model), **lars_hyperparameters(optim), fused_update=fused_update)


def cosine_lr(step: int, total_steps: int, base_lr: float, warmup_steps: int = 0, min_lr: float = 0.0) -> float:
    """Learning rate at iteration `step`: linear warmup, then cosine from base_lr to min_lr (with warmup_steps=0,
    torch's CosineAnnealingLR(T_max=total_steps) stepped per iteration)."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))
