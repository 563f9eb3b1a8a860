"""`fastemp check`: the DALI patch backend against the torch one, by the channel statistics of the
patches they cut from the same images; the compiled torch recipe against the eager one."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import AugmentConfig, DataConfig
from ..data import load_split
from ..data.streamed import StreamedSet
from .core import AUGMENT_TOL, FP32_TOL, CheckResult, Context, compare, fmt_shape, skipped


def smooth_images(ctx: Context, count: int, size: int = 32) -> torch.Tensor:
    """uint8 (N, H, W, 3) natural-ish images: smooth random colour fields, some saturated (the recipe
    of tests/patches/test_dali_backend.py), on the check's device."""
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


def png_folder(images: torch.Tensor, root: Path, device) -> StreamedSet:
    """uint8 (N, H, W, 3) images as lossless PNG files under root/train/ (two classes: a probe needs two),
    listed streamed in index order: the very pixels of `images`, for a backend that reads files."""
    from PIL import Image

    for i, image in enumerate(images.cpu().numpy()):
        folder = root / "train" / f"c{2 * i // len(images)}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:05d}.png")
    return load_split(DataConfig(source="imagefolder", path=str(root), streamed=True), "train", device)


def check_augment_stats(ctx: Context) -> list[CheckResult]:
    """The DALI backend vs the torch backend on the same pixels, default recipe (tolerances of
    tests/patches/test_dali_backend.py). DALI reads the images as PNG files (lossless: it decodes the
    very pixels the torch backend holds resident).

    paired: the same seed. Both backends draw with draw.sharded_params (DALI on a CPU generator), so for
      images of one size the torch backend run on a CPU copy uses identical parameters; the documented
      semantic differences (fixed jitter order, reflect-101 blur borders) move the channel statistics
      by ~0.002-0.005, so |dali - torch| <= 0.01 (absolute, normalised pixel scale).
    independent: the torch backend with another seed on the check's device; |dali - torch| must be
      within 5 standard errors (from the per-patch values) + 0.01; err is the worst |diff| / that bound.
    """
    from ..patches import dali_available

    if not dali_available():
        return [skipped("augment dali-vs-torch", "nvidia.dali does not import")]
    from ..patches.dali_images import DaliImagePatches
    from ..patches.torch_backend import TorchPatches

    aug = AugmentConfig()
    batch, n = 16, (50 if ctx.quick else 100)
    images = smooth_images(ctx, batch)
    index = torch.arange(batch)
    seed, other_seed = ctx.seed(), ctx.seed()
    with tempfile.TemporaryDirectory() as root:
        dali_backend = DaliImagePatches(png_folder(images, Path(root), ctx.device), aug, seed=seed)
        dali, se_dali = channel_stats(dali_backend(index, n, seed))
        dali_backend.close()
    paired, _ = channel_stats(TorchPatches(images.cpu(), aug)(index, n, seed))
    indep, se_indep = channel_stats(TorchPatches(images, aug)(index.to(ctx.device), n, other_seed))
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
    """Patches taken after a prefetch (PatchBackend.prefetch/take, keyed by step as the Trainer and evaluation
    call them) are the patches made afresh, bit for bit, and a prefetch under another key is never taken.

    CUDA: from the second step on, the patches are made on the torch backend's side stream while the current
    stream runs on; each step takes its patches right after announcing the next ones and reads them at once,
    so a missing event wait or a buffer reused too early would show here as different pixels. With the
    recipe compiled unless --quick (as the Trainer runs it). CPU: the same calls; prefetch makes the patches
    at once. Exact (tol 0): the same recipe on the same device with the same draw.
    """
    from ..patches import PatchRequest
    from ..patches.torch_backend import TorchPatches

    aug = AugmentConfig()
    batch, n, steps = (100, 20, 5) if ctx.cuda else (8, 4, 3)
    images = smooth_images(ctx, 4 * batch)
    perm = torch.randperm(4 * batch, generator=ctx.gen).to(ctx.device)
    seeds = [ctx.seed() for _ in range(steps)]
    compiled = ctx.cuda and not ctx.quick
    patches = TorchPatches(images, aug, compile_recipe=compiled)

    def request(step: int, seed: int | None = None) -> PatchRequest:  # a fresh index tensor, as batch_index's
        index = perm[(step % 4) * batch : (step % 4 + 1) * batch].clone()
        return PatchRequest(index, n, seeds[step] if seed is None else seed)

    taken = []
    for step in range(steps):
        x = patches.take(step, request(step))  # step 0: nothing prefetched, made now
        if step + 1 < steps:
            patches.prefetch(step + 1, request(step + 1))
        taken.append(x.clone())
        del x
    patches.prefetch(steps, request(0))
    other = patches.take(steps + 1, request(0, seeds[0] + 1))  # another key: made afresh, the prefetch dropped
    fresh = torch.cat([patches.make(request(step)) for step in range(steps)])
    shape = fmt_shape(tuple(fresh.shape))
    how = ("side stream + events" if ctx.cuda else "made at prefetch (CPU)") + (", compiled recipe" if compiled else "")
    return [
        compare("prefetch taken", shape, "fp32", torch.cat(taken), fresh, 0.0, note=f"{steps} steps, {how}"),
        compare(
            "prefetch other key",
            fmt_shape(tuple(other.shape)),
            "fp32",
            other,
            patches.make(request(0, seeds[0] + 1)),
            0.0,
            note="a prefetch under another key is not taken",
        ),
    ]
