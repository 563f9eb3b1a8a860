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

from .config import ConfigError
from .losses import LossTerms
from .memory import available_bytes
from .model import frozen_batchnorm_stats


def plan_chunks(
    n: int,
    batch: int,
    grad_chunks: int,
    bn_groups: int,
    device: torch.device,
    bytes_per_patch: float,
    world: int = 1,
    sync_bn: bool = False,
    free_bytes: int | None = None,
) -> tuple[int, int]:
    """(gradient-cache chunks, BatchNorm groups per forward) for one step of n*batch patches. bn_groups 0: BatchNorm
    per chunk; k > 0: k groups normalised apart (ghost BN) in chunks of whole groups, grad_chunks 0 choosing them: on
    one CUDA device the fewest whose activations (x1.5) fit in 80% of the free memory, elsewhere k."""
    if bn_groups == 0:
        return max(grad_chunks, 1), 1
    if grad_chunks == 0:
        grad_chunks = bn_groups
        if device.type == "cuda" and world == 1:
            free = available_bytes(device) if free_bytes is None else free_bytes
            fits = (
                c
                for c in range(1, bn_groups)
                if bn_groups % c == 0 and n * batch / c * bytes_per_patch * 1.5 <= 0.8 * free
            )
            grad_chunks = next(fits, bn_groups)
    per_forward = bn_groups // grad_chunks
    if world > 1 and sync_bn and per_forward > 1:
        raise ConfigError(
            f"train.bn_groups={bn_groups} with train.grad_chunks={grad_chunks} needs ghost BatchNorm, "
            "which SyncBatchNorm does not have; under torchrun set train.grad_chunks to "
            "train.bn_groups (or 0)"
        )
    return grad_chunks, per_forward


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
    """Loss terms of one step, parameter gradients accumulated as if all patches ran at once. `forward` may be the
    compiled `model`; under DDP gradients are all-reduced once, after the last chunk. `mark`: as Trainer.train_step."""
    model = model if model is not None else forward
    no_sync = getattr(model, "no_sync", nullcontext)
    batch = patches.shape[0] // n
    bounds = chunk_bounds(n, batch, chunks)
    with torch.no_grad(), frozen_batchnorm_stats(model):
        outs = []
        for lo, hi in bounds:
            with amp:  # a copy: under CUDA graphs (compile mode reduce-overhead) the next replay reuses the output
                outs.append(forward(patches[lo:hi]).clone())
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
