"""LARS against a hand computation of the official rule, its float64 exactness and finiteness flag, and the
schedule against torch's. The fp32 fast paths (multi-tensor, compiled) against the per-tensor rule: `fastemp
check`'s lars case (fastemp/check/training.py), run on the CPU by tests/check/test_cases.py."""

import math

import numpy as np
import pytest
import torch
from torch import nn

import fastemp.lars as lars_module
from fastemp.check.core import Context
from fastemp.check.training import lars_rows
from fastemp.config import OptimConfig
from fastemp.lars import LARS, cosine_lr, lars_param_groups, segment_views


def hand_lars(w, g, lr, wd=1e-4, eta=0.005, eps=1e-8):
    """The official LARSWrapper update of a gradient, in numpy float64."""
    p_norm, g_norm = np.linalg.norm(w), np.linalg.norm(g)
    if p_norm == 0 or g_norm == 0:
        return g
    trust = eta * p_norm / (g_norm + p_norm * wd + eps)
    trust = min(trust / lr, 1.0)
    return (g + wd * w) * trust


def test_two_steps_match_hand_computation():
    torch.manual_seed(1)
    layer = nn.Linear(6, 4)
    w0, b0 = layer.weight.detach().double().numpy().copy(), layer.bias.detach().double().numpy().copy()
    opt = LARS(lars_param_groups(layer), lr=0.3, momentum=0.9, nesterov=True, weight_decay=1e-4, eta=0.005)
    grads = [(torch.randn(4, 6), torch.randn(4)), (torch.randn(4, 6) * 10, torch.randn(4))]
    lrs = [0.3, 0.2]
    w, b = w0, b0
    vw, vb = np.zeros_like(w), np.zeros_like(b)
    for (gw, gb), lr in zip(grads, lrs):
        for group in opt.param_groups:
            group["lr"] = lr
        layer.weight.grad, layer.bias.grad = gw.clone(), gb.clone()
        opt.step()
        # hand: LARS-adapted weight gradient, untouched bias gradient, nesterov SGD without decay
        dw = hand_lars(w, gw.double().numpy(), lr)
        db = gb.double().numpy()
        vw = 0.9 * vw + dw if vw.any() else dw
        vb = 0.9 * vb + db if vb.any() else db
        w = w - lr * (dw + 0.9 * vw)
        b = b - lr * (db + 0.9 * vb)
        np.testing.assert_allclose(layer.weight.detach().double().numpy(), w, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(layer.bias.detach().double().numpy(), b, rtol=1e-5, atol=1e-7)


def test_trust_ratio_is_clipped_at_one():
    w = nn.Parameter(torch.full((3, 3), 10.0))
    opt = LARS([{"params": [w]}], lr=1e-4, weight_decay=0.0, eta=0.005)
    w.grad = torch.full((3, 3), 1e-6)  # huge trust ratio / lr -> clipped to 1: plain SGD step
    opt.adapt_gradients()
    assert torch.allclose(w.grad, torch.full((3, 3), 1e-6))


def test_zero_gradient_is_left_alone():
    w = nn.Parameter(torch.ones(2, 2))
    opt = LARS([{"params": [w]}], lr=0.3, weight_decay=1e-4)
    w.grad = torch.zeros(2, 2)
    opt.adapt_gradients()
    assert torch.equal(w.grad, torch.zeros(2, 2))  # no decay either, as in the official wrapper


def test_param_groups_exclude_biases_and_norms():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    weights, others = lars_param_groups(model)
    assert weights["lars"] and not others["lars"]
    assert sorted(p.ndim for p in weights["params"]) == [2, 4]
    assert all(p.ndim == 1 for p in others["params"]) and len(others["params"]) == 4


def test_cosine_matches_torch_scheduler():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=50, eta_min=0)
    for step in range(50):
        assert math.isclose(cosine_lr(step, 50, 0.3), opt.param_groups[0]["lr"], rel_tol=1e-9, abs_tol=1e-12)
        opt.step()
        sched.step()


