"""Fused cosine-to-mean (the EMP-SSL invariance term) straight from raw projector outputs p (n, B, d),
patch-major. For unit rows z_ib = p_ib / |p_ib|, L = -mean_b mean_i cos(z_ib, zbar_b) = -mean_b |zbar_b|, and
dL/dp_ib = -(u_b - cos_ib z_ib) / (n B |p_ib|) with u_b = zbar_b / |zbar_b|. One program per image, two sweeps
over its rows, the gradient made in the forward; zero rows, dtypes and the interpreter's upcast:
docs/speed.md#the-cosine-to-mean-kernel.
"""

from __future__ import annotations

import contextlib
import os

import torch

try:  # Triton is Linux-only; the torch path below needs none of it.
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - depends on the platform
    triton = None
    tl = None
    HAVE_TRITON = False

NORM_EPS = 1e-12  # same guard as F.normalize's default
_ZBAR_TINY = 1e-30  # u = zbar / max(|zbar|, tiny): exact for any normal |zbar|, 0 when zbar == 0
INTERPRETER_UPCAST = True  # see _launch; only read when the kernel runs under TRITON_INTERPRET=1
_alloc = torch.empty  # output allocator (a seam: tests swap in a NaN-filled one to catch unwritten elements)

__all__ = ["cosine_to_mean", "triton_usable", "launch_params"]


