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

With train.bn_groups the BatchNorm groups are fixed by the config instead ("ghost" BN in
fastemp.model), and the chunks only decide memory: `plan_chunks` picks the fewest chunks of
whole groups that fit (often one pass: no second forward), with the same gradients. It is called
once, by fastemp.runtime.resolve; the Trainer sets the model's groups from the Runtime.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from .config import ConfigError
from .losses import LossTerms
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
    """(gradient-cache chunks, BatchNorm groups per forward) for one step of n*batch patches.

    bn_groups 0 is the gradient cache's own semantics: BatchNorm per chunk, grad_chunks chunks.
    bn_groups k > 0 fixes the semantics whatever the memory: k groups of n/k patch groups, each
    normalised on its own ("ghost" BN; k=10 at n=200 is the official multi-GPU run's 2,000 patches
    per GPU). The chunks then hold whole groups (k/chunks per forward); grad_chunks 0 picks them:
    on CUDA the fewest (a divisor of k) whose estimated activations, chunk * bytes_per_patch * 1.5,
    fit in 80% of the free memory (torch.cuda.mem_get_info, or free_bytes); on the CPU and under
    torchrun, k chunks (BatchNorm per chunk, as before: SyncBatchNorm has no groups).
    """
    if bn_groups == 0:
        return max(grad_chunks, 1), 1
    if grad_chunks == 0:
        grad_chunks = bn_groups
        if device.type == "cuda" and world == 1:
            free = torch.cuda.mem_get_info(device)[0] if free_bytes is None else free_bytes
            fitting = [
                c
                for c in range(1, bn_groups + 1)
                if bn_groups % c == 0 and n * batch / c * bytes_per_patch * 1.5 <= 0.8 * free
            ]
            grad_chunks = fitting[0] if fitting else bn_groups
    per_forward = bn_groups // grad_chunks
    if world > 1 and sync_bn and per_forward > 1:
        raise ConfigError(
            f"train.bn_groups={bn_groups} with train.grad_chunks={grad_chunks} needs ghost BatchNorm, "
            "which SyncBatchNorm does not have; under torchrun set train.grad_chunks to "
            "train.bn_groups (or 0)"
        )
    return grad_chunks, per_forward


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
    mark: Callable[[str], None] = lambda phase: None,
) -> LossTerms:
    """Loss terms of one step; parameter gradients accumulated as if all patches ran at once.

    `forward` may be the compiled model; `model` is the module whose BatchNorm layers it runs
    (defaults to `forward` itself when that is an nn.Module). When `model` is DDP, every chunk's
    backward but the last runs under its no_sync, so gradients are all-reduced once per step.
    `mark(phase)` is called after each phase ("forward": pass 1, "loss", "backward": pass 2), as
    Trainer.train_step documents.
    """
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
