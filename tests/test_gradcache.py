"""Memory strategies for large n: chunking, the plan, the config rules.

That the gradient cache, activation checkpointing and ghost BatchNorm are exact (against one autograd graph, the
plain step, the gradient cache) are `fastemp check` cases (fastemp/check/training.py: gradcache, checkpoint,
ghostbn), run on the CPU by tests/check/test_cases.py."""

import pytest
import torch
import torch.nn.functional as F

from fastemp import runtime
from fastemp.config import Config, ConfigError, TrainConfig
from fastemp.gradcache import chunk_bounds
from fastemp.model import BatchNorm2d


def test_chunk_bounds_cover_whole_groups():
    assert chunk_bounds(6, 4, 4) == [(0, 8), (8, 16), (16, 20), (20, 24)]
    assert chunk_bounds(200, 100, 10)[0] == (0, 2000) and chunk_bounds(200, 100, 10)[-1] == (18000, 20000)
    assert chunk_bounds(3, 5, 10) == [(0, 5), (5, 10), (10, 15)]  # never more chunks than groups


def test_ghost_batchnorm_keeps_bf16_and_evaluates_with_running_stats():
    """Training-mode ghost BatchNorm vs float64 per group is the check's "ghost BN bf16" row; in eval mode the
    groups do not matter: the running statistics, as torch's batch_norm."""
    bn = BatchNorm2d(5)
    x = torch.randn(12, 5, 4, 4).to(torch.bfloat16)
    bn.groups = 3
    assert bn(x).dtype == torch.bfloat16
    bn.eval()
    assert torch.equal(bn(x), F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias))


def test_plan_chunks_from_memory_and_the_rules(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")

    def plan(grad_chunks, bn_groups, device, per_patch, world=1, free_gib=0):
        monkeypatch.setattr(runtime, "available_bytes", lambda device: free_gib * 2**30)
        cfg = Config(train=TrainConfig(n_patches=200, batch_size=100, grad_chunks=grad_chunks, bn_groups=bn_groups))
        return runtime.plan_chunks(cfg, device, per_patch, world)

    assert plan(10, 0, cuda, 0.0) == (10, 1)  # bn_groups 0: BatchNorm per chunk, as before
    assert plan(0, 10, cpu, 0.0) == (10, 1)  # CPU: the gradient cache, as before
    mib = 2.0**20
    assert plan(0, 10, cuda, 2.4 * mib, free_gib=130) == (1, 10)  # one pass fits
    assert plan(0, 10, cuda, 2.4 * mib, free_gib=70) == (2, 5)  # 10 000 patches fit
    assert plan(0, 10, cuda, 2.4 * mib, free_gib=1) == (10, 1)  # nothing fits: smallest
    assert plan(5, 10, cuda, 0.0) == (5, 2)  # the override
    assert plan(0, 10, cuda, 2.4 * mib, world=2) == (10, 1)  # torchrun (sync_bn): per chunk
    with pytest.raises(ConfigError, match="SyncBatchNorm"):
        plan(1, 10, cuda, 0.0, world=2)


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
    assert trainer.runtime.grad_chunks == 2  # on the CPU: the gradient cache, one chunk per BatchNorm group
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
