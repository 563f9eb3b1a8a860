"""The benchmark harness and its suites (throughput, kernels, profile, data, report) on the CPU at tiny sizes, and
the checks every bench command makes before measuring. Nothing here asserts a timing: the commands run, their
result fields are there and consistent with each other (MFU arithmetic, FLOP count), and the baseline and the
instrumented step compute what fastemp computes."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny_run import BENCH_CPU, BENCH_TINY

from fastemp.benchmarks import harness
from fastemp.benchmarks.baseline import PerPatchDataset, baseline_loss_terms, loop_tcr
from fastemp.benchmarks.cli import NAMES
from fastemp.benchmarks.profile import category
from fastemp.benchmarks.report import END, START, _short_data, render_tables, update_readme
from fastemp.benchmarks.throughput import PHASES, points, targets
from fastemp.check.reference import reference_total_coding_rate
from fastemp.cli import main
from fastemp.clock import Clock, datasheet_peak, time_calls
from fastemp.config import AugmentConfig, LossConfig, load_config
from fastemp.kernels.cosine_to_mean import triton_usable
from fastemp.losses import projection_loss_terms
from fastemp.model import flops_per_patch
from fastemp.patches import patch_major
from fastemp.train import Trainer

REPO = Path(__file__).resolve().parents[1]
COMMON = {"benchmark", "schema_version", "created", "command", "environment", "partial"}
ENVIRONMENT = {"device", "device_name", "device_slug", "torch", "triton", "dali", "python", "commit", "cpu_threads"}


@pytest.fixture(autouse=True)
def _restore_threads():
    """The CLI's --threads 1 (used here for speed on shared cores) must not leak into other tests."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def strict_json(path: Path) -> dict:
    """A result file, refusing NaN / Infinity (not JSON), with the fields every result has."""
    result = json.loads(path.read_text(), parse_constant=lambda name: pytest.fail(f"{path}: {name}"))
    assert COMMON <= set(result) and ENVIRONMENT <= set(result["environment"]) and result["partial"] is False
    return result


# ------------------------------------------------------------------------------ the harness


def test_harness_grid_points_and_result_names(tmp_path, capsys):
    assert harness.grid({"a": [1, 2], "b": ["x"]}) == [{"a": 1, "b": "x"}, {"a": 2, "b": "x"}]
    assert NAMES(" torch, dali") == ["torch", "dali"]  # a comma-separated option
    assert len(time_calls(lambda: None, torch.device("cpu"), 2, 5)) == 5  # the library's clock, 5 calls
    cfg = load_config("quickstart")
    grid = points(cfg, {"n_patches": [2, 4], "backend": ["torch"]})
    assert len(grid) == 2 and all(p["batch_size"] == cfg.train.batch_size for p in grid)

    # result names are decided before measuring: an existing result is never replaced without --force
    def name(force=False):
        return harness.Results("x", str, str(tmp_path), "throughput", "cpu", force).name

    assert name() == "throughput" and capsys.readouterr().err == ""
    (tmp_path / "throughput.json").write_text("{}")
    assert name() == "throughput-2" and "throughput.json exists" in capsys.readouterr().err
    (tmp_path / "throughput-2.md").write_text("")
    assert name() == "throughput-3" and name(force=True) == "throughput"
    assert harness.Results("x", str, None, "k", "cpu", False).folder == Path("benchmarks/results/cpu")
    assert harness.device_slug({"device": "cuda:0", "device_name": "NVIDIA H100 80GB HBM3"}) == "h100-80gb-hbm3"


def test_a_point_that_fails_or_runs_out_of_memory_is_a_row_and_the_sweep_goes_on():
    def measure(point):
        if point == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        if point == 2:
            raise ValueError("boom")
        return {"images_per_s": 1.0}

    seen = []
    rows = harness.run_points([0, 1, 2, 3], measure, lambda p: {"p": p}, seen.append)
    assert [r["status"] for r in rows] == ["ok", "oom", "error", "ok"] and "boom" in rows[2]["reason"]
    assert len(seen) == 4 and rows[3]["images_per_s"] == 1.0


