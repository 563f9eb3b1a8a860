"""Two gloo processes against one: the same patches, loss, gradients and weights on the global batch."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from augment_helpers import random_images
from test_train import TINY, assert_same_state, model_state, tiny_config
from torch import nn

from fastemp import distributed, train, watchdog
from fastemp.config import AugmentConfig
from fastemp.train import Trainer


@contextmanager
def float64():
    """The Trainer's model and patches in float64: a test-only cast (no config flag for it).

    In fp32 this toy ReLU network is discontinuous at the rounding level: a 6e-8 relative change of
    the initial weights (one fp32 ulp) flips ReLU masks and moves some gradients by up to 4e-3 (no
    chunks) or 6e-4 (2 chunks), measured in float64. fp32 reduction-order differences between 1 and
    2 processes do the same, so in fp32 no tolerance separates them from a real difference. In
    float64 they are ~1e-15 and 2 vs 1 processes agree to <= 3e-13 (gradients) and 5e-13 (weights
    after 3 steps), measured; a semantic difference (gradient scale, a missing gradient path, other
    BatchNorm statistics) shows orders of magnitude above rtol 1e-5. The loss itself stays fp32
    (projection_loss_terms casts p to float): its inputs are the fp32 roundings of float64 p that
    agree to ~1e-15, so they are bitwise the same on both sides.
    """
    build, begin = train.build_model, Trainer._begin_step
    with (
        mock.patch.object(train, "build_model", lambda cfg: build(cfg).double()),
        mock.patch.object(Trainer, "_begin_step", lambda self, step: begin(self, step).double()),
    ):
        yield


def one_step_and_three(overrides: list[str]) -> dict:
    """Step 0's loss, tcr and gradients; then the weights after 3 optimizer steps (the same run)."""
    with float64():
        trainer = Trainer(tiny_config(*overrides), progress=False)
        out = {"initial": {name: v.clone() for name, v in trainer.model.state_dict().items()}}

        class GradientsAfterBackward:  # a clock that reads the gradients before the optimizer step
            def mark(self, phase: str) -> None:
                if phase == "backward":
                    params = trainer.model.named_parameters()
                    out["grads"] = {name: p.grad.clone() for name, p in params if p.grad is not None}

        terms = trainer.train_step(GradientsAfterBackward())
        out.update(
            loss=distributed.sum_across_ranks(terms.total.detach()) / distributed.world_size(), tcr=terms.tcr.detach()
        )
        trainer.train_until(3)
        out["weights"] = trainer.model.state_dict()
    return out


