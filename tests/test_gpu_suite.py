"""benchmarks/gpu_suite.sh end to end on the CPU (SUITE_DRY_RUN=1): offline, per-part limits, result folder."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

GPU_SUITE = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.sh"


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
    result = run_suite("throughput20,profile,throughput200,kernels,tta,data", out, LIMIT_THROUGHPUT20="3")
    assert result.returncode == 1, result.stdout + result.stderr  # one part timed out
    assert "part throughput20: TIMEOUT" in result.stdout
    parts = {p["part"]: p for p in json.loads((out / "suite.json").read_text())["parts"]}
    assert parts["throughput20"]["status"] == "TIMEOUT" and parts["throughput20"]["limit_seconds"] == 3
    assert [parts[p]["status"] for p in ("profile", "throughput200", "kernels", "tta", "data")] == ["PASS"] * 5
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
    assert "./throughput20.log" in names and "./time_to_85_n20.md" in names and "./pip-freeze.txt" in names
    assert "./profile.md" in names and "## Profile" in (out / "suite.md").read_text()
    tta = json.loads((out / "time_to_85_n20.json").read_text())
    assert tta["partial"] is False and [m["top1"] for m in tta["milestones"]] == [0.7, 0.75, 0.8, 0.85]
    assert tta["best_linear_top1"] is not None
    assert "pip install" not in result.stdout + result.stderr


def test_smoke_reports_one_line_per_item_and_writes_smoke_json(tmp_path):
    out = tmp_path / "results"
    result = run_suite("smoke", out)
    assert result.returncode == 0, result.stdout + result.stderr
    smoke = json.loads((out / "smoke.json").read_text())
    assert smoke["benchmark"] == "smoke" and smoke["verdict"] == "PASS"
    items = {i["item"]: i for i in smoke["items"]}
    assert list(items) == ["environment", "check", "train", "large_n", "dali"]
    assert all(i["status"] in ("PASS", "SKIP") for i in items.values())
    assert items["train"]["details"]["finite"] and items["large_n"]["details"]["grad_chunks"] == 2
    lines = [line for line in result.stdout.splitlines() if line.startswith("smoke ")]
    assert len(lines) == 5 and all(line.split()[2] in ("PASS", "SKIP") for line in lines)


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
    assert statuses == {"environment": "PASS", "check": "FAIL", "train": "FAIL", "large_n": "FAIL", "dali": "FAIL"}
    assert result["verdict"] == "FAIL"


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


def test_accuracy_part_writes_fastemp_seeds_and_the_peer_status_within_eight_files(tmp_path):
    out = tmp_path / "results"
    (out / "details").mkdir(parents=True)
    for name in ("smoke", "throughput_n20", "throughput_n200", "time_to_85_n20", "kernels"):  # earlier parts' results
        (out / "details" / f"{name}.json").write_text("{}")
    result = run_suite("accuracy", out, ACCURACY_SEEDS="2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "part accuracy: PASS" in result.stdout and "official peer SKIP: dry run" in result.stdout
    accuracy = json.loads((out / "accuracy.json").read_text())
    (row,) = accuracy["rows"]
    assert row["row"] == "c10_n20_official_1ep@1" and row["status"] == "complete" and row["seeds"] == [0, 1]
    assert row["epochs_trained"] == 1 and row["schedule_epochs"] == 2 and row["official_linear_top1"] == 0.842
    assert accuracy["official_peer"]["status"] == "SKIP"
    assert "official code on the same data" in (out / "suite.md").read_text()
    # six result files: the first five are published, the sixth travels in details.tar.gz
    files = sorted(p.name for p in out.iterdir() if p.is_file())
    assert len(files) == 8 and "kernels.json" not in files and "accuracy.json" in files, files
    with tarfile.open(out / "details.tar.gz") as tar:
        names = tar.getnames()
    assert "./kernels.json" in names and "./official_peer.json" in names and "./accuracy.json" not in names


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
