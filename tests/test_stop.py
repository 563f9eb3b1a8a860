"""Issue 22, third round: a streamed file that fails after it was listed (both backends, training and
evaluation, data.bad_files=stop and skip), signals that end a run (Pillow workers end with it, Ctrl-C and
SIGTERM leave a resumable checkpoint), and the data a checkpoint was trained on (resume, eval, torchrun ranks).
Every folder is a few tiny JPEGs the test writes."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_train import assert_same_state, model_state

import fastemp.data.streamed as streamed
from fastemp import stop
from fastemp.config import load_config, save_config
from fastemp.data import DataError
from fastemp.data.streamed import BadFileError
from fastemp.startup import evaluate_run, resume_training, run_training
from fastemp.train import Trainer

SMALL = [
    "train.device=cpu",
    "augment.crop_size=16",
    "model.width=4",
    "model.hidden_dim=16",
    "model.z_dim=8",
    "train.n_patches=2",
    "train.batch_size=4",
    "train.log_every=1",
    "eval.mode=plain",
    "eval.batch_size=4",
    "eval.probe_epochs=1",
    "eval.probe_batch_size=4",
    "eval.knn=false",
]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """train/c000, c001 with 8 JPEGs each and test/ with 2 each, of noise, 40 pixels high and 30 to 40 wide."""
    root, rng = tmp_path_factory.mktemp("jpegs"), np.random.default_rng(0)
    for split, count in (("train", 8), ("test", 2)):
        for c in ("c000", "c001"):
            (root / split / c).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (40, int(rng.integers(30, 41)), 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{split}_{i:05d}.jpg", quality=90)
    return root


@pytest.fixture
def folder(pristine, tmp_path):
    return Path(shutil.copytree(pristine, tmp_path / "data"))


def small(folder, *extra):
    """The ImageNet-100 recipe shrunk to 40-pixel JPEGs, 16-pixel patches, width 4 (4 steps per epoch)."""
    return load_config(
        "imagenet100_n20", [f"data.path={folder}", f"data.root={folder.parent / 'root'}", *SMALL, *extra]
    )


def spoil(path: Path, kind: str) -> None:
    if kind == "deleted":
        path.unlink()
    elif kind == "truncated":
        path.write_bytes(path.read_bytes()[:300])
    else:  # "corrupt": its header and end marker intact, the image data garbage: only a decode finds it
        data = bytearray(path.read_bytes())
        data[400:-2] = b"\x55" * (len(data) - 402)
        path.write_bytes(bytes(data))


@pytest.fixture
def after_listing(monkeypatch):
    """spoil(path, kind) once the folder's `split` has next been listed (and checked): a file that changes mid-run."""
    spoils = []
    real = streamed.list_folder

    def listed(*args, need="train", **kwargs):
        out = real(*args, need=need, **kwargs)
        for path, kind, split in list(spoils):
            if split == need:
                spoil(path, kind)
                spoils.remove((path, kind, split))
        return out

    monkeypatch.setattr(streamed, "list_folder", listed)
    return lambda path, kind, split="train": spoils.append((path, kind, split))


def first_step_of(cfg, folder: Path, name: str) -> int:
    """The first step whose batch holds train/<name> (the epoch's permutation decides)."""
    trainer = Trainer(cfg, progress=False)
    index = trainer.train_set.paths.index(str(folder / "train" / name))
    return next(t for t in range(trainer.total_steps) if index in trainer.batch_index(t).tolist())


@pytest.mark.parametrize("backend, kind", [("pillow", "deleted"), ("dali", "corrupt"), ("pillow", "truncated")])
def test_a_file_failing_mid_run_stops_at_the_last_finished_step_and_resumes_bit_identically(
    folder, tmp_path, after_listing, backend, kind
):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    cfg = small(folder, "train.max_steps=8", "eval.at_end=false", f"data.backend={backend}", "data.workers=0")
    bad = folder / "train" / "c001" / "train_00002.jpg"
    at = first_step_of(cfg, folder, "c001/train_00002.jpg")
    assert 0 < at < 7
    whole = tmp_path / "whole"
    run_training(cfg, whole, progress=False)  # the reference, before the file goes bad

    kept = tmp_path / "kept.jpg"
    shutil.copy(bad, kept)
    after_listing(bad, kind)
    run = tmp_path / "run"
    with pytest.raises(BadFileError) as err:
        run_training(cfg, run, progress=False)
    message = str(err.value)
    assert message.startswith(f"{bad} failed at step {at}: ") and "\n" not in message
    assert message.endswith(
        f"; {run}/checkpoint.pt holds step {at}; restore that file (or set data.bad_files: skip in "
        f"{run}/config.yaml), then go on with: fastemp resume {run}"
    )
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == at

    shutil.copy(kept, bad)  # restored: the same data, so the run goes on to the uninterrupted weights
    resume_training(run, progress=False)
    assert_same_state(model_state(run / "checkpoint.pt"), model_state(whole / "checkpoint.pt"))