def _spawned(rank: int, world: int, init_file: str, out: str, cases: list[list[str]]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for k, overrides in enumerate(cases):
            torch.save(one_step_and_three(overrides), os.path.join(out, f"case{k}_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


SYNC_BN = ["model.sync_bn=true", "train.max_steps=3", "optim.lr=1.0"]
# without and with the gradient cache (train.grad_chunks); the von Mises uniformity (over the gathered image
# means) with a frozen projector (parameters DDP must leave alone)
CASES = {
    "1 chunk": ["train.grad_chunks=1"],
    "2 chunks": ["train.grad_chunks=2"],
    "vonmises, frozen projector": ["train.grad_chunks=1", "loss.uniformity=vonmises", "model.freeze_projector=true"],
}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict[str, list[dict]]:
    """All cases from one spawn of 2 gloo processes (process start-up is most of the time)."""
    tmp = tmp_path_factory.mktemp("two_ranks")
    cases = [[*SYNC_BN, *overrides] for overrides in CASES.values()]
    mp.spawn(_spawned, args=(2, str(tmp / "rendezvous"), str(tmp), cases), nprocs=2)
    return {
        case: [torch.load(tmp / f"case{k}_rank{r}.pt", weights_only=True) for r in range(2)]
        for k, case in enumerate(CASES)
    }


# Linear biases followed by BatchNorm: their exact gradient is 0 (BN removes the mean), so both sides
# hold float64 rounding noise (~1e-15 of the same layer's weight gradient, measured): compared with
# an atol of 1e-9 of that scale instead of rtol. Everything else: rtol 1e-5 and no atol.
BIASES_BEFORE_BN = ("pre_feature.0.bias", "projection.0.bias")


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str, atol: float = 0.0) -> None:
    torch.testing.assert_close(got, want, rtol=1e-5, atol=atol, msg=what)


@pytest.mark.parametrize("case", CASES)
def test_two_ranks_with_sync_bn_equal_one_process_on_the_global_batch(two_ranks, case):
    """float64, sync_bn: loss, tcr and every gradient of one step on each rank, and the weights
    after 3 optimizer steps, equal the single-process run on the global batch at rtol 1e-5; with
    chunks=2 the gradient cache runs per rank (chunk-wise synced BatchNorm, no_sync)."""
    one = one_step_and_three([*SYNC_BN, *CASES[case]])
    for r, got in enumerate(two_ranks[case]):
        assert_close(got["loss"], one["loss"], f"loss on rank {r}")
        assert_close(got["tcr"], one["tcr"], f"tcr on rank {r}")
        assert got["grads"].keys() == one["grads"].keys()
        for name, grad in one["grads"].items():
            assert grad.dtype == torch.float64, name
            atol = 1e-9 * float(one["grads"][name[:-4] + "weight"].abs().max()) if name in BIASES_BEFORE_BN else 0.0
            assert_close(got["grads"][name], grad, f"grad {name} on rank {r}", atol)
        assert got["weights"].keys() == one["weights"].keys()
        for name, value in one["weights"].items():
            if value.is_floating_point():
                assert value.dtype == torch.float64, name
                assert_close(got["weights"][name], value, f"{name} after 3 steps on rank {r}")
            else:
                assert torch.equal(got["weights"][name], value), name  # num_batches_tracked
        assert not torch.equal(got["weights"]["backbone.conv1.weight"], one["initial"]["backbone.conv1.weight"])
        if "frozen" in case:
            assert not [name for name in got["grads"] if name.startswith("projection.")]
            assert torch.equal(got["weights"]["projection.0.weight"], one["initial"]["projection.0.weight"])


def test_cpu_sync_batchnorm_conversion_keeps_each_layers_own_tensors():
    """Same parameter and buffer objects (so their dtype: a float64 model stays float64), same mode."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)))
    model = model.double().eval()
    before = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    distributed.convert_sync_batchnorm(model, torch.device("cpu"))
    assert isinstance(model[1], distributed.CpuSyncBatchNorm) and isinstance(model[2][1], distributed.CpuSyncBatchNorm)
    after = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert not model[1].training and model[1].weight.dtype == torch.float64


def test_a_shards_patches_are_the_global_batchs_rows():
    """(the streamed backends: tests/patches/test_streamed_backends.py)"""
    from fastemp.patches import make_patch_backend

    images = random_images(12)
    patches = make_patch_backend("torch", images, AugmentConfig())
    index, n = torch.tensor([3, 7, 1, 0, 11, 5]), 3
    whole = patches(index, n, seed=9).view(n, 6, 3, 32, 32)
    for shard in (slice(0, 3), slice(3, 6), slice(2, 4)):
        part = patches(index, n, seed=9, shard=shard).view(n, shard.stop - shard.start, 3, 32, 32)
        assert torch.equal(part, whole[:, shard]), shard


def test_a_batch_that_does_not_divide_by_the_world_is_a_config_error(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    with pytest.raises(distributed.ConfigError, match="train.batch_size=20 does not divide by the world size 3"):
        distributed.batch_shard(20)  # taken by every training step (Trainer.begin_step); evaluation takes none


# ------------------------------------------------------------------------------ under torchrun


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node=2",
        f"--master-port={free_port()}",
        "-m",
        "fastemp",
        *args,
    ]


def run(cmd, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240, **kw)


TRAIN = ["train", *TINY, "train.max_steps=10", "train.ckpt_every=2", "--no-progress"]


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


@pytest.fixture(scope="module")
def torchrun_runs(tmp_path_factory) -> Path:
    """Three runs of TRAIN started together (process start-up is most of their time): "two" under torchrun
    (copied to "two_copy" when it ends), "one" on one process, and "killed" under torchrun, killed by SIGKILL of
    one rank after its first checkpoint. Their output is in NAME.out and NAME.err."""
    tmp = tmp_path_factory.mktemp("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    commands = {
        "two": torchrun(*TRAIN, "--out", str(tmp / "two")),
        "one": [sys.executable, "-m", "fastemp", *TRAIN, "--out", str(tmp / "one")],
        "killed": torchrun(*TRAIN, "--out", str(tmp / "killed")),
    }
    started = {}
    for name, cmd in commands.items():
        with open(tmp / f"{name}.out", "w") as out, open(tmp / f"{name}.err", "w") as err:
            started[name] = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
    killed, deadline = started["killed"], time.time() + 180
    while not (tmp / "killed" / "checkpoint.pt").exists() and time.time() < deadline and killed.poll() is None:
        time.sleep(0.02)
    workers = worker_pids(killed.pid)
    assert workers, "torchrun has no workers to kill"
    os.kill(max(workers), signal.SIGKILL)  # one rank dies; torchrun tears the group down
    assert killed.wait(timeout=120) != 0
    for name in ("two", "one"):
        assert started[name].wait(timeout=240) == 0, (tmp / f"{name}.err").read_text()[-2000:]
    shutil.copytree(tmp / "two", tmp / "two_copy")
    return tmp


def test_torchrun_writes_one_run_folder_with_the_one_process_summary(torchrun_runs):
    two, one = torchrun_runs / "two", torchrun_runs / "one"
    assert (torchrun_runs / "two.out").read_text().count("run folder:") == 1  # rank 0 alone prints
    stderr = (torchrun_runs / "two.err").read_text()
    assert "Warning" not in stderr, stderr[-2000:]  # torch 2.13's FutureWarnings for the renamed collectives
    summaries = [json.loads((run / "summary.json").read_text()) for run in (two, one)]
    assert summaries[0].keys() == summaries[1].keys() and "linear_top1" in summaries[0]
    assert (summaries[0]["world_size"], summaries[1]["world_size"]) == (2, 1)
    steps = [r["step"] for r in map(json.loads, (two / "metrics.jsonl").read_text().splitlines())]
    assert steps == [1, 2, 4, 6, 8, 10]  # one line per logged step, not one per rank
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())


def test_torchrun_run_killed_by_sigkill_of_one_rank_resumes_to_the_uninterrupted_weights(torchrun_runs):
    killed = torchrun_runs / "killed"
    step = torch.load(killed / "checkpoint.pt", weights_only=True)["step"]
    assert step < 10, "the run finished before it could be killed"
    done = run(torchrun("resume", str(killed), "--no-progress"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same_state(model_state(killed / "checkpoint.pt"), model_state(torchrun_runs / "two" / "checkpoint.pt"))


def test_a_torchrun_checkpoint_records_its_layout_and_resumes_on_one_process_with_a_note(torchrun_runs, capsys):
    from fastemp import checkpoint
    from fastemp.cli import main

    run_dir = torchrun_runs / "two_copy"
    assert checkpoint.read(run_dir / "checkpoint.pt")["layout"] == {"world_size": 2, "sync_bn": True, "bn_images": 20}
    assert main(["resume", str(run_dir), "--no-progress"]) == 0  # model.sync_bn=true: the same BatchNorm groups
    assert "written by 2 process(es)) on 1" in capsys.readouterr().out
    assert checkpoint.read(run_dir / "checkpoint.pt")["step"] == 10


def test_bad_world_size_and_missing_rendezvous_are_one_line_errors(tmp_path, monkeypatch, capsys):
    from fastemp.cli import main

    bad = [sys.executable, "-m", "fastemp", "train", *TINY, "train.batch_size=9", "--out", str(tmp_path / "bad")]
    with agent_store(60.0) as env:
        ranks = start_ranks(env, [[*bad, "--no-progress"]] * 2)
        results = [p.communicate(timeout=180) for p in ranks]
    assert [p.returncode for p in ranks] == [2, 2], [e[-2000:] for _, e in results]
    assert [line for _, e in results for line in e.strip().splitlines()] == [
        "fastemp: error: train.batch_size=9 does not divide by the world size 2: each rank takes an equal "
        "shard of the global batch; use a multiple of 2"
    ]
    assert not (tmp_path / "bad").exists()  # refused before the run folder (or any device buffer)

    for name in distributed.TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    assert main(["train", *TINY, "--out", str(tmp_path / "lone")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "fastemp: error: WORLD_SIZE is set but MASTER_ADDR, MASTER_PORT are not: no rendezvous to join; "
        "launch with torchrun (e.g. torchrun --nproc-per-node=2 -m fastemp train ...)"
    ]


# ------------------------------------------------------------------- hangs, mismatches, one line

HANG_TIMEOUT_S = 3.0

# rank `stuck` sleeps instead of joining the second collective (a plain all_reduce: the watchdog
# counts every collective, not only fastemp's); the other rank must name it once the timeout passed
STUCK = r"""
import sys, time, torch
import torch.distributed as dist
from fastemp import distributed
distributed.init_from_env()
x = torch.ones(1)
distributed.sum_across_ranks(x)
if distributed.rank() == int(sys.argv[1]):
    time.sleep(120)
print(f"waiting since {time.time()}", flush=True)
dist.all_reduce(x)
print("not reached", flush=True)
"""

# rank 0 works alone for twice the timeout (a long probe): not a hang, the others wait in the store
SLOW_MAIN = r"""
import time, torch
from fastemp import distributed, watchdog
distributed.init_from_env()
timeout = watchdog.collective_timeout_s()
value = distributed.run_on_main(lambda: time.sleep(1.3 * timeout) or 7)
with distributed.alone() as measuring:
    if measuring:
        time.sleep(1.3 * timeout)
assert value == 7 and distributed.sum_across_ranks(torch.ones(1)).item() == 2.0
distributed.shutdown()
print("done", flush=True)
"""

# rank 1 fails with a user error (as cli.main reports it) while rank 0 waits in a collective: rank 0
# prints rank 1's line at once, long before the (here 60 s) timeout
FAILS = r"""
import sys, torch
from fastemp import distributed, watchdog
distributed.init_from_env()
if distributed.rank() == 1:
    if watchdog.report_error("data.path /x does not exist; check the path"):
        print("fastemp: error: printed by rank 1 itself", file=sys.stderr)
    sys.exit(2)
distributed.sum_across_ranks(torch.ones(1))
"""


@contextmanager
def agent_store(timeout_s: float = HANG_TIMEOUT_S):
    """A rendezvous store hosted by this process, as torchrun's agent hosts it (the ranks are
    clients, so a rank that exits first does not take the store with it): the ranks' environment."""
    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    try:
        yield {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "TORCHELASTIC_USE_AGENT_STORE": "True",
            "WORLD_SIZE": "2",
            "OMP_NUM_THREADS": "1",
            watchdog.TIMEOUT_VARIABLE: str(timeout_s),
        }
    finally:
        del store


def start_ranks(env: dict, commands: list[list[str]]) -> list[subprocess.Popen]:
    return [
        subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **env, "RANK": str(r), "LOCAL_RANK": str(r)},
        )
        for r, cmd in enumerate(commands)
    ]


