"""The memory estimate: never refuses a shipped config, refuses absurd ones with the numbers, and
agrees with a peak measured on the CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastemp import runtime
from fastemp.config import load_config

CONFIGS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
GIB = 2**30


def chunks(cfg) -> int:
    """The chunks the Runtime plans on a machine that has only the room to spare: one per BatchNorm group."""
    return cfg.train.grad_chunks or cfg.train.bn_groups


@pytest.mark.parametrize("name", CONFIGS)
def test_every_shipped_config_fits_its_gpu(name, monkeypatch):
    gib = 80 if name.startswith(("imagenet", "tinyimagenet")) else 24  # 224-px patches: an 80 GB card (H100/A100-80)
    monkeypatch.setattr(runtime, "available_bytes", lambda device: gib * GIB)
    cfg = load_config(name)
    parts = runtime.estimate(cfg, "cuda", "bf16", chunks(cfg))
    runtime.check_memory_fits(parts, torch.device("cuda"))
    assert 0 < parts["total"] * runtime.SAFETY_MARGIN <= gib * GIB


def test_quickstart_fits_a_4_gib_cpu_machine_and_two_ranks_share_it(monkeypatch):
    monkeypatch.setattr(runtime, "available_bytes", lambda device: 4 * GIB)
    runtime.check_memory_fits(runtime.estimate(load_config("quickstart"), world=2), torch.device("cpu"), world=2)


@pytest.mark.parametrize(
    "override, term, advice",
    [
        ("train.n_patches=1000000", "step", "lower train.n_patches or train.batch_size"),
        ("data.synthetic_train=1000000000", "dataset", "use fewer images"),
        ("eval.patches=1000000", "evaluation", "lower eval.patches or eval.batch_size"),
    ],
)
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_an_absurd_value_is_refused_with_the_numbers(override, term, advice, device, monkeypatch):
    monkeypatch.setattr(runtime, "available_bytes", lambda device: 24 * GIB)
    cfg = load_config("cifar10_n20_1ep" if term != "dataset" else "quickstart", [override])
    with pytest.raises(runtime.MemoryEstimateError) as err:
        parts = runtime.estimate(cfg, device, "bf16" if device == "cuda" else "fp32")
        runtime.check_memory_fits(parts, torch.device(device))
    text = str(err.value)
    assert text.startswith("this run needs about ") and f"{term} " in text and advice in text and "\n" not in text
    assert ("GPU memory" if device == "cuda" else "RAM") in text and "but 24.0 GiB is available" in text


def test_evaluation_only_needs_no_step_and_the_step_shrinks_with_chunks_and_ranks():
    cfg = load_config("cifar10_n20_1ep")
    assert "step" not in runtime.estimate(cfg, "cuda", "bf16", train=False)
    one = runtime.estimate(cfg, "cuda", "bf16")["step"]
    assert runtime.estimate(cfg, "cuda", "bf16", grad_chunks=4)["step"] < one / 3
    assert runtime.estimate(cfg, "cuda", "bf16", world=4)["step"] < one / 3
    assert runtime.estimate(cfg, "cuda", "fp32")["step"] > 1.5 * one


def test_available_memory_is_positive_and_below_the_machines():
    total = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0]) * 1024
    assert 0 < runtime.available_bytes(torch.device("cpu")) <= total


MEASURE = r"""
import json, torch
from fastemp.config import load_config
from fastemp.train import Trainer
torch.set_num_threads(1)
cfg = load_config("quickstart", ["model.width=32", "model.hidden_dim=64", "model.z_dim=32", "train.n_patches=16",
                                 "train.batch_size=32", "data.synthetic_train=256", "data.synthetic_test=10"])
trainer = Trainer(cfg, progress=False)
patches = trainer.patches(trainer.batch_index(0), 16, seed=0)  # 512 patches

def status(key):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))

def peak_growth(work):
    open("/proc/self/clear_refs", "w").write("5")  # Linux: the peak RSS (VmHWM) restarts from the current RSS
    before = status("VmRSS:")
    work()
    return status("VmHWM:") - before

def evaluate():
    trainer.model.eval()
    with torch.no_grad():
        trainer.model.encode(patches)  # 512 patches, as one evaluation batch

def step():
    trainer.model.train()
    trainer.train_step()

print(json.dumps({"eval": peak_growth(evaluate), "step": peak_growth(step)}))
"""


def test_the_estimate_is_within_a_factor_of_two_of_a_peak_measured_on_the_cpu():
    """Peak RSS growth (VmHWM, reset before each) over one no-grad forward and one training step of
    512 patches, width 32, fp32, against the estimate's forward and step terms."""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak RSS")
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    measured = json.loads(proc.stdout)
    cfg = load_config(
        "quickstart",
        [
            "model.width=32",
            "model.hidden_dim=64",
            "model.z_dim=32",
            "train.n_patches=16",
            "train.batch_size=32",
            "eval.mode=patches",
            "eval.batch_size=32",
            "eval.patches=16",
        ],
    )
    step = runtime.estimate(cfg, "cpu", evaluate=False)["step"]
    forward = runtime.estimate(cfg, "cpu", train=False)["evaluation"]
    assert 0.5 <= measured["step"] / step <= 2.0, (measured, step)
    assert 0.5 <= measured["eval"] / forward <= 2.0, (measured, forward)
