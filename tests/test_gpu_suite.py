"""benchmarks/gpu_suite.sh and its --lease end to end on the CPU (SUITE_DRY_RUN=1): offline, per-part limits, the result
folder, the smoke gate, the lease's three calls. The dry runs start together (the `dry` fixture): each is a chain of
single-threaded processes, so on 2 cores they end in about half the time of one after the other."""

import json
import math
import os
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from official_stand_in import fake_jpeg_tar, stand_in_checkout

from fastemp.benchmarks import smoke, suite

GPU_SUITE = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.sh"


def run(script: Path, *args, **env) -> subprocess.CompletedProcess:
    # PIP_NO_INDEX and a dead proxy: any attempt to reach a package index fails instead of hanging
    env = {
        **os.environ,
        "SUITE_DRY_RUN": "1",
        "FASTEMP_PYTHON": sys.executable,
        "PIP_NO_INDEX": "1",
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "HTTP_PROXY": "http://127.0.0.1:9",
        "OMP_NUM_THREADS": "1",
        **env,
    }
    argv = ["bash", str(script), *map(str, args)]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)


def stand_in(tmp_path: Path) -> dict:
    """The environment that gives a dry run the stand-in official checkout and a tiny CIFAR-like JPEG archive."""
    official, python = stand_in_checkout(tmp_path)
    data = fake_jpeg_tar(tmp_path / "tiny-jpeg.tar.gz", 110, 10)
    return {
        "FASTEMP_OFFICIAL_DIR": str(official),
        "FASTEMP_OFFICIAL_PYTHON": str(python),
        "FASTEMP_CIFAR10_JPEG": str(data),
    }


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    """Every dry run of this file, started together: the lease's calls (call 1 with every smoke item, in a generous
    time: its own 230 s hold them on a GPU, not on a loaded CPU), the parts that do not need the data (the profile
    part cut at a 1 s limit), and the accuracy part with a failing official run."""
    tmp = tmp_path_factory.mktemp("dry")
    for name in ("lease_in", "accuracy_in"):
        (tmp / name).mkdir()
    # the seeds' history: the lease's own (where it would look) and none, never an earlier local dry run's
    # benchmarks/results/cpu-dry-run/accuracy.json
    lease_env = {**stand_in(tmp / "lease_in"), "LEASE_STATE": str(tmp / "state")}
    lease_env["ACCURACY_HISTORY"] = str(tmp / "state" / "accuracy.json")
    accuracy_env = {**stand_in(tmp / "accuracy_in"), "STAND_IN_MODE": "fail", "ACCURACY_SEEDS": "1,2"}
    accuracy_env["ACCURACY_HISTORY"] = str(tmp / "no-history.json")
    (tmp / "accuracy" / "details").mkdir(parents=True)
    for name in ("smoke", "throughput_n20", "throughput_n200", "time_to_85_n20", "kernels"):  # earlier parts' results
        (tmp / "accuracy" / "details" / f"{name}.json").write_text("{}")

    # call 3 reads the gate call 1 left on the machine: here one written beforehand, so the calls run side by side
    (tmp / "state3").mkdir()
    (tmp / "state3" / "gate.json").write_text(json.dumps({"overrides": ["data.patch_compile=off"], "peer": "run"}))
    calls = {  # one seed in call 2: the accuracy run below runs a seed after the official run
        "call1": dict(SMOKE_ITEMS=",".join(smoke.ITEMS), CALL_SECONDS="420", **lease_env),
        "call2": dict(LEASE_OVERRIDES="data.patch_compile=off", ACCURACY_SEEDS="1", **lease_env),
        "call3": {**lease_env, "LEASE_STATE": str(tmp / "state3")},
    }
    parts = "profile,throughput200,kernels,tta,data,tune,tune_modes"  # throughput20 and profile: call 3
    absent = {"FASTEMP_CIFAR10_JPEG": str(tmp / "absent.tar.gz")}
    with ThreadPoolExecutor(5) as pool:
        jobs = {
            call: pool.submit(run, GPU_SUITE, "--lease", call, tmp / f"out{call[-1]}", **env)
            for call, env in calls.items()
        }
        jobs["parts"] = pool.submit(run, GPU_SUITE, parts, tmp / "parts", LIMIT_PROFILE="1", **absent)
        jobs["accuracy"] = pool.submit(run, GPU_SUITE, "accuracy", tmp / "accuracy", **accuracy_env)
        yield tmp, {name: job.result for name, job in jobs.items()}