def test_a_stuck_rank_is_named_in_one_line_within_the_timeout_and_a_long_solo_phase_is_not_a_hang():
    with agent_store() as env, agent_store() as env_slow, agent_store(60.0) as env_fails:
        stuck = start_ranks(env, [[sys.executable, "-c", STUCK, "1"]] * 2)
        slow = start_ranks(env_slow, [[sys.executable, "-c", SLOW_MAIN]] * 2)
        fails = start_ranks(env_fails, [[sys.executable, "-c", FAILS]] * 2)
        try:
            out, err = stuck[0].communicate(timeout=120)
            ended = time.time()
            slow_results = [p.communicate(timeout=120) for p in slow]
            fails_results = [p.communicate(timeout=50) for p in fails]  # well before the 60 s timeout
        finally:
            for p in stuck + slow + fails:
                p.kill()
    waited = ended - float(out.split("waiting since ")[1].split()[0])
    assert stuck[0].returncode == 2 and "not reached" not in out, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and re.fullmatch(
        r"fastemp: error: rank 1 of 2 stopped answering \(rank 1: it has not joined the collective the others wait "
        r"in\); rank 0 waited \d+ s \(FASTEMP_COLLECTIVE_TIMEOUT=3\); look for that rank's own error, or raise "
        r"FASTEMP_COLLECTIVE_TIMEOUT if it is only slow",
        lines[0],
    ), err
    assert HANG_TIMEOUT_S <= waited < HANG_TIMEOUT_S + 10, waited  # slack: process exit on a loaded machine
    for p, (o, e) in zip(slow, slow_results):
        assert p.returncode == 0 and "done" in o, e[-2000:]
    assert [p.returncode for p in fails] == [2, 2], fails_results
    assert [e.strip() for _, e in fails_results] == [
        "fastemp: error: rank 1 of 2: data.path /x does not exist; check the path",
        "",
    ], fails_results