def test_targets_and_datasheet():
    env = {"device": "cuda", "device_name": "NVIDIA H100 80GB HBM3"}
    rows = [{"n_patches": 20, "batch_size": 100, "status": "ok", "patches_per_s": 120_000.0}]
    rows += [{"n_patches": 200, "batch_size": 100, "status": "oom"}]
    found = {r["name"]: r for r in targets(rows, env)}
    assert found["n20_patches_per_s"]["met"] is True and found["n20_patches_per_s"]["on_target_hardware"]
    assert found["n200_memory_gib"]["met"] is False and found["n200_memory_gib"]["note"] == "out of memory"
    assert found["n200_epoch_seconds"]["measured"] is None
    assert datasheet_peak("NVIDIA H100 PCIe") == ("H100 PCIe", 756.0) and datasheet_peak("NVIDIA L40S") is None
    assert datasheet_peak("NVIDIA H200") == ("H200", 989.0)


# ------------------------------------------------------------------------------ the baseline and the step


@pytest.mark.parametrize("fused", [False, True])
def test_baseline_loss_matches_fastemp(fused):
    """Per-patch d x d logdet loop + unfused cosine loop == projection_loss_terms: values and dL/dp."""
    if fused and not triton_usable("cpu"):
        pytest.skip("the fused path needs TRITON_INTERPRET=1 on the CPU")
    p, cfg = torch.randn(4, 16, 24), LossConfig()
    ours, theirs = p.clone().requires_grad_(True), p.clone().requires_grad_(True)
    terms = projection_loss_terms(ours, cfg, fused=fused)
    terms.total.backward()
    base = baseline_loss_terms(F.normalize(theirs, dim=-1), cfg)
    base.total.backward()
    for a, b in zip(terms, base):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), (a, b)
    assert torch.allclose(ours.grad, theirs.grad, rtol=1e-4, atol=1e-6)


def test_baseline_pieces():
    z = F.normalize(torch.randn(3, 10, 6, dtype=torch.float64), dim=-1)
    assert torch.allclose(-loop_tcr(z, 0.2), reference_total_coding_rate(z, 0.2).mean(), rtol=1e-12)  # the formula
    images = torch.randint(0, 256, (6, 32, 32, 3), dtype=torch.uint8)
    item = PerPatchDataset(images, 3, AugmentConfig())[2]
    assert item.shape == (3, 3, 32, 32) and item.min() >= -1 - 1e-6 and item.max() <= 1 + 1e-6
    assert not torch.equal(item[0], item[1])  # every patch draws its own augmentation
    batch = torch.arange(6).view(2, 3, 1, 1, 1).float()  # image b, patch i -> 3b + i
    assert patch_major(batch).flatten().tolist() == [0, 3, 1, 4, 2, 5]  # row i*B + b: patch i of image b


@pytest.mark.parametrize("grad_chunks", [1, 2])
def test_clocked_step_matches_train_until(grad_chunks):
    """The split's clock marks every phase of a step and changes nothing it computes."""
    keys = ["train.device=cpu", "train.n_patches=2", "train.batch_size=8", f"train.grad_chunks={grad_chunks}"]
    cfg = load_config("quickstart", BENCH_TINY + keys + ["train.max_steps=4"])
    plain, timed = Trainer(cfg, None, progress=False), Trainer(cfg, None, progress=False)
    plain.train_until(1)
    clock = Clock("cpu")
    assert torch.isfinite(timed.train_step(clock).total) and timed.step == 1
    assert [name for name, _ in clock.intervals()] == list(PHASES)
    for (name, a), b in zip(plain.model.state_dict().items(), timed.model.state_dict().values()):
        assert torch.equal(a, b), name


# ------------------------------------------------------------------------------ the commands, end to end


WRITES = []  # (points, baselines, final) of every write of the throughput run's result file


@pytest.fixture(scope="module")
def throughput_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("throughput")
    argv = ["bench", "throughput", *BENCH_CPU, *BENCH_TINY, "--n", "2", "--batch", "8", "--grad-chunks", "1,2"]
    argv += ["--warmup", "1", "--steps", "3", "--split-steps", "2", "--baseline", "--baseline-workers", "1"]
    write = harness.Results.write

    def recorded(self, result, final=False):
        WRITES.append((len(result["points"]), len(result["baselines"]), final))
        return write(self, result, final)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(harness.Results, "write", recorded)
        return main([*argv, "--baseline-steps", "2", "--peak-size", "256", "--out", str(out)]), out


