"""Float64 reference implementations of the EMP-SSL loss, written as literally as the formulas.

These are slow on purpose: no Sylvester trick, no Cholesky, no fusion. Every fast path in fastemp
is tested against them (tests/) and checked on the user's card by `fastemp check`. ReferenceLARS is
the optimizer's plain per-tensor rule, the reference of fastemp.lars's fast paths.
"""

from __future__ import annotations

import torch


def reference_total_coding_rate(z: torch.Tensor, eps: float = 0.2) -> torch.Tensor:
    """R(Z_i) = 1/2 logdet(I_d + d/(B*eps) Z_i^T Z_i) for each patch group i, in float64.

    z: (n, B, d), patch-major (group i holds patch i of every image). Returns (n,).
    """
    z = z.double()
    n, b, d = z.shape
    eye = torch.eye(d, dtype=torch.float64, device=z.device)
    scale = d / (b * eps)
    return torch.stack([0.5 * torch.logdet(eye + scale * z[i].T @ z[i]) for i in range(n)])


def reference_cosines(z: torch.Tensor) -> torch.Tensor:
    """cos(z_i[b], zbar[b]) with zbar = mean_i z_i (not detached), in float64: shape (n, B)."""
    z = z.double()
    zbar = z.mean(dim=0)
    return (z * zbar).sum(-1) / (z.norm(dim=-1) * zbar.norm(dim=-1))


def reference_invariance_loss(z: torch.Tensor) -> torch.Tensor:
    """-mean_i mean_b cos(z_i[b], zbar[b]) with zbar = mean_i z_i (not detached), in float64."""
    return -reference_cosines(z).mean()


def reference_emp_ssl_loss(
    z: torch.Tensor, eps: float = 0.2, invariance_weight: float = 200.0, tcr_weight: float = 1.0
) -> torch.Tensor:
    """invariance_weight * loss_sim + tcr_weight * loss_tcr, with loss_tcr = -mean_i R(Z_i)."""
    return invariance_weight * reference_invariance_loss(z) - tcr_weight * reference_total_coding_rate(z, eps).mean()


def reference_vonmises_uniformity(z: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """log of the mean over image pairs a < b of exp(-t * |zbar_a - zbar_b|^2), zbar_b = mean_i z_i[b], in
    float64, pair by pair from the differences (kachayev/ssl-in-one-epoch's von Mises uniformity)."""
    zbar = z.double().mean(dim=0)
    a, b = torch.triu_indices(zbar.shape[0], zbar.shape[0], 1, device=zbar.device)  # every pair a < b once
    return torch.log(torch.exp(-t * ((zbar[a] - zbar[b]) ** 2).sum(-1)).mean())


class ReferenceLARS(torch.optim.SGD):
    """fastemp.lars.LARS as it was before its fast paths (issue 17), kept as their reference: the per-tensor
    rule with lists of 0-d factors (one kernel per tensor on CUDA), then torch's SGD step. Any dtype."""

    def __init__(self, params, lr=0.3, momentum=0.9, nesterov=True, weight_decay=1e-4, eta=0.005, clip=True, eps=1e-8):
        super().__init__(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=0.0)
        for group in self.param_groups:
            group.setdefault("lars", True)
            group.setdefault("lars_weight_decay", weight_decay)
        self.eta, self.clip, self.eps = eta, clip, eps

    @torch.no_grad()
    def adapt_gradients(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None and p.ndim > 1] if group["lars"] else []
            if not params:
                continue
            grads = [p.grad for p in params]
            wd = group["lars_weight_decay"]
            p_norm = torch.stack(torch._foreach_norm(params))
            g_norm = torch.stack(torch._foreach_norm(grads))
            trust = self.eta * p_norm / (g_norm + wd * p_norm + self.eps)
            if self.clip:
                trust = torch.clamp(trust / group["lr"], max=1.0)
            active = (p_norm != 0) & (g_norm != 0)
            scale = torch.where(active, trust, torch.ones_like(trust))
            decay = torch.where(active, scale * wd, torch.zeros_like(trust))
            torch._foreach_mul_(grads, list(scale.unbind()))
            torch._foreach_add_(grads, torch._foreach_mul(params, list(decay.unbind())))

    @torch.no_grad()
    def step(self, closure=None):
        self.adapt_gradients()
        return super().step(closure)


def reference_lars(model: torch.nn.Module, optim) -> ReferenceLARS:
    """ReferenceLARS over the model's LARS parameter groups with an OptimConfig's hyperparameters (as build_lars)."""
    from ..lars import lars_hyperparameters, lars_param_groups

    return ReferenceLARS(lars_param_groups(model), **lars_hyperparameters(optim))
