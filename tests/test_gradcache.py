"""Memory strategies for large n: gradient cache and activation checkpointing are exact."""

import copy
from contextlib import nullcontext

import pytest
import torch

from fastemp.config import LossConfig
from fastemp.gradcache import chunk_bounds, gradient_cache_step
from fastemp.losses import projection_loss_terms
from fastemp.model import EMPEncoder

N, B = 6, 4


def small_model():
    torch.manual_seed(0)
    return EMPEncoder(width=4, hidden_dim=32, z_dim=16).train()


def loss_fn(p):
    return projection_loss_terms(p.float(), LossConfig(), fused=False)


def grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def stats(model):
    return torch.cat([b.flatten().float() for name, b in model.named_buffers() if "running" in name])


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("chunks", [2, 3, 4])
def test_gradient_cache_equals_single_graph_with_chunkwise_batchnorm(chunks):
    x = torch.randn(N * B, 3, 16, 16)
    ref, got = small_model(), small_model()
    # reference: one autograd graph over all chunks, each chunk normalised by its own batch stats
    p = torch.cat([ref(x[lo:hi]) for lo, hi in chunk_bounds(N, B, chunks)])
    ref_terms = loss_fn(p.view(N, B, -1))
    ref_terms.total.backward()

    terms = gradient_cache_step(got, x, N, chunks, loss_fn, nullcontext())
    assert torch.allclose(terms.total, ref_terms.total.detach(), rtol=1e-6)
    assert rel(grads(got), grads(ref)) < 1e-5
    assert rel(stats(got), stats(ref)) < 1e-6  # running stats updated once per chunk, not twice


def test_one_chunk_is_the_plain_step():
    x = torch.randn(N * B, 3, 16, 16)
    ref, got = small_model(), small_model()
    loss_fn(ref(x).view(N, B, -1)).total.backward()
    gradient_cache_step(got, x, N, 1, loss_fn, nullcontext())
    assert rel(grads(got), grads(ref)) < 1e-5


def test_chunk_bounds_cover_whole_groups():
    assert chunk_bounds(6, 4, 4) == [(0, 8), (8, 16), (16, 20), (20, 24)]
    assert chunk_bounds(200, 100, 10)[0] == (0, 2000) and chunk_bounds(200, 100, 10)[-1] == (18000, 20000)
    assert chunk_bounds(3, 5, 10) == [(0, 5), (5, 10), (10, 15)]  # never more chunks than groups


def test_activation_checkpointing_is_exact_with_full_batch_batchnorm():
    x = torch.randn(N * B, 3, 16, 16)
    ref = small_model()
    got = copy.deepcopy(ref)
    got.backbone.checkpoint_activations = True
    for model in (ref, got):
        loss_fn(model(x).view(N, B, -1)).total.backward()
    assert rel(grads(got), grads(ref)) < 1e-5
    assert torch.equal(stats(got), stats(ref))  # the recomputation leaves running stats alone
    assert got.backbone.layer1[0].bn1.momentum == 0.1  # and restores momentum afterwards
