"""`fastemp tune` on the CPU: the speed-only settings, the winner written as a config, streamed recipes on the
backends their data allows (Pillow; DALI's CPU operators where they import), and a failure named as such."""

import json

import pytest
from tiny_run import BENCH_CPU, BENCH_TINY

from fastemp.benchmarks import tune
from fastemp.cli import main
from fastemp.config import load_config
from fastemp.data.synthetic import make_folder
from fastemp.patches import dali_available


def test_tune_sweeps_the_settings_and_writes_the_winner(tmp_path, capsys):
    out = tmp_path / "tuned.yaml"
    argv = ["tune", *BENCH_CPU, *BENCH_TINY, "train.n_patches=2", "train.batch_size=8", "--cudnn-benchmark", "off,on"]
    assert main([*argv, "--patch-compile", "off", "--warmup", "0", "--steps", "1", "--out", str(out)]) == 0
    report = json.loads((tmp_path / "tuned.json").read_text())
    points = [(p["batch_size"], p["cudnn_benchmark"], p["patch_compile"]) for p in report["points"]]
    assert points == [(8, "off", "off"), (16, "off", "off"), (8, "on", "off"), (16, "on", "off")]  # B and 2B
    assert all(p["status"] == "ok" and p["fits_budget"] for p in report["points"])
    best, cfg = report["best"], load_config(out)
    assert best["images_per_s"] == max(p["images_per_s"] for p in report["points"])
    assert cfg.train.batch_size == best["batch_size"] and cfg.train.n_patches == 2  # n is kept
    assert cfg.model.cudnn_benchmark == (best["cudnn_benchmark"] == "on") and cfg.model.compile == "none"
    assert cfg.train.max_steps == 0 and cfg.model.width == 8  # the user's settings, not the benchmark's
    assert "- winner:" in (tmp_path / "tuned.md").read_text() and "train with" in capsys.readouterr().out


@pytest.mark.parametrize("backend", ["pillow", "dali"])
def test_a_streamed_recipe_is_tuned_on_the_backends_its_data_allows(tmp_path, backend):
    """Streamed files: tune offers Pillow (and DALI where it imports), never the resident torch backend."""
    if backend == "dali" and not dali_available():
        pytest.skip("nvidia.dali does not import here")
    folder = make_folder(tmp_path / "jpegs", classes=2, per_class=8, size=40, test_per_class=2)
    keys = [f"data.path={folder}", "data.workers=0", "train.n_patches=2", "model.width=8", "model.hidden_dim=16"]
    keys += ["model.z_dim=8", "augment.crop_size=16", "model.stem=cifar"]
    argv = ["tune", "--config", "imagenet100_n20", "--device", "cpu", "--threads", "1", *keys, "--batch", "4"]
    assert main([*argv, "--warmup", "0", "--steps", "1", "--out", str(tmp_path / "tuned.yaml")]) == 0
    report = json.loads((tmp_path / "tuned.json").read_text())
    offered = {p["backend"] for p in report["points"]}
    assert offered == ({"pillow", "dali"} if dali_available() else {"pillow"})
    assert {p["resolved"]["backend"] for p in report["points"] if p["status"] == "ok"} == offered
    assert load_config(tmp_path / "tuned.yaml").data.backend in offered


def test_a_failed_point_is_not_blamed_on_the_memory_budget(tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a backend error")

    monkeypatch.setattr(tune, "measure_point", broken)
    argv = ["tune", *BENCH_CPU, *BENCH_TINY, "train.n_patches=2", "--batch", "8", "--steps", "1"]
    assert main([*argv, "--out", str(tmp_path / "tuned.yaml")]) == 1
    out = capsys.readouterr().out
    assert "every point failed (RuntimeError: a backend error)" in out and "within the memory budget" not in out
    assert not (tmp_path / "tuned.yaml").exists()


def test_chunks_grow_by_whole_groups():
    assert tune.more_chunks(1, 20, 0) == 2 and tune.more_chunks(16, 20, 0) == 20 and tune.more_chunks(20, 20, 0) is None
    assert tune.more_chunks(2, 200, 10) == 5 and tune.more_chunks(10, 200, 10) is None
    assert tune.more_chunks(0, 200, 10) is None  # chosen from free memory already
