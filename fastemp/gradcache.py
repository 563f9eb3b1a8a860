"""Two-pass gradient cache: exact EMP-SSL gradients for n*B patches that do not fit at once.

    pass 1  no-grad forward of each chunk of patch groups      -> p (n, B, d), small
    loss    exact loss on all of p, backward to dL/dp          (TCR and invariance see every patch)
    pass 2  re-forward each chunk with grad, backprop dL/dp_c  -> parameter gradients

Memory is one chunk's activations instead of all n*B patches'. Each chunk is a contiguous range
of patch groups (patch i of every image), so BatchNorm normalises each chunk with its own batch
statistics -- the same as the official code, whose DataParallel run normalises each GPU's shard
of the patch-major batch separately. Both passes see the same statistics (same data, same
weights), so the gradient is exactly that of a single graph with chunk-wise BatchNorm. Running
statistics are updated once per chunk, in pass 2 only (momentum is 0 during pass 1).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from .losses import LossTerms
from .model import frozen_batchnorm_stats


def chunk_bounds(n: int, batch: int, chunks: int) -> list[tuple[int, int]]:
    """Row ranges of `chunks` nearly equal runs of whole patch groups (rows i*batch .. )."""
    groups = torch.tensor_split(torch.arange(n), min(chunks, n))
    return [(int(g[0]) * batch, (int(g[-1]) + 1) * batch) for g in groups if g.numel()]


def gradient_cache_step(
    forward: Callable[[torch.Tensor], torch.Tensor],
    patches: torch.Tensor,
    n: int,
    chunks: int,
    loss_fn: Callable[[torch.Tensor], LossTerms],
    amp: AbstractContextManager,
    model: nn.Module | None = None,
    clock=None,
) -> LossTerms:
    """Loss terms of one step; parameter gradients accumulated as if all patches ran at once.

    `forward` may be the compiled model; `model` is the module whose BatchNorm layers it runs
    (defaults to `forward` itself when that is an nn.Module). When `model` is DDP, every chunk's
    backward but the last runs under its no_sync, so gradients are all-reduced once per step.
    `clock.mark(phase)`, when a clock is given, is called after each phase ("forward": pass 1, "loss",
    "backward": pass 2), as Trainer.train_step documents.
    """
    mark = clock.mark if clock is not None else (lambda phase: None)
    model = model if model is not None else forward
    no_sync = getattr(model, "no_sync", nullcontext)
    batch = patches.shape[0] // n
    bounds = chunk_bounds(n, batch, chunks)
    with torch.no_grad(), frozen_batchnorm_stats(model):
        outs = []
        for lo, hi in bounds:
            with amp:
                outs.append(forward(patches[lo:hi]))
    p = torch.cat(outs).detach().requires_grad_(True)
    mark("forward")
    terms = loss_fn(p.view(n, batch, -1))
    terms.total.backward()
    grad = p.grad
    mark("loss")
    for k, (lo, hi) in enumerate(bounds):
        with no_sync() if k < len(bounds) - 1 else nullcontext():
            with amp:
                p_chunk = forward(patches[lo:hi])
            p_chunk.backward(grad[lo:hi].to(p_chunk.dtype))
    mark("backward")
    return LossTerms(terms.total.detach(), terms.invariance.detach(), terms.tcr.detach())
