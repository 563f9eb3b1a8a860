"""Many processes under torchrun: the process group, rank helpers, the batch gather, SyncBatchNorm, shards.

Without torchrun every helper here is the identity of a world of one process. What is global and what is per
rank: docs/many-gpus.md; hangs and errors: fastemp.watchdog.

Gradient scale. Every collective used in the loss has the adjoint backward (the gather's backward
sums each rank's gradient of its slice over all ranks; the all-reduce's backward all-reduces), so
autograd on K ranks computes, per rank, the gradient of sum_r loss_r through that rank's
parameters, and DDP divides by K: the step follows grad (1/K) sum_r loss_r. Each rank's loss is
`w * sim_r + tcr(gathered z)`, where sim_r is the mean over its B/K images and tcr is identical on
every rank; then (1/K) sum_r loss_r = w * mean_r sim_r + tcr = the single-process loss of the
global batch, because the shards are equal. (A gather without the backward sum drops the other
ranks' paths into tcr and under-scales its gradient by K.)
"""

from __future__ import annotations

import inspect
import os
import re
import time
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from . import watchdog
from .config import ConfigError, flat_dict, shown, to_dict
from .data.listing import what_changed
from .errors import DataError, UserError, one_line
from .watchdog import DistributedError

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_alone = False  # rank 0 runs as a world of one (the benchmark's one-process figure); the others wait


def init_from_env() -> None:
    """Join the process group that torchrun set up (NCCL for CUDA tensors, one GPU per LOCAL_RANK; gloo for CPU
    tensors) and start the watchdog; nothing when not launched by torchrun."""
    if "WORLD_SIZE" not in os.environ or dist.is_initialized():
        return
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise DistributedError(
            f"WORLD_SIZE is set but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not: no rendezvous "
            "to join; launch with torchrun (e.g. torchrun --nproc-per-node=2 -m fastemp train ...)"
        )
    bad = next((n for n in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT") if not os.environ[n].isdigit()), None)
    if bad:
        raise DistributedError(
            f"{bad}={shown(os.environ[bad])} is not a whole number; launch with torchrun, which sets it"
        )
    timeout = watchdog.collective_timeout_s()
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    try:
        # torch's own limit comes later than the watchdog's verdict, as the backstop
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout + max(10.0, timeout / 4)))
    except Exception as err:  # a refused or timed-out rendezvous: one line, not a C++ traceback
        raise DistributedError(
            f"rendezvous at {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} failed "
            f"(rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']}): {one_line(err)[:160]}; check that every "
            "rank was started and can reach MASTER_ADDR:MASTER_PORT"
        ) from err
    if dist.get_world_size() > 1:
        watchdog.active = watchdog.Watchdog(timeout)


def shutdown() -> None:
    if watchdog.active is not None:
        watchdog.active.close()
        watchdog.active = None
    if dist.is_initialized():
        dist.destroy_process_group()


# what a collective's error says when another rank is gone
COLLECTIVE_FAILURE = re.compile(r"gloo|nccl|connection (closed|reset)|timed out|broken pipe|process ?group", re.I)


def explain(err: BaseException) -> DistributedError | None:
    """A collective that failed because another rank is gone, as a one-line error; None otherwise."""
    lost = isinstance(err, getattr(dist, "DistError", ())) or (
        isinstance(err, RuntimeError) and COLLECTIVE_FAILURE.search(str(err)) is not None
    )
    if world_size() == 1 or isinstance(err, UserError) or not lost:
        return None
    return DistributedError(
        f"rank {rank()} of {world_size()} lost contact with the other ranks ({one_line(err)[:160]}); another "
        f"rank probably stopped: look for its error above"
    )


