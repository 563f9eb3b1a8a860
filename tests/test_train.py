"""Training end to end on the synthetic set: learning happens, resume is exact, the CLI works."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from tiny_run import TINY_CONFIG

from fastemp.cli import main
from fastemp.config import load_config
from fastemp.runtime import resolve
from fastemp.train import Trainer, run_training

TINY = [*TINY_CONFIG, "eval.probe_epochs=3"]


def tiny_config(*extra):
    return load_config("quickstart", TINY + list(extra))


def test_trainer_lowers_the_loss_and_follows_the_schedule():
    trainer = Trainer(tiny_config("train.max_steps=12", "optim.warmup_steps=2"), progress=False)
    trainer.train_until(1)
    first = trainer.last_record
    trainer.train_until()
    last = trainer.last_record
    assert trainer.step == trainer.total_steps == 12
    assert last["loss"] < first["loss"]  # invariance pulls patches together
    # warmup ramps 0.15 -> 0.3, then cosine over the last 10 steps: step 11 is at 9/10 of the way
    assert first["lr"] == pytest.approx(0.3 / 2)
    assert last["lr"] == pytest.approx(0.3 * 0.5 * (1 + math.cos(math.pi * 0.9)))


def test_the_next_batch_is_announced_to_the_backend_before_each_step():
    """Step t+1's (index, n, seed, shard) reach the backend's prefetch before step t runs, across an epoch
    boundary too, and are exactly what step t+1 then asks for; the last step announces nothing."""
    trainer = Trainer(tiny_config("train.max_steps=8"), progress=False)  # 6 steps per epoch
    calls = []

    class Recording:
        name = "recording"

        def __init__(self, inner):
            self.inner = inner

        def __call__(self, index, n, seed, shard=slice(None)):
            calls.append(("call", index.tolist(), n, seed, shard))
            return self.inner(index, n, seed, shard)

        def prefetch(self, index, n, seed, shard=slice(None)):
            calls.append(("prefetch", index.tolist(), n, seed, shard))

    trainer.patches = Recording(trainer.patches)
    trainer.train_until()
    assert [c[0] for c in calls] == ["call", "prefetch"] * 7 + ["call"]
    for announced, made in zip(calls[1::2], calls[2::2]):
        assert announced[1:] == made[1:]


def test_toy_widths_avoid_the_onednn_nhwc_bug_on_cpu():
    assert not resolve(tiny_config()).channels_last  # width 4 would hang in backward
    assert resolve(tiny_config("model.width=16")).channels_last


def test_epochs_visit_every_image_once():
    trainer = Trainer(tiny_config(), progress=False)
    seen = torch.cat([trainer.batch_index(s) for s in range(trainer.steps_per_epoch)])
    assert sorted(seen.tolist()) == list(range(120))
    assert not torch.equal(trainer.batch_index(0), trainer.batch_index(trainer.steps_per_epoch))  # reshuffled


def model_state(path):
    return torch.load(path, weights_only=True)["model"]


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resume_in_process_is_bit_identical(tmp_path):
    cfg = tiny_config("train.max_steps=8", "eval.at_end=false")
    whole = tmp_path / "whole"
    whole.mkdir()
    run_training(cfg, whole, progress=False)

    part = tmp_path / "part"
    part.mkdir()
    first = Trainer(cfg, part, progress=False)
    first.train_until(3)
    first.save_checkpoint()
    del first
    run_training(cfg, part, resume=True, progress=False)
    assert_same_state(model_state(part / "checkpoint.pt"), model_state(whole / "checkpoint.pt"))
    steps = [r["step"] for r in map(json.loads, (part / "metrics.jsonl").read_text().splitlines())]
    assert steps == sorted(steps) and steps[-1] == 8


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "fastemp", *args], capture_output=True, text=True, **kw)


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    args = ["train", *TINY, "train.max_steps=10", "train.ckpt_every=2", "eval.at_end=false", "--no-progress"]
    assert cli(*args, "--out", str(tmp_path / "whole")).returncode == 0

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastemp", *args, "--out", str(killed)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while not (killed / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    step = torch.load(killed / "checkpoint.pt", weights_only=True)["step"]
    assert step < 10, "the run finished before it could be killed"

    done = cli("resume", str(killed), "--no-progress")
    assert done.returncode == 0, done.stderr
    assert_same_state(model_state(killed / "checkpoint.pt"), model_state(tmp_path / "whole" / "checkpoint.pt"))


def test_cli_train_then_eval(tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                *TINY,
                "train.epochs=2",
                "eval.knn=true",
                "eval.random_init=true",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    for name in ("config.yaml", "metrics.jsonl", "checkpoint.pt", "summary.json", "losses.png"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    for key in (
        "final_loss",
        "final_loss_sim",
        "final_loss_tcr",
        "train_seconds",
        "images_per_s",
        "linear_top1",
        "knn_top1",
        "random_init_linear_top1",
        "environment",
    ):
        assert key in summary, key
    assert summary["steps"] == 12 and summary["final_loss_sim"] < 0 and summary["final_loss_tcr"] < 0
    assert load_config(out / "config.yaml").train.epochs == 2

    # an existing run folder is never overwritten without --force
    assert main(["train", *TINY, "--out", str(out), "--no-progress"]) == 2
    assert "exists" in capsys.readouterr().err
    assert (out / "summary.json").is_file()

    assert main(["eval", str(out), "--eval-patches", "2", "--knn", "eval.probe_epochs=2"]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["eval_mode"] == "patches" and result["eval_patches"] == 2
    assert 0 <= result["linear_top1"] <= 1 and 0 <= result["knn_top1"] <= 1


def test_cli_trains_and_evaluates_with_the_knobs_of_ssl_in_one_epoch(tmp_path, capsys):
    """loss.uniformity=vonmises and eval.embedding=proj through the command line; bad values are one line."""
    out, knobs = (
        tmp_path / "run",
        ["loss.uniformity=vonmises", "loss.vonmises_weight=1.5", "eval.embedding=proj", "eval.random_init=false"],
    )
    assert main(["train", *TINY_CONFIG, *knobs, "train.max_steps=2", "--out", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert -8.0 <= summary["final_loss_tcr"] <= 0  # log mean exp(-2 d^2), d^2 <= 4 for means of unit vectors
    assert 0 <= summary["linear_top1"] <= 1
    for bad, says in [
        ("loss.uniformity=vonmise", "loss.uniformity must be one of tcr, vonmises, got 'vonmise'; did you mean"),
        ("loss.vonmises_t=0", "loss.vonmises_t must be > 0"),
        ("eval.embedding=z", "eval.embedding must be one of features, proj, got 'z'"),
    ]:
        capsys.readouterr()
        assert main(["train", *TINY_CONFIG, bad, "--out", str(tmp_path / "bad"), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and says in err, err


def test_bad_config_key_is_one_clear_line(capsys):
    assert main(["train", "train.n_pathces=8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "fastemp: error: unknown config key 'train.n_pathces'; did you mean 'n_patches'?"


def test_missing_dataset_is_one_clear_line(tmp_path, capsys):
    code = main(
        [
            "train",
            "data.source=cifar10",
            f"data.root={tmp_path}",
            "data.download=false",
            "--out",
            str(tmp_path / "run"),
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert str(tmp_path / "cifar-10-python.tar.gz") in err and "https://www.cs.toronto.edu/~kriz/" in err
