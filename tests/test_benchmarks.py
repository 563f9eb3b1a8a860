"""The benchmark commands, end to end on the CPU at tiny sizes; arithmetic and equivalences.

Nothing here asserts on a timing: the commands run, their JSON is checked against an explicit
schema, the numbers are checked for consistency with each other (MFU arithmetic, FLOP count),
and the baseline and instrumented step are checked to compute what fastemp computes.
"""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny_run import BENCH_CPU, BENCH_TINY

from fastemp.benchmarks import common
from fastemp.benchmarks.baseline import (
    PerPatchDataset,
    baseline_loss_terms,
    coding_rate_dxd,
    make_loader,
    to_patch_major,
)
from fastemp.benchmarks.report import END, START, render_tables, splice, update_readme
from fastemp.benchmarks.throughput import (
    PHASES,
    attach_ratios,
    point_config,
    run_point,
    sweep_points,
    throughput_targets,
)
from fastemp.benchmarks.time_to_accuracy import eval_schedule
from fastemp.check.reference import reference_total_coding_rate
from fastemp.cli import main
from fastemp.clock import Clock
from fastemp.config import AugmentConfig, LossConfig, load_config
from fastemp.kernels.cosine_to_mean import triton_usable
from fastemp.losses import projection_loss_terms
from fastemp.model import flops_per_patch
from fastemp.train import Trainer