def check_same_config(cfg) -> None:
    """Every rank runs the same config (the differing keys are named)."""
    configs = gather_objects(flat_dict(to_dict(cfg)))
    for r, other in enumerate(configs):
        keys = sorted(k for k in {*other, *configs[0]} if other.get(k) != configs[0].get(k))
        if keys:
            what = ", ".join(f"{k} ({shown(configs[0].get(k))} vs {shown(other.get(k))})" for k in keys[:3])
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            raise ConfigError(
                f"the ranks started with different configs: rank {r} differs from rank 0 in {what}{more}; "
                "start every rank with the same --config and overrides"
            )


def check_same_data(identity: dict, where: str) -> None:
    """Every rank loaded the same data: checkpoint.data_identity's fingerprints compared, the ranks that differ
    named (a rank that sees other files would train on other images, or hang at the end of a shorter epoch)."""
    every = gather_objects(identity)
    differ = [r for r, other in enumerate(every) if other != every[0]]
    if differ:
        r = differ[0]
        split = next(k for k in every[0].keys() | every[r].keys() if every[0].get(k) != every[r].get(k))
        then, now = (every[k].get(split, {}).get("contents", {}) for k in (0, r))
        raise DataError(
            f"the ranks read different data: rank{'s' if len(differ) > 1 else ''} {', '.join(map(str, differ))} "
            f"differ{'' if len(differ) > 1 else 's'} from rank 0 in the {split} split of {where} (rank {r}: "
            f"{what_changed(then, now, 'on rank 0')}); give every rank the same files"
        )


def world_size() -> int:
    return 1 if _alone or not dist.is_initialized() else dist.get_world_size()


def rank() -> int:
    return 0 if _alone or not dist.is_initialized() else dist.get_rank()


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def launcher(world: int) -> str:
    """The command that starts fastemp on `world` processes."""
    return f"torchrun --nproc-per-node={world} -m fastemp" if world > 1 else "fastemp"


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


@contextmanager
def alone():
    """On rank 0: run the body as a one-process world (yields True; world_size() is 1 inside, so a Trainer built
    there is the single-process run of the config: `fastemp bench throughput`'s one-process figure); every other
    rank yields False and waits. Without torchrun it yields False: there is no larger world to step out of."""
    global _alone
    if not dist.is_initialized():
        yield False
        return
    # the others wait in the store, where the watchdog sees a silent rank 0, rather than in a collective that
    # would time out on a long probe
    key = f"main/{watchdog.collectives_issued()}" if watchdog.active is not None else None
    if dist.get_rank() == 0:
        _alone = True
        try:
            yield True
        finally:
            _alone = False
        if key is not None:
            watchdog.active.store.set(key, "1")
    else:
        yield False
        while key is not None and not watchdog.active.store.check([key]):
            time.sleep(0.05)
    dist.barrier()


# ------------------------------------------------------------------------------- the batch


def batch_shard(batch_size: int) -> slice:
    """This rank's contiguous images of a global batch of `batch_size` (every rank takes an equal shard)."""
    world = world_size()
    if batch_size % world:
        raise ConfigError(
            f"train.batch_size={batch_size} does not divide by the world size {world}: each rank "
            f"takes an equal shard of the global batch; use a multiple of {world}"
        )
    per_rank = batch_size // world
    return slice(rank() * per_rank, (rank() + 1) * per_rank)


