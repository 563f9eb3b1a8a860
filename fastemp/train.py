"""The EMP-SSL train loop. Data flows one way: config -> data -> patches -> model -> loss -> LARS.

Reproducibility: the image order of epoch e is a permutation drawn from (seed, e) and the
augmentation of step t is seeded from (seed, t), so a run resumed from a checkpoint replays
exactly the data and randomness of the uninterrupted run (bit-identical on CPU with the torch
backend).

Under torchrun (fastemp.distributed) every rank builds the same Trainer: it trains on its shard
of each global batch through DDP, logs global metrics, and rank 0 alone writes the run folder.
"""

from __future__ import annotations

import functools
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

from . import checkpoint, distributed, runs
from .config import Config, EvalConfig
from .data import load_split
from .errors import NonFiniteError
from .evaluate import evaluate_encoder
from .gradcache import gradient_cache_step, resolve_chunks
from .lars import build_lars, cosine_lr
from .losses import LossTerms, projection_loss_terms, use_fused
from .model import build_model, compile_model
from .patches import make_patch_backend
from .patches.torch_backend import resolve_patch_compile
from .validate import check_data


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and distributed.world_size() > 1:
        return torch.device("cuda", distributed.local_rank())  # one GPU per local rank
    return torch.device(name)


def mix_seed(seed: int, stream: int, index: int) -> int:
    """A distinct, reproducible seed for (run seed, random stream, step or epoch)."""
    return (seed * 1_000_003 + stream * 7_919 + index * 104_729) % (2**63 - 1)


