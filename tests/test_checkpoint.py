"""Checkpoints (fastemp.checkpoint) and run folders under concurrency, kills and --force.

The one-line errors of bad checkpoints and folders are rows of the catalog in test_cli_errors.py;
this file holds what needs real processes, timing or a special filesystem, and the unit tests of
the digest and the layout rule.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny_run import TINY

from fastemp import checkpoint, run_folder, runs
from fastemp.checkpoint import CheckpointError
from fastemp.cli import main
from fastemp.config import load_config


def fastemp(*args, **kw):
    return subprocess.Popen(
        [sys.executable, "-m", "fastemp", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        **kw,
    )


def wait_for(path: Path, proc, timeout=120):
    deadline = time.time() + timeout
    while not path.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert path.exists(), f"{path} never appeared ({proc.poll()=})"


def files(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "old"
    assert main(["train", *TINY, "train.max_steps=2", "eval.at_end=false", "--out", str(out)]) == 0
    return out


# -------------------------------------------------------------------------------- the file


def test_digest_covers_every_value_and_ignores_dict_order():
    state = {
        "model": {"w": torch.arange(6.0).view(2, 3), "b": torch.zeros(2, dtype=torch.bfloat16)},
        "step": 3,
        "clock": (1.5, 2.0, 7),
        "config": {"train": {"lr": 0.3}},
        "rng_cuda": None,
    }
    reordered = {k: state[k] for k in reversed(state)}
    assert checkpoint.digest(state) == checkpoint.digest(reordered)
    for change in (
        lambda s: s["model"]["w"].view(-1).__setitem__(4, 4.0000005),
        lambda s: s.__setitem__("step", 4),
        lambda s: s["config"]["train"].__setitem__("lr", 0.30001),
        lambda s: s.__setitem__("clock", (1.5, 2.0, 8)),
        lambda s: s["model"].__setitem__("b", torch.zeros(2)),
    ):  # same values, another dtype
        changed = {
            **state,
            "model": {k: v.clone() for k, v in state["model"].items()},
            "config": {"train": dict(state["config"]["train"])},
        }
        change(changed)
        assert checkpoint.digest(changed) != checkpoint.digest(state)


def test_saved_state_reads_back_verified_and_every_flipped_bit_of_a_weight_is_caught(tmp_path, finished_run):
    path = finished_run / "checkpoint.pt"
    state = checkpoint.read(path)
    assert state["format"] == checkpoint.FORMAT and state["layout"]["world_size"] == 1
    assert state["layout"]["bn_images"] == 20 and state["sha256"] == checkpoint.digest(state)
    data = path.read_bytes()
    weight = max((v for v in state["model"].values() if v.is_floating_point()), key=torch.Tensor.numel)
    weight = weight.numpy().tobytes()
    at = data.find(weight)
    for bit in (0, 7, 8 * len(weight) - 1, 8 * (len(weight) // 3) + 5):
        bad = bytearray(data)
        bad[at + bit // 8] ^= 1 << (bit % 8)
        (tmp_path / "checkpoint.pt").write_bytes(bytes(bad))
        with pytest.raises(CheckpointError, match=f"{tmp_path / 'checkpoint.pt'} is corrupt"):
            checkpoint.read(tmp_path / "checkpoint.pt")


def test_layout_allows_another_world_size_only_with_the_same_batchnorm_groups(finished_run):
    path = finished_run / "checkpoint.pt"
    synced = load_config("quickstart", ["train.batch_size=20"])
    state = {"layout": checkpoint.layout(synced, 2)}
    assert checkpoint.check_layout(synced, state, 2, path) is None
    note = checkpoint.check_layout(synced, state, 1, path)
    assert "written by 2 process(es)) on 1" in note and "recipe is unchanged" in note
    local = load_config("quickstart", ["train.batch_size=20", "model.sync_bn=false"])
    for then, now in ((2, 1), (1, 2), (2, 4)):
        with pytest.raises(CheckpointError, match="a different recipe mid-run"):
            checkpoint.check_layout(local, {"layout": checkpoint.layout(local, then)}, now, path)
    assert checkpoint.layout(local, 1)["bn_images"] == 20 and checkpoint.layout(local, 2)["bn_images"] == 10


# -------------------------------------------------------------------------------- the lock


def test_a_second_process_on_a_running_folder_is_refused_at_once_and_a_dead_holder_frees_it(tmp_path, capsys):
    run = tmp_path / "run"
    first = fastemp(
        "train", *TINY, "train.max_steps=100000", "train.ckpt_every=5", "eval.at_end=false", "--out", str(run)
    )
    try:
        wait_for(run / "checkpoint.pt", first)
        # this (pytest) process is the second one: a train, a --force, a resume and an eval
        for argv in (
            ["train", *TINY, "--out", str(run)],
            ["train", *TINY, "--out", str(run), "--force"],
            ["resume", str(run), "--no-progress"],
            ["eval", str(run), "--no-progress"],
        ):
            t0 = time.perf_counter()
            assert main(argv) == 2
            lines = capsys.readouterr().err.strip().splitlines()
            assert len(lines) == 1 and f"is in use by fastemp train (pid {first.pid} on " in lines[0], lines
            assert time.perf_counter() - t0 < 5, "refused at once, not after loading data or waiting"
        assert first.poll() is None, "the running train must be untouched"
        steps = [r["step"] for r in runs.read_lines(run / "metrics.jsonl")]
        assert steps == sorted(set(steps))  # nobody else logged into it
    finally:
        first.kill()
        first.wait()
    assert f'"pid": {first.pid}' in (run / ".lock").read_text()  # a stale lock: its holder is dead
    assert main(["eval", str(run), "--no-progress"]) == 0, capsys.readouterr().err
    assert (run / "eval.json").is_file()


def test_a_kill_before_the_first_checkpoint_gets_resume_advice_that_works(tmp_path, capsys):
    run = tmp_path / "run"
    proc = fastemp("train", *TINY, "train.max_steps=3", "eval.at_end=false", "--out", str(run))
    wait_for(run / "config.yaml", proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    if (run / "checkpoint.pt").exists():
        pytest.skip("the run reached its checkpoint before the kill")
    assert main(["resume", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    advice = err.strip().split("; ")[-1]
    assert len(err.strip().splitlines()) == 1
    assert advice == f"start the run again with fastemp train --config {run}/config.yaml --out {run} --force", err
    assert main([*advice.split(" with fastemp ")[1].split(), "--no-progress"]) == 0
    assert checkpoint.read(run / "checkpoint.pt")["step"] == 3


def test_a_force_killed_before_its_first_checkpoint_is_undone_by_the_next_command(tmp_path, finished_run, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    old = files(run)
    proc = fastemp("train", *TINY, "train.max_steps=100000", "eval.at_end=false", "--out", str(run), "--force")
    wait_for(run / run_folder.REPLACED / run_folder.MOVED, proc)
    wait_for(run / "config.yaml", proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert not (run / "checkpoint.pt").exists()
    assert main(["resume", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "again holds the run that an interrupted fastemp train --force was replacing" in err
    assert files(run) == old and not (run / run_folder.REPLACED).exists()
    assert main(["resume", str(run), "--no-progress"]) == 0  # the old run, as it was


# -------------------------------------------------------------------------------- --force


def test_force_through_a_symlink_replaces_the_target_and_keeps_the_link(tmp_path, finished_run):
    target = tmp_path / "target"
    shutil.copytree(finished_run, target)
    (tmp_path / "link").symlink_to(target)
    assert (
        main(["train", *TINY, "train.max_steps=3", "eval.at_end=false", "--out", str(tmp_path / "link"), "--force"])
        == 0
    )
    assert (tmp_path / "link").is_symlink() and checkpoint.read(target / "checkpoint.pt")["step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "target"]
    assert sorted(p.name for p in target.iterdir()) == [
        ".lock",
        "checkpoint.pt",
        "config.yaml",
        "losses.png",
        "metrics.jsonl",
        "summary.json",
    ]


def test_force_on_a_mount_point_replaces_its_contents(tmp_path, finished_run):
    mount = tmp_path / "mnt"
    mount.mkdir()
    if (
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True).returncode
        != 0
    ):
        pytest.skip("cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN)")
    try:
        for p in finished_run.iterdir():
            shutil.copy(p, mount / p.name)
        assert main(["train", *TINY, "train.max_steps=3", "eval.at_end=false", "--out", str(mount), "--force"]) == 0
        assert os.path.ismount(mount) and checkpoint.read(mount / "checkpoint.pt")["step"] == 3
        assert not (mount / run_folder.REPLACED).exists()
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def test_every_interrupted_step_of_a_replace_settles_to_one_whole_run(tmp_path):
    """A kill between any two file operations of --force (move aside, discard, restore) leaves a
    folder that settle_replaced turns into exactly the old run or exactly the new one."""
    old, new = {"config.yaml": b"old", "checkpoint.pt": b"old ckpt", "metrics.jsonl": b"1"}, {"config.yaml": b"new"}

    def folder(name, top, aside, moved):
        run = tmp_path / name
        (run / run_folder.REPLACED).mkdir(parents=True)
        for where, content in ((run, top), (run / run_folder.REPLACED, aside)):
            for key, value in content.items():
                (where / key).write_bytes(value)
        if moved:
            (run / run_folder.REPLACED / run_folder.MOVED).touch()
        return run

    def content(run):
        assert not (run / run_folder.REPLACED).exists()
        return {p.name: p.read_bytes() for p in run.iterdir()}

    # moving aside, killed after the first file: everything goes back
    run = folder("moving", {"checkpoint.pt": b"old ckpt", "metrics.jsonl": b"1"}, {"config.yaml": b"old"}, False)
    assert run_folder.settle_replaced(run) and content(run) == old
    # the new run started, no checkpoint yet: the old run comes back
    run = folder("started", new, old, True)
    assert run_folder.settle_replaced(run) and content(run) == old
    # the new run has its checkpoint; discard killed midway (some old files already gone, MOVED still there)
    with_ckpt = {**new, "checkpoint.pt": b"new ckpt"}
    run = folder("discarding", with_ckpt, {"metrics.jsonl": b"1"}, True)
    assert not run_folder.settle_replaced(run) and content(run) == with_ckpt
    # restoring, killed after MOVED went and part of the old run came back
    run = folder("restoring", {"config.yaml": b"old"}, {"checkpoint.pt": b"old ckpt", "metrics.jsonl": b"1"}, False)
    assert run_folder.settle_replaced(run) and content(run) == old
