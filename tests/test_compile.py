"""torch.compile(model) matches the eager model on CPU (small shapes) and never recompiles at fixed shapes.

Float64, not fp32: the gradient of a ReLU network jumps where a pre-activation crosses 0, and the
~1e-6 relative differences between compiled and eager fp32 activations flip such a ReLU in about 4
of 10 random draws at this size, moving early-layer gradients by up to ~3% (measured; see
fastemp.check.training.compile_case). In float64 the compiled graph -- the same capture, decompositions,
fusions and BatchNorm buffer updates -- agrees with eager to ~1e-14, so the tolerance can be tight.
One compilation (~25-75 s on two cores when the inductor cache is cold), reused by all three calls.
"""

from __future__ import annotations

import copy

import torch
import torch._dynamo
import torch.nn.functional as F
from torch._dynamo.utils import counters

from fastemp.check.reference import reference_emp_ssl_loss
from fastemp.model import EMPEncoder

N, B, SIZE = 4, 8, 16
TOL = 1e-9  # float64 compiled vs eager: measured <= 5e-13


def step(forward, model, x):
    """Forward, the EMP loss (float64 reference formula), backward: p, gradients, running stats."""
    model.zero_grad(set_to_none=True)
    p = forward(x)
    reference_emp_ssl_loss(F.normalize(p.view(N, B, -1), dim=-1)).backward()
    grads = {name: q.grad.detach().clone() for name, q in model.named_parameters()}
    stats = torch.cat([b.flatten().double() for name, b in model.named_buffers() if "running" in name])
    return p.detach(), grads, stats


def rel(a: torch.Tensor, b: torch.Tensor, floor: float = 0.0) -> float:
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    return ((a - b).norm() / max(b.norm().item(), floor)).item()


def test_compiled_model_matches_eager_without_recompiling(monkeypatch):
    torch._dynamo.reset()
    counters.clear()
    eager = EMPEncoder(width=8, hidden_dim=64, z_dim=32).double().train()
    model = copy.deepcopy(eager)
    compiled = torch.compile(model)  # as the trainer does

    for call in range(3):
        x = torch.randn(N * B, 3, SIZE, SIZE, dtype=torch.float64)  # new values, same shape
        p, grads, stats = step(compiled, model, x)
        p_ref, grads_ref, stats_ref = step(eager, eager, x)

        assert rel(p, p_ref) < TOL
        total = torch.cat([g.flatten() for g in grads_ref.values()])
        assert rel(torch.cat([g.flatten() for g in grads.values()]), total) < TOL
        for name, g in grads_ref.items():  # every tensor (biases before BatchNorm have zero gradient)
            assert rel(grads[name], g, floor=1e-3 * total.norm().item()) < TOL, name
        assert rel(stats, stats_ref) < TOL  # BatchNorm running stats updated identically, once per call

        if call == 0:
            assert counters["stats"]["unique_graphs"] == 1  # one graph: no graph breaks
            # from now on a recompilation raises instead of silently costing another compile
            monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
        else:
            assert counters["stats"]["unique_graphs"] == 1
    assert sum(counters["recompiles"].values()) == 0