class Trainer:
    """Builds everything from a Config, trains step by step, checkpoints, evaluates."""

    def __init__(self, cfg: Config, run_dir: Path | None = None, progress: bool = True):
        self.world = distributed.world_size()  # the batch shard is a training matter (begin_step): eval needs none
        self.cfg, self.run_dir, self.progress = cfg, run_dir, progress and distributed.is_main()
        self.device = resolve_device(cfg.train.device)
        on_cuda = self.device.type == "cuda"
        self.precision = {"auto": "bf16" if on_cuda else "fp32"}.get(cfg.model.precision, cfg.model.precision)
        self.autocast_dtype = torch.bfloat16 if self.precision == "bf16" else None
        # oneDNN's NHWC 1x1 stride-2 conv backward-weights hangs or returns wrong gradients when the input has
        # fewer channels than its ISA block (8 on AVX2, 16 on AVX-512): uxlfoundation/oneDNN#6035. The first
        # downsample shortcut sees `width` channels, so toy widths stay NCHW on CPU.
        self.channels_last = cfg.model.channels_last and (on_cuda or cfg.model.width >= 16)
        self.compile_mode = {"auto": "default" if on_cuda else "none"}.get(cfg.model.compile, cfg.model.compile)

        self.train_set = load_split(cfg.data, "train", self.device)
        check_data(cfg, len(self.train_set))  # before the model is built
        self.patches = make_patch_backend(cfg.data.backend, self.train_set, cfg.augment, cfg.train.seed,
                                          workers=cfg.data.workers,
                                          compile_recipe=resolve_patch_compile(cfg.data.patch_compile, self.device,
                                                                               self.compile_mode))
        self.backend_name = self.patches.name
        if self.progress:
            print(f"fastemp: patches: {self.backend_name} ({self.patches.reason})", file=sys.stderr, flush=True)
        torch.manual_seed(cfg.train.seed)
        self.model = build_model(cfg.model).to(self.device)
        if self.world > 1 and cfg.model.sync_bn:
            self.model = distributed.convert_sync_batchnorm(self.model, self.device)
        self.model.backbone.checkpoint_activations = cfg.train.checkpoint_activations
        self.grad_chunks = resolve_chunks(self.model, cfg, self.device, self.world, self.precision,
                                          self.compile_mode)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ddp = distributed.wrap_ddp(self.model, self.device) if self.world > 1 else None
        wrapped = self.ddp or self.model
        self.forward = compile_model(wrapped, self.compile_mode, self.device, cfg.model.cudnn_benchmark)
        self.optimizer = build_lars(self.model, cfg.optim, fused_update=self.compile_mode != "none")  # compiled with the model
        self.fused = use_fused(cfg.loss, self.device)
        self.steps_per_epoch = len(self.train_set) // cfg.train.batch_size
        self.total_steps = cfg.train.max_steps or cfg.train.epochs * self.steps_per_epoch
        self.step, self._perm = 0, (-1, None)
        # wall clock: the first step a process runs (compilation, allocator warm-up) is kept apart
        self.warmup_seconds, self.train_seconds, self.timed_images = 0.0, 0.0, 0
        self.last_record: dict | None = None
        # (first non-finite step, term: 0 sim, 1 tcr, 2 gradients), -1 while all is finite; see _watch_finite
        self._nonfinite = torch.full((2,), -1, dtype=torch.long, device=self.device)

    # -- data order -------------------------------------------------------------------------
    def batch_index(self, step: int) -> torch.Tensor:
        epoch, k = divmod(step, self.steps_per_epoch)
        if self._perm[0] != epoch:
            gen = torch.Generator().manual_seed(mix_seed(self.cfg.train.seed, 1, epoch))
            self._perm = (epoch, torch.randperm(len(self.train_set), generator=gen).to(self.device))
        b = self.cfg.train.batch_size
        return self._perm[1][k * b:(k + 1) * b]

    # -- one step ---------------------------------------------------------------------------
    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype else nullcontext()

    def begin_step(self, step: int) -> torch.Tensor:
        """Set the learning rate of `step` and return its patches (same for a resumed run)."""
        cfg, t = self.cfg, self.cfg.train
        lr = cosine_lr(step, self.total_steps, cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.min_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        shard = distributed.batch_shard(t.batch_size)
        patches = self.patches(self.batch_index(step), t.n_patches, seed=mix_seed(t.seed, 2, step), shard=shard)
        prefetch = getattr(self.patches, "prefetch", None)  # streamed backends: read step t+1's files meanwhile
        if prefetch is not None and step + 1 < self.total_steps:
            prefetch(self.batch_index(step + 1), t.n_patches, seed=mix_seed(t.seed, 2, step + 1), shard=shard)
        return patches if self.channels_last else patches.contiguous()

    def forward_backward(self, patches: torch.Tensor, mark=None) -> LossTerms:
        """Loss terms of one step, with gradients accumulated into the model."""
        n = self.cfg.train.n_patches
        if self.compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # CUDA graphs: this step may reuse the last one's outputs
        if self.grad_chunks > 1:
            return gradient_cache_step(self.forward, patches, n, self.grad_chunks,
                                       lambda p: projection_loss_terms(p, self.cfg.loss, self.fused), self.autocast(),
                                       model=self.ddp or self.model, mark=mark)
        with self.autocast():
            p = self.forward(patches)
        terms = projection_loss_terms(p.view(n, -1, p.shape[-1]), self.cfg.loss, self.fused)
        terms.total.backward()
        return terms

    def train_until(self, stop_step: int | None = None) -> None:
        """Train from self.step up to stop_step (default: the end of the run)."""
        cfg, t = self.cfg, self.cfg.train
        stop_step = min(stop_step or self.total_steps, self.total_steps)
        bar = tqdm(total=stop_step - self.step, disable=not self.progress, desc=cfg.name, unit="step")
        tick, images, warm = time.perf_counter(), 0, self.step
        for step in range(self.step, stop_step):
            terms = self.forward_backward(self.begin_step(step))
            self.optimizer.step()
            self._watch_finite(terms, step + 1)  # after the step: it reads the gradient norms LARS computed
            self.optimizer.zero_grad(set_to_none=True)
            self.step, images = step + 1, images + t.batch_size
            if step == warm or self.step % t.log_every == 0 or self.step == stop_step:
                record = self._log(terms, images, time.perf_counter() - tick, warmup=step == warm)
                bar.set_postfix(sim=f"{record['loss_sim']:.3f}", tcr=f"{record['loss_tcr']:.1f}",
                                img_s=f"{record['images_per_s']:.0f}")
                tick, images = time.perf_counter(), 0
            if self.run_dir and t.ckpt_every and self.step % t.ckpt_every == 0:
                self.save_checkpoint()
            bar.update(1)
        bar.close()

    def _watch_finite(self, terms: LossTerms, step: int) -> None:
        """Record on the device the first step whose sim, tcr or gradient is not finite.

        Checking on the host every step would add a sync per step; this keeps the verdict on the
        device and reads it once on logged steps and before every checkpoint write (raise_if_nonfinite),
        so nothing non-finite is ever saved and the error still names the first bad step and term.
        The gradients' verdict is the optimizer's, from the norms its step computed (LARS.gradients_finite)."""
        grads_ok = self.optimizer.gradients_finite()
        tcr_ok = terms.tcr.detach().isfinite()
        ok = torch.stack([terms.invariance.detach().isfinite(), tcr_ok, tcr_ok if grads_ok is None else grads_ok])
        here = torch.stack([torch.full((), step, dtype=torch.long, device=self.device),
                            torch.argmin(ok.to(torch.uint8)).to(torch.long)])  # argmin: the first False
        first = (self._nonfinite[0] < 0) & ~ok.all()
        self._nonfinite = torch.where(first, here, self._nonfinite)

    def raise_if_nonfinite(self, nonfinite: list[int] | None = None) -> None:
        step, term = nonfinite if nonfinite is not None else self._nonfinite.tolist()
        if step >= 0:
            what = ("the invariance loss (sim)", "the coding-rate loss (tcr)", "the gradients")[int(term)]
            saved = (f"{self.run_dir / 'checkpoint.pt'} holds the last finite state, step {self.saved_step}"
                     if self.run_dir and self.saved_step is not None else "no checkpoint of this run was written")
            raise NonFiniteError(f"training diverged: {what} became non-finite at step {int(step)} ({saved}); "
                                 "lower optim.lr, raise loss.eps or check the data, then train again")

    def _log(self, terms: LossTerms, images: int, seconds: float, warmup: bool) -> dict:
        # the one sync per log: the three loss values (under torchrun their mean over ranks, the global
        # batch's value) and this rank's non-finite record together. DDP makes gradients, and so the
        # record of the first bad step, the same on every rank, so all ranks stop at the same log step.
        losses = distributed.mean_across_ranks(torch.stack([terms.total, terms.invariance, terms.tcr]).detach().double())
        flat = torch.cat([losses, self._nonfinite.double()]).tolist()
        values = flat[:3]
        self.raise_if_nonfinite(flat[3:])
        if warmup:
            self.warmup_seconds += seconds
        else:
            self.train_seconds, self.timed_images = self.train_seconds + seconds, self.timed_images + images
        record = {"step": self.step, "epoch": self.step / self.steps_per_epoch, "loss": values[0],
                  "loss_sim": values[1], "loss_tcr": values[2], "lr": self.optimizer.param_groups[0]["lr"],
                  "images_per_s": images / max(seconds, 1e-9),
                  "elapsed_s": self.warmup_seconds + self.train_seconds}
        if self.run_dir and distributed.is_main():
            runs.append_metrics(self.run_dir, record)
        self.last_record = record
        return record

    def images_per_second(self) -> float:
        """Training throughput over all timed steps (warm-up steps excluded)."""
        return self.timed_images / self.train_seconds if self.train_seconds else float("nan")

    # -- checkpoints ------------------------------------------------------------------------
    saved_step: int | None = None  # the step checkpoint.pt in run_dir holds (None: there is none)

    def save_checkpoint(self) -> None:
        self.raise_if_nonfinite()  # never write non-finite weights over the last good checkpoint
        state = checkpoint.trainer_state(self)
        if distributed.is_main():  # every rank holds the same weights and optimizer state
            checkpoint.save(state, self.run_dir / "checkpoint.pt")
            runs.discard_replaced(self.run_dir)  # a run that --force replaced is no longer needed
        self.saved_step = self.step
        distributed.barrier()

    def load_checkpoint(self, path: Path) -> None:
        checkpoint.load_into(self, path)
        self.saved_step = self.step

    # -- evaluation -------------------------------------------------------------------------
    @functools.cached_property
    def test_set(self):
        """The test split, loaded on first use (only evaluation needs it)."""
        return load_split(self.cfg.data, "test", self.device)

    def evaluate(self, model: torch.nn.Module | None = None, prefix: str = "", eval_cfg: EvalConfig | None = None) -> dict:
        """Score `model` (default: the trained one) under eval_cfg (default: the config's eval protocol)."""
        if model is None:  # without sync_bn each rank has its shard's running statistics: use rank 0's
            distributed.broadcast_buffers(self.model)
        return evaluate_encoder(model or self.model, self.train_set, self.test_set, eval_cfg or self.cfg.eval,
                                self.cfg.augment, self.backend_name, self.cfg.train.seed, self.autocast_dtype,
                                self.channels_last, prefix, self.compile_mode, self.cfg.data.workers)

    def random_init_model(self) -> torch.nn.Module:
        """The same architecture at the run's initialisation seed, never trained."""
        torch.manual_seed(self.cfg.train.seed)
        model = build_model(self.cfg.model).to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model


def run_training(cfg: Config, run_dir: Path, resume: bool = False, progress: bool = True,
                 trainer: Trainer | None = None) -> dict:
    """Train (or resume) the run in run_dir, evaluate, write summary.json; return the summary."""
    trainer = trainer or Trainer(cfg, run_dir, progress)
    if cfg.eval.at_end:
        trainer.test_set  # load it now: a missing test split fails before training, not after it
    if resume:
        trainer.load_checkpoint(run_dir / "checkpoint.pt")
        if distributed.is_main():
            runs.truncate_metrics(run_dir, trainer.step)
    trainer.train_until()
    trainer.save_checkpoint()
    last = trainer.last_record or runs.read_metrics(run_dir)[-1]
    summary = {"name": cfg.name, "steps": trainer.step, "epochs": trainer.step / trainer.steps_per_epoch,
               "n_patches": cfg.train.n_patches, "batch_size": cfg.train.batch_size, "world_size": trainer.world,
               "final_loss": last["loss"], "final_loss_sim": last["loss_sim"], "final_loss_tcr": last["loss_tcr"],
               "train_seconds": trainer.warmup_seconds + trainer.train_seconds,
               "warmup_seconds": trainer.warmup_seconds, "images_per_s": trainer.images_per_second(),
               "data": trainer.train_set.description, "backend": trainer.backend_name,
               "precision": trainer.precision, "compile": trainer.compile_mode, "fused_loss": trainer.fused,
               "environment": runs.environment(trainer.device)}
    if cfg.eval.at_end:
        t0 = time.perf_counter()
        summary.update(trainer.evaluate())
        if cfg.eval.random_init:
            summary.update(trainer.evaluate(trainer.random_init_model(), prefix="random_init_"))
        summary["eval_seconds"] = time.perf_counter() - t0
    if distributed.is_main():
        runs.write_json(run_dir / "summary.json", summary)
        runs.plot_losses(run_dir)
    return summary
