"""What the config's open choices ("auto") mean on this machine: `resolve(cfg)` decides them once per run, and
checks that the machine has what the config asks; everything else reads the frozen Runtime it returns
(docs/training.md#what-auto-means-here). `fastemp.validate.check_config` checks the values before this runs.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from . import distributed, memory, patches
from .config import Config, ConfigError
from .gradcache import plan_chunks
from .validate import check_backend


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

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if self.precision == "bf16" else None

    def autocast(self) -> AbstractContextManager:
        dtype = self.autocast_dtype
        return torch.autocast(self.device.type, dtype=dtype) if dtype else nullcontext()

    def resolved(self) -> dict:  # as the summary and the benchmark results record them
        names = ("backend", "compile_mode", "precision", "channels_last", "fused_loss", "patch_compile")
        names += ("fused_update", "grad_chunks", "bn_groups_per_forward")
        return {name.removesuffix("_mode"): getattr(self, name) for name in names}  # compile_mode as "compile"

    def describe(self) -> str:
        """One line saying what "auto" chose, logged when a run starts."""
        where = f"{self.device}" + (f" x {self.world_size} processes" if self.world_size > 1 else "")
        chunks = f", gradient cache x{self.grad_chunks}" if self.grad_chunks > 1 else ""
        ghost = f", {self.bn_groups_per_forward} BatchNorm groups per forward" if self.bn_groups_per_forward > 1 else ""
        return (
            f"{where}, {self.precision}, compile {self.compile_mode}, "
            f"{'channels_last' if self.channels_last else 'NCHW'}, {self.backend} patches "
            f"({self.backend_reason}{', compiled' if self.patch_compile else ''}), "
            f"{'fused' if self.fused_loss else 'torch'} invariance loss"
            f"{', fused LARS update' if self.fused_update else ''}{chunks}{ghost}"
        )


def resolve_device(name: str) -> torch.device:
    """The device `train.device` names (auto: CUDA when present), if this machine has it; under torchrun, this
    process's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ConfigError(f"train.device must be auto, cpu, cuda or cuda:N, got {name!r}; set one of them")
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


def resolve_fused(name: str, device: torch.device) -> bool:
    """loss.fused: the Triton kernel on CUDA by default; on demands it (the CPU needs TRITON_INTERPRET=1)."""
    from fastemp.kernels.cosine_to_mean import triton_usable

    if name == "on" and not triton_usable(device):
        raise ConfigError(
            "loss.fused=on needs CUDA with Triton, or TRITON_INTERPRET=1 on the CPU; "
            "use loss.fused=auto or set TRITON_INTERPRET=1"
        )
    return name == "on" or (name == "auto" and device.type == "cuda" and triton_usable(device))


DALI_MISSING = "nvidia.dali does not import (install nvidia-dali-cuda130, or -cuda120)"


def choose_backend(requested: str, streamed: bool, device_type: str, dali_installed: bool) -> tuple[str, str]:
    """(the patch backend, why) from the request, the data (resident or streamed), the device and whether DALI
    imports (docs/data-backends.md)."""
    check_backend(requested, streamed)
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


def resolve(
    cfg: Config, device: torch.device | None = None, training: bool = True, check_memory: bool = False
) -> Runtime:
    """The Runtime of cfg on this machine; training=False (evaluation only): no batch shard and no chunks;
    check_memory: refuse a run that cannot fit (fastemp.memory)."""
    device = device or resolve_device(cfg.train.device)
    on_cuda = device.type == "cuda"
    m = cfg.model
    precision = {"auto": "bf16" if on_cuda else "fp32"}.get(m.precision, m.precision)
    compile_mode = {"auto": "default" if on_cuda else "none"}.get(m.compile, m.compile)
    d = cfg.data
    asks_dali = d.streamed and d.backend in ("dali", "auto")  # DALI is imported only where it could be chosen
    backend, backend_reason = choose_backend(d.backend, d.streamed, device.type, asks_dali and patches.dali_available())
    world = distributed.world_size()
    shard = distributed.batch_shard(cfg.train.batch_size) if training else None  # checks B divides by the world
    chunks, per_forward = 1, 1
    if training:
        # the memory estimate's activations of a patch, tripled without compilation (eager ghost BatchNorm keeps
        # float32 temporaries of a bf16 step)
        t = cfg.train
        per_patch = memory.activation_bytes_per_patch(cfg, precision) * (3 if compile_mode == "none" else 1)
        chunks, per_forward = plan_chunks(
            t.n_patches, t.batch_size // world, t.grad_chunks, t.bn_groups, device, per_patch, world, m.sync_bn
        )
    if check_memory:
        evaluate = not training or cfg.eval.scheduled
        memory.check_memory(cfg, device, precision, chunks, world, train=training, evaluate=evaluate)
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
        fused_loss=resolve_fused(cfg.loss.fused, device),
        world_size=world,
        shard=shard,
        grad_chunks=chunks,
        bn_groups_per_forward=per_forward,
    )
