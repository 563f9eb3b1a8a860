"""Float64 references of the EMP-SSL loss, as literal as the formulas: slow on purpose (no Sylvester trick, no
Cholesky, no fusion). ReferenceLARS: the optimizer's plain per-tensor rule, the reference of fastemp.lars."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reference_total_coding_rate(z: torch.Tensor, eps: float = 0.2) -> torch.Tensor:
    """R(Z_i) = 1/2 logdet(I_d + d/(B*eps) Z_i^T Z_i) for each patch group i of z (n, B, d): shape (n,)."""
    z = z.double()
    n, b, d = z.shape
    eye = torch.eye(d, dtype=torch.float64, device=z.device)
    scale = d / (b * eps)
    return torch.stack([0.5 * torch.logdet(eye + scale * z[i].T @ z[i]) for i in range(n)])


def reference_cosines(z: torch.Tensor) -> torch.Tensor:
    """cos(z_i[b], zbar[b]) with zbar = mean_i z_i (not detached): shape (n, B)."""
    z = z.double()
    zbar = z.mean(dim=0)
    return (z * zbar).sum(-1) / (z.norm(dim=-1) * zbar.norm(dim=-1))


def reference_invariance_loss(z: torch.Tensor) -> torch.Tensor:
    return -reference_cosines(z).mean()


def reference_vonmises_uniformity(z: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """log of the mean over image pairs a < b of exp(-t * |zbar_a - zbar_b|^2), pair by pair from the differences
    (kachayev/ssl-in-one-epoch's von Mises uniformity)."""
    zbar = z.double().mean(dim=0)
    a, b = torch.triu_indices(zbar.shape[0], zbar.shape[0], 1, device=zbar.device)  # every pair a < b once
    return torch.log(torch.exp(-t * ((zbar[a] - zbar[b]) ** 2).sum(-1)).mean())


def reference_loss(p: torch.Tensor, cfg) -> torch.Tensor:
    """The loss of raw projections p under a LossConfig: invariance_weight * loss_sim, then minus tcr_weight x the
    mean TCR or plus vonmises_weight x the von Mises uniformity, on z = F.normalize(p)."""
    z = F.normalize(p.double(), dim=-1)
    invariance = cfg.invariance_weight * reference_invariance_loss(z)
    if cfg.uniformity == "vonmises":
        return invariance + cfg.vonmises_weight * reference_vonmises_uniformity(z, cfg.vonmises_t)
    return invariance - cfg.tcr_weight * reference_total_coding_rate(z, cfg.eps).mean()


class ReferenceLARS(torch.optim.SGD):
    """fastemp.lars.LARS before its fast paths (issue 17): the per-tensor rule with lists of 0-d factors, then
    torch's SGD step. Any dtype."""

    def __init__(self, params, lr=0.3, momentum=0.9, nesterov=True, weight_decay=1e-4, eta=0.005, clip=True):
        super().__init__(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=0.0)
        for group in self.param_groups:
            group.setdefault("lars", True)
            group.setdefault("lars_weight_decay", weight_decay)
        self.eta, self.clip = eta, clip

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None and p.ndim > 1] if group["lars"] else []
            if not params:
                continue
            grads = [p.grad for p in params]
            wd = group["lars_weight_decay"]
            p_norm = torch.stack(torch._foreach_norm(params))
            g_norm = torch.stack(torch._foreach_norm(grads))
            trust = self.eta * p_norm / (g_norm + wd * p_norm + 1e-8)
            if self.clip:
                trust = torch.clamp(trust / group["lr"], max=1.0)
            active = (p_norm != 0) & (g_norm != 0)
            scale = torch.where(active, trust, torch.ones_like(trust))
            decay = torch.where(active, scale * wd, torch.zeros_like(trust))
            torch._foreach_mul_(grads, list(scale.unbind()))
            torch._foreach_add_(grads, torch._foreach_mul(params, list(decay.unbind())))
        return super().step(closure)


def reference_lars(model: torch.nn.Module, optim) -> ReferenceLARS:
    """ReferenceLARS over the model's LARS parameter groups with an OptimConfig's hyperparameters (as build_lars)."""
    from ..lars import lars_hyperparameters, lars_param_groups

    return ReferenceLARS(lars_param_groups(model), **lars_hyperparameters(optim))