def test_warmup_then_cosine():
    assert cosine_lr(0, 100, 1.0, warmup_steps=10) == 0.1
    assert cosine_lr(9, 100, 1.0, warmup_steps=10) == 1.0
    assert cosine_lr(10, 100, 1.0, warmup_steps=10) == 1.0
    assert cosine_lr(100, 100, 1.0, warmup_steps=10, min_lr=0.01) == 0.01


@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format], ids=["channels_last", "contiguous"])
@pytest.mark.parametrize("segments", [True, False], ids=["segment-views", "0-d-factors"])
def test_fast_path_is_the_per_tensor_rule_in_float64(segments, layout, monkeypatch):
    """In float64 the multi-tensor update is the per-tensor rule to 1e-12: the check's lars rows on a float64 model,
    in both factor forms (CUDA's segment views on the CPU too) and both layouts (fp32 and the compiled update: the
    check's lars case, tests/check/test_cases.py)."""
    monkeypatch.setattr(lars_module, "segment_factors_on", lambda device: segments)
    ctx = Context(torch.device("cpu"), False, torch.Generator().manual_seed(1))
    for optim in (OptimConfig(), OptimConfig(weight_decay=5e-2, lars_clip=False)):
        rows = lars_rows(ctx, 0, optim, False, torch.float64, layout)
        assert [r.op for r in rows] == ["lars params", "lars momentum"] and all(r.err < 1e-12 for r in rows), rows


def test_segment_views_have_the_strides_of_each_tensor():
    conv = torch.empty(4, 3, 2, 2).to(memory_format=torch.channels_last)
    flat = torch.arange(48 + 6, dtype=torch.float32)
    views = segment_views(flat, [conv, torch.empty(2, 3)])
    assert views[0].stride() == conv.stride() and views[1].stride() == (3, 1)
    assert views[1].flatten().tolist() == list(range(48, 54))
    rows = torch.arange(2 * 54.0).view(2, 54)
    assert segment_views(rows[1], [torch.empty(2, 3)])[0].flatten().tolist() == list(range(54, 60))  # row offset


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
@pytest.mark.parametrize("where, bad", [(0, float("nan")), (0, float("inf")), (1, float("nan")), (3, float("-inf"))])
def test_gradients_finite_covers_lars_weights_and_excluded_parameters(where, bad, fused):
    # parameters 0 and 2 are conv weights (LARS), 1 and 3 are BatchNorm weight and bias (excluded)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1, bias=False))
    params = list(net.parameters())
    assert [p.ndim for p in params] == [4, 1, 1, 4]
    opt = LARS(lars_param_groups(net), fused_update=fused)
    if fused:  # the flag comes from the norms outside the compiled update (its values: the check's lars case)
        opt._fused = lambda *args: None
    assert opt.gradients_finite is None
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert bool(opt.gradients_finite)
    for p in params:
        p.grad = torch.randn_like(p)
    params[where].grad.view(-1)[1] = bad
    opt.step()
    assert not bool(opt.gradients_finite)


def test_trainer_names_a_non_finite_gradient_of_a_parameter_outside_lars():
    from fastemp.config import load_config
    from fastemp.errors import NonFiniteError
    from fastemp.train import Trainer

    cfg = load_config(
        "quickstart",
        [
            "data.synthetic_train=40",
            "data.synthetic_test=20",
            "model.width=4",
            "model.hidden_dim=16",
            "model.z_dim=8",
            "train.n_patches=2",
            "train.batch_size=10",
            "eval.at_end=false",
        ],
    )
    trainer = Trainer(cfg, progress=False)

    class PoisonAfterBackward:  # a step clock: its "backward" mark comes between the backward and LARS
        def mark(self, phase: str) -> None:
            if phase == "backward":
                trainer.model.backbone.bn1.bias.grad[0] = float("nan")  # BatchNorm: no LARS, no decay, still watched

    trainer.train_step(PoisonAfterBackward())
    with pytest.raises(NonFiniteError, match="the gradients became non-finite at step 1"):
        trainer.raise_if_nonfinite()