@pytest.mark.parametrize("backend, workers", [("pillow", 1), ("dali", 0)])
def test_skip_replaces_a_bad_file_by_the_next_image_of_its_batch_and_resumes_bit_identically(
    folder, tmp_path, after_listing, backend, workers
):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    skip = [f"data.backend={backend}", f"data.workers={workers}", "data.bad_files=skip"]
    bad = folder / "train" / "c000" / "train_00005.jpg"
    after_listing(bad, "corrupt")
    cfg = small(folder, "train.max_steps=8", "eval.at_end=false", *skip)
    whole = run_training(cfg, tmp_path / "whole", progress=False)
    assert list(whole["skipped_files"]) == [str(bad)] and "cannot be decoded" in whole["skipped_files"][str(bad)]
    logged = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["skipped_files"] == 1

    part = tmp_path / "part"  # interrupted at step 5 (the checkpoint carries what was skipped) and resumed
    part.mkdir()
    save_config(cfg, part / "config.yaml")
    first = Trainer(cfg, part, progress=False)
    first.train_until(5)
    first.save_checkpoint()
    first.patches.close()
    assert resume_training(part, progress=False)["skipped_files"] == whole["skipped_files"]
    assert_same_state(model_state(part / "checkpoint.pt"), model_state(tmp_path / "whole" / "checkpoint.pt"))

    # the same rule on the other backend, and without the file's own draw: what replaces it is the batch's next image
    trainer = Trainer(cfg, progress=False)
    t = first_step_of(cfg, folder, "c000/train_00005.jpg")
    index = trainer.batch_index(t).tolist()
    p = index.index(trainer.train_set.paths.index(str(bad)))
    request = trainer.patch_request(t)
    patches = trainer.patches(*request).view(2, 4, 3, 16, 16)
    swapped = list(index)
    swapped[p] = index[(p + 1) % 4]
    instead = trainer.patches(torch.tensor(swapped), *request[1:]).view(2, 4, 3, 16, 16)
    assert torch.equal(patches, instead)


def test_evaluation_names_a_file_failing_after_listing_or_skips_it(folder, tmp_path, after_listing):
    run = tmp_path / "run"
    run_training(small(folder, "train.max_steps=2", "eval.at_end=false", "data.workers=0"), run, progress=False)
    bad = folder / "test" / "c001" / "test_00001.jpg"
    good = bad.read_bytes()
    after_listing(bad, "truncated", "test")
    with pytest.raises(BadFileError) as err:
        evaluate_run(run, progress=False)
    assert str(err.value).startswith(f"cannot use {bad}: ") and "data.bad_files=skip" in str(err.value)
    bad.write_bytes(good)
    after_listing(bad, "truncated", "test")
    result = evaluate_run(run, ["data.bad_files=skip"], progress=False)
    assert list(result["skipped_files"]) == [str(bad)] and 0 <= result["linear_top1"] <= 1
    assert set(result["data_fingerprints"]) == {"train", "test"}


# ------------------------------------------------------------------------------------- signals


def test_ctrl_c_ends_training_after_the_step_it_came_in_with_a_checkpoint_that_resumes_bit_identically(
    folder, tmp_path, monkeypatch
):
    cfg = small(folder, "train.max_steps=8", "eval.at_end=false", "data.workers=0")
    whole = tmp_path / "whole"
    run_training(cfg, whole, progress=False)
    log = Trainer._log

    def log_then_ctrl_c(self, *args):  # Ctrl-C in the middle of step 3's iteration: it ends after it
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return log(self, *args)

    monkeypatch.setattr(Trainer, "_log", log_then_ctrl_c)
    # a background job (nohup, `&`) starts with SIGINT ignored, which fastemp keeps ignored: not this case
    ignored = signal.signal(signal.SIGINT, signal.default_int_handler)
    run, handler = tmp_path / "run", signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(stop.Interrupted) as err:
            run_training(cfg, run, progress=False)
        assert signal.getsignal(signal.SIGINT) is handler  # put back
    finally:
        signal.signal(signal.SIGINT, ignored)
    assert str(err.value) == (
        f"interrupted by SIGINT at step 3; {run}/checkpoint.pt holds step 3; go on with: fastemp resume {run}"
    )
    assert err.value.exit_code == 130
    monkeypatch.undo()
    resume_training(run, progress=False)
    assert_same_state(model_state(run / "checkpoint.pt"), model_state(whole / "checkpoint.pt"))


def test_ctrl_c_outside_a_run_is_one_line(monkeypatch, capsys):
    from fastemp import cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_eval", interrupted)
    assert cli.main(["eval", "RUN"]) == 130
    assert capsys.readouterr().err == "fastemp: error: interrupted by SIGINT\n"


