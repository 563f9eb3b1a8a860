"""`fastemp check`: the patches and what reads them -- the DALI backend vs the torch one (channel statistics of
patches of the same images), the compiled torch recipe vs eager, prefetched patches vs patches made afresh, the
evaluation's features vs a plain loop."""

from __future__ import annotations

import dataclasses
import math
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import AugmentConfig, DataConfig
from ..data import load_split
from ..data.streamed import StreamedSet
from .core import AUGMENT_TOL, FP32_TOL, CheckResult, Context, compare, compare_with_baseline, row, skipped


def smooth_images(ctx: Context, count: int, size: int = 32) -> torch.Tensor:
    """uint8 (N, H, W, 3) smooth random colour fields, some saturated, on the check's device."""
    low = torch.rand(count, 3, 6, 6, generator=ctx.gen) * 1.2 - 0.1
    img = F.interpolate(low, size=size, mode="bilinear", align_corners=False)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().to(ctx.device)


def channel_stats(patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean r, g, b, std r, g, b) over every pixel of every patch, and their standard errors from
    the per-patch values (patches are independent draws), float64."""
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
    """DALI vs torch patches of the same pixels (DALI reads PNG files), default recipe: "paired" with the same
    seed (the same drawn parameters), "independent" with another."""
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
        dali_backend = DaliImagePatches(png_folder(images, Path(root), ctx.device), aug)
        dali, se_dali = channel_stats(dali_backend(index, n, seed))
        dali_backend.close()
    paired, _ = channel_stats(TorchPatches(images.cpu(), aug)(index, n, seed))
    indep, se_indep = channel_stats(TorchPatches(images, aug)(index.to(ctx.device), n, other_seed))
    shape = (n * batch, 3, aug.crop_size, aug.crop_size)
    diff = (dali - paired).abs()
    paired_row = row("augment paired", shape, "fp32", diff.max().item(), AUGMENT_TOL, diff.max().item())
    paired_row.note = "abs diff of channel mean/std, same seed; " + _stats_note(dali, paired)
    bound = 5 * torch.sqrt(se_dali**2 + se_indep**2) + AUGMENT_TOL
    diff = (dali - indep).abs()
    note = "|diff| / (5 SE + 0.01), other seed; " + _stats_note(dali, indep)
    return [
        paired_row,
        row("augment independent", shape, "fp32", (diff / bound).max().item(), 1.0, diff.max().item(), note=note),
    ]


def check_patches_compiled(ctx: Context) -> list[CheckResult]:
    """The torch recipe compiled (data.patch_compile) vs eager, same images and draw; solarized patches apart, by
    the fraction of pixels off by > 1e-4 (a threshold flips with rounding)."""
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
    shape, diff = tuple(ref.shape), (got[solarized] - ref[solarized]).abs()
    flipped = (diff > 1e-4).double().mean().nan_to_num(0.0).item()
    max_abs = diff.max().item() if bool(solarized.any()) else 0.0
    plain = f"{int((~solarized).sum())} patches without solarize"
    note = f"fraction of pixels off by > 1e-4 in {int(solarized.sum())} solarized patches"
    return [
        compare("patches compiled", shape, "fp32", got[~solarized], ref[~solarized], FP32_TOL, note=plain),
        row("patches compiled solarized", shape, "fp32", flipped, 1e-3, max_abs, note=note),
    ]


def check_prefetch(ctx: Context) -> list[CheckResult]:
    """Patches taken after a prefetch (PatchBackend.prefetch/take, keyed by step as the Trainer calls them) are
    the patches made afresh, bit for bit (CUDA: through the side stream); a prefetch under another key is not."""
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
    taken, fresh = torch.cat(taken), torch.cat([patches.make(request(step)) for step in range(steps)])
    how = ("side stream + events" if ctx.cuda else "made at prefetch (CPU)") + (", compiled recipe" if compiled else "")
    afresh, note = patches.make(request(0, seeds[0] + 1)), "a prefetch under another key is not taken"
    return [
        compare("prefetch taken", tuple(fresh.shape), "fp32", taken, fresh, 0.0, note=f"{steps} steps, {how}"),
        compare("prefetch other key", tuple(other.shape), "fp32", other, afresh, 0.0, note=note),
    ]


def eval_case(device: torch.device) -> dict:
    """CUDA: the standard model at the official protocol's forward shape, as evaluation runs it there (compiled
    bf16); CPU: a tiny model, as evaluation runs it here (fp32 eager)."""
    from ..config import Config, EvalConfig, ModelConfig

    if device.type == "cuda":
        return dict(config=Config(), count=200, eval=EvalConfig())
    tiny = ModelConfig(width=8, hidden_dim=64, z_dim=32)
    return dict(config=Config(model=tiny), count=12, eval=EvalConfig(patches=4, batch_size=5))


def check_eval_forward(ctx: Context) -> list[CheckResult]:
    """fastemp.evaluate.extract_features as the runtime runs it (CUDA: compiled bf16, channels_last, vs eager bf16
    by compare_with_baseline; CPU: fp32 eager) vs a plain fp32 eager loop over the same patches and weights (NCHW,
    no TF32). BatchNorm's running statistics come from one batch first: a trained network's scale."""
    from ..evaluate import extract_features
    from ..patches.torch_backend import TorchPatches
    from ..runtime import resolve
    from .training import encoder

    case = eval_case(ctx.device)
    runtime = resolve(case["config"], ctx.device, training=False)
    compiled = runtime.eval_compile_mode != "none"
    if compiled and ctx.quick:
        return [skipped("eval forward", "--quick skips compilation")]
    count, cfg = case["count"], case["eval"]
    aug, seed = AugmentConfig(), ctx.seed()
    images = smooth_images(ctx, count)
    recipe = TorchPatches(images, aug, compile_recipe=runtime.patch_compile)
    m = case["config"].model
    model = encoder(ctx, ctx.seed(), sizes=dict(width=m.width, hidden_dim=m.hidden_dim, z_dim=m.z_dim))
    with torch.no_grad():  # running statistics = one batch's statistics
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.momentum = 1.0
        model(recipe(torch.arange(min(count, 100), device=ctx.device), 4, seed - 1))
    model.eval()
    loop = []
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # true fp32 convolutions
        for start in range(0, count, cfg.batch_size):
            index = torch.arange(start, min(start + cfg.batch_size, count), device=ctx.device)
            h = model.encode(recipe(index, cfg.patches, seed + start).contiguous())
            loop.append(h.view(cfg.patches, index.numel(), -1).mean(0))
    ref = torch.cat(loop)
    shape = (count, cfg.patches, 3, aug.crop_size, aug.crop_size)

    if not compiled:
        got = extract_features(model, images, cfg, aug, runtime, seed)
        return [compare("eval forward h", shape, "fp32", got, ref, FP32_TOL, note="CPU: fp32 eager")]
    model = model.to(memory_format=torch.channels_last)
    got = extract_features(model, images, cfg, aug, runtime, seed)
    eager = extract_features(model, images, cfg, aug, dataclasses.replace(runtime, eval_compile_mode="none"), seed)
    note = "compiled, channels_last; ref fp32 eager NCHW"
    return [compare_with_baseline("eval forward h", shape, "bf16-amp", got, eager, ref, "eager bf16", note)]