def test_cli_throughput(throughput_run):
    rc, out = throughput_run
    assert rc == 0
    result = strict_json(out / "throughput.json")
    flops = flops_per_patch(load_config("quickstart", BENCH_TINY).model, image_size=32)
    assert result["flops_per_patch"] == flops and result["peak"]["dtype"] == "float32"
    assert [p["grad_chunks"] for p in result["points"]] == [1, 2]
    (base,) = result["baselines"]
    assert base["status"] == "ok" and (base["n_patches"], base["batch_size"], base["timed_steps"]) == (2, 8, 2)
    assert 0 <= base["data_wait_fraction"] <= 1
    for p in result["points"]:
        assert p["status"] == "ok" and p["resolved"]["compile"] == "none" and len(p["step_seconds"]) == 3
        assert p["patches_per_s"] == pytest.approx(2 * p["images_per_s"])
        assert p["images_per_s"] == pytest.approx(8 / p["step_seconds_median"])
        assert p["achieved_tflops"] == pytest.approx(p["patches_per_s"] * flops / 1e12)
        assert p["mfu"] == pytest.approx(p["achieved_tflops"] / result["peak"]["measured_tflops"])
        assert p["speedup_vs_baseline"] == pytest.approx(p["images_per_s"] / base["images_per_s"])
        assert set(p["split"]) >= {*PHASES, "forward_backward", "total"} and p["split"]["steps"] == 2
    assert (out / "throughput.md").read_text().startswith("# Throughput")
    # the file is rewritten after every row with what was measured so far (a run cut at a limit keeps it)
    assert WRITES == [(1, 0, False), (2, 0, False), (2, 1, False), (2, 1, True)]


def test_cli_kernels_profile_and_data(tmp_path):
    argv = ["bench", "kernels", "--device", "cpu", "--threads", "1", "--n", "3", "--batch", "8", "--dim", "16"]
    argv += ["--width", "4", "--warmup", "1", "--iters", "2", "--no-compile", "--images", "32"]
    assert main([*argv, "--baseline-aug-patches", "4", "--out", str(tmp_path)]) == 0
    result = strict_json(tmp_path / "kernels.json")
    rows = {(r["kernel"], r["impl"]): r for r in result["rows"]}
    assert rows[("tcr", "loop")]["grad_max_abs_diff"] < 1e-4 and rows[("tcr", "cholesky")]["seconds"] > 0
    assert rows[("cosine_to_mean", "triton")]["seconds"] is None  # never a CPU time for Triton
    assert rows[("lars", "eager")]["params"] > 0 and {"reference", "eager"} <= {i for k, i in rows if k == "lars"}
    assert {r["impl"] for r in result["augmentation"]} == {"torch eager", "baseline per-patch CPU (1 process)"}
    assert {s["vs"] for s in result["speedups"]} >= {"loop", "reference"}

    tiny = [*BENCH_CPU, *BENCH_TINY, "train.n_patches=2", "train.batch_size=8"]
    trace = tmp_path / "trace.json"
    argv = ["bench", "profile", *tiny, "--warmup", "0", "--steps", "1", "--out", str(tmp_path), "--trace", str(trace)]
    assert main(argv) == 0
    profile = strict_json(tmp_path / "profile.json")
    assert profile["ms_per_step"] > 0 and "convolution" in profile["categories"] and profile["top"]
    assert "traceEvents" in json.loads(trace.read_text())

    argv = ["bench", "data", "--device", "cpu", "--threads", "1", "--sources", "24", "--patch", "16", "--n", "2"]
    argv += ["--batch", "4", "--workers", "0", "--warmup", "0", "--steps", "1", "--classes", "2", "--per-class", "2"]
    assert main([*argv, "model.width=8", "model.hidden_dim=16", "model.z_dim=8", "--out", str(tmp_path)]) == 0
    rows = {r["arm"]: r for r in strict_json(tmp_path / "data.json")["rows"]}
    assert set(rows) == {"step_only", "pillow", "dali", "resident"} and rows["step_only"]["data_added_fraction"] == 0
    for arm, r in rows.items():
        assert r["status"] == "ok" or (arm, r["status"]) == ("dali", "skipped"), r
        assert r["status"] != "ok" or (r["images_per_s"] > 0 and 0 <= r["data_added_fraction"] < 1)


def test_profile_categories_name_the_kind_of_work():
    names = {"sm90_xmma_fprop_implicit_gemm_bf16": "convolution", "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT": "matmul"}
    names.update({"triton_per_fused_native_batch_norm_0": "triton", "aten::native_batch_norm": "batchnorm"})
    names.update({"Memcpy DtoD (Device -> Device)": "copy", "aten::where": "other"})
    assert {name: category(name) for name in names} == names


