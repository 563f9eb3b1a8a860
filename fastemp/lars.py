"""LARS over SGD, as the official EMP-SSL code uses it, and the per-iteration cosine schedule.

For each weight with ndim > 1 (convolutions, linear weights):

    trust = eta * |p| / (|g| + wd * |p| + 1e-8)
    trust = min(trust / lr, 1)            (clip=True, the official setting)
    g    <- (g + wd * p) * trust

then a plain SGD step (momentum 0.9, nesterov) whose own weight decay is off. Biases and
BatchNorm parameters (ndim 1) get neither LARS nor weight decay. A weight whose norm or gradient
norm is zero is left untouched (no decay either), as in the official wrapper. Everything stays on
the device: no host sync, and a few multi-tensor kernels per step rather than some per parameter.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import OptimConfig


def segment_views(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Views of consecutive segments of `flat`, each with the size and strides of the matching tensor.

    The strides are the tensors' own (channels_last weights included), so a foreach op over `like`
    and these views passes torch's fast-route check (same sizes and strides pairwise) and runs as a
    few multi-tensor kernels instead of one kernel per tensor. Every tensor must be dense."""
    views, offset = [], flat.storage_offset()
    for t in like:
        views.append(flat.as_strided(t.shape, t.stride(), offset))
        offset += t.numel()
    return views


class LARS(torch.optim.SGD):
    def __init__(
        self,
        params,
        lr: float = 0.3,
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 1e-4,
        eta: float = 0.005,
        clip: bool = True,
        eps: float = 1e-8,
    ):
        super().__init__(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=0.0)
        for group in self.param_groups:
            group.setdefault("lars", True)
            group.setdefault("lars_weight_decay", weight_decay)
        self.eta, self.clip, self.eps = eta, clip, eps
        self._finite: torch.Tensor | None = None
        self._sizes: dict[tuple, torch.Tensor] = {}  # per-tensor element counts, copied to the device once

    def _numels(self, params: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
        key = tuple(p.numel() for p in params)
        if key not in self._sizes:
            self._sizes[key] = torch.tensor(key, dtype=torch.long, device=params[0].device)
        return self._sizes[key], sum(key)

    @torch.no_grad()
    def adapt_gradients(self) -> torch.Tensor | None:
        """Replace each LARS weight's gradient by its trust-scaled, weight-decayed version.

        Two foreach norm passes (weights, gradients) and one update pass, whose per-tensor factors
        are expanded to segments of one flat tensor (`segment_views`): a list of 0-d tensors would
        send foreach to its one-kernel-per-tensor path. Same roundings as the plain per-tensor rule
        (g * scale, then + p * decay). Returns whether every gradient was finite (0-d bool on the
        device, None without gradients), read from the norms computed here: a non-finite entry
        makes a 2-norm non-finite. The norms of parameters outside LARS are max-norms (cheap,
        they are small)."""
        finite = []
        for group in self.param_groups:
            with_grad = [p for p in group["params"] if p.grad is not None]
            params = [p for p in with_grad if p.ndim > 1] if group["lars"] else []
            others = [p for p in with_grad if not (group["lars"] and p.ndim > 1)]
            if others:
                finite.append(torch.stack(torch._foreach_norm([p.grad for p in others], float("inf"))).isfinite().all())
            if not params:
                continue
            grads = [p.grad for p in params]
            wd = group["lars_weight_decay"]
            p_norm = torch.stack(torch._foreach_norm(params))
            g_norm = torch.stack(torch._foreach_norm(grads))
            finite.append(g_norm.isfinite().all())
            trust = self.eta * p_norm / (g_norm + wd * p_norm + self.eps)
            if self.clip:
                trust = torch.clamp(trust / group["lr"], max=1.0)
            active = (p_norm != 0) & (g_norm != 0)
            scale = torch.where(active, trust, torch.ones_like(trust))
            decay = torch.where(active, scale * wd, torch.zeros_like(trust))
            # g <- g * scale + p * (scale * wd), with each factor repeated over its tensor's elements
            sizes, total = self._numels(params)
            scale_full, decay_full = torch.stack([scale, decay]).repeat_interleave(sizes, dim=1, output_size=total)
            torch._foreach_mul_(grads, segment_views(scale_full, grads))
            torch._foreach_add_(grads, torch._foreach_mul(params, segment_views(decay_full, params)))
        return torch.stack(finite).all() if finite else None

    @torch.no_grad()
    def step(self, closure=None):
        self._finite = self.adapt_gradients()
        return super().step(closure)

    def gradients_finite(self) -> torch.Tensor | None:
        """Whether every gradient of the last step was finite (0-d bool on the device; None before a step
        or when no parameter had a gradient). Costs nothing: LARS computed the norms anyway."""
        return self._finite


def lars_param_groups(model: nn.Module) -> list[dict]:
    """Weights (ndim > 1) under LARS with weight decay; biases and norm parameters without either."""
    weights = [p for p in model.parameters() if p.ndim > 1]
    others = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": weights, "lars": True}, {"params": others, "lars": False}]


def build_lars(model: nn.Module, optim: OptimConfig) -> LARS:
    """LARS over the model's parameter groups with the config's hyperparameters."""
    return LARS(lars_param_groups(model), lr=optim.lr, momentum=optim.momentum, nesterov=optim.nesterov,
                weight_decay=optim.weight_decay, eta=optim.lars_eta, clip=optim.lars_clip)


def cosine_lr(step: int, total_steps: int, base_lr: float, warmup_steps: int = 0, min_lr: float = 0.0) -> float:
    """Learning rate at iteration `step`: linear warmup, then cosine from base_lr to min_lr.

    With warmup_steps=0 this is torch's CosineAnnealingLR(T_max=total_steps) stepped per iteration.
    """
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))
