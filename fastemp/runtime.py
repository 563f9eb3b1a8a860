"""What the config's open choices ("auto") mean on this machine: `resolve(cfg)` decides them once per run, and
checks that the machine has what the config asks; everything else reads the frozen Runtime it returns
(docs/training.md#what-auto-means-here). It checks the values first (`fastemp.validate.check_config`).

The memory of a training step and of an evaluation is estimated here, before anything is allocated, so that a
config that cannot fit is refused at start-up with the numbers. Per rank, in bytes (the terms are explained in
docs/reliability-limits.md):

    peak = (model + dataset + max(step, features + evaluation)) x SAFETY_MARGIN
"""

from __future__ import annotations

import os
import re
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from . import distributed, patches
from .config import Config, ConfigError
from .errors import UserError


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    precision: str  # fp32 | bf16
    compile_mode: str  # training: none, or a torch.compile mode
    eval_compile_mode: str  # feature extraction: none, or default (one forward shape: no autotuning, no CUDA graphs)
    channels_last: bool  # NHWC activations and patches
    backend: str  # the patch backend: torch | dali | pillow
    backend_reason: str  # why: what auto saw (resident or streamed data, CUDA, DALI), or the config's choice
    patch_compile: bool  # the torch backend's recipe through torch.compile
    fused_update: bool  # LARS's update as one compiled pass per tensor (optim.fused_update)
    fused_loss: bool  # the Triton cosine-to-mean kernel for the invariance term
    world_size: int  # processes under torchrun (1 without)
    shard: slice | None  # this rank's images of every global batch (None: resolved for evaluation only)
    grad_chunks: int  # gradient-cache chunks per step (1: one pass)
    bn_groups_per_forward: int  # BatchNorm groups normalised apart within one forward (1: the whole forward)

    def autocast(self) -> AbstractContextManager:
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.precision == "bf16" else nullcontext()

    def resolved(self) -> dict:  # as the summary and the benchmark results record them
        names = ("backend", "compile_mode", "precision", "channels_last", "fused_loss", "patch_compile")
        names += ("fused_update", "grad_chunks", "bn_groups_per_forward")
        return {name.removesuffix("_mode"): getattr(self, name) for name in names}  # compile_mode as "compile"

    def describe(self) -> str:
        """One line saying what "auto" chose (the summary's fields), logged when a run starts."""
        where = f"{self.device}" + (f" x {self.world_size} processes" if self.world_size > 1 else "")
        chosen = ", ".join(f"{name} {value}" for name, value in self.resolved().items())
        return f"{where}, {chosen} ({self.backend_reason})"


def resolve_device(name: str) -> torch.device:
    """The device `train.device` names (auto: CUDA when present), if this machine has it; under torchrun, this
    process's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise ConfigError(f"train.device must be auto, cpu, cuda or cuda:N, got {name!r}; set one of them")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"train.device={name} but torch sees no CUDA device; use train.device=cpu "
                "(or auto), or install a CUDA build of torch"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"train.device={name} but there are {torch.cuda.device_count()} CUDA devices; "
                f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}"
            )
        if device.index is None and distributed.world_size() > 1:
            return torch.device("cuda", distributed.local_rank())
    return device


DALI_MISSING = "nvidia.dali does not import (install nvidia-dali-cuda130, or -cuda120)"


def choose_backend(requested: str, streamed: bool, device_type: str, dali_installed: bool) -> tuple[str, str]:
    """(the patch backend, why) from the request, the data (resident or streamed), the device and whether DALI
    imports (docs/data-backends.md); the three fit together (fastemp.validate.check_backend)."""
    if not streamed:
        return "torch", "resident images: the batched torch backend" if requested == "auto" else "data.backend=torch"
    if requested == "pillow":
        return "pillow", "data.backend=pillow"
    if requested == "dali":
        if dali_installed:
            return "dali", "data.backend=dali" + ("" if device_type == "cuda" else " (CPU operators: no GPU)")
        return "pillow", f"data.backend=dali but {DALI_MISSING}: Pillow workers instead"
    if dali_installed and device_type == "cuda":
        return "dali", "streamed files on CUDA: DALI decodes (nvJPEG) and cuts the patches on the GPU"
    missing = "no CUDA device" if dali_installed else DALI_MISSING
    return "pillow", f"streamed files, {missing}: Pillow workers"


def plan_chunks(cfg: Config, device: torch.device, bytes_per_patch: float, world: int = 1) -> tuple[int, int]:
    """(gradient-cache chunks, BatchNorm groups per forward) for one step of cfg's n x batch/world patches.
    bn_groups 0: BatchNorm per chunk; k > 0: k groups normalised apart (ghost BN) in chunks of whole groups,
    grad_chunks 0 choosing them: on one CUDA device the fewest whose activations (x1.5) fit in 80% of the free
    memory, elsewhere k."""
    t = cfg.train
    n, batch, grad_chunks, bn_groups = t.n_patches, t.batch_size // world, t.grad_chunks, t.bn_groups
    if bn_groups == 0:
        return max(grad_chunks, 1), 1
    if grad_chunks == 0:
        grad_chunks = bn_groups
        if device.type == "cuda" and world == 1:
            free = available_bytes(device)
            fits = (
                c
                for c in range(1, bn_groups)
                if bn_groups % c == 0 and n * batch / c * bytes_per_patch * 1.5 <= 0.8 * free
            )
            grad_chunks = next(fits, bn_groups)
    per_forward = bn_groups // grad_chunks
    if world > 1 and cfg.model.sync_bn and per_forward > 1:
        raise ConfigError(
            f"train.bn_groups={bn_groups} with train.grad_chunks={grad_chunks} needs ghost BatchNorm, "
            "which SyncBatchNorm does not have; under torchrun set train.grad_chunks to "
            "train.bn_groups (or 0)"
        )
    return grad_chunks, per_forward


ACTIVATION_UNITS = 24  # training: saved activations per patch, in units of width x side^2 elements (measured)
EVAL_UNITS = 6  # no-grad forward: live activations per patch, same units (measured)
# The ImageNet stem keeps three w-channel maps at half the side: 12 units at the stages' (quarter) side when
# training, about two of them live at once (8) in a no-grad forward; counted from the architecture.
STEM_UNITS, STEM_EVAL_UNITS = 12, 8
SAFETY_MARGIN = 1.25
KNOWN_SIZES = {"cifar10": (50_000, 10_000, 32), "cifar100": (50_000, 10_000, 32)}  # train, test, side


class MemoryEstimateError(UserError, MemoryError):
    """A config whose step or evaluation cannot fit in the memory of this machine."""


def activation_bytes(cfg: Config, side: int, precision: str, training: bool = True) -> int:
    """Activations of one patch of `side` pixels (training: what autograd keeps; else a no-grad forward's live
    ones): units x width x side^2 elements at the stages' side (the ImageNet stem quarters it); stage k holds 2^k w
    channels on (side/2^k)^2 pixels. The memory check's step term and the chunk planner's figure."""
    imagenet = cfg.model.stem == "imagenet"
    stage = side // 4 if imagenet else side
    units, stem = (ACTIVATION_UNITS, STEM_UNITS) if training else (EVAL_UNITS, STEM_EVAL_UNITS)
    return (units + (stem if imagenet else 0)) * cfg.model.width * stage * stage * (2 if precision == "bf16" else 4)


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
            per_pass * activation_bytes(cfg, crop, precision)
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
        out["evaluation"] = per_batch * (activation_bytes(cfg, side_in, precision, False) + 3 * side_in * side_in * elt)
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


def check_memory_fits(parts: dict[str, int], device: torch.device, world: int = 1) -> None:
    """Refuse, with the numbers, a step or an evaluation whose estimate (`parts`) cannot fit in the memory
    available now. On the CPU every rank shares the host's memory."""
    need = parts["total"] * SAFETY_MARGIN * (world if device.type == "cpu" else 1)
    have = available_bytes(device)
    if need <= have:
        return
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