# ------------------------------------------------------------------------------ checked before any work


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "throughput", "--steps", "0"], "--steps: expected a whole number >= 1, got '0'"),
        (["bench", "throughput", "--n", "20,x"], "--n: expected comma-separated whole numbers"),
        (["tune", "--backend", " , "], "--backend: expected comma-separated names, got ' , '"),
        (["bench", "kernels", "--iters", "-1"], "--iters: expected a whole number >= 1"),
        (["bench", "time-to-accuracy", "--target", "1.5"], "--target: expected a linear top-1 in (0, 1]"),
        (["bench", "accuracy", "--seeds", "x"], "--seeds must be a count >= 1"),
        (["bench", "accuracy", "--rows", "c10_n21"], "unknown rows c10_n21"),
        # a row without data (no CIFAR-100 given) still has its variant's keys checked
        (["bench", "accuracy", "--rows", "c100_n20_official_1ep", "--variant", "v", "train.nope=1"], "'train.nope'"),
        (["bench", "throughput", *BENCH_CPU, "train.n_pathces=2"], "did you mean 'n_patches'"),
        (["bench", "throughput", *BENCH_CPU, "--backend", "dali"], "data.backend=dali reads image files"),
        (["bench", "throughput", *BENCH_CPU, "--batch", "5000"], "exceeds the 2000 training images"),
        (["tune", *BENCH_CPU, "data.source=imagefolder", "data.path=/nowhere/x"], "/nowhere/x"),
        (["bench", "profile", *BENCH_CPU, "data.source=imagefolder", "data.path=/nowhere/x"], "/nowhere/x"),
        (["bench", "time-to-accuracy", *BENCH_CPU, "data.source=imagefolder", "data.path=/nowhere/x"], "/nowhere/x"),
        (["bench", "accuracy", "--cifar10", "/nowhere/cifar10-jpeg.tar.gz", "--device", "cpu"], "/nowhere"),
        (["bench", "time-to-accuracy", *BENCH_CPU, "data.synthetic_train=50"], "exceeds the 50 training images"),
    ],
)
def test_bad_arguments_config_or_data_are_one_line_before_anything_is_measured(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    try:  # argparse's errors exit from inside the parser
        code = main([*argv, *(["--out", str(out)] if argv[0] == "bench" else ["--out", str(out / "tuned.yaml")])])
    except SystemExit as exit:
        code = exit.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("fastemp: error:") and "\n" not in err and message in err, err
    assert not out.exists() or not list(out.iterdir())  # no result file, no error row


# ------------------------------------------------------------------------------ the README table


def test_report_regenerates_the_readme_table(throughput_run, tmp_path, capsys):
    _, out = throughput_run
    results = tmp_path / "benchmarks" / "results"
    (results / "cpu").mkdir(parents=True)
    (results / "cpu" / "throughput.json").write_text((out / "throughput.json").read_text())
    (results / "cpu-dry-run").mkdir()  # what `SUITE_DRY_RUN=1 gpu_suite.sh` leaves in a checkout: never in the table
    (results / "cpu-dry-run" / "throughput.json").write_text((out / "throughput.json").read_text())
    assert "| device |" in render_tables(results) and "benchmarks/results/cpu/throughput.json" in render_tables(results)
    assert "cpu-dry-run" not in render_tables(results)
    readme = tmp_path / "README.md"
    readme.write_text(f"# project\n\n{START}\nstale\n{END}\n\nmore text\n")
    assert update_readme(results, readme, check=True) == 1
    assert main(["bench", "report", "--results", str(results), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "stale" not in text and text.endswith("more text\n") and update_readme(results, readme, check=True) == 0


def test_the_readme_table_is_the_committed_results():
    """The README's table is regenerated from benchmarks/results whenever a result lands (pipeline checks,
    *_check.json, stay out of it)."""
    assert update_readme(REPO / "benchmarks" / "results", REPO / "README.md", check=True) == 0
    assert "_check.json" not in render_tables(REPO / "benchmarks" / "results")
    long = "imagefolder (/d/x/cifar10-jpeg.tar.gz, decoded with DALI on cpu), train, 50000 images, 10 classes"
    assert _short_data(long) == "imagefolder cifar10-jpeg.tar.gz, 50000 images"