def test_unknown_parts_and_a_missing_interpreter_are_usage_errors(dry, tmp_path, capsys):  # first: starts the runs
    from fastemp.benchmarks.suite import main

    assert main(["smoke,bogus"]) == 2 and main(["--lease", "call4", str(tmp_path)]) == 2
    assert "usage: benchmarks/gpu_suite.sh" in capsys.readouterr().err
    missing = run(GPU_SUITE, "smoke", tmp_path, FASTEMP_PYTHON="no-such-python3")
    assert missing.returncode == 2 and "FASTEMP_PYTHON" in missing.stderr


def test_a_part_cut_at_its_limit_is_reported_and_the_next_parts_still_run(dry):
    tmp, jobs = dry
    out, result = tmp / "parts", jobs["parts"]()
    assert result.returncode == 1, result.stdout + result.stderr  # one part timed out
    assert "part profile: TIMEOUT" in result.stdout
    parts = {p["part"]: p for p in json.loads((out / "suite.json").read_text())["parts"]}
    assert parts["profile"]["status"] == "TIMEOUT" and parts["profile"]["limit_seconds"] == 1
    later = ("throughput200", "kernels", "tta", "data", "tune", "tune_modes")
    assert [parts[p]["status"] for p in later] == ["PASS"] * 6
    # the data part's rows ride inside suite.json (its own file would be a 9th)
    assert parts["data"]["result_file"] == "suite.json"
    assert {"pillow", "resident", "step_only"} <= {r["arm"] for r in parts["data"]["result_json"]["rows"]}
    suite_md = (out / "suite.md").read_text()
    assert "# Data path" in suite_md and "profile" in suite_md and "TIMEOUT" in suite_md
    assert suite_md.count("- winner:") == 2 and "cudnn bench" in suite_md  # tune and tune_modes
    # at most 8 files, every part's JSON beside the summary, the details packed
    files = {p.name for p in out.iterdir() if p.is_file()}
    assert len(files) <= 8, files
    published = {"throughput_n200.json", "kernels.json", "time_to_85_n20.json"}
    assert published | {"suite.json", "suite.md", "details.tar.gz"} <= files
    with tarfile.open(out / "details.tar.gz") as tar:
        names = tar.getnames()
    assert {"./profile.log", "./time_to_85_n20.md", "./tuned_n20.yaml", "./tune_modes_n20.yaml"} <= set(names)
    tta = json.loads((out / "time_to_85_n20.json").read_text())
    assert tta["partial"] is False and [m["top1"] for m in tta["milestones"]] == [0.7, 0.75, 0.8, 0.85]
    assert tta["best_linear_top1"] is not None
    assert "pip install" not in result.stdout + result.stderr


def test_a_hung_smoke_item_fails_at_its_limit_and_the_others_still_run(tmp_path):
    record = tmp_path / "smoke.jsonl"
    record.write_text(
        json.dumps(
            {"item": "environment", "status": "PASS", "reason": "x", "seconds": 1.0, "details": {"device": "cpu"}}
        )
        + "\n"
        + '{"item": "check", "status": "FAIL", "reason": "timed out after 75 s", "seconds": 75, '
        '"details": {}}\n{"item": "train", "sta'
    )  # a line cut by the kill
    assert smoke.report(record, tmp_path) == 1
    result = json.loads((tmp_path / "smoke.json").read_text())
    statuses = {i["item"]: i["status"] for i in result["items"]}
    assert statuses == {
        "environment": "PASS",
        "check": "FAIL",
        "train": "FAIL",
        "large_n": "FAIL",
        "dali": "FAIL",
    }
    assert result["verdict"] == "FAIL" and "prefetch: not verified" in result["gate"]["stop"]  # no check rows at all


