"""One start-up path for train, resume and eval (of a run, or of any weights), from the command line and Python.

Every entry point goes through the same chain, so a mistake is found before any work and is one line
(a UserError, which the CLI prints as `fastemp: error: ...`):

    config       loaded, the same on every torchrun rank, every value checked (fastemp.validate)
    runtime      every "auto" decided, the machine and the memory checked (fastemp.runtime.resolve)
    run folder   checked (train: fastemp.run_folder.check_run_dir; resume, eval: claimed, and what an
                 interrupted --force left is settled), then locked; under --force the old run moves aside
    checkpoint   read and verified once, compared with the config, then restored from that same state
    trainer      the training split loaded and the batch checked; the probe and the test split too when
                 the run evaluates, so a missing test split fails before training

Under torchrun rank 0 alone touches the run folder; the other ranks get its result or its error.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from . import checkpoint, distributed, run_folder, runs, stop
from . import progress as bars
from .config import Config, load_config
from .data import absolute_paths
from .data.streamed import BadFileError
from .errors import UserError, one_line
from .loggers import check_loggers
from .runtime import Runtime, resolve
from .train import Trainer
from .validate import check_data, check_output_path
from .weights import check_weights, load_weights, read_weights, weights_config


def run_training(
    cfg: Config, run_dir: str | Path | None = None, *, force: bool = False, progress: bool = True, retry: str = ""
) -> dict:
    """Train a new run of cfg in run_dir (default runs/<cfg.name>), evaluate it and write summary.json; returns
    the summary. force: replace an existing run folder, as `fastemp train --force`. retry: the command that
    starts the run again, named by the errors of a run that failed (the CLI passes its command line)."""
    distributed.init_from_env()
    absolute_paths(cfg.data)  # config.yaml names the data wherever the run is resumed from
    runtime = _runtime(cfg, training=True)
    run_dir = distributed.run_on_main(lambda: run_folder.check_run_dir(run_dir or Path("runs") / cfg.name, force=force))
    retry = retry or "the same run_training call with force=True"
    trainer = _trainer(cfg, runtime, run_dir, progress)  # validation and data loading write nothing
    try:
        distributed.run_on_main(lambda: run_folder.begin_run(run_dir, force, cfg, retry))
        try:
            return _train(trainer)
        except BaseException as err:
            if distributed.is_main():
                outcome = run_folder.outcome_of_failed_run(run_dir, retry)
                if outcome and isinstance(err, UserError):
                    err.args = (f"{one_line(err)}; {outcome}",)
            raise
    finally:
        run_folder.unlock_all()


def resume_training(run_dir: str | Path, *, progress: bool = True) -> dict:
    """Continue the run in run_dir from its checkpoint to the end of its schedule, as `fastemp resume`; returns
    the summary (bit-identical to an uninterrupted run on the CPU)."""
    distributed.init_from_env()
    run_dir = Path(run_dir)
    try:
        trainer, metrics = _from_checkpoint(run_dir, (), progress, resuming=True)
        if distributed.is_main():
            runs.truncate_metrics(run_dir, trainer.step)  # the steps past the checkpoint are logged again
        trainer.evaluations = [r for r in metrics if "linear_top1" in r and r["step"] <= trainer.step]
        return _train(trainer)
    finally:
        run_folder.unlock_all()


def evaluate_run(
    run_dir: str | Path, overrides: Sequence[str] = (), *, progress: bool = True, echo: bool = False
) -> dict:
    """Evaluate the checkpoint in run_dir under its config with `section.key=value` overrides (eval.* keys, or
    any key but the architecture's), as `fastemp eval`; writes RUN/eval.json and returns the result. echo:
    print it as JSON first (the CLI's output), so a folder that cannot take eval.json loses nothing."""
    distributed.init_from_env()
    run_dir = Path(run_dir)
    try:
        trainer, _ = _from_checkpoint(run_dir, overrides, progress, resuming=False)
        return _score(trainer, trainer.step, {}, run_dir / "eval.json", echo)
    finally:
        run_folder.unlock_all()


def _from_checkpoint(run_dir: Path, overrides: Sequence[str], progress: bool, resuming: bool):
    """The trainer restored from run_dir's checkpoint, read and verified once and checked against the config
    (resume: every key but the safe ones, and the world size; eval: the architecture) and the data; and, when
    resuming, the run's metrics records. The folder is claimed first, then locked (eval: unless read-only)."""
    command = "fastemp resume" if resuming else "fastemp eval"
    writes = "resume writes checkpoint.pt and metrics.jsonl" if resuming else ""
    distributed.run_on_main(lambda: run_folder.claim(run_dir, command, writes))
    cfg = load_config(run_dir / "config.yaml", overrides)
    runtime = _runtime(cfg, training=resuming)
    path = run_dir / "checkpoint.pt"
    state = checkpoint.read(path)
    note, metrics = None, []
    if resuming:
        checkpoint.check_resume(cfg, state, run_dir)
        note = checkpoint.check_layout(cfg, state, runtime.world_size, path)
        metrics = runs.read_lines(run_dir / runs.METRICS)  # corrupt: an error now, not after the run
    else:
        checkpoint.check_architecture(cfg, state, path)
    # eval writes eval.json: it holds the folder's lock, unless the folder is read-only (then nobody writes it)
    distributed.run_on_main(lambda: run_folder.lock_run_dir(run_dir, command, read_only_ok=not resuming))
    if note and distributed.is_main():
        print(note)
    trainer = _trainer(cfg, runtime, run_dir if resuming else None, progress)
    moved = checkpoint.check_data_matches(trainer, state, path, resuming)
    if moved and resuming and distributed.is_main():
        print(f"resuming {path}: {moved}")
    checkpoint.restore(trainer, state, path)
    return trainer, metrics


def evaluate_weights(
    path: str | Path,
    format: str = "fastemp",
    config: str | Path | Config | None = None,
    overrides: Sequence[str] = (),
    *,
    out: str | Path | None = None,
    progress: bool = True,
    echo: bool = False,
    train_set=None,
    test_set=None,
) -> dict:
    """Score the weights in a file of `format` (fastemp.weights.FORMATS), as `fastemp eval --weights`: under
    `config` (default: the file's own, else weights.DEFAULT_CONFIG) with overrides, the architecture the
    weights'; the result has eval_run's fields and is written to `out` when given. train_set, test_set: splits
    already loaded (the official peer's)."""
    distributed.init_from_env()
    weights = read_weights(path, format)
    cfg = weights_config(weights, config, overrides)
    check_weights(weights, cfg.model)
    if out:
        check_output_path(out, "--out", is_file=True)
    trainer = _trainer(cfg, _runtime(cfg, training=False), None, progress, train_set, test_set)
    load_weights(trainer.model, weights)
    extra = {"weights": str(path), "format": format, "tensors": len(weights.tensors)}
    return _score(trainer, weights.step, extra, out and Path(out), echo)


def _score(trainer: Trainer, step: int | None, extra: dict, out: Path | None, echo: bool) -> dict:
    """Evaluate the trainer's model under its eval section; rank 0 prints the result as JSON (echo) and writes it
    to `out`. echo first, so a folder that cannot take the file loses nothing."""
    e = trainer.cfg.eval
    result = {"step": step, "eval_mode": e.mode, "eval_patches": e.patches, "probe_epochs": e.probe_epochs}
    result.update(extra, precision=trainer.runtime.precision, backend=trainer.runtime.backend)
    result.update(trainer.evaluate())
    result.update(checkpoint.data_report(trainer))
    if distributed.is_main():
        if echo:
            print(json.dumps(result, indent=2))
        try:
            if out:
                runs.write_json(out, result)
        except OSError as err:
            kept = "the evaluation is printed above, make" if echo else "make"
            raise UserError(
                f"could not write {out}: {err.strerror or err}; {kept} {out.parent} writable to keep it there"
            ) from None
    return result


def _runtime(cfg: Config, training: bool) -> Runtime:
    """The config checked on every rank, then resolved (memory included) before any rank allocates a device
    buffer; said in one line on rank 0 when training (eval's output is its JSON alone)."""
    distributed.check_same_config(cfg)
    if training:
        check_loggers(cfg.train.loggers)
    runtime = resolve(cfg, training=training, check_memory=True)
    if training and distributed.is_main():
        print(f"runtime: {runtime.describe()}", flush=True)
    return runtime


def _trainer(cfg: Config, runtime: Runtime, run_dir: Path | None, progress: bool, train=None, test=None) -> Trainer:
    """The Trainer (on splits already loaded, when given), with the probe and the test split checked too when
    it evaluates: always without a run folder (eval), else when the run's config says so."""
    progress = bars.decide(progress and distributed.is_main())
    trainer = Trainer(cfg, run_dir, progress=progress, runtime=runtime, train_set=train, test_set=test)
    if run_dir is None or cfg.eval.scheduled:
        check_data(cfg, len(trainer.probe_train_set), probe=True)
        _ = trainer.test_set
    distributed.check_same_data(checkpoint.data_identity(trainer), checkpoint.data_location(cfg))
    return trainer


def _train(trainer: Trainer) -> dict:
    """trainer.run() with SIGINT and SIGTERM handled (fastemp.stop). A signal, or a file that fails under
    data.bad_files=stop, ends it with a checkpoint of the last finished step and one line saying how to go on."""
    try:
        with stop.handled(defer_always=trainer.runtime.world_size > 1):
            return trainer.run()
    except (stop.Interrupted, BadFileError) as err:
        step, run, world = trainer.step, trainer.run_dir, trainer.runtime.world_size
        signalled = isinstance(err, stop.Interrupted)
        # a checkpoint needs every rank at the same step: a signal they agreed on; one process also after a bad file
        if run and step > 0 and trainer.saved_step != step and not getattr(err, "forced", False):
            if world == 1 or signalled:
                trainer.save_checkpoint()
        err.args = (f"{err} at step {step}" if signalled else f"{err.path} failed at step {step}: {err.why}",)
        if run and trainer.saved_step is not None:  # else run_training says what is left of the run
            fix = (
                "" if signalled else f"restore that file (or set data.bad_files: skip in {run / 'config.yaml'}), then "
            )
            err.args = (
                f"{err}; {run / 'checkpoint.pt'} holds step {trainer.saved_step}; {fix}go on with: "
                f"{distributed.launcher(world)} resume {run}",
            )
        raise
