"""benchmarks/gpu_suite.sh end to end on the CPU (SUITE_DRY_RUN=1): offline, per-part limits, result folder."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from official_stand_in import fake_jpeg_tar, stand_in_checkout

GPU_SUITE = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.sh"
LEASE = GPU_SUITE.with_name("lease.sh")


def run_suite(parts: str, out: Path, **env) -> subprocess.CompletedProcess:
    # PIP_NO_INDEX and a dead proxy: any attempt to reach a package index fails instead of hanging
    env = {
        **os.environ,
        "SUITE_DRY_RUN": "1",
        "FASTEMP_PYTHON": sys.executable,
        "PIP_NO_INDEX": "1",
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "HTTP_PROXY": "http://127.0.0.1:9",
        "OMP_NUM_THREADS": "1",
        "FASTEMP_CIFAR10_JPEG": str(out / "absent.tar.gz"),
        **env,
    }
    return subprocess.run(
        ["bash", str(GPU_SUITE), parts, str(out)], capture_output=True, text=True, env=env, timeout=600
    )


def test_unknown_parts_and_a_missing_interpreter_are_usage_errors(tmp_path):
    bad = run_suite("smoke,bogus", tmp_path)
    assert bad.returncode == 2 and "usage" in bad.stderr
    missing = run_suite("smoke", tmp_path, FASTEMP_PYTHON="no-such-python3")
    assert missing.returncode == 2 and "FASTEMP_PYTHON" in missing.stderr


def test_a_part_cut_at_its_limit_is_reported_and_the_next_parts_still_run(tmp_path):
    out = tmp_path / "results"
    result = run_suite("throughput20,throughput200,kernels,tta,data", out, LIMIT_THROUGHPUT20="3")  # profile: in call 3
    assert result.returncode == 1, result.stdout + result.stderr  # one part timed out
    assert "part throughput20: TIMEOUT" in result.stdout
    parts = {p["part"]: p for p in json.loads((out / "suite.json").read_text())["parts"]}
    assert parts["throughput20"]["status"] == "TIMEOUT" and parts["throughput20"]["limit_seconds"] == 3
    assert [parts[p]["status"] for p in ("throughput200", "kernels", "tta", "data")] == ["PASS"] * 4
    # the data part's rows ride inside suite.json (its own file would be a 9th)
    assert parts["data"]["result_file"] == "suite.json"
    assert {"pillow", "resident", "step_only"} <= {r["arm"] for r in parts["data"]["result_json"]["rows"]}
    assert "# Data path" in (out / "suite.md").read_text()
    assert "throughput20" in (out / "suite.md").read_text() and "TIMEOUT" in (out / "suite.md").read_text()
    # at most 8 files, every part's JSON beside the summary, the details packed
    files = sorted(p.name for p in out.iterdir() if p.is_file())
    assert len(files) <= 8, files
    assert {
        "throughput_n200.json",
        "kernels.json",
        "time_to_85_n20.json",
        "suite.json",
        "suite.md",
        "details.tar.gz",
    } <= set(files)
    with tarfile.open(out / "details.tar.gz") as tar:
        names = tar.getnames()
    assert "./throughput20.log" in names and "./time_to_85_n20.md" in names
    tta = json.loads((out / "time_to_85_n20.json").read_text())
    assert tta["partial"] is False and [m["top1"] for m in tta["milestones"]] == [0.7, 0.75, 0.8, 0.85]
    assert tta["best_linear_top1"] is not None
    assert "pip install" not in result.stdout + result.stderr


def test_a_hung_smoke_item_fails_at_its_limit_and_the_others_still_run(tmp_path):
    from fastemp.benchmarks import smoke

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
        "official_loader": "FAIL",
        "train": "FAIL",
        "large_n": "FAIL",
        "dali": "FAIL",
    }
    assert result["verdict"] == "FAIL" and "prefetch: not verified" in result["gate"]["stop"]  # no check rows at all


def test_profile_categories_name_the_kind_of_work():
    from fastemp.benchmarks.profile import category

    assert category("sm90_xmma_fprop_implicit_gemm_bf16") == "convolution"
    assert category("aten::convolution_backward") == "convolution"
    assert category("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT") == "matmul"
    assert category("triton_per_fused_native_batch_norm_0") == "triton"
    assert category("_cosine_to_mean_kernel") == "triton"
    assert category("aten::native_batch_norm") == "batchnorm"
    assert category("Memcpy DtoD (Device -> Device)") == "copy"
    assert category("aten::where") == "other"


def stand_in(tmp_path: Path) -> dict:
    """The environment that gives a dry run the stand-in official checkout and a tiny CIFAR-like JPEG archive."""
    official, python = stand_in_checkout(tmp_path)
    data = fake_jpeg_tar(tmp_path / "tiny-jpeg.tar.gz", 110, 10)
    return {
        "FASTEMP_OFFICIAL_DIR": str(official),
        "FASTEMP_OFFICIAL_PYTHON": str(python),
        "FASTEMP_CIFAR10_JPEG": str(data),
    }


def test_a_failed_official_run_fails_the_accuracy_part_and_keeps_its_json_and_log(tmp_path):
    out = tmp_path / "results"
    (out / "details").mkdir(parents=True)
    for name in ("smoke", "throughput_n20", "throughput_n200", "time_to_85_n20", "kernels"):  # earlier parts' results
        (out / "details" / f"{name}.json").write_text("{}")
    result = run_suite("accuracy", out, STAND_IN_MODE="fail", ACCURACY_SEEDS="1,2", **stand_in(tmp_path))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "part accuracy: FAIL" in result.stdout and "official run FAILED" in result.stdout
    peer = json.loads((out / "official_peer.json").read_text())  # published, whatever else is there
    assert peer["status"] == "FAIL" and "boom" in peer["error"]
    accuracy = json.loads((out / "accuracy.json").read_text())
    assert [r["seed"] for r in accuracy["runs"]] == [1, 2]  # explicit seeds; the next one still ran after the peer
    assert accuracy["official_runs"][-1]["status"] == "FAIL" and accuracy["comparison"] == []
    files = sorted(p.name for p in out.iterdir() if p.is_file())
    assert len(files) == 8 and "kernels.json" not in files and "time_to_85_n20.json" not in files, files
    with tarfile.open(out / "details.tar.gz") as tar:
        log = tar.extractfile("./official_peer.log").read().decode()
    assert "boom" in log and "2it" in log


def lease(call: str, out: Path, state: Path, **env) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "SUITE_DRY_RUN": "1",
        "FASTEMP_PYTHON": sys.executable,
        "PIP_NO_INDEX": "1",
        "OMP_NUM_THREADS": "1",
        "LEASE_STATE": str(state),
        **env,
    }
    return subprocess.run(["bash", str(LEASE), call, str(out)], capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def call1(tmp_path_factory):
    """The lease's call 1 with every smoke item (the costliest dry run), read by the smoke and the lease tests."""
    from fastemp.benchmarks.smoke import ITEMS

    tmp = tmp_path_factory.mktemp("lease")
    env = stand_in(tmp)
    items = ",".join(ITEMS)  # a generous call (its own 170 s hold every item on a GPU, not on a loaded CPU)
    return tmp, env, lease("call1", tmp / "out1", tmp / "state", SMOKE_ITEMS=items, CALL_SECONDS="420", **env)