@pytest.fixture(autouse=True)
def _restore_threads():
    """The CLI's --threads 1 (used here for speed on shared cores) must not leak into other tests."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------ JSON schema

NUM = (int, float)
OPT_NUM = (int, float, type(None))
OPT_STR = (str, type(None))

COMMON = {"benchmark": str, "schema_version": int, "created": str, "command": str, "environment": dict}
ENVIRONMENT = {
    "device": str,
    "device_name": str,
    "device_slug": str,
    "torch": str,
    "triton": OPT_STR,
    "dali": OPT_STR,
    "python": str,
    "commit": str,
    "cpu_threads": int,
}
THROUGHPUT = {
    "config": dict,
    "axes": dict,
    "data": str,
    "flops_per_patch": NUM,
    "peak": dict,
    "settings": dict,
    "points": list,
    "baselines": list,
    "targets": list,
    "notes": list,
}
PEAK = {
    "measured_tflops": NUM,
    "dtype": str,
    "matmul_size": int,
    "datasheet_tflops": OPT_NUM,
    "datasheet_label": OPT_STR,
}
POINT = {
    "n_patches": int,
    "batch_size": int,
    "backend": str,
    "compile": str,
    "precision": str,
    "grad_chunks": int,
    "status": str,
    "reason": OPT_STR,
    "flops_per_patch": NUM,
}
POINT_OK = {
    "resolved": dict,
    "data": str,
    "images_per_s": NUM,
    "patches_per_s": NUM,
    "step_seconds_median": NUM,
    "images_per_s_window_mean": NUM,
    "first_step_seconds": NUM,
    "compile_seconds": NUM,
    "achieved_tflops": NUM,
    "mfu": OPT_NUM,
    "mfu_datasheet": OPT_NUM,
    "peak_memory_bytes": (int, type(None)),
    "peak_memory_source": str,
    "split": (dict, type(None)),
    "step_seconds": list,
    "speedup_vs_baseline": OPT_NUM,
}
SPLIT = {
    "data": NUM,
    "forward": NUM,
    "loss": NUM,
    "backward": NUM,
    "optimizer": NUM,
    "forward_backward": NUM,
    "total": NUM,
    "steps": int,
    "clock": str,
}
BASELINE_OK = {
    "n_patches": int,
    "batch_size": int,
    "status": str,
    "workers": int,
    "timed_steps": int,
    "seconds": NUM,
    "images_per_s": NUM,
    "patches_per_s": NUM,
    "data_wait_fraction": NUM,
}
TARGET = {
    "name": str,
    "description": str,
    "threshold": NUM,
    "measured": OPT_NUM,
    "met": (bool, type(None)),
    "on_target_hardware": bool,
    "note": str,
}
KERNELS = {"settings": dict, "rows": list, "augmentation": list, "speedups": list, "notes": list}
KERNEL_ROW = {
    "kernel": str,
    "impl": str,
    "n": int,
    "B": int,
    "d": int,
    "dtype": str,
    "timed": bool,
    "seconds": OPT_NUM,
    "loss_abs_diff": OPT_NUM,
    "grad_max_abs_diff": OPT_NUM,
    "status": str,
    "note": str,
}
AUG_ROW = {
    "kernel": str,
    "impl": str,
    "n": int,
    "B": int,
    "seconds": OPT_NUM,
    "patches_per_s": OPT_NUM,
    "timed": bool,
    "status": str,
    "note": str,
}
TTA = {
    "config": dict,
    "target": NUM,
    "reached": bool,
    "train_seconds": OPT_NUM,
    "train_seconds_incl_first_step": OPT_NUM,
    "first_step_seconds": NUM,
    "epochs": OPT_NUM,
    "steps": (int, type(None)),
    "images_seen": (int, type(None)),
    "eval_seconds_total": NUM,
    "final_linear_top1": NUM,
    "protocol": dict,
    "data": str,
    "test_data": str,
    "n_patches": int,
    "batch_size": int,
    "evals": list,
    "targets": list,
}
PROTOCOL = {"eval_mode": str, "eval_patches": (int, type(None)), "probe_epochs": int, "eval_every_steps": int}
EVAL = {
    "step": int,
    "epoch": NUM,
    "images_seen": int,
    "train_seconds": NUM,
    "train_seconds_excl_first_step": NUM,
    "eval_seconds": NUM,
    "linear_top1": NUM,
}


def check_keys(obj: dict, spec: dict, where: str) -> None:
    """Every key of spec is in obj with one of the allowed types (bool never passes as a number)."""
    assert isinstance(obj, dict), f"{where}: not an object"
    for key, types in spec.items():
        assert key in obj, f"{where}: missing key '{key}'"
        value = obj[key]
        assert isinstance(value, types), f"{where}.{key}: {type(value).__name__} is not {types}"
        if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
            raise AssertionError(f"{where}.{key}: a bool where a number belongs")


def load_strict_json(path) -> dict:
    """Parse a result file, refusing NaN / Infinity (not JSON)."""

    def no_constants(name):
        raise ValueError(f"{path}: non-standard JSON constant {name}")

    return json.loads(path.read_text(), parse_constant=no_constants)


def check_common(result: dict, benchmark: str) -> None:
    check_keys(result, COMMON, "result")
    assert result["benchmark"] == benchmark
    check_keys(result["environment"], ENVIRONMENT, "environment")


def check_each(result: dict, key: str, schema) -> None:
    for i, row in enumerate(result[key]):
        check_keys(row, schema, f"{key}[{i}]")


def check_throughput_schema(result: dict) -> None:
    check_common(result, "throughput")
    check_keys(result, THROUGHPUT, "throughput")
    check_keys(result["peak"], PEAK, "peak")
    assert result["points"], "no points"
    for i, point in enumerate(result["points"]):
        check_keys(point, POINT, f"points[{i}]")
        if point["status"] == "ok":
            check_keys(point, POINT_OK, f"points[{i}]")
            if point["split"] is not None:
                check_keys(point["split"], SPLIT, f"points[{i}].split")
    for i, base in enumerate(result["baselines"]):
        if base["status"] == "ok":
            check_keys(base, BASELINE_OK, f"baselines[{i}]")
    check_each(result, "targets", TARGET)


def check_kernels_schema(result: dict) -> None:
    check_common(result, "kernels")
    check_keys(result, KERNELS, "kernels")
    check_each(result, "rows", KERNEL_ROW)
    check_each(result, "augmentation", AUG_ROW)


def check_tta_schema(result: dict) -> None:
    check_common(result, "time_to_accuracy")
    check_keys(result, TTA, "time_to_accuracy")
    check_keys(result["protocol"], PROTOCOL, "protocol")
    check_each(result, "evals", EVAL)


def test_schema_check_rejects_bad_results():
    """The schema check itself can fail: a missing key, a wrong type, a bool for a number."""
    good = {"a": 1.0}
    check_keys(good, {"a": NUM}, "x")
    for bad in ({}, {"a": "1"}, {"a": True}):
        with pytest.raises(AssertionError):
            check_keys(bad, {"a": NUM}, "x")


# ------------------------------------------------------------------------------ arithmetic


def test_mfu_arithmetic():
    assert common.achieved_tflops(100.0, 1e12) == pytest.approx(100.0)
    assert common.mfu(100.0, 1e12, 200.0) == pytest.approx(0.5)
    # the H100 target: 115k patches/s x 3.47 GFLOP = 399 TFLOP/s = 50% of a measured 798
    assert common.achieved_tflops(115_000, 3.47e9) == pytest.approx(399.05)
    assert common.mfu(115_000, 3.47e9, 798.0) == pytest.approx(0.500063, rel=1e-5)
    assert common.mfu(1.0, 1.0, None) is None and common.mfu(1.0, 1.0, 0.0) is None


def test_datasheet_table():
    assert common.datasheet_peak("NVIDIA H100 80GB HBM3") == ("H100 SXM", 989.0)
    assert common.datasheet_peak("NVIDIA H100 PCIe") == ("H100 PCIe", 756.0)
    assert common.datasheet_peak("NVIDIA H200") == ("H200", 989.0)
    assert common.datasheet_peak("NVIDIA A100-SXM4-80GB") == ("A100", 312.0)
    assert common.datasheet_peak("NVIDIA GeForce RTX 4090") == ("GeForce RTX 4090", 165.0)
    assert common.datasheet_peak("NVIDIA L4") == ("L4", 121.0)
    assert common.datasheet_peak("NVIDIA L40S") is None
    assert common.datasheet_peak("x86_64") is None


def test_median_grid_and_lists():
    assert common.median([3.0, 1.0, 2.0]) == 2.0
    assert common.parse_list("20, 200", int) == [20, 200] and common.parse_list(None) is None
    assert common.grid({"a": [1, 2], "b": ["x"]}) == [{"a": 1, "b": "x"}, {"a": 2, "b": "x"}]
    assert common.device_slug({"device": "cuda:0", "device_name": "NVIDIA H100 80GB HBM3"}) == "h100-80gb-hbm3"
    assert common.device_slug({"device": "cpu", "device_name": "x86_64"}) == "cpu"


def test_sweep_points_keep_config_values_for_unswept_axes():
    cfg = load_config("quickstart")
    points = sweep_points(cfg, {"n_patches": [2, 4], "backend": ["torch", "dali"]})
    assert len(points) == 4
    assert all(p["batch_size"] == cfg.train.batch_size and p["compile"] == cfg.model.compile for p in points)
    run_cfg = point_config(cfg, points[-1], "cpu", total_steps=7)
    assert (run_cfg.train.n_patches, run_cfg.data.backend, run_cfg.train.max_steps) == (4, "dali", 7)
    assert cfg.train.max_steps == 0  # the base is not modified


def test_dali_point_is_skipped_without_dali(monkeypatch):
    import fastemp.benchmarks.throughput as throughput

    monkeypatch.setattr(throughput, "dali_available", lambda: False)
    cfg = load_config("quickstart", BENCH_TINY)
    point = {**sweep_points(cfg, {})[0], "backend": "dali"}
    row = run_point(cfg, point, "cpu", 1, 2, 0, {"measured_tflops": 1.0}, common.DatasetCache())
    assert row["status"] == "skipped" and "images_per_s" not in row  # never a number that was not measured


def test_targets_and_ratios():
    env = {"device": "cuda", "device_name": "NVIDIA H100 80GB HBM3"}
    points = [
        {"n_patches": 20, "batch_size": 100, "status": "ok", "images_per_s": 6000.0, "patches_per_s": 120_000.0},
        {"n_patches": 200, "batch_size": 100, "status": "oom"},
    ]
    attach_ratios(points, [{"n_patches": 20, "batch_size": 100, "status": "ok", "images_per_s": 150.0}])
    assert points[0]["speedup_vs_baseline"] == pytest.approx(40.0) and points[1]["speedup_vs_baseline"] is None
    rows = {r["name"]: r for r in throughput_targets(points, env)}
    assert rows["n20_patches_per_s"]["met"] is True and rows["n20_patches_per_s"]["on_target_hardware"]
    assert "speedup_vs_baseline" not in rows  # reported per point, no longer a target
    assert rows["n200_memory_gib"]["met"] is False and rows["n200_memory_gib"]["note"] == "out of memory"
    assert rows["n200_epoch_seconds"]["measured"] is None and rows["n200_epoch_seconds"]["met"] is None
    points[0]["patches_per_s"] = 80_000.0
    assert {r["name"]: r for r in throughput_targets(points, env)}["n20_patches_per_s"]["met"] is False
    points[1].update(status="ok", images_per_s=500.0, peak_memory_bytes=6 * 2**30)  # 50,000 images in 100 s
    rows = {r["name"]: r for r in throughput_targets(points, {**env, "device_name": "NVIDIA H200"})}
    assert rows["n200_epoch_seconds"]["measured"] == pytest.approx(100.0) and rows["n200_epoch_seconds"]["met"] is True
    assert rows["n200_memory_gib"]["met"] is True and rows["n200_epoch_seconds"]["on_target_hardware"]


def test_eval_schedule():
    assert eval_schedule(10, 4) == [4, 8, 10]
    assert eval_schedule(8, 4) == [4, 8]
    assert eval_schedule(3, 5) == [3]


# ------------------------------------------------------------------------------ baseline


@pytest.mark.parametrize("fused", [False, True])
def test_baseline_loss_matches_fastemp(fused):
    """Per-patch d x d logdet loop + unfused cosine loop == projection_loss_terms: values and dL/dp."""
    if fused and not triton_usable("cpu"):
        pytest.skip("the fused path needs TRITON_INTERPRET=1 on the CPU")
    torch.manual_seed(1)
    p = torch.randn(4, 16, 24)
    cfg = LossConfig()
    ours = p.clone().requires_grad_(True)
    terms = projection_loss_terms(ours, cfg, fused=fused)
    terms.total.backward()
    theirs = p.clone().requires_grad_(True)
    base = baseline_loss_terms(F.normalize(theirs, dim=-1), cfg.eps, cfg.invariance_weight, cfg.tcr_weight)
    base.total.backward()
    for a, b in zip(terms, base):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), (a, b)
    assert torch.allclose(ours.grad, theirs.grad, rtol=1e-4, atol=1e-6)


def test_baseline_coding_rate_is_the_literal_formula():
    z = F.normalize(torch.randn(3, 10, 6, dtype=torch.float64), dim=-1)
    loop = torch.stack([coding_rate_dxd(z[i], 0.2) for i in range(3)])
    assert torch.allclose(loop, reference_total_coding_rate(z, 0.2), rtol=1e-12)


def test_baseline_augmentation_shapes_and_ranges():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (6, 32, 32, 3), dtype=torch.uint8)
    aug = AugmentConfig()
    item = PerPatchDataset(images, 3, aug)[2]
    assert item.shape == (3, 3, 32, 32) and item.dtype == torch.float32
    assert torch.isfinite(item).all()
    assert item.min() >= -1.0 - 1e-6 and item.max() <= 1.0 + 1e-6  # (x - 0.5) / 0.5 of x in [0, 1]
    assert not torch.equal(item[0], item[1])  # every patch draws its own augmentation
    batch = next(iter(make_loader(images, 3, 4, aug, workers=1, pin_memory=False)))
    assert batch.shape == (4, 3, 3, 32, 32)


def test_to_patch_major_order():
    batch = torch.arange(2 * 3).view(2, 3, 1, 1, 1).float()  # image b, patch i -> value 3b + i
    flat = to_patch_major(batch).flatten()
    assert flat.tolist() == [0, 3, 1, 4, 2, 5]  # row i*B + b is patch i of image b


# ------------------------------------------------------------------------------ instrumented step


@pytest.mark.parametrize("grad_chunks", [1, 2])
def test_clocked_step_matches_train_until(grad_chunks):
    """The split's clock marks every phase of a step and changes nothing it computes."""
    cfg = load_config(
        "quickstart",
        BENCH_TINY
        + [
            "train.device=cpu",
            "train.n_patches=2",
            "train.batch_size=8",
            f"train.grad_chunks={grad_chunks}",
            "train.max_steps=4",
        ],
    )
    plain, timed = Trainer(cfg, None, progress=False), Trainer(cfg, None, progress=False)
    plain.train_until(1)
    clock = Clock(torch.device("cpu"))
    terms = timed.train_step(clock)
    assert timed.step == 1 and torch.isfinite(terms.total)
    assert [name for name, _ in clock.intervals()] == list(PHASES)
    for (name, a), b in zip(plain.model.state_dict().items(), timed.model.state_dict().values()):
        assert torch.equal(a, b), name


