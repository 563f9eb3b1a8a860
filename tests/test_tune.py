"""`fastemp tune` over the speed-only settings (cudnn.benchmark, compiled patch recipe) on the CPU."""

import json

from tiny_run import BENCH_CPU, BENCH_TINY

from fastemp.benchmarks.tune import more_chunks, settings_variants
from fastemp.cli import main
from fastemp.config import load_config


def test_tune_sweeps_the_settings_and_writes_the_winner(tmp_path, capsys):
    out = tmp_path / "tuned.yaml"
    rc = main(
        [
            "tune",
            *BENCH_CPU,
            *BENCH_TINY,
            "train.n_patches=2",
            "--batch",
            "8",
            "--cudnn-benchmark",
            "off,on",
            "--patch-compile",
            "off",
            "--warmup",
            "0",
            "--steps",
            "1",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    report = json.loads((tmp_path / "tuned.json").read_text())
    assert [(p["cudnn_benchmark"], p["patch_compile"]) for p in report["points"]] == [("off", "off"), ("on", "off")]
    assert all(p["status"] == "ok" for p in report["points"])
    best = report["best"]
    cfg = load_config(out)
    assert cfg.model.cudnn_benchmark == (best["cudnn_benchmark"] == "on") and cfg.data.patch_compile == "off"
    assert "- winner:" in capsys.readouterr().out and "cudnn_benchmark=" in out.read_text()


def test_settings_default_to_the_config_and_chunks_grow_by_whole_groups():
    base = load_config("quickstart", ["model.cudnn_benchmark=true"])
    assert settings_variants(base, {}) == [{"cudnn_benchmark": True, "patch_compile": "auto"}]
    assert more_chunks(1, 20, 0) == 2 and more_chunks(16, 20, 0) == 20 and more_chunks(20, 20, 0) is None
    assert more_chunks(2, 200, 10) == 5 and more_chunks(5, 200, 10) == 10 and more_chunks(10, 200, 10) is None
    assert more_chunks(0, 200, 10) is None  # chosen from free memory already
