"""`bench official-peer`: the initialisation law of the official model (from its checkout), the data the
official loader reads, the output clock, the one-line errors, and the whole harness end to end around a stand-in for the official checkout."""

import json
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from official_checkout import moments, official_encoder_class
from official_stand_in import executable, fake_jpeg_tar, official_stub, stand_in_checkout

from fastemp.benchmarks.official_run import run_official, split_output, subset, timings, write_cifar_batches
from fastemp.cli import main
from fastemp.config import DataConfig
from fastemp.data import load_split
from fastemp.model import EMPEncoder

REPO = Path(__file__).resolve().parents[1]


def peer_main(argv: list[str]) -> int:
    return main(["bench", "official-peer", *argv])


# ------------------------------------------------------------------------------ the official model


@pytest.mark.parametrize("arch, stem", [("resnet18-cifar", "cifar"), ("resnet18-imagenet", "imagenet")])
def test_initialisation_follows_the_official_model(arch, stem):
    """Same law for every tensor as the official encoder's own initialisation: spread and shape (kurtosis:
    uniform 1.8, normal 3.0) of each weight, exact BatchNorm constants. Seeds differ, so values cannot match."""
    torch.manual_seed(0)
    official = {k.removeprefix("module."): v for k, v in official_encoder_class()(arch=arch).state_dict().items()}
    torch.manual_seed(1)
    ours = EMPEncoder(stem=stem).state_dict()
    assert official.keys() == ours.keys()
    for name, theirs in official.items():
        if theirs.unique().numel() == 1:  # BatchNorm's constants and counter
            assert torch.equal(ours[name], theirs), name
            continue
        (std, kurtosis), (their_std, their_kurtosis) = moments(ours[name]), moments(theirs)
        assert std == pytest.approx(their_std, rel=0.05), name
        assert kurtosis == pytest.approx(their_kurtosis, abs=0.3), name


# ------------------------------------------------------------------------------ data for the official loader