def resolve(
    cfg: Config, device: torch.device | None = None, training: bool = True, check_memory: bool = False
) -> Runtime:
    """The Runtime of cfg on this machine; training=False (evaluation only): no batch shard and no chunks;
    check_memory: refuse a run that cannot fit. The values are checked first: a Config made in Python gets the
    command line's one-line errors too."""
    from fastemp.kernels.cosine_to_mean import triton_usable

    from .validate import check_config

    check_config(cfg)
    device = device or resolve_device(cfg.train.device)
    on_cuda = device.type == "cuda"
    m = cfg.model
    precision = {"auto": "bf16" if on_cuda else "fp32"}.get(m.precision, m.precision)
    compile_mode = {"auto": "default" if on_cuda else "none"}.get(m.compile, m.compile)
    d = cfg.data
    asks_dali = d.streamed and d.backend in ("dali", "auto")  # DALI is imported only where it could be chosen
    backend, backend_reason = choose_backend(d.backend, d.streamed, device.type, asks_dali and patches.dali_available())
    if cfg.loss.fused == "on" and not triton_usable(device):
        raise ConfigError(
            "loss.fused=on needs CUDA with Triton, or TRITON_INTERPRET=1 on the CPU; "
            "use loss.fused=auto or set TRITON_INTERPRET=1"
        )
    world = distributed.world_size()
    shard = distributed.batch_shard(cfg.train.batch_size) if training else None  # checks B divides by the world
    chunks, per_forward = 1, 1
    if training:
        # the memory estimate's activations of a patch, tripled without compilation (eager ghost BatchNorm keeps
        # float32 temporaries of a bf16 step)
        per_patch = activation_bytes(cfg, cfg.augment.crop_size, precision) * (3 if compile_mode == "none" else 1)
        chunks, per_forward = plan_chunks(cfg, device, per_patch, world)
    if check_memory:
        evaluate = not training or cfg.eval.scheduled
        check_memory_fits(estimate(cfg, device.type, precision, chunks, world, training, evaluate), device, world)
    return Runtime(
        device=device,
        precision=precision,
        compile_mode=compile_mode,
        eval_compile_mode="none" if compile_mode == "none" else "default",
        # oneDNN's NHWC 1x1 stride-2 conv backward-weights hangs or returns wrong gradients when the input has
        # fewer channels than its ISA block (8 on AVX2, 16 on AVX-512): uxlfoundation/oneDNN#6035. The first
        # downsample shortcut sees `width` channels, so toy widths stay NCHW on CPU.
        channels_last=m.channels_last and (on_cuda or m.width >= 16),
        backend=backend,
        backend_reason=backend_reason,
        # auto: on CUDA whenever the model is compiled too
        patch_compile=d.patch_compile == "on" or (d.patch_compile == "auto" and on_cuda and compile_mode != "none"),
        # auto: whenever the model is compiled (on demands torch.compile, which works on the CPU too, slowly)
        fused_update=cfg.optim.fused_update == "on" or (cfg.optim.fused_update == "auto" and compile_mode != "none"),
        # auto: the Triton kernel on CUDA
        fused_loss=cfg.loss.fused == "on" or (cfg.loss.fused == "auto" and on_cuda and triton_usable(device)),
        world_size=world,
        shard=shard,
        grad_chunks=chunks,
        bn_groups_per_forward=per_forward,
    )