# torch 2.13 renamed all_gather_into_tensor / reduce_scatter_tensor (the old names warn)
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _GatherBatch(torch.autograd.Function):
    """(n, b, d) per rank -> (n, K*b, d), ranks in order along dim 1; backward: the gradient of each
    rank's slice summed over all ranks (reduce-scatter), the adjoint of the gather."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world, (n, b, d) = dist.get_world_size(), x.shape
        out = x.new_empty((world * n, b, d))
        _all_gather_single(out, x.contiguous())  # (K*n, b, d): rank-major
        return out.view(world, n, b, d).transpose(0, 1).reshape(n, world * b, d)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        n, big_b, d = grad.shape
        world = dist.get_world_size()
        per_rank = grad.view(n, world, big_b // world, d).transpose(0, 1).contiguous()  # (K, n, b, d)
        out = grad.new_empty((n, big_b // world, d))
        _reduce_scatter_single(out, per_rank.view(world * n, big_b // world, d))
        return out


def gather_batch(z: torch.Tensor) -> torch.Tensor:
    """The global batch of z (n, b, d) from every rank, differentiable; z itself in a world of one."""
    return z if world_size() == 1 else _GatherBatch.apply(z)


class _SumAcrossRanks(torch.autograd.Function):
    """All-reduce (sum); backward: the gradient all-reduced, the adjoint (torch.distributed.nn's is deprecated)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _SumAcrossRanks.apply(grad)


def sum_across_ranks(values: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of equal-shaped values (global metrics from per-rank ones), differentiable."""
    return values if world_size() == 1 else _SumAcrossRanks.apply(values)


def run_on_main(fn):
    """fn() on rank 0 only (alone); every rank returns its result or raises its exception, so all ranks act alike."""
    if world_size() == 1:
        return fn()
    box = [None]
    with alone() as main:
        if main:
            try:
                box[0] = (True, fn())
            except Exception as err:  # re-raised below, on every rank
                box[0] = (False, err)
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise value
    return value


def gather_objects(obj) -> list:
    """obj from every rank, in rank order."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------------------- BatchNorm, DDP


class CpuSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm with the statistics of the global batch on the CPU, with gloo (torch's SyncBatchNorm is GPU-only,
    and DDP refuses it on CPU modules). Affine, as every BatchNorm of the model. The per-channel sums are
    accumulated in float64 (as torch's CPU batch_norm does; float32 sums over ~10^5 elements lose the 1e-5
    agreement) and summed over the ranks by sum_across_ranks, whose backward sums their gradients (the adjoint,
    as the batch gather's). Running statistics get the unbiased global variance."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or world_size() == 1:
            return super().forward(x)
        dims, shape = [0, *range(2, x.dim())], [1, -1] + [1] * (x.dim() - 2)
        count = x.numel() // x.shape[1] * world_size()  # equal shards on every rank
        sums = sum_across_ranks(torch.stack([x.sum(dims, dtype=torch.float64), (x * x).sum(dims, dtype=torch.float64)]))
        mean = sums[0] / count
        var = (sums[1] / count - mean * mean).clamp(min=0)  # biased, in float64
        # one scale (rstd x weight) for the centred x: autograd keeps x and x - mean, not xhat as well
        scale = (var + self.eps).rsqrt().to(x.dtype) * self.weight
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.to(x.dtype), alpha=m)
                self.running_var.mul_(1 - m).add_((var * count / max(count - 1, 1)).to(x.dtype), alpha=m)
        return (x - mean.to(x.dtype).view(shape)) * scale.view(shape) + self.bias.view(shape)


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm layer synchronised over the world by torch's converter (same parameter and buffer objects,
    so their dtype and device, and state-dict keys): torch's SyncBatchNorm on CUDA, CpuSyncBatchNorm on the CPU."""
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if device.type != "cuda":
        for layer in model.modules():
            if isinstance(layer, nn.SyncBatchNorm):
                layer.__class__ = CpuSyncBatchNorm  # the same layer, another forward (not a SyncBatchNorm for DDP)
    return model


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """DDP over the world: gradients averaged once per backward (bucketed). Buffers are never broadcast per
    forward (one broadcast per gradient-cache chunk): with sync_bn the running statistics are global already,
    without it rank 0's are saved and evaluated (Trainer.evaluate), as with the official DataParallel run."""
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    ddp = nn.parallel.DistributedDataParallel
    # torch >= 2.12 renamed the switch (the old name warns); the buffers are equal at init either way
    no_buffer_sync = (
        {"forward_sync_buffers": False}
        if "forward_sync_buffers" in inspect.signature(ddp).parameters
        else {"broadcast_buffers": False}
    )
    return ddp(model, device_ids=ids, **no_buffer_sync)
