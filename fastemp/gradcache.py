"""Two-pass gradient cache: exact EMP-SSL gradients for n*B patches that do not fit at once (docs/training.md).

    pass 1  no-grad forward of each chunk of patch groups      -> p (n, B, d), small
    loss    exact loss on all of p, backward to dL/dp          (TCR and invariance see every patch)
    pass 2  re-forward each chunk with grad, backprop dL/dp_c  -> parameter gradients

BatchNorm normalises each chunk apart, as the official DataParallel run normalises each GPU's shard; both
passes see the same statistics, so the gradient is exact. Running statistics move in pass 2 only.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from .losses import LossTerms
from .model import frozen_batchnorm_stats


def chunk_bounds(n: int, batch: int, chunks: int) -> list[tuple[int, int]]:
    """Row ranges of `chunks` nearly equal runs of whole patch groups."""
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
    mark: Callable[[str], None] = lambda phase: None,
) -> LossTerms:
    """Loss terms of one step, parameter gradients accumulated as if all patches ran at once; one chunk is the plain
    step (the forward keeps its graph: no second pass). `forward` may be the compiled `model`; under DDP gradients
    are all-reduced once, after the last chunk. `mark`: as Trainer.train_step."""
    model = model if model is not None else forward
    no_sync = getattr(model, "no_sync", nullcontext)
    batch = patches.shape[0] // n
    bounds = chunk_bounds(n, batch, chunks)
    if len(bounds) == 1:
        with amp:
            out = forward(patches)
    else:
        with torch.no_grad(), frozen_batchnorm_stats(model):
            outs = []
            for lo, hi in bounds:
                with amp:  # a copy: under CUDA graphs (compile mode reduce-overhead) the next replay reuses the output
                    outs.append(forward(patches[lo:hi]).clone())
        out = torch.cat(outs)
    p = out.detach().requires_grad_(True)  # the loss's backward apart from the model's, for the clock
    mark("forward")
    terms = loss_fn(p.view(n, batch, -1))
    terms.total.backward()
    mark("loss")
    if len(bounds) == 1:
        out.backward(p.grad)
    else:
        for k, (lo, hi) in enumerate(bounds):
            with no_sync() if k < len(bounds) - 1 else nullcontext():
                with amp:
                    p_chunk = forward(patches[lo:hi])
                p_chunk.backward(p.grad[lo:hi].to(p_chunk.dtype))
    mark("backward")
    return LossTerms(terms.total.detach(), terms.invariance.detach(), terms.tcr.detach())
