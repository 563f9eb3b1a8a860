"""`fastemp check`: the DALI patch backend against the torch one, by the channel statistics of the
patches they cut from the same images."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..config import AugmentConfig
from .core import AUGMENT_TOL, FP32_TOL, CheckResult, Context, compare, fmt_shape, skipped


def smooth_images(ctx: Context, count: int, size: int = 32) -> torch.Tensor:
    """uint8 (N, H, W, 3) natural-ish images: smooth random colour fields, some saturated (the recipe
    of tests/test_patches_dali.py), on the check's device."""
    low = torch.rand(count, 3, 6, 6, generator=ctx.gen) * 1.2 - 0.1
    img = F.interpolate(low, size=size, mode="bilinear", align_corners=False)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().to(ctx.device)


def channel_stats(patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean r, g, b, std r, g, b) over every pixel of every patch, and their standard
    errors estimated from the per-patch values (patches are independent draws), float64."""
    x = patches.detach().double().cpu().transpose(0, 1).reshape(3, patches.shape[0], -1)  # (3, P, pixels)
    mean = x.mean((1, 2))
    std = x.var((1, 2)).sqrt()
    per_patch_mean = x.mean(2)  # (3, P)
    per_patch_var = ((x - mean[:, None, None]) ** 2).mean(2)
    p = x.shape[1]
    se_mean = per_patch_mean.std(1) / math.sqrt(p)
    se_std = per_patch_var.std(1) / math.sqrt(p) / (2 * std)  # delta method: d std = d var / (2 std)
    return torch.cat([mean, std]), torch.cat([se_mean, se_std])


def _stats_note(got: torch.Tensor, ref: torch.Tensor) -> str:
    return "dali/torch mean rgb, std rgb: " + " ".join(f"{a:+.3f}/{b:+.3f}" for a, b in zip(got.tolist(), ref.tolist()))


def check_augment_stats(ctx: Context) -> list[CheckResult]:
    """DALI vs torch patches of the same images, default recipe (tolerances of tests/test_patches_dali.py).

    paired: the same seed. DALI draws its parameters with the torch backend's sharded_params on a CPU
      generator, so the torch backend run on a CPU copy of the images uses identical parameters; the
      documented semantic differences (fixed jitter order, reflect-101 blur borders) move the channel
      statistics by ~0.002-0.005, so |dali - torch| <= 0.01 (absolute, normalised pixel scale).
    independent: the torch backend with another seed on the check's device; |dali - torch| must be
      within 5 standard errors (from the per-patch values) + 0.01; err is the worst |diff| / that bound.
    """
    from ..patches import dali_available

    if not dali_available():
        return [skipped("augment dali-vs-torch", "nvidia.dali does not import")]
    from ..patches.dali_backend import DaliPatches
    from ..patches.torch_backend import TorchPatches

    aug = AugmentConfig()
    batch, n = 16, (50 if ctx.quick else 100)
    images = smooth_images(ctx, batch)
    index = torch.arange(batch, device=ctx.device)
    seed, other_seed = ctx.seed(), ctx.seed()
    dali, se_dali = channel_stats(DaliPatches(images, aug, seed=seed)(index, n, seed))
    paired, _ = channel_stats(TorchPatches(images.cpu(), aug)(index.cpu(), n, seed))
    indep, se_indep = channel_stats(TorchPatches(images, aug)(index, n, other_seed))
    shape = (n * batch, 3, aug.crop_size, aug.crop_size)
    rows = []
    diff = (dali - paired).abs()
    err = diff.max().item()
    rows.append(
        CheckResult(
            "augment paired",
            fmt_shape(shape),
            "fp32",
            err,
            AUGMENT_TOL,
            err,
            math.nan,
            "pass" if math.isfinite(err) and err <= AUGMENT_TOL else "FAIL",
            "abs diff of channel mean/std, same seed; " + _stats_note(dali, paired),
        )
    )
    bound = 5 * torch.sqrt(se_dali**2 + se_indep**2) + AUGMENT_TOL
    diff = (dali - indep).abs()
    err = (diff / bound).max().item()
    rows.append(
        CheckResult(
            "augment independent",
            fmt_shape(shape),
            "fp32",
            err,
            1.0,
            diff.max().item(),
            math.nan,
            "pass" if math.isfinite(err) and err <= 1.0 else "FAIL",
            "|diff| / (5 SE + 0.01), other seed; " + _stats_note(dali, indep),
        )
    )
    return rows


def check_patches_compiled(ctx: Context) -> list[CheckResult]:
    """The torch backend with its recipe compiled (data.patch_compile) vs eager, same images and seed.

    The random draw is eager in both, so the parameters are identical and the pixels differ only by
    Inductor's reordered float math. Solarize is a threshold: a pixel within that rounding of it can
    invert in one and not the other, so solarized patches are compared apart, by the fraction of
    pixels that differ by more than 1e-4 (tol 1e-3); every other patch by the relative-norm error.
    """
    from ..patches.torch_backend import TorchPatches

    if ctx.quick:
        return [skipped("patches compiled", "--quick skips compilation")]
    aug = AugmentConfig()
    batch, n = (100, 20) if ctx.cuda else (8, 4)
    images = smooth_images(ctx, 4 * batch)
    index = torch.randperm(4 * batch, generator=ctx.gen)[:batch].to(ctx.device)
    seed = ctx.seed()
    eager = TorchPatches(images, aug)
    compiled = TorchPatches(images, aug, compile_recipe=True)
    ref, got = eager(index, n, seed), compiled(index, n, seed)
    solarized = eager.params(index, n, seed).solarize
    shape = fmt_shape(tuple(ref.shape))
    rows = [
        compare(
            "patches compiled",
            shape,
            "fp32",
            got[~solarized],
            ref[~solarized],
            FP32_TOL,
            note=f"{int((~solarized).sum())} patches without solarize",
        )
    ]
    flipped = ((got[solarized] - ref[solarized]).abs() > 1e-4).double().mean().nan_to_num(0.0).item()
    max_abs = (got[solarized] - ref[solarized]).abs().max().item() if bool(solarized.any()) else 0.0
    rows.append(
        CheckResult(
            "patches compiled solarized",
            shape,
            "fp32",
            flipped,
            1e-3,
            max_abs,
            math.nan,
            "pass" if flipped <= 1e-3 else "FAIL",
            f"fraction of pixels off by > 1e-4 in {int(solarized.sum())} solarized patches",
        )
    )
    return rows


def check_prefetch(ctx: Context) -> list[CheckResult]:
    """Patches taken after a prefetch (TorchPatches.prefetch, as the Trainer and evaluation call it) are the
    patches made afresh, bit for bit, and a prefetch for other arguments is never taken.

    CUDA: from the second prefetch on, the patches are made on the backend's side stream while the current
    stream runs on; each step takes its patches right after announcing the next ones and reads them at once,
    so a missing event wait or a buffer reused too early would show here as different pixels. With the
    recipe compiled unless --quick (as the Trainer runs it). CPU: the same calls; prefetch makes the patches
    at once. Exact (tol 0): the same recipe on the same device with the same draw.
    """
    from ..patches.torch_backend import TorchPatches

    aug = AugmentConfig()
    batch, n, steps = (100, 20, 5) if ctx.cuda else (8, 4, 3)
    images = smooth_images(ctx, 4 * batch)
    perm = torch.randperm(4 * batch, generator=ctx.gen).to(ctx.device)
    seeds = [ctx.seed() for _ in range(steps)]
    compiled = ctx.cuda and not ctx.quick
    patches = TorchPatches(images, aug, compile_recipe=compiled)

    def index(step: int) -> torch.Tensor:  # a fresh tensor made on the current stream, as batch_index's slices
        return perm[(step % 4) * batch : (step % 4 + 1) * batch].clone()

    taken, ahead = [], index(0)
    for step in range(steps):
        x = patches(ahead, n, seeds[step])  # step 0: nothing prefetched, made now
        if step + 1 < steps:
            ahead = index(step + 1)
            patches.prefetch(ahead, n, seeds[step + 1])
        taken.append(x.clone())
        del x
    first = index(0)
    patches.prefetch(first, n, seeds[0])
    other = patches(first, n, seeds[0] + 1)  # the same index, another seed: made afresh, the prefetch dropped
    fresh = torch.cat([patches.make(index(step), n, seeds[step]) for step in range(steps)])
    shape = fmt_shape(tuple(fresh.shape))
    how = ("side stream + events" if ctx.cuda else "made at prefetch (CPU)") + (", compiled recipe" if compiled else "")
    return [
        compare("prefetch taken", shape, "fp32", torch.cat(taken), fresh, 0.0, note=f"{steps} steps, {how}"),
        compare(
            "prefetch other args",
            fmt_shape(tuple(other.shape)),
            "fp32",
            other,
            patches.make(first, n, seeds[0] + 1),
            0.0,
            note="a prefetch for another seed is not taken",
        ),
    ]
