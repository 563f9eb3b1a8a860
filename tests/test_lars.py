"""LARS against a hand computation of the official rule, and the schedule against torch's."""

import math

import numpy as np
import torch
from torch import nn

from fastemp.lars import LARS, cosine_lr, lars_param_groups


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