# ------------------------------------------------------------------------------ CLI, end to end


@pytest.fixture(scope="module")
def throughput_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("throughput")
    rc = main(
        [
            "bench",
            "throughput",
            *BENCH_CPU,
            *BENCH_TINY,
            "--n",
            "2",
            "--batch",
            "8",
            "--grad-chunks",
            "1,2",
            "--warmup",
            "1",
            "--steps",
            "3",
            "--split-steps",
            "2",
            "--baseline",
            "--baseline-workers",
            "1",
            "--baseline-steps",
            "2",
            "--peak-size",
            "256",
            "--out",
            str(out),
        ]
    )
    return rc, out


def test_cli_throughput(throughput_run):
    rc, out = throughput_run
    assert rc == 0
    result = load_strict_json(out / "throughput.json")
    check_throughput_schema(result)
    assert (out / "throughput.md").read_text().startswith("# Throughput")
    cfg = load_config("quickstart", BENCH_TINY)
    flops = flops_per_patch(cfg.model, image_size=32)
    assert result["flops_per_patch"] == flops  # MFU uses the model's own count
    assert [p["grad_chunks"] for p in result["points"]] == [1, 2]
    peak = result["peak"]["measured_tflops"]
    base = result["baselines"][0]
    assert base["status"] == "ok" and (base["n_patches"], base["batch_size"]) == (2, 8)
    for p in result["points"]:
        assert p["status"] == "ok", p.get("reason")
        assert p["flops_per_patch"] == flops
        assert p["patches_per_s"] == pytest.approx(2 * p["images_per_s"])
        assert p["images_per_s"] == pytest.approx(8 / p["step_seconds_median"])
        assert p["achieved_tflops"] == pytest.approx(p["patches_per_s"] * flops / 1e12)
        assert p["mfu"] == pytest.approx(p["achieved_tflops"] / peak)
        assert p["speedup_vs_baseline"] == pytest.approx(p["images_per_s"] / base["images_per_s"])
        assert len(p["step_seconds"]) == 3 and p["split"]["steps"] == 2
        assert p["split"]["forward_backward"] > 0 and p["resolved"]["compile"] == "none"
    assert result["environment"]["device"] == "cpu" and result["peak"]["dtype"] == "float32"