if HAVE_TRITON:

    @triton.jit
    def _cosine_to_mean_kernel(
        p_ptr,  # (n, B, d) input, any strides (fp32 / bf16 / fp16)
        dp_ptr,  # (n, B, d) contiguous gradient output, p's dtype (unused if not WRITE_GRAD)
        cos_ptr,  # (n, B) contiguous fp32
        zbar_norm_ptr,  # (B,) fp32: |zbar_b|
        n,
        B,
        d,
        stride_pn,
        stride_pb,
        stride_pd,
        grad_scale,  # -1 / (n * B)
        eps,
        zbar_tiny,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        WRITE_GRAD: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < d
        p_img = p_ptr + b * stride_pb
        col_off = offs_d.to(tl.int64)[None, :] * stride_pd

        # ---- sweep 1: zbar_b = mean_i p_ib / max(|p_ib|, eps), fp32 accumulation ----
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for i0 in range(0, n, BLOCK_N):
            rows = i0 + offs_n
            mask = (rows < n)[:, None] & mask_d[None, :]
            x = tl.load(p_img + rows.to(tl.int64)[:, None] * stride_pn + col_off, mask=mask, other=0.0)
            x = x.to(tl.float32)
            inv_r = 1.0 / tl.maximum(tl.sqrt(tl.sum(x * x, axis=1)), eps)  # masked rows: x = 0 -> z = 0
            acc += tl.sum(x * inv_r[:, None], axis=0)
        zbar = acc / n
        zbar_norm = tl.sqrt(tl.sum(zbar * zbar, axis=0))
        tl.store(zbar_norm_ptr + b, zbar_norm)
        u = zbar / tl.maximum(zbar_norm, zbar_tiny)  # == 0 when zbar == 0

        # ---- sweep 2: cos_ib = z_ib . u_b and dL/dp_ib ----
        for i0 in range(0, n, BLOCK_N):
            rows = i0 + offs_n
            row_ok = rows < n
            mask = row_ok[:, None] & mask_d[None, :]
            rows64 = rows.to(tl.int64)
            x = tl.load(p_img + rows64[:, None] * stride_pn + col_off, mask=mask, other=0.0)
            x = x.to(tl.float32)
            norm = tl.sqrt(tl.sum(x * x, axis=1))
            inv_r = 1.0 / tl.maximum(norm, eps)
            z = x * inv_r[:, None]
            c = tl.sum(z * u[None, :], axis=1)
            tl.store(cos_ptr + rows64 * B + b, c, mask=row_ok)
            if WRITE_GRAD:
                # F.normalize's clamp: below eps the row is x / eps, whose Jacobian is I / eps.
                proj = tl.where(norm >= eps, c, 0.0)
                g = (grad_scale * inv_r)[:, None] * (u[None, :] - proj[:, None] * z)
                dp_off = (rows64[:, None] * B + b) * d + offs_d[None, :]
                tl.store(dp_ptr + dp_off, g.to(dp_ptr.dtype.element_ty), mask=mask)

    try:
        from triton.runtime.interpreter import InterpretedFunction as _InterpretedFunction

        _INTERPRETED = isinstance(_cosine_to_mean_kernel, _InterpretedFunction)
    except ImportError:  # pragma: no cover - older/newer Triton layouts
        _INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
else:  # pragma: no cover
    _INTERPRETED = False


def triton_usable(device: torch.device | str) -> bool:
    """True on CUDA with Triton importable, or on CPU when the kernel was built in interpreter mode
    (TRITON_INTERPRET=1 must be set before triton and this module are first imported)."""
    device = torch.device(device)
    if not HAVE_TRITON:
        return False
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and _INTERPRETED


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def launch_params(n: int, d: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_D, num_warps) for an (n, ., d) input: a whole row per tile (the row norm is one
    in-register reduction), tiles of at most 8K fp32 elements, one warp per 1K elements (1 to 16)."""
    block_d = _next_pow2(d)
    block_n = max(1, min(_next_pow2(n), 8192 // block_d))
    num_warps = max(1, min(16, (block_n * block_d) // 1024))
    return block_n, block_d, num_warps


def _launch(p: torch.Tensor, write_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Run the kernel: returns (loss, cos, dp or None). Any strides are read directly (no copy);
    dp is contiguous (n, B, d) in p's dtype."""
    if p.dim() != 3 or min(p.shape) == 0:
        raise ValueError(f"cosine_to_mean expects p of shape (n, B, d), n, B, d >= 1, got {tuple(p.shape)}")
    if p.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"cosine_to_mean (Triton) supports fp32, bf16 and fp16 inputs, got {p.dtype}")
    if not triton_usable(p.device):
        raise RuntimeError(
            f"the Triton cosine-to-mean kernel cannot run on {p.device}: it needs CUDA with Triton, or "
            "TRITON_INTERPRET=1 set before triton is imported on CPU"
        )
    x = p
    if _INTERPRETED and INTERPRETER_UPCAST and p.dtype != torch.float32:
        # the interpreter's fp32 -> bf16/fp16 casts truncate (the GPU rounds to nearest even): run on an fp32
        # copy and round dp in torch; the kernel's math is fp32 either way
        x = p.float()
    n, B, d = x.shape
    block_n, block_d, num_warps = launch_params(n, d)
    dev = x.device
    cos = _alloc((n, B), dtype=torch.float32, device=dev)
    zbar_norm = _alloc((B,), dtype=torch.float32, device=dev)
    dp = _alloc((n, B, d), dtype=x.dtype, device=dev) if write_grad else cos  # dummy ptr if unused
    # Triton launches on the current CUDA device: make it p's (train.device may be cuda:N).
    guard = torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()
    with guard:
        _cosine_to_mean_kernel[(B,)](
            x,
            dp,
            cos,
            zbar_norm,
            n,
            B,
            d,
            x.stride(0),
            x.stride(1),
            x.stride(2),
            -1.0 / (n * B),
            NORM_EPS,
            _ZBAR_TINY,
            BLOCK_N=block_n,
            BLOCK_D=block_d,
            WRITE_GRAD=write_grad,
            num_warps=num_warps,
        )
    # dp.to: a no-op except for the interpreter upcast above
    return -zbar_norm.mean(), cos, dp.to(p.dtype) if write_grad else None


class _CosineToMean(torch.autograd.Function):
    @staticmethod
    def forward(ctx, p: torch.Tensor):
        loss, cos, dp = _launch(p, write_grad=bool(ctx.needs_input_grad[0]))
        ctx.mark_non_differentiable(cos)
        ctx.save_for_backward(dp)
        return loss, cos

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, grad_cos: torch.Tensor | None):
        (dp,) = ctx.saved_tensors
        if dp.dtype == torch.float32:
            return dp * grad_loss
        # Scale in fp32 so grad_loss (e.g. the invariance weight times upstream grads) is not rounded
        # to bf16 first; one extra elementwise pass over a small (n, B, d) tensor.
        return (dp.float() * grad_loss).to(dp.dtype)


def cosine_to_mean(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, cos) of p (n, B, d) fp32, bf16 or fp16, any strides, by the Triton kernel: loss = -mean_b |zbar_b|
    (0-dim fp32, differentiable w.r.t. p), cos (n, B) fp32 per-patch cosines to the image mean (for logging, no
    grad). RuntimeError where the kernel cannot run (see triton_usable)."""
    if p.requires_grad and torch.is_grad_enabled():
        return _CosineToMean.apply(p)
    loss, cos, _ = _launch(p, write_grad=False)
    return loss, cos