def test_ranks_with_different_configs_stop_with_one_line_naming_the_keys(tmp_path):
    train = [sys.executable, "-m", "fastemp", "train", *TINY, "--out", str(tmp_path / "run"), "--no-progress"]
    with agent_store(60.0) as env:
        ranks = start_ranks(env, [train + ["train.epochs=1"], train + ["train.epochs=2", "optim.lr=0.5"]])
        results = [p.communicate(timeout=180) for p in ranks]
    assert [p.returncode for p in ranks] == [2, 2], [e[-2000:] for _, e in results]
    lines = [line for _, e in results for line in e.strip().splitlines()]
    assert lines == [
        "fastemp: error: the ranks started with different configs: rank 1 differs from rank 0 in optim.lr "
        "(0.3 vs 0.5), train.epochs (1 vs 2); start every rank with the same --config and overrides"
    ], lines
    assert not (tmp_path / "run").exists()


def test_stalled_ranks_are_those_behind_silent_or_never_seen():
    others = {1: (10, 100.0), 2: (9, 100.0), 3: (10, 80.0), 4: None}
    assert watchdog.stalled_ranks(10, others, now=101.0, timeout_s=5.0) == {
        2: "it has not joined the collective the others wait in",
        3: "no sign of life for 21 s",
        4: "it never reported",
    }
    assert watchdog.stalled_ranks(10, {1: (10, 100.0)}, now=101.0, timeout_s=5.0) == {}