def test_a_failed_official_run_fails_the_accuracy_part_and_keeps_its_json_and_log(dry):
    tmp, jobs = dry
    out, result = tmp / "accuracy", jobs["accuracy"]()
    assert result.returncode == 1, result.stdout + result.stderr
    assert "part accuracy: FAIL" in result.stdout and "official run FAILED" in result.stdout
    peer = json.loads((out / "official_peer.json").read_text())  # published, whatever else is there
    assert peer["status"] == "FAIL" and "boom" in peer["error"]
    accuracy = json.loads((out / "accuracy.json").read_text())
    assert [r["seed"] for r in accuracy["runs"]] == [1, 2]  # explicit seeds, both after the failed official run
    assert accuracy["official_runs"][-1]["status"] == "FAIL" and accuracy["comparison"] == []
    files = sorted(p.name for p in out.iterdir() if p.is_file())
    assert len(files) == 8 and "kernels.json" not in files and "time_to_85_n20.json" not in files, files
    with tarfile.open(out / "details.tar.gz") as tar:
        log = tar.extractfile("./official_peer.log").read().decode()
    assert "boom" in log and "2it" in log


@pytest.mark.parametrize("passed", [False, True])
def test_the_official_run_goes_first_until_one_has_passed(tmp_path, monkeypatch, passed):
    official, jpeg, history = tmp_path / "official", tmp_path / "cifar10-jpeg.tar.gz", tmp_path / "accuracy.json"
    official.mkdir()
    (official / "main.py").write_text("")
    jpeg.write_bytes(b"")
    history.write_text(json.dumps({"official_runs": [{"status": "FAIL"}, *[{"status": "PASS"}] * passed]}))
    env = dict(SUITE_DETAILS=tmp_path / "details", ACCURACY_HISTORY=history, FASTEMP_OFFICIAL_DIR=official)
    env |= dict(FASTEMP_CIFAR10_JPEG=jpeg, ACCURACY_SEEDS="1,2", LEASE_PEER="run", SUITE_DRY_RUN="1")
    for name in (
        "CUDA_VISIBLE_DEVICES",
        "TRITON_INTERPRET",
        "PIP_NO_INDEX",
        "FASTEMP_OFFICIAL_PYTHON",
        "PYTHONUNBUFFERED",
    ):
        env.setdefault(name, os.environ.get(name, ""))  # the suite sets these: monkeypatch puts them back
    for name, value in env.items():
        monkeypatch.setenv(name, str(value))
    runs = suite.Suite(str(tmp_path / "out"))
    runs.part_end = time.monotonic() + 1000
    commands = [step.argv[4] for step in runs.accuracy()]  # python -m fastemp bench COMMAND
    first = ["accuracy", "official-peer"] if passed else ["official-peer", "accuracy"]
    assert commands == [*first, "accuracy"]


def test_the_lease_script_runs_its_three_calls(dry):
    """benchmarks/gpu_suite.sh --lease dry: call 1's smoke (one line and one record per item, smoke.json), its gate
    and next line, call 2's overrides reaching fastemp and the official run's evaluation, fastemp - official in one
    accuracy.json, call 3; each call's OUT holds at most 8 files."""
    tmp, jobs = dry
    first, second, third = jobs["call1"](), jobs["call2"](), jobs["call3"]()
    assert first.returncode == 0, first.stdout + first.stderr
    found = json.loads((tmp / "out1" / "smoke.json").read_text())
    assert found["benchmark"] == "smoke" and found["verdict"] == "PASS"
    items = {i["item"]: i for i in found["items"]}
    assert list(items) == ["environment", "check", "train", "large_n", "dali"]
    assert all(i["status"] == "PASS" for i in found["items"][:4]) and items["dali"]["status"] in ("PASS", "SKIP")
    assert math.isfinite(items["train"]["details"]["loss"]) and items["large_n"]["details"]["grad_chunks_used"] == 2
    lines = [line for line in first.stdout.splitlines() if line.startswith("smoke ") and line.split()[1] in items]
    assert len(lines) == 5 and all(line.split()[2] in ("PASS", "SKIP") for line in lines)
    assert found["gate"] == {"overrides": [], "stop": None, "peer": "run", "notes": []}
    assert "lease: next: LEASE_OVERRIDES='' LEASE_PEER='run'" in first.stdout
    assert json.loads((tmp / "state" / "gate.json").read_text()) == found["gate"]  # for call 2 and 3 on this machine
    assert second.returncode == 0, second.stdout + second.stderr
    accuracy = json.loads((tmp / "out2" / "accuracy.json").read_text())
    assert [r["seed"] for r in accuracy["runs"]] == [0] and accuracy["runs"][0]["official_linear_top1"] == 0.842
    assert all("data.patch_compile=off" in r["overrides"] for r in accuracy["runs"])
    (official,) = accuracy["official_runs"]
    assert official["status"] == "PASS" and official["seed"] == 0 and "data.patch_compile=off" in official["overrides"]
    (comparison,) = accuracy["comparison"]
    assert comparison["official_seeds"] == [0] and "one run each" in comparison["uncertainty"]  # 2: test_bench_accuracy
    # the last lines: accuracy.md (each side's linear top-1, fastemp - official), then what to run next
    assert (tmp / "state" / "call2" / "accuracy.md").read_text() in second.stdout and "call3" in second.stdout
    assert third.returncode == 0, third.stdout + third.stderr
    assert "lease: overrides: data.patch_compile=off; official run: run" in third.stdout  # the gate call 1 left
    assert (tmp / "out3" / "throughput_n20.json").exists()
    assert "## Profile" in (tmp / "out3" / "suite.md").read_text()
    parts = {p["part"]: p["status"] for p in json.loads((tmp / "out3" / "suite.json").read_text())["parts"]}
    assert parts == {"profile": "PASS", "throughput20": "PASS"}
    with tarfile.open(tmp / "out3" / "details.tar.gz") as tar:
        assert "./profile.md" in tar.getnames()
    for out in ("out1", "out2", "out3"):
        assert len(list((tmp / out).iterdir())) <= 8


