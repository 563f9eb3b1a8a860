"""Float64 reference implementations of the EMP-SSL loss, written as literally as the formulas.

These are slow on purpose: no Sylvester trick, no Cholesky, no fusion. Every fast path in fastemp
is tested against them (tests/) and checked on the user's card by `fastemp check`.
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
