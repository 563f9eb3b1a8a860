"""Two gloo processes against one: the same patches, loss, gradients and weights on the global batch."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastemp import distributed
from fastemp.config import AugmentConfig
from fastemp.patches import dali_available
from fastemp.patches_torch import TorchPatches
from fastemp.train import Trainer
from test_train import TINY, assert_same_state, model_state, tiny_config

from augment_helpers import random_images


def _spawned(rank: int, world: int, init_file: str, out: str, overrides: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        trainer = Trainer(tiny_config(*overrides), progress=False)
        terms = trainer.forward_backward(trainer.begin_step(0))
        loss = distributed.mean_across_ranks(terms.total.detach())
        grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters()}
        trained = Trainer(tiny_config(*overrides), progress=False)
        trained.train_until(3)
        torch.save({"loss": loss, "tcr": terms.tcr, "grads": grads, "weights": trained.model.state_dict()},
                   os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_two_ranks(tmp_path, overrides: list[str]) -> list[dict]:
    mp.spawn(_spawned, args=(2, str(tmp_path / "rendezvous"), str(tmp_path), overrides), nprocs=2)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]


# Linear biases followed by BatchNorm: their exact gradient is 0 (BN removes the mean), so both sides
# hold rounding noise, compared at the scale of the same layer's weight gradient.
BIASES_BEFORE_BN = ("pre_feature.0.bias", "projection.0.bias")


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str, scale: float | None = None,
                 atol_of_scale: float = 5e-5) -> None:
    """rtol 1e-5 (fp32), with entries near 0 compared at 5e-5 of the tensor's largest entry.

    Measured at this width: the worst tensor (an early conv) differs between 1 and 2 processes by
    2.5e-5 of its largest entry, while the fp32 single-process gradient itself is 8e-4 of it away
    from a float64 run, so this is well inside fp32's own rounding; a wrong gradient scale (x2, x1/2)
    or a missing gradient path fails by orders of magnitude.
    """
    scale = float(want.abs().max()) if scale is None else scale
    torch.testing.assert_close(got, want, rtol=1e-5, atol=atol_of_scale * scale + 1e-12, msg=what)


def test_two_ranks_with_sync_bn_equal_one_process_on_the_global_batch(tmp_path):
    overrides = ["model.sync_bn=true", "train.max_steps=3", "optim.lr=1.0"]
    ranks = run_two_ranks(tmp_path, overrides)

    one = Trainer(tiny_config(*overrides), progress=False)
    terms = one.forward_backward(one.begin_step(0))
    trained = Trainer(tiny_config(*overrides), progress=False)
    trained.train_until(3)
    for r, got in enumerate(ranks):
        assert_close(got["loss"], terms.total.detach(), f"loss on rank {r}")
        assert_close(got["tcr"], terms.tcr.detach(), f"tcr on rank {r}")
        grads = {name: p.grad for name, p in one.model.named_parameters()}
        for name, grad in grads.items():
            scale = float(grads[name[:-4] + "weight"].abs().max()) if name in BIASES_BEFORE_BN else None
            assert_close(got["grads"][name], grad, f"grad {name} on rank {r}", scale)
        # Three steps of this toy model amplify rounding: a 1e-7 relative change of the initial weights
        # (about one ulp) changes the weights after 3 steps by ~1e-2 of their scale (measured), so the
        # weights are compared at 1e-3 of each tensor's scale; 1 vs 2 processes differ by 1.4e-4.
        weights = trained.model.state_dict()
        for name, value in weights.items():
            if value.is_floating_point():
                assert_close(got["weights"][name], value, f"{name} after 3 steps on rank {r}", atol_of_scale=1e-3)
        assert not torch.equal(got["weights"]["backbone.conv1.weight"],
                               one.model.state_dict()["backbone.conv1.weight"])  # the 3 steps moved it


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_a_shards_patches_are_the_global_batchs_rows(backend):
    if backend == "dali" and not dali_available():
        pytest.skip("nvidia.dali does not import")
    from fastemp.patches import make_patch_backend

    images = random_images(12)
    patches = make_patch_backend(backend, images, AugmentConfig())
    index, n = torch.tensor([3, 7, 1, 0, 11, 5]), 3
    whole = patches(index, n, seed=9).view(n, 6, 3, 32, 32)
    for shard in (slice(0, 3), slice(3, 6), slice(2, 4)):
        part = patches(index, n, seed=9, shard=shard).view(n, shard.stop - shard.start, 3, 32, 32)
        assert torch.equal(part, whole[:, shard]), shard


def test_a_batch_that_does_not_divide_by_the_world_is_a_config_error(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    with pytest.raises(distributed.ConfigError, match="train.batch_size=20 does not divide by the world size 3"):
        Trainer(tiny_config(), progress=False)


# ------------------------------------------------------------------------------ under torchrun

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
            "-m", "fastemp", *args]


def run(cmd, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240, **kw)


TRAIN = ["train", *TINY, "train.max_steps=10", "train.ckpt_every=2", "eval.at_end=false", "--no-progress"]


def test_torchrun_writes_one_run_folder_with_the_one_process_summary(tmp_path):
    args = ["train", *TINY, "train.max_steps=4", "--no-progress"]
    two = run(torchrun(*args, "--out", str(tmp_path / "two")))
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("run folder:") == 1  # rank 0 alone prints
    one = run([sys.executable, "-m", "fastemp", *args, "--out", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-2000:]
    summaries = [json.loads((tmp_path / name / "summary.json").read_text()) for name in ("two", "one")]
    assert summaries[0].keys() == summaries[1].keys()
    assert (summaries[0]["world_size"], summaries[1]["world_size"]) == (2, 1)
    assert [r["step"] for r in map(json.loads, (tmp_path / "two" / "metrics.jsonl").read_text().splitlines())] \
        == [1, 2, 4]  # one line per logged step, not one per rank
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())


def worker_pids(parent: int) -> list[int]:
    """The processes whose parent is `parent` (torchrun's workers)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            pids.append(int(stat.parent.name))
    return pids


def test_torchrun_run_killed_by_sigkill_of_one_rank_resumes_to_the_uninterrupted_weights(tmp_path):
    whole = run(torchrun(*TRAIN, "--out", str(tmp_path / "whole")))
    assert whole.returncode == 0, whole.stderr[-2000:]

    killed = tmp_path / "killed"
    proc = subprocess.Popen(torchrun(*TRAIN, "--out", str(killed)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 180
    while not (killed / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    workers = worker_pids(proc.pid)
    assert workers, "torchrun has no workers to kill"
    os.kill(max(workers), signal.SIGKILL)  # one rank dies; torchrun tears the group down
    assert proc.wait(timeout=120) != 0
    step = torch.load(killed / "checkpoint.pt", weights_only=False)["step"]
    assert step < 10, "the run finished before it could be killed"

    done = run(torchrun("resume", str(killed), "--no-progress"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same_state(model_state(killed / "checkpoint.pt"), model_state(tmp_path / "whole" / "checkpoint.pt"))


def test_bad_world_size_and_missing_rendezvous_are_one_line_errors(tmp_path):
    bad = run(torchrun("train", *TINY, "train.batch_size=9", "--out", str(tmp_path / "bad"), "--no-progress"))
    assert bad.returncode != 0
    line = ("fastemp: error: train.batch_size=9 does not divide by the world size 2: each rank takes an equal "
            "shard of the global batch; use a multiple of 2")
    assert line in bad.stderr.splitlines()
    assert not (tmp_path / "bad").exists()  # refused before the run folder (or any device buffer)

    env = {k: v for k, v in os.environ.items() if k not in distributed.TORCHRUN_VARIABLES}
    lone = subprocess.run([sys.executable, "-m", "fastemp", "train", *TINY, "--out", str(tmp_path / "lone")],
                          capture_output=True, text=True, timeout=120,
                          env={**env, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"})
    assert lone.returncode == 2
    assert lone.stderr.strip().splitlines() == [
        "fastemp: error: WORLD_SIZE is set but MASTER_ADDR, MASTER_PORT are not: no rendezvous to join; "
        "launch with torchrun (e.g. torchrun --nproc-per-node=2 -m fastemp train ...)"]