@pytest.mark.parametrize("value", ["abc", "0", "-3", "inf"])
def test_a_bad_collective_timeout_is_a_one_line_error(monkeypatch, value):
    monkeypatch.setenv(watchdog.TIMEOUT_VARIABLE, value)
    with pytest.raises(
        watchdog.DistributedError,
        match=f"{watchdog.TIMEOUT_VARIABLE}=.* is not a number of seconds > 0; set it to e.g. 300",
    ):
        watchdog.collective_timeout_s()
    monkeypatch.setenv(watchdog.TIMEOUT_VARIABLE, "45")
    assert watchdog.collective_timeout_s() == 45.0


def test_eval_on_two_ranks_needs_no_divisible_training_batch_and_prints_an_error_once(tmp_path):
    from fastemp.cli import main

    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                *TINY,
                "train.batch_size=9",
                "train.max_steps=2",
                "eval.at_end=false",
                "--no-progress",
                "--out",
                str(run),
            ]
        )
        == 0
    )
    evaluate = [sys.executable, "-m", "fastemp", "eval", str(run), "--no-progress"]
    with agent_store(60.0) as env, agent_store(60.0) as env_bad:
        good = start_ranks(env, [evaluate] * 2)
        bad = start_ranks(env_bad, [evaluate + ["model.width=8"]] * 2)
        good_out, bad_out = [p.communicate(timeout=180) for p in good], [p.communicate(timeout=180) for p in bad]
    assert [p.returncode for p in good] == [0, 0], [e[-2000:] for _, e in good_out]
    assert json.loads((run / "eval.json").read_text())["step"] == 2
    assert [p.returncode for p in bad] == [2, 2]
    lines = [line for _, e in bad_out for line in e.strip().splitlines()]
    assert len(lines) == 1 and lines[0].startswith("fastemp: error: ") and "model.width=4" in lines[0], lines