def test_cli_kernels(tmp_path):
    rc = main(
        [
            "bench",
            "kernels",
            "--device",
            "cpu",
            "--threads",
            "1",
            "--n",
            "3",
            "--batch",
            "8",
            "--dim",
            "16",
            "--warmup",
            "1",
            "--iters",
            "2",
            "--no-compile",
            "--images",
            "32",
            "--baseline-aug-patches",
            "4",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0
    result = load_strict_json(tmp_path / "kernels.json")
    check_kernels_schema(result)
    rows = {(r["kernel"], r["impl"]): r for r in result["rows"]}
    assert rows[("tcr", "cholesky")]["timed"] and rows[("tcr", "loop")]["grad_max_abs_diff"] < 1e-4
    triton = rows[("cosine_to_mean", "triton")]
    assert not triton["timed"] and triton["seconds"] is None  # never a CPU time for Triton
    if triton_usable("cpu"):
        assert triton["status"] == "ok" and triton["grad_max_abs_diff"] < 1e-6
    backends = {r["impl"]: r for r in result["augmentation"]}
    assert backends["torch"]["patches_per_s"] > 0


def test_cli_time_to_accuracy(tmp_path):
    rc = main(
        [
            "bench",
            "time-to-accuracy",
            *BENCH_CPU,
            *BENCH_TINY,
            "train.n_patches=2",
            "train.batch_size=16",
            "train.epochs=2",
            "eval.mode=plain",
            "eval.probe_epochs=1",
            "--target",
            "0.0",
            "--eval-every",
            "2",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0
    result = load_strict_json(tmp_path / "time_to_accuracy.json")
    check_tta_schema(result)
    assert result["reached"] and len(result["evals"]) == 1  # stops at the first evaluation at the target
    assert result["steps"] == 2 and result["images_seen"] == 32 and result["epochs"] == pytest.approx(0.5)
    assert result["train_seconds"] == pytest.approx(result["evals"][0]["train_seconds_excl_first_step"])
    assert result["protocol"]["probe_epochs"] == 1 and "synthetic" in result["data"]
    assert (tmp_path / "time_to_accuracy.png").stat().st_size > 0


def test_cli_tune_writes_a_loadable_config(tmp_path):
    out = tmp_path / "tuned.yaml"
    rc = main(
        [
            "tune",
            *BENCH_CPU,
            *BENCH_TINY,
            "train.n_patches=2",
            "train.batch_size=8",
            "--warmup",
            "1",
            "--steps",
            "2",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    report = load_strict_json(tmp_path / "tuned.json")
    best = report["best"]
    assert {p["batch_size"] for p in report["points"]} == {8, 16}  # default: B and 2B
    cfg = load_config(out)
    assert cfg.train.batch_size == best["batch_size"] and cfg.train.n_patches == 2  # n is kept
    assert cfg.data.backend == best["resolved"]["backend"] and cfg.model.compile == "none"
    assert cfg.train.max_steps == 0 and cfg.model.width == 8  # the user's settings, not the benchmark's
    assert best["images_per_s"] == max(p["images_per_s"] for p in report["points"] if p["fits_budget"])


# ------------------------------------------------------------------------------ report


def test_report_regenerates_the_readme_table(throughput_run, tmp_path, capsys):
    _, out = throughput_run
    results = tmp_path / "benchmarks" / "results"
    (results / "cpu").mkdir(parents=True)
    (results / "cpu" / "throughput.json").write_text((out / "throughput.json").read_text())
    tables = render_tables(results)
    point = load_strict_json(out / "throughput.json")["points"][0]
    assert "| device |" in tables and common.fmt(point["images_per_s"]) in tables
    assert "benchmarks/results/cpu/throughput.json" in tables

    readme = tmp_path / "README.md"
    readme.write_text(f"# project\n\n{START}\nstale\n{END}\n\nmore text\n")
    assert update_readme(results, readme, check=True) == 1  # stale
    assert main(["bench", "report", "--results", str(results), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "stale" not in text and text.startswith("# project") and text.endswith("more text\n")
    assert splice(text, tables) == text and update_readme(results, readme, check=True) == 0

    bare = tmp_path / "BARE.md"
    bare.write_text("no markers\n")
    assert update_readme(results, bare) == 0 and bare.read_text() == "no markers\n"
    assert "| device |" in capsys.readouterr().out  # printed instead


def test_the_readme_table_is_the_committed_results():
    """The README's table is regenerated from benchmarks/results whenever a result lands (pipeline checks,
    *_check.json, stay out of it)."""
    repo = Path(__file__).resolve().parents[1]
    assert update_readme(repo / "benchmarks" / "results", repo / "README.md", check=True) == 0
    assert "_check.json" not in render_tables(repo / "benchmarks" / "results")


def test_strict_json_has_no_nan(tmp_path):
    json_path, _ = common.write_results(tmp_path, "x", {"a": float("nan"), "b": [math.inf, 1.0]}, "# x")
    assert load_strict_json(json_path) == {"a": None, "b": [None, 1.0]}


def test_report_shortens_data_descriptions():
    from fastemp.benchmarks.report import _short_data

    long = (
        "imagefolder (/data/x/cifar10-jpeg.tar.gz, decoded with DALI on cpu, from cache /c/a.npy), train, "
        "50000 images, 10 classes"
    )
    assert _short_data(long) == "imagefolder cifar10-jpeg.tar.gz, 50000 images"
    assert (
        _short_data("synthetic (shapes and textures, 32x32, seed 0), train, 2000 images, 10 classes")
        == "synthetic, 2000 images"
    )


def test_results_never_overwrite_without_force(tmp_path, capsys):
    # decided before measuring: a fresh --out folder keeps the plain name, an existing result gets -2, -3
    assert common.results_target(str(tmp_path / "fresh"), "throughput", "cpu", False) == (
        tmp_path / "fresh",
        "throughput",
    )
    assert capsys.readouterr().err == ""
    (tmp_path / "throughput.json").write_text("{}")
    assert common.results_target(str(tmp_path), "throughput", "cpu", False) == (tmp_path, "throughput-2")
    assert "throughput.json exists" in capsys.readouterr().err
    (tmp_path / "throughput-2.md").write_text("")
    assert common.results_target(str(tmp_path), "throughput", "cpu", False)[1] == "throughput-3"
    assert common.results_target(str(tmp_path), "throughput", "cpu", True)[1] == "throughput"
    # the default folder is benchmarks/results/<device> under the working directory
    assert common.results_target(None, "kernels", "cpu", False)[0] == Path("benchmarks/results/cpu")
