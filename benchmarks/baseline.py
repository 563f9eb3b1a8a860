"""The reference-style EMP-SSL pipeline measured beside fastemp in the same run (docs/benchmarks.md), written from
the method's description (no official code, torchvision or PIL): per-patch CPU augmentation in DataLoader workers,
an eager fp32 model, the loss in Python loops, fastemp.lars. Same loss as fastemp (tests/test_benchmarks.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastemp.clock import Clock, PeakMemory
from fastemp.config import AugmentConfig, Config, LossConfig
from fastemp.lars import build_lars
from fastemp.losses import LossTerms
from fastemp.model import build_model
from fastemp.patches import patch_major
from fastemp.patches.draw import N_UNIFORMS, params_from_uniforms
from fastemp.patches.torch_backend import augment


def loop_tcr(z: torch.Tensor, eps: float = 0.2) -> torch.Tensor:
    """The baseline's -mean_i R(Z_i), R(Z_i) = 1/2 logdet(I_d + d/(B eps) Z_i^T Z_i) of patch group i (B, d): one
    d x d logdet per group in Python."""
    n, b, d = z.shape
    eye = torch.eye(d, dtype=z.dtype, device=z.device)
    return -sum(0.5 * torch.logdet(eye + (d / (b * eps)) * (z[i].T @ z[i])) for i in range(n)) / n


def baseline_loss_terms(z: torch.Tensor, loss: LossConfig) -> LossTerms:
    """The EMP-SSL loss of unit rows z (n, B, d), one patch group at a time in Python loops."""
    n, zbar = z.shape[0], z.mean(dim=0)
    sim = sum(-F.cosine_similarity(z[i], zbar, dim=1).mean() for i in range(n)) / n
    tcr = loop_tcr(z, loss.eps)
    return LossTerms(loss.invariance_weight * sim + loss.tcr_weight * tcr, sim, tcr)


def augment_one_patch(images: torch.Tensor, image: int, aug: AugmentConfig) -> torch.Tensor:
    """One augmented patch of dataset image `image`: (3, S, S) float32, normalized, drawn from the torch RNG."""
    u = torch.rand(1, N_UNIFORMS)  # one row of the shared draw
    params = params_from_uniforms(u, torch.tensor([image]), images.shape[1], images.shape[2], aug)
    return augment(images, params, aug)[0].contiguous()


class PerPatchDataset(torch.utils.data.Dataset):
    """Image i -> its n augmented patches (n, 3, S, S), made one patch at a time on the CPU from the process's torch
    RNG (the DataLoader seeds each worker's apart, per epoch)."""

    def __init__(self, images: torch.Tensor, n_patches: int, aug: AugmentConfig):
        self.images, self.n, self.aug = images.cpu(), n_patches, aug

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.stack([augment_one_patch(self.images, i, self.aug) for _ in range(self.n)])


def measure_baseline(cfg: Config, images: torch.Tensor, device: torch.device, workers: int, steps=None) -> dict:
    """Images/s of the reference-style pipeline at cfg's n and batch size, on the library's clock.

    Workers deliver batches in bursts, so the rate is images over the seconds of a window of max(20, 2 x workers)
    steps after warm-up steps that let the pipeline fill (a per-step median would time batches already waiting).
    The clock marks when each batch arrives ("wait": on CUDA the device's idle time until then) and when its step
    is queued ("step")."""
    n, batch = cfg.train.n_patches, cfg.train.batch_size
    warmup, steps = max(2, workers + 2), steps or max(20, 2 * workers)
    if (warmup + steps) * batch > images.shape[0]:  # cycle the images instead of re-creating the loader mid-window
        images = images.repeat(-(-(warmup + steps) * batch // images.shape[0]), 1, 1, 1)
    memory, clock = PeakMemory(device), Clock(device)
    # PyTorch's cuDNN defaults (the Trainer sets cudnn.benchmark process-wide from model.cudnn_benchmark)
    with torch.backends.cudnn.flags(enabled=True, benchmark=False):
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.model).to(device)
        optimizer = build_lars(model, cfg.optim)

        def step(patches: torch.Tensor) -> LossTerms:  # eager fp32
            z = F.normalize(model(patch_major(patches).to(device, non_blocking=True)), dim=-1)
            terms = baseline_loss_terms(z.view(n, -1, z.shape[-1]), cfg.loss)
            terms.total.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return terms

        loader = torch.utils.data.DataLoader(
            PerPatchDataset(images, n, cfg.augment),
            batch_size=batch,
            shuffle=True,
            drop_last=True,
            num_workers=workers,
            pin_memory=device.type == "cuda",
            generator=torch.Generator().manual_seed(cfg.train.seed),
            persistent_workers=workers > 0,
        )
        loader = iter(loader)
        for _ in range(warmup):
            step(next(loader))
        memory.reset()
        clock.mark("start")
        for _ in range(steps):
            batch_data = next(loader)
            clock.mark("wait")
            terms = step(batch_data)
            clock.mark("step")
        intervals = clock.intervals()
    seconds = sum(s for _, s in intervals)
    return {
        "workers": workers,
        "warmup_steps": warmup,
        "timed_steps": steps,
        "seconds": seconds,
        "images_per_s": steps * batch / seconds,
        "patches_per_s": steps * batch * n / seconds,
        "data_wait_fraction": sum(s for name, s in intervals if name == "wait") / seconds,
        "peak_memory_bytes": memory.peak_bytes(),
        "peak_memory_source": memory.source,
        "final_loss": float(terms.total.detach()),
        "description": "per-patch CPU augmentation in DataLoader workers, eager fp32 model, "
        "d x d logdet loop, unfused cosine loop, LARS",
    }