def test_the_smoke_gate_switches_failed_or_unverified_paths_off_or_stops(tmp_path):
    rows = tmp_path / "rows.jsonl"
    cuda = {"compile": "default", "patch_compile": True, "fused_update": True, "fused_loss": True}

    def gate(runtime, ops, records=()):
        lines = [json.dumps({"runtime": runtime})] if runtime is not None else []
        lines += [json.dumps({"op": op, "status": status}) for op, status in ops]
        rows.write_text("\n".join(lines) + "\n")
        return smoke.lease_gate(list(records), rows)

    passing = [(prefix + " x", "pass") for prefix, _, _ in smoke.GATE]
    assert gate(cuda, passing) == {"overrides": [], "stop": None, "peer": "run", "notes": []}
    broken = [(op, "FAIL" if op.startswith("patches") else s) for op, s in passing if not op.startswith("lars")]
    assert gate(cuda, broken)["overrides"] == ["data.patch_compile=off", "optim.fused_update=off"]  # lars: unverified
    assert gate({**cuda, "patch_compile": False, "fused_update": False}, broken)["overrides"] == []  # not taken
    assert (
        "prefetch: FAIL" in gate(cuda, [(op, "FAIL" if op.startswith("prefetch") else s) for op, s in passing])["stop"]
    )
    assert gate(None, [])["stop"]  # the checks never ran
    records = [
        {"item": "train", "status": "FAIL", "reason": "RuntimeError: inductor"},
    ]
    verdict = gate(cuda, passing, records)
    assert verdict["overrides"] == ["model.compile=none", "loss.fused=off"] and verdict["peer"] == "run"
    records = [{"item": "train", "status": "FAIL", "reason": "timed out after 240 s"}]
    assert gate(cuda, passing, records)["overrides"] == []  # too slow is not wrong


def test_a_call_2_after_one_that_stopped_still_adds_to_the_seeds_of_the_one_before(tmp_path, monkeypatch):
    """Call 2 keeps what an earlier call 2 measured (state/accuracy.json) as its history, also when the call in
    between stopped before measuring (its details, where the history would have come from, hold none)."""
    state = tmp_path / "state"
    (state / "call2").mkdir(parents=True)
    (state / "accuracy.json").write_text("{}")  # the first call 2's seeds, kept when the second one started
    (state / "gate.json").write_text(json.dumps({"overrides": [], "peer": "run", "stop": "a failed check"}))
    env = {"LEASE_STATE": str(state)}
    monkeypatch.setattr(smoke.os, "environ", env)
    assert smoke.lease("call2", str(tmp_path / "out")) == 3  # the third call: stopped by the gate
    assert env["ACCURACY_HISTORY"] == str(state / "accuracy.json")
