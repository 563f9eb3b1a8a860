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
from fastemp.config import load_config, save_config
from fastemp.runtime import resolve
from fastemp.startup import resume_training, run_training
from fastemp.train import Trainer

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
    """Step t+1's request reaches the backend's prefetch, keyed by t+1, before step t runs, across an epoch
    boundary too, and is exactly what step t+1 then takes; the last step announces nothing."""
    trainer = Trainer(tiny_config("train.max_steps=8"), progress=False)  # 6 steps per epoch
    calls = []

    class Recording:
        name = "recording"

        def __init__(self, inner):
            self.inner = inner

        def take(self, key, request):
            calls.append(("take", key, request.index.tolist(), *request[1:]))
            return self.inner.take(key, request)

        def prefetch(self, key, request):
            calls.append(("prefetch", key, request.index.tolist(), *request[1:]))

    trainer.patches = Recording(trainer.patches)
    trainer.train_until()
    assert [c[:2] for c in calls] == [("take", 0)] + [(kind, t) for t in range(1, 8) for kind in ("prefetch", "take")]
    for announced, made in zip(calls[1::2], calls[2::2]):
        assert announced[1:] == made[1:]


def test_toy_widths_avoid_the_onednn_nhwc_bug_on_cpu():
    assert not resolve(tiny_config()).channels_last  # width 4 would hang in backward
    assert resolve(tiny_config("model.width=16")).channels_last


def test_fused_lars_update_has_its_own_switch():
    """optim.fused_update: auto follows model.compile (today's rule); on and off hold whatever the model does,
    resolved once in the Runtime, which the Trainer's optimizer follows; resuming may change it (rounding only)."""
    from fastemp.checkpoint import _safe

    for compile_mode, setting, fused in [
        ("none", "auto", False),
        ("default", "auto", True),
        ("default", "off", False),
        ("none", "on", True),
    ]:
        cfg = tiny_config(f"model.compile={compile_mode}", f"optim.fused_update={setting}")
        assert resolve(cfg).fused_update is fused and resolve(cfg).resolved()["fused_update"] is fused
    trainer = Trainer(tiny_config("optim.fused_update=on"), progress=False)  # compiles lazily: nothing runs here
    assert trainer.optimizer._fused is not None and "fused_update True" in trainer.runtime.describe()
    assert Trainer(tiny_config(), progress=False).optimizer._fused is None
    assert _safe("optim.fused_update") and not _safe("optim.lr")


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
    save_config(cfg, part / "config.yaml")
    first = Trainer(cfg, part, progress=False)
    first.train_until(3)
    first.save_checkpoint()
    del first
    resume_training(part, progress=False)
    assert_same_state(model_state(part / "checkpoint.pt"), model_state(whole / "checkpoint.pt"))
    steps = [r["step"] for r in map(json.loads, (part / "metrics.jsonl").read_text().splitlines())]
    assert steps == sorted(steps) and steps[-1] == 8


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "fastemp", *args], capture_output=True, text=True, **kw)


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    args = ["train", *TINY, "train.max_steps=10", "train.ckpt_every=2", "eval.at_end=false", "--no-progress"]
    # the uninterrupted run beside the killed one (independent processes: half the wall time on 2 cores)
    command = [sys.executable, "-m", "fastemp", *args, "--out"]
    err = open(tmp_path / "whole.err", "w+")  # a file, not a pipe: nobody reads it until the end
    whole = subprocess.Popen([*command, str(tmp_path / "whole")], stdout=subprocess.DEVNULL, stderr=err)
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
    assert whole.wait(timeout=240) == 0, (tmp_path / "whole.err").read_text()
    err.close()

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

    assert main(["eval", str(out), "eval.mode=patches", "eval.patches=2", "eval.knn=true", "eval.probe_epochs=2"]) == 0
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
        ("eval.embedding=z", "eval.embedding must be one of features, proj, backbone, got 'z'"),
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


def assert_same_tree(a, b, where="state"):
    """Two nested dicts/lists of tensors and plain values, bit for bit."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_tree(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_periodic_evaluation_changes_nothing_in_training(tmp_path):
    """A CPU run evaluated every 3 steps (patch features: the augmentation and the probe draw random numbers)
    ends bit-identical to the same run without: weights, BatchNorm statistics, optimizer state, random state
    and every logged loss; the evaluations come at steps 3, 6 and at the end, each with the train seconds so far."""
    from fastemp import runs

    done = {}
    for name, extra in (("plain", []), ("evaluated", ["eval.every=3", "eval.mode=patches", "eval.patches=2"])):
        out = tmp_path / name
        out.mkdir()
        summary = Trainer(tiny_config("train.max_steps=8", "eval.at_end=false", *extra), out, progress=False).run()
        state = torch.load(out / "checkpoint.pt", weights_only=True)
        losses = [
            (r["step"], r["loss"], r["loss_sim"], r["loss_tcr"])
            for r in runs.read_lines(out / "metrics.jsonl")
            if "loss" in r
        ]
        done[name] = ({k: state[k] for k in ("model", "optimizer", "rng_cpu", "step")}, losses, summary)
    assert_same_tree(done["evaluated"][0], done["plain"][0])
    assert done["evaluated"][1] == done["plain"][1]
    evaluations = done["evaluated"][2]["evaluations"]
    assert [r["step"] for r in evaluations] == [3, 6, 8] and "evaluations" not in done["plain"][2]
    seconds = [r["train_seconds"] for r in evaluations]
    assert seconds == sorted(seconds) and seconds[-1] <= done["evaluated"][2]["train_seconds"]
    assert all(0 <= r["linear_top1"] <= 1 and r["eval_seconds"] > 0 for r in evaluations)
    assert [r for r in runs.read_lines(tmp_path / "evaluated" / "metrics.jsonl") if "linear_top1" in r] == evaluations


def test_training_stops_at_the_first_evaluation_that_reaches_eval_stop_at(tmp_path):
    from fastemp.evaluate import first_reaching

    cfg = tiny_config("train.max_steps=12", "eval.every=0.5ep", "eval.stop_at=0.01")  # 6 steps an epoch
    summary = run_training(cfg, tmp_path / "run", progress=False)
    first = summary["evaluations"][0]
    assert summary["steps"] == first["step"] == 3 and summary["stopped_at_target"] and len(summary["evaluations"]) == 1
    assert (
        first_reaching(summary["evaluations"], 0.01) == first and first_reaching(summary["evaluations"], 1.01) is None
    )
    assert summary["linear_top1"] == first["linear_top1"]  # the evaluation at the end is that one
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] == 3
    assert (
        summary["final_loss"] == json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["loss"]
    )


def test_eval_every_in_steps_or_epochs_and_its_mistakes_are_one_line():
    from fastemp.config import ConfigError
    from fastemp.validate import check_config

    steps = {every: tiny_config(f"eval.every={every}").eval.every_steps(6) for every in ("0", "4", "0.5ep", "0.01ep")}
    assert steps == {"0": 0, "4": 4, "0.5ep": 3, "0.01ep": 1}
    for bad, words in (("eval.every=3x", "eval.every must be a number of steps"), ("eval.stop_at=0.8", "eval.every")):
        with pytest.raises(ConfigError, match=words) as err:
            check_config(tiny_config(bad))
        assert "\n" not in str(err.value)
