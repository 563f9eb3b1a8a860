"""A reference-style EMP-SSL pipeline, measured beside fastemp for a ratio rather than a claim.

It makes the official implementation's choices, written here from the method's description (no
official code is copied, and neither torchvision nor PIL is used):

    data       per-image Dataset whose __getitem__ augments n patches one at a time on the CPU
               (fastemp.patches.torch_backend's recipe applied to a single patch per call), batched by
               a torch DataLoader with worker processes, then copied to the device
    model      eager fp32: no torch.compile, no channels_last, no autocast
    loss       invariance: a Python loop over patches of F.cosine_similarity to the mean;
               TCR: for each patch group, 1/2 logdet(I_d + d/(B eps) W W^T) with W = Z_i^T (d x B),
               torch.logdet on the d x d matrix, in a Python loop
    optimizer  fastemp.lars.LARS (the official LARS-over-SGD semantics)

The step computes the same loss as fastemp (tests/test_benchmarks.py checks values and gradients against
fastemp.losses.projection_loss_terms); only how it is computed differs.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from fastemp.clock import Clock
from fastemp.config import AugmentConfig, Config
from fastemp.lars import build_lars
from fastemp.losses import LossTerms
from fastemp.model import build_model
from fastemp.patches.draw import sharded_params
from fastemp.patches.torch_backend import augment

from .harness import PeakMemory, time_calls

# ------------------------------------------------------------------------------------- loss


def coding_rate_dxd(z_i: torch.Tensor, eps: float) -> torch.Tensor:
    """R(Z_i) = 1/2 logdet(I_d + d/(B eps) W W^T), W = Z_i^T of shape (d, B): the d x d form."""
    w = z_i.T
    d, b = w.shape
    eye = torch.eye(d, dtype=w.dtype, device=w.device)
    return 0.5 * torch.logdet(eye + (d / (b * eps)) * (w @ w.T))


def loop_tcr(z: torch.Tensor, eps: float = 0.2) -> torch.Tensor:
    """The baseline's -mean_i R(Z_i): one d x d logdet per patch group in Python."""
    return -sum(coding_rate_dxd(z[i], eps) for i in range(z.shape[0])) / z.shape[0]


def baseline_loss_terms(
    z: torch.Tensor, eps: float = 0.2, invariance_weight: float = 200.0, tcr_weight: float = 1.0
) -> LossTerms:
    """The EMP-SSL loss of unit rows z (n, B, d), one patch group at a time in Python loops."""
    n = z.shape[0]
    zbar = z.mean(dim=0)
    sim = sum(-F.cosine_similarity(z[i], zbar, dim=1).mean() for i in range(n)) / n
    tcr = loop_tcr(z, eps)
    return LossTerms(invariance_weight * sim + tcr_weight * tcr, sim, tcr)


# ------------------------------------------------------------------------------------- data


def augment_one_patch(images: torch.Tensor, image: int, aug: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """One augmented patch of dataset image `image`: (3, S, S) float32, normalized."""
    params = sharded_params(torch.tensor([image]), 1, slice(None), images.shape[1], images.shape[2], aug, generator)
    return augment(images, params, aug)[0].contiguous()


class PerPatchDataset(torch.utils.data.Dataset):
    """Image i -> its n augmented patches (n, 3, S, S), made one patch at a time on the CPU.

    Each process (DataLoader worker) draws from its own generator, seeded from the process's torch
    seed, which the DataLoader makes distinct per worker and per epoch.
    """

    def __init__(self, images: torch.Tensor, n_patches: int, aug: AugmentConfig):
        self.images, self.n, self.aug = images.cpu(), n_patches, aug
        self._generator: tuple[int, torch.Generator] | None = None

    def generator(self) -> torch.Generator:
        if self._generator is None or self._generator[0] != os.getpid():
            self._generator = (os.getpid(), torch.Generator().manual_seed(torch.initial_seed()))
        return self._generator[1]

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        gen = self.generator()
        return torch.stack([augment_one_patch(self.images, i, self.aug, gen) for _ in range(self.n)])


def to_patch_major(batch: torch.Tensor) -> torch.Tensor:
    """(B, n, 3, S, S) from the DataLoader -> (n*B, 3, S, S) with row i*B + b = patch i of image b."""
    return batch.transpose(0, 1).reshape(-1, *batch.shape[2:])


def make_loader(
    images: torch.Tensor, n: int, batch: int, aug: AugmentConfig, workers: int, pin_memory: bool, seed: int = 0
) -> torch.utils.data.DataLoader:
    """Shuffled, drop_last DataLoader over PerPatchDataset with `workers` processes."""
    gen = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        PerPatchDataset(images, n, aug),
        batch_size=batch,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        pin_memory=pin_memory,
        generator=gen,
        persistent_workers=workers > 0,
    )


# ------------------------------------------------------------------------------------- step


class BaselineStep:
    """Model, optimizer and one training step, eager fp32."""

    def __init__(self, cfg: Config, device: torch.device):
        torch.manual_seed(cfg.train.seed)
        self.cfg, self.device = cfg, device
        self.model = build_model(cfg.model).to(device)
        self.optimizer = build_lars(self.model, cfg.optim)

    def __call__(self, batch: torch.Tensor) -> LossTerms:
        n = batch.shape[1]
        x = to_patch_major(batch).to(self.device, non_blocking=True)
        z = F.normalize(self.model(x), dim=-1)
        terms = baseline_loss_terms(
            z.view(n, -1, z.shape[-1]), self.cfg.loss.eps, self.cfg.loss.invariance_weight, self.cfg.loss.tcr_weight
        )
        terms.total.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return terms


class _TorchDefaults:
    """Run under PyTorch's default numerics (TF32 matmul off, cuDNN TF32 on, no cudnn.benchmark)."""

    def __enter__(self):
        b = torch.backends
        self.saved = (b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32, b.cudnn.benchmark)
        b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32, b.cudnn.benchmark = False, True, False

    def __exit__(self, *exc):
        b = torch.backends
        b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32, b.cudnn.benchmark = self.saved


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
    with _TorchDefaults():
        step = BaselineStep(cfg, device)
        loader = iter(make_loader(images, n, batch, cfg.augment, workers, device.type == "cuda", cfg.train.seed))
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


def augmentation_rate(images: torch.Tensor, aug: AugmentConfig, patches: int) -> float:
    """Patches/s of the baseline's per-patch CPU augmentation in one process (for the kernels table)."""
    images, gen = images.cpu(), torch.Generator().manual_seed(0)
    one = iter(range(10**9))
    seconds = time_calls(
        lambda: augment_one_patch(images, next(one) % images.shape[0], aug, gen), images.device, 1, patches
    )
    return patches / sum(seconds)