def read_like_torchvision(folder: Path, files: list[str]) -> tuple[np.ndarray, list[int]]:
    """What torchvision's CIFAR10 does with the batch files: unpickle, stack, to HWC."""
    data, labels = [], []
    for name in files:
        with open(folder / name, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        data.append(entry["data"])
        labels.extend(entry["labels"])
    return np.vstack(data).reshape(-1, 3, 32, 32).transpose((0, 2, 3, 1)), labels


def test_cifar_batches_hold_fastemps_pixels(tmp_path):
    tar = fake_jpeg_tar(tmp_path / "tiny-jpeg.tar.gz", 6, 2)
    cfg = DataConfig(source="imagefolder", path=str(tar), root=str(tmp_path / "cache"))
    train, test = load_split(cfg, "train"), load_split(cfg, "test")
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar_batches(train, test, folder)
    assert {p.name for p in folder.iterdir()} == {
        *(f"data_batch_{i}" for i in range(1, 6)),
        "test_batch",
        "batches.meta",
    }
    images, labels = read_like_torchvision(folder, [f"data_batch_{i}" for i in range(1, 6)])
    assert np.array_equal(images, train.images.numpy()) and labels == train.labels.tolist()
    images, labels = read_like_torchvision(folder, ["test_batch"])
    assert np.array_equal(images, test.images.numpy()) and labels == test.labels.tolist()
    with open(folder / "batches.meta", "rb") as f:
        assert pickle.load(f, encoding="latin1")["label_names"] == ["cat", "dog"]
    assert len(subset(train, 4)) == 4 and subset(train, 4).labels.tolist() == [0, 0, 1, 1]  # both classes kept


# ------------------------------------------------------------------------------ the official run's clock


def test_lines_are_stamped_when_their_text_arrives():
    # tqdm writes "\r<line>" and ends a line only with its next write
    lines, rest, t = split_output("", 0.0, "\r0it [00:00, ?it/s]", 1.0)
    assert lines == [] and rest == "0it [00:00, ?it/s]" and t == 1.0
    lines, rest, t = split_output(rest, t, "\r1it [00:02, 2.00s/it]", 3.0)
    assert lines == [(1.0, "0it [00:00, ?it/s]")] and rest == "1it [00:02, 2.00s/it]"
    lines, rest, _ = split_output(rest, t, " more\nAt epoch: 0\n", 4.0)
    assert lines == [(4.0, "1it [00:02, 2.00s/it] more"), (4.0, "At epoch: 0")] and rest == ""


def test_clock_separates_startup_first_step_and_steady_steps():
    stamped = [
        (5.0, "0it [00:00, ?it/s]"),
        (8.0, "1it [00:03, 3.00s/it]"),
        (9.0, "11it [00:04]"),
        (10.0, "21it [00:05]"),
    ]
    stamped.append((10.5, "At epoch: 0 loss similarity is -0.9 ,loss TCR is: -150.5 and learning rate is: 0.15"))
    (ended,) = timings(stamped, launched=0.0)["epochs"]
    assert ended["steps"] == 21 and ended["steady_steps"] == 20 and ended["steady_seconds"] == 2.0
    assert ended["images_per_s"] == 20 * 100 / 2.0 and ended["images_per_s_whole_loop"] == 21 * 100 / 5.0
    assert (ended["loss_similarity"], ended["loss_tcr"], ended["lr_after"]) == (-0.9, -150.5, 0.15)
    report = timings([*stamped, (12.0, "0it [00:00, ?it/s]")], launched=0.0)  # the next epoch's bar
    assert report["startup_seconds"] == 5.0 and [e["done"] for e in report["epochs"]] == [True, False]


FAKE_RUN = r"""
import sys, time
for step in range(6):
    sys.stderr.write(f"\r{step}it [00:00, 10.00it/s]"); sys.stderr.flush(); time.sleep(0.05)
if sys.argv[1] == "fail":
    print("Traceback (most recent call last):\nValueError: boom"); sys.exit(1)
if sys.argv[1] == "hang":
    time.sleep(60)
print("\nAt epoch: 0 loss similarity is -0.5 ,loss TCR is: -100.0 and learning rate is: 0.15", flush=True)
time.sleep(60)  # the harness stops it once the epochs it wants have ended
"""


@pytest.mark.parametrize("mode, status", [("ok", "ok"), ("hang", "timeout"), ("fail", "error")])
def test_run_official_stops_at_the_epoch_the_limit_or_an_error(tmp_path, mode, status):
    script = tmp_path / "fake_main.py"
    script.write_text(FAKE_RUN)
    reports = []
    command, log = [sys.executable, str(script), mode], tmp_path / "official.log"
    report = run_official(command, tmp_path, epochs=1, time_limit=3.0, log=log, on_progress=reports.append)
    assert report["status"] == status and report["wall_seconds"] < 30
    assert report["epochs"][0]["steps"] == 5
    if mode == "ok":
        assert report["epochs"][0]["done"] and report["epochs"][0]["steady_steps"] == 4 and reports
    if mode == "fail":
        assert report["exit_code"] == 1 and report["output_tail"][-1] == "ValueError: boom"
    assert "5it" in (tmp_path / "official.log").read_text()


# ------------------------------------------------------------------------------ one-line errors


def one_line_error(capsys, argv: list[str]) -> str:
    assert peer_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastemp: error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_one_line_errors(tmp_path, capsys):
    data = fake_jpeg_tar(tmp_path / "tiny.tar.gz", 1, 1)
    stub = official_stub(tmp_path / "official")
    base = ["--data", str(data), "--out", str(tmp_path / "out")]
    assert "does not exist" in one_line_error(capsys, ["--official-dir", str(tmp_path / "nowhere"), *base])
    (tmp_path / "partial").mkdir()
    assert "no main.py" in one_line_error(capsys, ["--official-dir", str(tmp_path / "partial"), *base])
    err = one_line_error(
        capsys, ["--official-dir", str(stub), "--data", str(tmp_path / "none.tar.gz"), "--out", str(tmp_path / "out")]
    )
    assert "--data" in err and "does not exist" in err
    (tmp_path / "data.txt").write_text("not an archive")
    assert "neither a folder nor" in one_line_error(
        capsys, ["--official-dir", str(stub), "--data", str(tmp_path / "data.txt"), "--out", "x"]
    )
    bare = executable(tmp_path / "bare-python", f'#!/bin/sh\nexec "{sys.executable}" -I -S "$@"\n')  # stdlib only
    err = one_line_error(capsys, ["--official-dir", str(stub), *base, "--python", str(bare)])
    assert "torchvision (ModuleNotFoundError)" in err and "--python" in err
    assert not (tmp_path / "out").exists()  # nothing is written before the checks pass
    if not torch.cuda.is_available():
        ready = executable(tmp_path / "ready-python", '#!/bin/sh\necho \'{"missing": [], "versions": {}}\'\n')
        assert "needs a CUDA GPU" in one_line_error(
            capsys, ["--official-dir", str(stub), *base, "--python", str(ready)]
        )


# ------------------------------------------------------------------------------ end to end around a stand-in


def peer_args(tmp_path: Path, official: Path, python: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """The peer's command line on the stand-in: CPU dry run, n=2, a tiny model and evaluation."""
    argv = ["--official-dir", str(official), "--data", str(data), "--out", str(out), "--python", str(python)]
    argv += "--cpu-dry-run --n 2 --seed 3 model.width=8 model.hidden_dim=32".split()
    argv += "model.z_dim=16 eval.patches=2 eval.probe_epochs=2".split()
    return [*argv, f"data.root={tmp_path / 'cache'}", *extra]


def test_end_to_end_around_a_stand_in_checkout(tmp_path):
    official, python = stand_in_checkout(tmp_path)
    data = fake_jpeg_tar(tmp_path / "tiny-jpeg.tar.gz", 110, 10)
    out, work = tmp_path / "out", tmp_path / "work"
    assert peer_main(peer_args(tmp_path, official, python, data, out, "--work", str(work), "--time-limit", "600")) == 0
    result = json.loads((out / "official_peer.json").read_text())
    assert result["status"] == "PASS" and result["partial"] is False and result["dry_run"] is True
    arguments = "--data cifar10 --epoch 2 --patch_sim 200 --arch resnet18-cifar --num_patches 2 --lr 0.3"
    assert result["official"]["arguments"] == arguments.split()
    overrides = "model.width=8 model.hidden_dim=32 model.z_dim=16 eval.patches=2 eval.probe_epochs=2".split()
    assert result["overrides"] == [*overrides, f"data.root={tmp_path / 'cache'}"]
    assert result["data"]["train_images"] == 220 and result["data"]["test_images"] == 20
    training = result["training"]
    assert training["epochs_trained"] == 1 and training["epochs"][0]["steps"] == 2
    assert training["images_per_s"] > 0 and training["startup_seconds"] > 0
    evaluation = result["evaluation"]
    assert evaluation["checkpoint"].endswith("save_models/0.pt") and evaluation["epochs_trained"] == 1
    assert evaluation["tensors"] == len(EMPEncoder(8, 32, 16).state_dict())
    assert 0 <= evaluation["linear_top1"] <= 1 and evaluation["eval_config"]["patches"] == 2
    assert "official encoder (0.pt)" in (out / "official_peer.md").read_text()
    assert "At epoch: 0" in (out / "official_peer.log").read_text()  # written into --out as it came


def test_the_time_limit_covers_the_evaluation(tmp_path, monkeypatch):
    """--time-limit bounds data, training and evaluation: training gets the limit less --eval-seconds, the latest
    checkpoint is evaluated when training runs out, an evaluation still running at the limit is stopped, and a
    limit that leaves no training time stops before the official code starts. Every one writes its TIMEOUT."""
    import fastemp.benchmarks.official_peer as peer

    official, python = stand_in_checkout(tmp_path)
    data = fake_jpeg_tar(tmp_path / "tiny-jpeg.tar.gz", 60, 5)
    monkeypatch.setattr(peer, "probe_imports", lambda python: {"missing": [], "versions": {}})
    limits, evaluated = [], []

    def train(command, work, epochs, time_limit, log, on_progress):  # epoch 0 of 2 saved, then the limit ran out
        limits.append(time_limit)
        folder = work / "logs" / "EMP-SSL-Training" / "run" / "save_models"
        folder.mkdir(parents=True)
        torch.save({}, folder / "0.pt")
        return {"status": "timeout", "epochs": []}

    def evaluate(checkpoint, *args, **kwargs):
        evaluated.append(checkpoint.name)
        if len(evaluated) == 2:
            time.sleep(60)  # past the limit: stopped there
        return {"linear_top1": 0.5, "checkpoint": str(checkpoint)}

    monkeypatch.setattr(peer, "run_official", train)
    monkeypatch.setattr("fastemp.startup.evaluate_weights", evaluate)

    def run(name: str, *extra: str) -> dict:
        args = peer_args(tmp_path, official, python, data, tmp_path / name, "--epochs", "2", *extra)
        assert peer_main(args) == 1
        result = json.loads((tmp_path / name / "official_peer.json").read_text())
        assert result["status"] == "TIMEOUT" and result["partial"] is True
        return result

    first = run("latest", "--time-limit", "60", "--eval-seconds", "20")
    assert first["evaluation"]["epochs_trained"] == 1 and evaluated == ["0.pt"]
    assert 30 < limits[0] <= 40  # 60 s less the data's seconds less the 20 s kept for the evaluation
    start = time.perf_counter()
    second = run("overrun", "--time-limit", "4", "--eval-seconds", "1")
    assert time.perf_counter() - start < 30 and "evaluation" not in second
    assert "time" in second["error"]
    third = run("none-left", "--time-limit", "5", "--eval-seconds", "10")
    assert "no time to train" in third["error"] and len(limits) == 2


def test_a_failed_or_killed_official_run_keeps_its_json_and_log(tmp_path, monkeypatch):
    official, python = stand_in_checkout(tmp_path)
    data = fake_jpeg_tar(tmp_path / "tiny-jpeg.tar.gz", 110, 5)
    monkeypatch.setenv("STAND_IN_MODE", "fail")
    failed = tmp_path / "failed"
    assert peer_main(peer_args(tmp_path, official, python, data, failed)) == 2  # a one-line error
    result = json.loads((failed / "official_peer.json").read_text())
    assert (
        result["status"] == "FAIL"
        and "boom" in result["error"]
        and "boom" in (failed / "official_peer.log").read_text()
    )
    monkeypatch.setenv("STAND_IN_MODE", "hang")
    killed = tmp_path / "killed"
    command = [
        sys.executable,
        "-m",
        "fastemp",
        "bench",
        "official-peer",
        *peer_args(tmp_path, official, python, data, killed),
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log, deadline = killed / "official_peer.log", time.time() + 180
    while not (log.exists() and "3it" in log.read_text()):  # training is under way
        assert time.time() < deadline and process.poll() is None
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)  # as the suite's watchdog does
    assert process.wait(timeout=60) == 1
    result = json.loads((killed / "official_peer.json").read_text())
    assert result["status"] == "TIMEOUT" and result["partial"] is True and "signal 15" in result["error"]
    assert result["training"]["epochs"][0]["steps"] >= 3 and "3it" in log.read_text()


def test_the_peers_data_is_prepared_with_train_device_auto(tmp_path):
    """Off a dry run the peer's config keeps train.device=auto (the first H200 lease failed on it: torch.device)."""
    import argparse

    from fastemp.benchmarks.official_peer import add_arguments, peer_config
    from fastemp.benchmarks.official_run import prepare_data

    data = fake_jpeg_tar(tmp_path / "tiny-jpeg.tar.gz", 60, 5)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = ["--data", str(data), "--official-dir", str(tmp_path), "--out", str(tmp_path / "out")]
    args = parser.parse_args([*argv, "--train-images", "100", "--test-images", "10"])
    cfg = peer_config(args)
    assert cfg.train.device == "auto"
    train, test, info = prepare_data(args, cfg, tmp_path / "work")
    assert (
        len(train) == 100
        and len(test) == 10
        and train.images.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    )