def descendants(pid: int) -> list[int]:
    """Every process below pid (the forkserver, its workers, the resource tracker)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is gone
    except OSError:
        return False


def test_pillow_workers_end_with_their_run_and_sigterm_leaves_a_resumable_checkpoint(pristine, tmp_path):
    """Two streamed runs with two Pillow worker processes each, ended by SIGTERM and SIGKILL once they train: no
    process of theirs survives; SIGTERM ends with one line and a checkpoint of the last finished step."""
    train = [sys.executable, "-m", "fastemp", "train", "--config", "imagenet100_n20", *SMALL, "train.max_steps=400"]
    train += [f"data.path={pristine}", f"data.root={tmp_path / 'root'}", "data.workers=2", "--no-progress"]
    signals = {"TERM": signal.SIGTERM, "KILL": signal.SIGKILL}
    procs = {  # SIGTERM goes to the whole process group, as a terminal or a scheduler sends it; SIGKILL to the run
        name: subprocess.Popen(
            [*train, "--out", str(tmp_path / name)], stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        for name in signals
    }
    family, deadline = {}, time.time() + 120
    while len(family) < len(procs) and time.time() < deadline:
        for name, proc in procs.items():
            if name in family:  # signalled: it may have ended already
                continue
            assert proc.poll() is None, proc.stderr.read()
            if (tmp_path / name / "metrics.jsonl").exists():  # a step is done: workers run
                family[name] = descendants(proc.pid)
                if name == "TERM":
                    os.killpg(proc.pid, signal.SIGTERM)
                else:
                    proc.send_signal(signal.SIGKILL)
        time.sleep(0.05)
    errors = {}
    for name, proc in procs.items():
        errors[name] = proc.communicate(timeout=60)[1]
        assert proc.returncode == (143 if name == "TERM" else -signal.SIGKILL), (name, errors[name])
        assert len(family[name]) >= 3, family  # the forkserver and two workers (and the resource tracker)
        deadline = time.time() + 10
        while any(map(alive, family[name])) and time.time() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in family[name] if alive(pid)], name
    run = tmp_path / "TERM"
    step = torch.load(run / "checkpoint.pt", weights_only=True)["step"]
    assert (
        errors["TERM"].strip().splitlines()
        == [
            f"fastemp: error: interrupted by SIGTERM at step {step}; {run}/checkpoint.pt holds step {step}; "
            f"go on with: fastemp resume {run}"
        ]
        and 0 < step < 400
    )


# ------------------------------------------------------------------------------------- the data of a run


def test_resume_and_eval_refuse_other_data_and_the_same_data_moved_resumes_with_a_note(folder, tmp_path, capsys):
    run = tmp_path / "run"
    run_training(small(folder, "train.max_steps=2", "eval.at_end=false", "data.workers=0"), run, progress=False)
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert set(state["data"]) == {"train"} and state["skipped_files"] == {}  # no test split: it does not evaluate
    extra = folder / "train" / "c000" / "extra.jpg"
    shutil.copy(folder / "train" / "c000" / "train_00000.jpg", extra)  # an image added between checkpoint and resume
    for command in (resume_training, evaluate_run):
        with pytest.raises(DataError) as err:
            command(run, progress=False)
        assert str(err.value).startswith(
            f"the train split of {folder} is not the data of {run}/checkpoint.pt: train/c000/ has 9 files, 8 then "
            "(1 added) (fingerprint "
        ), str(err.value)
        assert str(err.value).endswith(f"restore that data, or point data.path in {run}/config.yaml at it")
    extra.unlink()

    moved = folder.rename(tmp_path / "moved")  # the same files elsewhere: config.yaml is pointed there
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace(str(folder), str(moved)))
    capsys.readouterr()
    resume_training(run, progress=False)
    assert f"the data moved (data.path {folder} -> {moved}): the same files" in capsys.readouterr().out
    assert torch.load(run / "checkpoint.pt", weights_only=True)["config"]["data"]["path"] == str(moved)


RANKS_SEE = r"""
import os, sys
import fastemp.data.streamed as streamed
real = streamed.list_folder
def listed(*args, **kwargs):  # rank 1's copy of the folder lacks a file
    out = real(*args, **kwargs)
    if os.environ["RANK"] == "1":
        out.splits["train"].pop()
    return out
streamed.list_folder = listed
from fastemp.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_torchrun_ranks_that_read_different_data_stop_before_the_first_step_naming_them(pristine, tmp_path):
    from test_distributed import agent_store, start_ranks

    train = [sys.executable, "-c", RANKS_SEE, "train", "--config", "imagenet100_n20", *SMALL, "data.workers=0"]
    train += [f"data.path={pristine}", f"data.root={tmp_path / 'root'}", "--out", str(tmp_path / "run")]
    with agent_store() as env:
        ranks = start_ranks(env, [train, train])
        results = [p.communicate(timeout=180) for p in ranks]
    assert [p.returncode for p in ranks] == [2, 2], [e[-2000:] for _, e in results]
    assert [line for _, e in results for line in e.strip().splitlines()] == [
        f"fastemp: error: the ranks read different data: rank 1 differs from rank 0 in the train split of {pristine} "
        "(rank 1: train/c001/ has 7 files, 8 on rank 0 (1 removed)); give every rank the same files"
    ]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
