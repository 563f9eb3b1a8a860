"""Memory strategies for large n: gradient cache and activation checkpointing are exact."""

import copy
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

from fastemp.config import ConfigError, LossConfig
from fastemp.gradcache import chunk_bounds, gradient_cache_step, plan_chunks
from fastemp.losses import projection_loss_terms
from fastemp.model import BatchNorm2d, EMPEncoder, set_batchnorm_groups

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


# ------------------------------------------------------------------ ghost BatchNorm: n=200 in one pass


def small_model64():
    return small_model().double()


def ghost_one_pass(model, x, groups):
    set_batchnorm_groups(model, groups)
    terms = loss_fn(model(x).view(N, B, -1))
    terms.total.backward()
    return terms.total.detach()


@pytest.mark.parametrize("channels_last", [False, True])
def test_ghost_batchnorm_in_one_pass_equals_the_gradient_cache(channels_last):
    x = torch.randn(N * B, 3, 16, 16, dtype=torch.float64)
    cache, ghost = small_model64(), small_model64()
    if channels_last:
        x, ghost = x.contiguous(memory_format=torch.channels_last), ghost.to(memory_format=torch.channels_last)
    ref = gradient_cache_step(cache, x, N, 3, loss_fn, nullcontext())  # BatchNorm per chunk of 2 patch groups
    got = ghost_one_pass(ghost, x, 3)
    assert torch.allclose(got, ref.total, rtol=1e-12, atol=0)
    assert rel(grads(ghost), grads(cache)) < 1e-10
    assert rel(stats(ghost), stats(cache)) < 1e-12


def test_ghost_groups_inside_gradient_cache_chunks():
    # 6 BatchNorm groups: one pass, 3 chunks of 2 ghost groups, and 6 plain chunks all agree
    x = torch.randn(N * B, 3, 16, 16, dtype=torch.float64)
    one, three, six = small_model64(), small_model64(), small_model64()
    ghost_one_pass(one, x, 6)
    set_batchnorm_groups(three, 2)
    gradient_cache_step(three, x, N, 3, loss_fn, nullcontext())
    gradient_cache_step(six, x, N, 6, loss_fn, nullcontext())
    for model in (one, three):
        assert rel(grads(model), grads(six)) < 1e-10 and rel(stats(model), stats(six)) < 1e-12


def test_ghost_batchnorm_in_bf16_matches_float32_batch_norm_per_group():
    bn = BatchNorm2d(5)
    x = torch.randn(12, 5, 4, 4).to(torch.bfloat16)
    bn.groups = 3
    out = bn(x)
    ref = torch.cat([F.batch_norm(c.float(), None, None, training=True) for c in x.chunk(3)])
    assert out.dtype == torch.bfloat16 and torch.allclose(out.float(), ref, atol=2e-2)
    bn.eval()
    assert torch.equal(bn(x), F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias))


def test_plan_chunks_from_memory_and_the_rules():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert plan_chunks(200, 100, 10, 0, cuda, 0.0) == (10, 1)  # bn_groups 0: BatchNorm per chunk, as before
    assert plan_chunks(200, 100, 0, 10, cpu, 0.0) == (10, 1)  # CPU: the gradient cache, as before
    mib = 2.0**20
    assert plan_chunks(200, 100, 0, 10, cuda, 2.4 * mib, free_bytes=130 * 2**30) == (1, 10)  # one pass fits
    assert plan_chunks(200, 100, 0, 10, cuda, 2.4 * mib, free_bytes=70 * 2**30) == (2, 5)  # 10 000 patches fit
    assert plan_chunks(200, 100, 0, 10, cuda, 2.4 * mib, free_bytes=2**30) == (10, 1)  # nothing fits: smallest
    assert plan_chunks(200, 100, 5, 10, cuda, 0.0) == (5, 2)  # the override
    assert plan_chunks(200, 50, 0, 10, cuda, 2.4 * mib, world=2, sync_bn=True) == (10, 1)  # torchrun: per chunk
    with pytest.raises(ConfigError, match="SyncBatchNorm"):
        plan_chunks(200, 50, 1, 10, cuda, 0.0, world=2, sync_bn=True)


def test_trainer_resolves_chunks_and_config_rules():
    from fastemp.config import load_config
    from fastemp.train import Trainer
    from fastemp.validate import check_config

    tiny = [
        "data.synthetic_train=40",
        "data.synthetic_test=20",
        "model.width=4",
        "model.hidden_dim=16",
        "model.z_dim=8",
        "train.n_patches=4",
        "train.batch_size=10",
        "eval.at_end=false",
    ]
    trainer = Trainer(load_config("quickstart", tiny + ["train.grad_chunks=0", "train.bn_groups=2"]), progress=False)
    assert trainer.grad_chunks == 2  # on the CPU: the gradient cache, one chunk per BatchNorm group
    assert {m.groups for m in trainer.model.modules() if isinstance(m, BatchNorm2d)} == {1}
    ghost = Trainer(load_config("quickstart", tiny + ["train.bn_groups=2"]), progress=False)  # one pass, 2 groups
    assert (ghost.runtime.grad_chunks, ghost.runtime.bn_groups_per_forward) == (1, 2)
    assert {m.groups for m in ghost.model.modules() if isinstance(m, BatchNorm2d)} == {2}
    for bad, match in [
        ("train.bn_groups=3", "divisor of train.n_patches"),
        ("train.grad_chunks=0", "bn_groups is 0"),
        ("train.bn_groups=2 train.grad_chunks=4", "divisor of train.bn_groups"),
    ]:
        with pytest.raises(ConfigError, match=match):
            check_config(load_config("quickstart", tiny + bad.split()))