def test_smoke_reports_one_line_per_item_and_writes_smoke_json(call1, tmp_path, monkeypatch):
    tmp, _, result = call1
    assert result.returncode == 0, result.stdout + result.stderr
    smoke = json.loads((tmp / "out1" / "smoke.json").read_text())
    assert smoke["benchmark"] == "smoke" and smoke["verdict"] == "PASS"
    items = {i["item"]: i for i in smoke["items"]}
    assert list(items) == ["environment", "check", "official_loader", "train", "large_n", "dali"]
    assert all(i["status"] in ("PASS", "SKIP") for i in items.values())
    assert items["train"]["details"]["finite"] and items["large_n"]["details"]["grad_chunks"] == 2
    lines = [line for line in result.stdout.splitlines() if line.startswith("smoke ") and line.split()[1] in items]
    assert len(lines) == 6 and all(line.split()[2] in ("PASS", "SKIP") for line in lines)
    # without an official checkout the loader probe is SKIP and the gate keeps the official run out
    from fastemp.benchmarks import smoke as module

    monkeypatch.delenv("FASTEMP_OFFICIAL_DIR", raising=False)
    skipped = module.run_item("official_loader", True, tmp_path / "smoke.jsonl")
    assert skipped["status"] == "SKIP" and "FASTEMP_OFFICIAL_DIR unset" in skipped["reason"]
    assert module.lease_gate([skipped], tmp_path / "no_rows.jsonl")["peer"].startswith("skip")


