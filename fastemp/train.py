"""The EMP-SSL train loop: config -> data -> patches -> model -> loss -> LARS.

Epoch e's image order is drawn from (seed, e) and step t's augmentation from (seed, t), so a resumed run replays
the uninterrupted one (bit-identical on CPU with the torch backend). Under torchrun every rank trains its shard of
each global batch through DDP and rank 0 alone writes the run folder.
"""

from __future__ import annotations

import functools
import signal
from pathlib import Path

import torch
from tqdm import tqdm

from . import checkpoint, distributed, run_folder, runs, stop
from .clock import Clock
from .config import Config
from .data import ImageSet, load_split, load_train_images
from .data.streamed import StreamedSet
from .errors import NonFiniteError
from .evaluate import evaluate_encoder
from .gradcache import gradient_cache_step
from .lars import build_lars, cosine_lr
from .loggers import Records
from .losses import LossTerms, projection_loss_terms
from .model import build_model, prepare_projector, set_batchnorm_groups
from .patches import PatchBackend, PatchRequest, make_patch_backend
from .runtime import Runtime, resolve
from .validate import check_data

RECORD_KEYS = ("step", "epoch", "train_seconds", "eval_seconds")  # a periodic evaluation's record, besides its results


def mix_seed(seed: int, stream: int, index: int) -> int:
    """A distinct, reproducible seed for (run seed, random stream, step or epoch)."""
    return (seed * 1_000_003 + stream * 7_919 + index * 104_729) % (2**63 - 1)


