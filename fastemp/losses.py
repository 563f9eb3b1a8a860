"""The EMP-SSL loss over z of shape (n, B, d), patch-major (group i holds patch i of every image):

    loss_sim = -mean_i mean_b cos(z_i[b], zbar[b]),   zbar = mean_i z_i (not detached)
    R(Z_i)   = 1/2 logdet(I_d + d/(B*eps) Z_i^T Z_i),  loss_tcr = -mean_i R(Z_i)
    total    = invariance_weight * loss_sim + tcr_weight * loss_tcr

Both terms are negative by design (docs/training.md#the-loss-and-why-both-terms-are-negative).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .config import LossConfig
from .distributed import gather_batch


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """The loss's working precision: fp32 for bf16/fp16/fp32 inputs, float64 kept (the float64 references)."""
    return t if t.dtype == torch.float64 else t.float()


class LossTerms(NamedTuple):
    total: torch.Tensor
    invariance: torch.Tensor  # loss_sim, in [-1, 1]
    tcr: torch.Tensor  # the uniformity term: loss_tcr = -mean_i R(Z_i), or vonmises_uniformity (loss.uniformity)


class _CholeskyCodingRate(torch.autograd.Function):
    """R(Z_i) for all groups with one batched Cholesky of M = I + c G = L L^T, G the Gram matrix on the smaller
    side (Sylvester): logdet M = 2 sum log diag L, dR/dZ = c M^{-1} Z or c Z M^{-1}. A failed factorisation
    (M's eigenvalues are >= 1: only non-finite inputs) gives NaN, never a wrong number."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, eps: float):
        n, b, d = z.shape
        c = d / (b * eps)
        zf = at_least_fp32(z)
        b_side = b < d
        left, right = (zf, zf.transpose(1, 2)) if b_side else (zf.transpose(1, 2), zf)
        eye = torch.eye(min(b, d), dtype=zf.dtype, device=zf.device)
        # I + c Z Z^T as one batched GEMM with the identity as its addend (no separate scale and add)
        chol, info = torch.linalg.cholesky_ex(torch.baddbmm(eye, left, right, alpha=c))
        rate = torch.diagonal(chol, dim1=-2, dim2=-1).log().sum(-1)  # 1/2 logdet
        rate = rate.masked_fill(info != 0, float("nan"))
        ctx.save_for_backward(zf, chol)
        ctx.c, ctx.b_side, ctx.in_dtype = c, b_side, z.dtype
        return rate

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_rate: torch.Tensor):
        zf, chol = ctx.saved_tensors
        scale = (ctx.c * grad_rate.to(zf.dtype))[:, None, None]
        if ctx.b_side:
            grad = torch.cholesky_solve(zf, chol)
        else:
            grad = torch.cholesky_solve(zf.transpose(1, 2), chol).transpose(1, 2)
        return grad.mul_(scale).to(ctx.in_dtype), None


def total_coding_rate(z: torch.Tensor, eps: float = 0.2) -> torch.Tensor:
    """Per-group coding rates R(Z_i) of z (n, B, d), shape (n,), in fp32 (float64 kept) with autocast off."""
    with torch.autocast(z.device.type, enabled=False):
        return _CholeskyCodingRate.apply(z, eps)


def invariance_loss(z: torch.Tensor) -> torch.Tensor:
    """loss_sim = -mean_i mean_b cos(z_i[b], zbar[b]); z need not be normalised."""
    zbar = z.mean(dim=0, keepdim=True)
    return -F.cosine_similarity(z, zbar, dim=-1).mean()


def vonmises_uniformity(z: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """log mean_{a<b} exp(-t |zbar_a - zbar_b|^2) over image pairs, zbar = mean_i z_i: kachayev/ssl-in-one-epoch's
    uniformity term, in fp32 (float64 kept); distances from the Gram matrix (no sqrt: finite gradient at 0)."""
    with torch.autocast(z.device.type, enabled=False):
        zbar = at_least_fp32(z).mean(dim=0)
        sq = zbar.square().sum(-1)
        dist2 = (sq[:, None] + sq[None, :] - 2 * zbar @ zbar.T).clamp_min(0)
        a, b = torch.triu_indices(len(zbar), len(zbar), 1, device=z.device)
        return torch.logsumexp(-t * dist2[a, b], dim=0) - math.log(a.numel())


def projection_loss_terms(p: torch.Tensor, cfg: LossConfig, fused: bool = False) -> LossTerms:
    """The loss from raw projector outputs p (n, B, d), z = p / |p| per row; fused: the invariance term by the
    Triton kernel straight from p. Under torchrun p is this rank's shard: `invariance` (so `total`) is this
    rank's, `tcr` the global batch's (every rank factorises the gathered z: cheap, and no broadcast)."""
    z = F.normalize(at_least_fp32(p), dim=-1)
    if fused:
        from fastemp.kernels.cosine_to_mean import cosine_to_mean

        sim = cosine_to_mean(p)[0]
    else:
        sim = invariance_loss(z)
    if cfg.uniformity == "vonmises":  # over the global batch's image means, as the TCR over its groups
        uniformity = vonmises_uniformity(gather_batch(z.mean(0, keepdim=True)), cfg.vonmises_t)
        return LossTerms(cfg.invariance_weight * sim + cfg.vonmises_weight * uniformity, sim, uniformity)
    tcr = -total_coding_rate(gather_batch(z), cfg.eps).mean()
    return LossTerms(cfg.invariance_weight * sim + cfg.tcr_weight * tcr, sim, tcr)