def test_the_lease_script_runs_its_three_calls(call1):
    """benchmarks/lease.sh dry: call 1's gate and next line, call 2's overrides reaching fastemp and the official
    run's evaluation, fastemp - official in one accuracy.json, call 3; each call's OUT holds at most 8 files."""
    tmp_path, env, first = call1
    state = tmp_path / "state"
    assert first.returncode == 0, first.stdout + first.stderr
    smoke = json.loads((tmp_path / "out1" / "smoke.json").read_text())
    assert [i["item"] for i in smoke["items"]][:3] == ["environment", "check", "official_loader"]
    assert all(i["status"] == "PASS" for i in smoke["items"][:3]), smoke["items"]
    assert smoke["gate"] == {"overrides": [], "stop": None, "peer": "run", "notes": []}
    assert "lease: next: LEASE_OVERRIDES='' LEASE_PEER='run'" in first.stdout
    # one seed: test_a_failed_official_run_fails_the_accuracy_part... runs a seed after the official run
    second = lease(
        "call2", tmp_path / "out2", state, LEASE_OVERRIDES="data.patch_compile=off", ACCURACY_SEEDS="1", **env
    )
    assert second.returncode == 0, second.stdout + second.stderr
    accuracy = json.loads((tmp_path / "out2" / "accuracy.json").read_text())
    assert [r["seed"] for r in accuracy["runs"]] == [0] and accuracy["runs"][0]["official_linear_top1"] == 0.842
    assert all("data.patch_compile=off" in r["overrides"] for r in accuracy["runs"])
    (official,) = accuracy["official_runs"]
    assert official["status"] == "PASS" and official["seed"] == 0 and "data.patch_compile=off" in official["overrides"]
    (comparison,) = accuracy["comparison"]
    assert (
        comparison["official_seeds"] == [0] and "one run each" in comparison["uncertainty"]
    )  # 2 seeds: test_bench_accuracy
    assert "lease: fastemp - official" in second.stdout and "call3" in second.stdout
    third = lease("call3", tmp_path / "out3", state, **env)
    assert third.returncode == 0, third.stdout + third.stderr
    assert (tmp_path / "out3" / "throughput_n20.json").exists()
    assert "## Profile" in (tmp_path / "out3" / "suite.md").read_text()
    parts = {p["part"]: p["status"] for p in json.loads((tmp_path / "out3" / "suite.json").read_text())["parts"]}
    assert parts == {"profile": "PASS", "throughput20": "PASS"}
    with tarfile.open(tmp_path / "out3" / "details.tar.gz") as tar:
        assert "./profile.md" in tar.getnames()
    for out in ("out1", "out2", "out3"):
        assert len(list((tmp_path / out).iterdir())) <= 8


def test_the_smoke_gate_switches_failed_or_unverified_paths_off_or_stops(tmp_path):
    from fastemp.benchmarks import smoke

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
        {
            "item": "official_loader",
            "status": "FAIL",
            "reason": "AssertionError: the official DataLoader did not deliver",
        },
    ]
    verdict = gate(cuda, passing, records)
    assert verdict["overrides"] == ["model.compile=none", "loss.fused=off"] and verdict["peer"].startswith("skip")
    records = [{"item": "train", "status": "FAIL", "reason": "timed out after 240 s"}]
    assert gate(cuda, passing, records)["overrides"] == []  # too slow is not wrong


def test_tune_parts_write_the_winner_into_the_details_and_suite_md(tmp_path):
    out = tmp_path / "results"
    result = run_suite("tune,tune_modes", out)
    assert result.returncode == 0, result.stdout + result.stderr
    parts = {p["part"]: p["status"] for p in json.loads((out / "suite.json").read_text())["parts"]}
    assert parts == {"tune": "PASS", "tune_modes": "PASS"}
    suite_md = (out / "suite.md").read_text()
    assert suite_md.count("- winner:") == 2 and "cudnn bench" in suite_md
    with tarfile.open(out / "details.tar.gz") as tar:
        names = tar.getnames()
    assert "./tuned_n20.yaml" in names and "./tune_modes_n20.yaml" in names
    assert len([p for p in out.iterdir() if p.is_file()]) <= 8