class Trainer:
    """Builds everything from a Config, trains step by step, checkpoints, evaluates. Made from cfg unless given:
    runtime (resolve(cfg)), train_set and test_set (splits loaded on runtime.device: a sweep loads them once),
    patches (a backend over train_set: a test's stand-in)."""

    def __init__(
        self,
        cfg: Config,
        run_dir: Path | None = None,
        progress: bool = True,
        runtime: Runtime | None = None,
        train_set: ImageSet | None = None,
        test_set: ImageSet | None = None,
        patches: PatchBackend | None = None,
    ):
        self.runtime = rt = runtime or resolve(cfg)  # before anything touches a device
        self.cfg, self.run_dir, self.progress = cfg, run_dir, progress and distributed.is_main()
        self.device = rt.device
        self.train_set = train_set if train_set is not None else load_train_images(cfg.data, self.device)
        if test_set is not None:
            self.test_set = test_set
        check_data(cfg, len(self.train_set))  # before the model is built
        self.patches = patches or make_patch_backend(
            rt.backend,
            self.train_set,
            cfg.augment,
            workers=cfg.data.workers,
            compile_recipe=rt.patch_compile,
        )
        torch.manual_seed(cfg.train.seed)
        self.model = prepare_projector(build_model(cfg.model), cfg.model).to(self.device)
        if rt.world_size > 1 and cfg.model.sync_bn:
            self.model = distributed.convert_sync_batchnorm(self.model, self.device)
        self.model.backbone.checkpoint_activations = cfg.train.checkpoint_activations
        set_batchnorm_groups(self.model, rt.bn_groups_per_forward)
        if rt.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ddp = distributed.wrap_ddp(self.model, self.device) if rt.world_size > 1 else None
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = cfg.model.cudnn_benchmark  # process-wide
        module = self.ddp or self.model
        self.forward = module if rt.compile_mode == "none" else torch.compile(module, mode=rt.compile_mode)
        self.optimizer = build_lars(self.model, cfg.optim, fused_update=rt.fused_update)
        self.loss_terms = functools.partial(projection_loss_terms, cfg=cfg.loss, fused=rt.fused_loss)
        self.steps_per_epoch = len(self.train_set) // cfg.train.batch_size
        self.total_steps = cfg.train.max_steps or cfg.train.epochs * self.steps_per_epoch
        self.step, self._perm = 0, (-1, None)
        # the first step this Trainer runs (compilation, allocator warm-up) is timed apart from the others
        self.clock, self.warmed_up, self._window_seconds = Clock(self.device), False, 0.0
        self.warmup_seconds, self.train_seconds, self.timed_images = 0.0, 0.0, 0
        self.eval_every = cfg.eval.every_steps(self.steps_per_epoch)
        self.evaluations: list[dict] = []  # the periodic evaluations' records (eval.every)
        self.stopped = False  # an evaluation reached eval.stop_at
        self.signal = 0  # the signal every rank agreed to stop on (fastemp.stop), 0: none
        self.last_record: dict | None = None
        self.records = Records(cfg, run_dir, self.total_steps)  # metrics.jsonl and the train.loggers sinks
        # (first non-finite step, term: 0 sim, 1 tcr, 2 gradients), -1 while all is finite; see _watch_finite
        self._nonfinite = torch.full((2,), -1, dtype=torch.long, device=self.device)

    # -- data order -------------------------------------------------------------------------
    def batch_index(self, step: int) -> torch.Tensor:
        epoch, k = divmod(step, self.steps_per_epoch)
        if self._perm[0] != epoch:
            gen = torch.Generator().manual_seed(mix_seed(self.cfg.train.seed, 1, epoch))
            perm = torch.randperm(len(self.train_set), generator=gen)
            # resident images are gathered on their device; streamed backends read files by index on the host,
            # where a device index would cost a sync per use
            self._perm = (epoch, perm if isinstance(self.train_set, StreamedSet) else perm.to(self.device))
        b = self.cfg.train.batch_size
        return self._perm[1][k * b : (k + 1) * b]

    def patch_request(self, step: int) -> PatchRequest:
        """What step `step` asks the patch backend for (the same for a resumed run)."""
        t = self.cfg.train
        return PatchRequest(self.batch_index(step), t.n_patches, mix_seed(t.seed, 2, step), self.runtime.shard)

    # -- one step ---------------------------------------------------------------------------
    def train_step(self, clock=None) -> LossTerms:
        """Run step `self.step` and advance: the one training step (train_until, the benchmarks, the profiler).
        `clock.mark(phase)`, when given, follows "start", "data", "forward", "loss", "backward", "optimizer"."""
        mark = clock.mark if clock is not None else (lambda phase: None)
        t, runtime, step = self.cfg.train, self.runtime, self.step
        mark("start")
        patches = self._begin_step(step)
        mark("data")
        if runtime.compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # CUDA graphs: this step may reuse the last one's outputs
        terms = gradient_cache_step(
            self.forward,
            patches,
            t.n_patches,
            runtime.grad_chunks,
            self.loss_terms,
            runtime.autocast(),
            model=self.ddp or self.model,
            mark=mark,
        )
        self.optimizer.step()
        self._watch_finite(terms, step + 1)  # after the step: it reads the gradient norms LARS computed
        self.optimizer.zero_grad(set_to_none=True)
        mark("optimizer")
        self.step = step + 1
        return terms

    def _begin_step(self, step: int) -> torch.Tensor:
        """Set the learning rate of `step` and return its patches (same for a resumed run); announce step+1's."""
        optim = self.cfg.optim
        lr = cosine_lr(step, self.total_steps, optim.lr, optim.warmup_steps, optim.min_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        patches = self.patches.take(step, self.patch_request(step))
        if step + 1 < self.total_steps:  # the next batch is known from the epoch's permutation: start it now
            self.patches.prefetch(step + 1, self.patch_request(step + 1))
        return patches if self.runtime.channels_last else patches.contiguous()

    def train_until(self, stop_step: int | None = None, clock=None) -> None:
        """Train from self.step up to stop_step (default: the end of the run), evaluating every eval.every steps
        (off the clock; training ends at an evaluation that reaches eval.stop_at); clock: see train_step."""
        t = self.cfg.train
        stop_step = min(stop_step or self.total_steps, self.total_steps)
        bar = tqdm(total=stop_step - self.step, disable=not self.progress, desc=self.cfg.name, unit="step")
        images = 0
        self.clock.mark("start")  # what came before this call is not training
        stop.defer(True)  # a signal ends training after the iteration it came in (fastemp.stop)
        while self.step < stop_step and not self.stopped:
            warm = not self.warmed_up
            terms = self.train_step(clock)
            self.clock.mark("step")
            images += t.batch_size
            self.timed_images += 0 if warm else t.batch_size
            if self.eval_every and (self.step % self.eval_every == 0 or self.step == self.total_steps):
                self._evaluate_periodically()
            if warm or self.stopped or self.step % t.log_every == 0 or self.step == stop_step:
                r = self._log(terms, images)
                bar.set_postfix(sim=f"{r['loss_sim']:.3f}", tcr=f"{r['loss_tcr']:.1f}", img_s=round(r["images_per_s"]))
                images = 0
            if self.run_dir and t.ckpt_every and self.step % t.ckpt_every == 0:
                self.save_checkpoint()
            bar.update(1)
            if self.signal or (stop.pending and self.runtime.world_size == 1):
                raise stop.Interrupted(self.signal or stop.pending)
        stop.defer(False)
        bar.close()

    def _time_steps(self) -> None:
        """Fold the steps timed since the last read into the warm-up (the first step) or the train seconds."""
        seconds = self.clock.seconds("step")
        self._window_seconds += seconds
        if self.warmed_up:
            self.train_seconds += seconds
        else:
            self.warmup_seconds, self.warmed_up = self.warmup_seconds + seconds, True

    def _evaluate_periodically(self) -> None:
        """eval.every: evaluate off the training clock, leaving training as it was (see evaluate), record it in
        metrics.jsonl and self.evaluations, and stop training at eval.stop_at."""
        self.raise_if_nonfinite()  # a diverged model is reported, not evaluated
        self._time_steps()
        results = self.evaluate()
        self.clock.mark("evaluation")  # the evaluation's interval: never part of the train seconds
        record = {
            "step": self.step,
            "epoch": self.step / self.steps_per_epoch,
            "train_seconds": self.warmup_seconds + self.train_seconds,
            **results,
            "eval_seconds": self.clock.seconds("evaluation"),
        }
        self.evaluations.append(record)
        self.records.write(record)
        self.stopped = 0 < self.cfg.eval.stop_at <= record["linear_top1"]

    def _watch_finite(self, terms: LossTerms, step: int) -> None:
        """Record on the device the first step whose sim, tcr or gradient (LARS's norms) is not finite: read on
        logged steps and before every checkpoint write (raise_if_nonfinite), not with a sync per step."""
        grads_ok = self.optimizer.gradients_finite
        tcr_ok = terms.tcr.detach().isfinite()
        ok = torch.stack([terms.invariance.detach().isfinite(), tcr_ok, tcr_ok if grads_ok is None else grads_ok])
        term = torch.argmin(ok.to(torch.uint8))  # the first False
        here = torch.stack([torch.full_like(term, step), term])
        first = (self._nonfinite[0] < 0) & ~ok.all()
        self._nonfinite = torch.where(first, here, self._nonfinite)

    def raise_if_nonfinite(self, nonfinite: list[int] | None = None) -> None:
        step, term = nonfinite if nonfinite is not None else self._nonfinite.tolist()
        if step >= 0:
            names = ("the invariance loss (sim)", f"the uniformity loss ({self.cfg.loss.uniformity})", "the gradients")
            saved = (
                f"{self.run_dir / 'checkpoint.pt'} holds the last finite state, step {self.saved_step}"
                if self.run_dir and self.saved_step is not None
                else "no checkpoint of this run was written"
            )
            raise NonFiniteError(
                f"training diverged: {names[int(term)]} became non-finite at step {int(step)} ({saved}); "
                "lower optim.lr, raise loss.eps or check the data, then train again"
            )

    def _log(self, terms: LossTerms, images: int) -> dict:
        """The losses of the last step and the throughput since the last log, to metrics.jsonl."""
        # the one sync per log: the losses (under torchrun the global batch's), the files skipped and the ranks
        # signalled in one all-reduce, with the non-finite record, the same on every rank (DDP's gradients):
        # all ranks stop at the same log step
        ours = torch.tensor([len(getattr(self.train_set, "skipped", ())), stop.pending > 0], device=self.device)
        total = distributed.sum_across_ranks(
            torch.cat([torch.stack([terms.total, terms.invariance, terms.tcr]).detach().double(), ours.double()])
        )
        flat = torch.cat([total, self._nonfinite.double()]).tolist()
        values, skipped = [v / self.runtime.world_size for v in flat[:3]], round(flat[3])
        self.signal = (stop.pending or signal.SIGTERM) if flat[4] > 0 else 0  # every rank stops after this step
        self.raise_if_nonfinite(flat[5:])
        self._time_steps()
        seconds, self._window_seconds = self._window_seconds, 0.0
        record = {
            "step": self.step,
            "epoch": self.step / self.steps_per_epoch,
            "loss": values[0],
            "loss_sim": values[1],
            "loss_tcr": values[2],
            "lr": self.optimizer.param_groups[0]["lr"],
            "images_per_s": images / max(seconds, 1e-9),
            "elapsed_s": self.warmup_seconds + self.train_seconds,
            **({"skipped_files": skipped} if skipped else {}),
        }
        self.records.write(record)
        self.last_record = record
        return record

    def images_per_second(self) -> float:
        """Training throughput over all timed steps (warm-up steps excluded)."""
        return self.timed_images / self.train_seconds if self.train_seconds else float("nan")

    # -- the whole run -----------------------------------------------------------------------
    def run(self) -> dict:
        """Train to the end, write the last checkpoint, evaluate (eval.at_end), write and return summary.json."""
        cfg = self.cfg
        with self.records:  # the train.loggers sinks are closed at the end, and on an error
            self.train_until()
        if self.run_dir:
            self.save_checkpoint()
        last = self.last_record or [r for r in runs.read_lines(self.run_dir / runs.METRICS) if "loss" in r][-1]
        summary = {
            "name": cfg.name,
            "steps": self.step,
            "epochs": self.step / self.steps_per_epoch,
            "n_patches": cfg.train.n_patches,
            "batch_size": cfg.train.batch_size,
            "world_size": self.runtime.world_size,
            "final_loss": last["loss"],
            "final_loss_sim": last["loss_sim"],
            "final_loss_tcr": last["loss_tcr"],
            "train_seconds": self.warmup_seconds + self.train_seconds,
            "warmup_seconds": self.warmup_seconds,
            "images_per_s": self.images_per_second(),
            "data": self.train_set.description,
            **self.runtime.resolved(),
            "environment": runs.environment(self.device),
        }
        if self.eval_every:
            summary["evaluations"] = self.evaluations
        if cfg.eval.stop_at:
            summary["stopped_at_target"] = self.stopped
        if cfg.eval.at_end:
            self.clock.mark("start")
            last = self.evaluations[-1] if self.evaluations and self.evaluations[-1]["step"] == self.step else None
            summary.update({k: v for k, v in last.items() if k not in RECORD_KEYS} if last else self.evaluate())
            if cfg.eval.random_init:
                torch.manual_seed(cfg.train.seed)  # the run's initialisation, never trained
                untrained = build_model(cfg.model).to(self.device)
                untrained = untrained.to(memory_format=torch.channels_last) if self.runtime.channels_last else untrained
                summary.update(self.evaluate(untrained, prefix="random_init_"))
            self.clock.mark("evaluation")
            summary["eval_seconds"] = self.clock.seconds("evaluation") + (last["eval_seconds"] if last else 0.0)
        summary.update(checkpoint.data_report(self))
        if self.run_dir and distributed.is_main():
            runs.write_json(self.run_dir / "summary.json", summary)
            runs.plot_losses(self.run_dir)
        return summary

    # -- checkpoints ------------------------------------------------------------------------
    saved_step: int | None = None  # the step checkpoint.pt in run_dir holds (None: there is none)

    def save_checkpoint(self) -> None:
        self.raise_if_nonfinite()  # never write non-finite weights over the last good checkpoint
        state = checkpoint.trainer_state(self)
        if distributed.is_main():  # every rank holds the same weights and optimizer state
            checkpoint.save(state, self.run_dir / "checkpoint.pt")
            run_folder.discard_replaced(self.run_dir)  # a run that --force replaced is no longer needed
        self.saved_step = self.step
        distributed.barrier()

    # -- evaluation -------------------------------------------------------------------------
    @functools.cached_property
    def test_set(self):
        """The test split, loaded on first use (only evaluation needs it)."""
        return load_split(self.cfg.data, "test", self.device)

    @functools.cached_property
    def probe_train_set(self):
        """The labelled split the probe fits: the training images, or data.source's train split when training
        reads the unlabelled data.train_path."""
        return load_split(self.cfg.data, "train", self.device) if self.cfg.data.train_path else self.train_set

    def evaluate(self, model: torch.nn.Module | None = None, prefix: str = "") -> dict:
        """Score `model` (default: the trained one) under cfg.eval, leaving training as it was: the random streams
        forked, eval mode (running statistics read only), and each rank's own statistics back."""
        model = self.model if model is None else model
        kept = [b.clone() for b in model.buffers()] if self.runtime.world_size > 1 else []
        for buffer in model.buffers() if kept else ():  # without sync_bn each rank has its shard's: use rank 0's
            torch.distributed.broadcast(buffer, src=0)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            try:
                return evaluate_encoder(model, self.probe_train_set, self.test_set, self.cfg, self.runtime, prefix)
            finally:
                for buffer, saved in zip(model.buffers(), kept):
                    buffer.copy_(saved)
