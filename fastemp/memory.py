"""Peak memory of a training step and of an evaluation, estimated before anything is allocated.

A config that cannot fit is refused at start-up with the numbers (`check_memory`), instead of an
out-of-memory traceback minutes later (or the kernel's OOM killer). The estimate is deliberately
simple, per rank, in bytes, with elt = 2 under bf16 autocast and 4 in fp32:

  model        16 P: fp32 weights, gradients and LARS momentum, plus one more copy for casts and
               temporaries (P: the parameter count, from the model built on the meta device)
  dataset      N x S x S x 3 uint8 per split (train; test too when evaluating), on the device
  step         patches per forward pass x ACTIVATION_UNITS x width x c^2 x elt: what autograd keeps
               for a ResNet-18 patch of crop side c (stage k holds 2^k w channels on (c/2^k)^2
               pixels, so every stage weighs ~w c^2); patches per pass = n x B / K, / the chunks
               the Runtime chose for the gradient cache (which also keeps every patch's projection
               p); plus the input patches and the TCR's n covariance matrices (z_dim^2, x3 for the
               solve). The same per-patch figure plans the chunks (fastemp.runtime.resolve_chunks).
  features     the evaluation features of both splits: hidden_dim floats per image (x2 under
               torchrun: the zero-filled buffer and its all-reduce), and the kNN's similarities of
               1024 test images to every training image
  evaluation   one no-grad forward of eval.batch_size x eval.patches patches (EVAL_UNITS x width x
               c^2 x elt each)

  peak = model + dataset + max(step, features + evaluation): the step's activations are gone when
  evaluation runs.

ACTIVATION_UNITS and EVAL_UNITS were measured on the CPU (fp32, widths 16, 32 and 64, 256-512
patches, fresh process, ru_maxrss delta of one step: 19.6-25.6 units for training, 4.5-7.5 for a
no-grad forward);
tests/test_memory.py checks the estimate against a measured peak. Activation checkpointing is
counted as without it (it measured no smaller at width 16). The whole estimate is multiplied by
SAFETY_MARGIN (allocator slack, library workspaces, the Python process) before it is compared
with what is available: MemAvailable (and the cgroup limit) for the CPU, torch.cuda.mem_get_info
for a GPU. ImageFolder sizes are unknown before the folder is listed: their dataset and feature
terms are left out.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .config import Config
from .errors import UserError

ACTIVATION_UNITS = 24  # training: saved activations per patch, in units of width x c^2 elements
EVAL_UNITS = 6  # no-grad forward: live activations per patch, same units
# The ImageNet stem (7x7 stride-2 conv, BN, ReLU, stride-2 max-pool) leaves the stages a quarter of the
# side, and keeps three w-channel maps at half the side: 12 units at the stages' side when training,
# about two of them live at once (8 units) in a no-grad forward. Counted from the architecture, not measured.
STEM_UNITS, STEM_EVAL_UNITS = 12, 8
SAFETY_MARGIN = 1.25
KNOWN_SIZES = {"cifar10": (50_000, 10_000, 32), "cifar100": (50_000, 10_000, 32)}  # train, test, side
GIB = 2**30


class MemoryEstimateError(UserError, MemoryError):
    """A config whose step or evaluation cannot fit in the memory of this machine."""


def parameter_count(cfg: Config) -> int:
    """Parameters of the model cfg describes, counted on the meta device (nothing allocated)."""
    from .model import build_model

    with torch.device("meta"):
        return sum(p.numel() for p in build_model(cfg.model).parameters())


def dataset_sizes(cfg: Config) -> tuple[int, int, int]:
    """(train images, test images, side) known from the config alone; (0, 0, side) for imagefolder."""
    d = cfg.data
    if d.source == "synthetic":
        return d.synthetic_train, d.synthetic_test, d.image_size
    return KNOWN_SIZES.get(d.source, (0, 0, d.image_size))


def activation_bytes_per_patch(cfg: Config, precision: str) -> float:
    """What autograd keeps of one training patch: ACTIVATION_UNITS (and the ImageNet stem's) x width x c^2 x elt."""
    crop, imagenet_stem = cfg.augment.crop_size, cfg.model.stem == "imagenet"
    stage = crop // 4 if imagenet_stem else crop
    units = ACTIVATION_UNITS + (STEM_UNITS if imagenet_stem else 0)
    return float(units * cfg.model.width * stage * stage * (2 if precision == "bf16" else 4))


def estimate(
    cfg: Config,
    device_type: str = "cpu",
    precision: str = "fp32",
    grad_chunks: int = 1,
    world: int = 1,
    train: bool = True,
    evaluate: bool = True,
) -> dict[str, int]:
    """Bytes per rank by term (see the module doc) for the Runtime's device, precision and chunks; "total" is
    the peak before the margin."""
    m, t, e = cfg.model, cfg.train, cfg.eval
    elt = 2 if precision == "bf16" else 4
    params = parameter_count(cfg)
    n_train, n_test, side = dataset_sizes(cfg)
    crop = cfg.augment.crop_size
    imagenet_stem = m.stem == "imagenet"
    out = {"model": 16 * params, "dataset": n_train * side * side * 3 + (n_test * side * side * 3 if evaluate else 0)}
    if device_type == "cpu":
        out["dataset"] *= 2  # the loader's copy before the tensor
    if train:
        patches = t.n_patches * t.batch_size // world
        per_pass = -(-patches // grad_chunks)
        out["step"] = int(
            per_pass * activation_bytes_per_patch(cfg, precision)
            + patches * 3 * crop * crop * 4
            + (patches * m.z_dim * 4 if grad_chunks > 1 else 0)
            + 3 * t.n_patches * m.z_dim * m.z_dim * 4
        )
    if evaluate:
        side_in = crop if e.mode == "patches" else side
        per_batch = e.batch_size * (e.patches if e.mode == "patches" else 1)
        out["features"] = (n_train + n_test) * m.hidden_dim * 4 * (2 if world > 1 else 1) + (
            1024 * n_train * 4 * 3 if e.knn else 0
        )
        stage = side_in // 4 if imagenet_stem else side_in
        eval_units = EVAL_UNITS + (STEM_EVAL_UNITS if imagenet_stem else 0)
        out["evaluation"] = per_batch * (eval_units * m.width * stage * stage + 3 * side_in * side_in) * elt
    evaluation = out.get("features", 0) + out.get("evaluation", 0)
    out["total"] = out["model"] + out["dataset"] + max(out.get("step", 0), evaluation)
    return out


def available_bytes(device: torch.device) -> int:
    """Memory free for this process now: the GPU's free memory, or on the CPU MemAvailable (capped
    by the cgroup's limit when there is one)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    free = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if free is None:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        limit, used = (Path("/sys/fs/cgroup", name).read_text().strip() for name in ("memory.max", "memory.current"))
        if limit != "max":
            free = min(free, int(limit) - int(used))
    except (OSError, ValueError):
        pass
    return free


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def check_memory(
    cfg: Config,
    device: torch.device,
    precision: str = "fp32",
    grad_chunks: int = 1,
    world: int = 1,
    train: bool = True,
    evaluate: bool = True,
    available: int | None = None,
) -> dict[str, int]:
    """Refuse, with the numbers, a step or an evaluation that cannot fit; returns the estimate. The device,
    precision, chunks and world are the Runtime's (fastemp.runtime.resolve calls this); `available` (bytes)
    models a machine, by default it is measured. On the CPU every rank of the world shares the host's memory."""
    parts = estimate(cfg, device.type, precision, grad_chunks, world, train, evaluate)
    need = parts["total"] * SAFETY_MARGIN * (world if device.type == "cpu" else 1)
    have = available_bytes(device) if available is None else available
    if need <= have:
        return parts
    what = "GPU memory" if device.type == "cuda" else "RAM"
    biggest = max((k for k in parts if k != "total"), key=parts.get)
    terms = ", ".join(f"{k} {_gib(v)}" for k, v in parts.items() if k != "total")
    advice = {
        "step": "lower train.n_patches or train.batch_size, or raise train.grad_chunks",
        "evaluation": "lower eval.patches or eval.batch_size (or use eval.mode=plain)",
        "dataset": "use fewer images (data.synthetic_train/test) or a smaller data.image_size",
        "features": "use fewer images (data.synthetic_train/test) or a smaller model.hidden_dim",
        "model": "use a smaller model (model.width, model.hidden_dim)",
    }[biggest]
    ranks = f" x {world} ranks" if device.type == "cpu" and world > 1 else ""
    raise MemoryEstimateError(
        f"this run needs about {_gib(need)} of {what} ({terms}; x{SAFETY_MARGIN} margin{ranks}) "
        f"but {_gib(have)} is available on {device}; {advice}"
    )
