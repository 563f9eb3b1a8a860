"""Peak memory of a training step and of an evaluation, estimated before anything is allocated, so that a
config that cannot fit is refused at start-up with the numbers. Per rank, in bytes (the terms are explained
in docs/reliability-limits.md):

    peak = (model + dataset + max(step, features + evaluation)) x SAFETY_MARGIN
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .config import Config
from .errors import UserError

ACTIVATION_UNITS = 24  # training: saved activations per patch, in units of width x side^2 elements (measured)
EVAL_UNITS = 6  # no-grad forward: live activations per patch, same units (measured)
# The ImageNet stem keeps three w-channel maps at half the side: 12 units at the stages' (quarter) side when
# training, about two of them live at once (8) in a no-grad forward; counted from the architecture.
STEM_UNITS, STEM_EVAL_UNITS = 12, 8
SAFETY_MARGIN = 1.25
KNOWN_SIZES = {"cifar10": (50_000, 10_000, 32), "cifar100": (50_000, 10_000, 32)}  # train, test, side


class MemoryEstimateError(UserError, MemoryError):
    """A config whose step or evaluation cannot fit in the memory of this machine."""


def activation_elements(cfg: Config, side: int, training: bool) -> int:
    """Activations of one patch of `side` pixels: units x width x side^2 at the stages' side (the ImageNet stem
    quarters it); stage k holds 2^k w channels on (side/2^k)^2 pixels."""
    imagenet = cfg.model.stem == "imagenet"
    stage = side // 4 if imagenet else side
    units, stem = (ACTIVATION_UNITS, STEM_UNITS) if training else (EVAL_UNITS, STEM_EVAL_UNITS)
    return (units + (stem if imagenet else 0)) * cfg.model.width * stage * stage


def activation_bytes_per_patch(cfg: Config, precision: str) -> float:
    """What autograd keeps of one training patch (the memory check's step term and the chunk planner's figure)."""
    return float(activation_elements(cfg, cfg.augment.crop_size, True) * (2 if precision == "bf16" else 4))


def estimate(
    cfg: Config,
    device_type: str = "cpu",
    precision: str = "fp32",
    grad_chunks: int = 1,
    world: int = 1,
    train: bool = True,
    evaluate: bool = True,
) -> dict[str, int]:
    """Bytes per rank by term (see the module doc); "total" is the peak before the margin."""
    from .model import build_model

    d, m, t, e = cfg.data, cfg.model, cfg.train, cfg.eval
    elt = 2 if precision == "bf16" else 4
    with torch.device("meta"):  # nothing allocated
        params = sum(p.numel() for p in build_model(m).parameters())
    if d.source == "synthetic":
        n_train, n_test, side = d.synthetic_train, d.synthetic_test, d.image_size
    else:  # image folders' sizes are not known from the config: 0
        n_train, n_test, side = KNOWN_SIZES.get(d.source, (0, 0, d.image_size))
    crop = cfg.augment.crop_size
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
        out["evaluation"] = per_batch * (activation_elements(cfg, side_in, False) + 3 * side_in * side_in) * elt
    evaluation = out.get("features", 0) + out.get("evaluation", 0)
    out["total"] = out["model"] + out["dataset"] + max(out.get("step", 0), evaluation)
    return out


def available_bytes(device: torch.device) -> int:
    """Memory free for this process now: the GPU's, or MemAvailable capped by the cgroup's limit."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        free = int(meminfo["MemAvailable"].split()[0]) * 1024  # in kB
    except (OSError, ValueError, KeyError, IndexError):
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        limit, used = (Path("/sys/fs/cgroup", name).read_text().strip() for name in ("memory.max", "memory.current"))
        if limit != "max":
            free = min(free, int(limit) - int(used))
    except (OSError, ValueError):
        pass
    return free


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


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
    """Refuse, with the numbers, a step or an evaluation that cannot fit; returns the estimate. `available`
    (default: measured) models a machine. On the CPU every rank shares the host's memory."""
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
