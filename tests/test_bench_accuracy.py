"""`fastemp bench accuracy` and the protocol options of `bench time-to-accuracy`, on tiny synthetic runs."""

import json
import math
import statistics

import pytest

from fastemp.benchmarks import accuracy
from fastemp.benchmarks.accuracy import ROWS, data_copy, data_overrides, parse_seeds, run_accuracy, select_rows
from fastemp.cli import main
from fastemp.config import DataConfig

TINY = [
    "data.source=synthetic",
    "data.synthetic_train=60",
    "data.synthetic_test=20",
    "model.width=8",
    "model.hidden_dim=32",
    "model.z_dim=16",
    "train.n_patches=2",
    "train.batch_size=20",
    "eval.patches=2",
    "eval.probe_epochs=2",
    "eval.probe_batch_size=20",
    "eval.batch_size=10",
]

ROW_KEYS = (
    "dataset",
    "data_copy",
    "n_patches",
    "epochs_trained",
    "schedule_epochs",
    "eval_patches",
    "probe_epochs",
    "protocol",
    "seeds",
    "linear_top1",
    "linear_top1_mean",
    "linear_top1_std",
    "best_top1_on_test_mean",
    "knn_top1_mean",
    "official_linear_top1",
    "train_seconds",
    "train_seconds_mean",
    "eval_seconds",
)


def test_cli_accuracy_writes_every_seed_beside_the_official_figure(tmp_path):
    rc = main(
        [
            "bench",
            "accuracy",
            "--device",
            "cpu",
            "--rows",
            "c10_n20_official_1ep",
            "--seeds",
            "2",
            "--variant",
            "fp32",
            "model.precision=fp32 eval.protocol=cheap",
            *TINY,
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0
    result = json.loads((tmp_path / "accuracy.json").read_text())
    assert result["benchmark"] == "accuracy" and result["partial"] is False
    assert {"device", "versions", "commit"} <= set(result)
    rows = {r["row"]: r for r in result["rows"]}
    assert list(rows) == [
        "c10_n20_official_1ep@1",
        "c10_n20_official_1ep@2",
        "c10_n20_official_1ep+fp32@1",
        "c10_n20_official_1ep+fp32@2",
    ]
    for row in rows.values():
        assert all(key in row for key in ROW_KEYS), set(ROW_KEYS) - set(row)
        assert row["status"] == "complete" and row["seeds"] == [0, 1] and len(row["linear_top1"]) == 2
        assert row["linear_top1_mean"] == pytest.approx(sum(row["linear_top1"]) / 2)
        assert row["schedule_epochs"] == 2 and row["n_patches"] == 2 and "synthetic" in row["data_copy"]
    first, second = rows["c10_n20_official_1ep@1"], rows["c10_n20_official_1ep@2"]
    assert (first["epochs_trained"], first["official_linear_top1"]) == (1, 0.842)
    assert (second["epochs_trained"], second["official_linear_top1"]) == (2, None)
    assert all(a < b for a, b in zip(first["train_seconds"], second["train_seconds"]))  # one run, two checkpoints
    assert first["protocol"] == "custom" and first["eval_patches"] == 2 and first["probe_epochs"] == 2
    # the variant's overrides come last: eval.protocol=cheap resets every protocol key
    variant = rows["c10_n20_official_1ep+fp32@1"]
    assert (variant["protocol"], variant["eval_patches"], variant["probe_epochs"]) == ("cheap", 16, 20)
    markdown = (tmp_path / "accuracy.md").read_text()
    assert "not an accuracy claim" in markdown and "84.20" in markdown and "best on test" in markdown


def test_budget_skips_seeds_that_would_end_past_it_and_every_seed_is_written(tmp_path):
    written = []
    rows = select_rows(["c10_n20_1ep"])
    result = run_accuracy(
        rows,
        [0, 1, 2],
        TINY + ["train.device=cpu"],
        {},
        budget=1e-3,
        on_progress=lambda r: written.append(json.loads(json.dumps(r))),
    )
    row = result["rows"][0]
    assert row["seeds"] == [0] and row["status"] == "partial" and "--budget" in row["reason"]
    assert "from warm steps" in row["reason"]
    assert written and written[0]["partial"] and written[0]["rows"][0]["linear_top1"] == row["linear_top1"]


def test_a_row_without_its_data_is_skipped_not_downloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no archive under the default data.root
    result = run_accuracy(select_rows(["c100_n20_official_1ep"]), [0], ["train.device=cpu"], {})
    row = result["rows"][0]
    assert row["status"] == "skipped" and "cifar100" in row["reason"] and row["linear_top1"] == []


def test_rows_seeds_and_data_copies(tmp_path):
    assert parse_seeds("3") == [0, 1, 2] and parse_seeds("4,7") == [4, 7] and parse_seeds("next:2") == 2
    for bad in ("0", "next:0", "x"):
        with pytest.raises(ValueError, match="--seeds"):
            parse_seeds(bad)
    assert [r.name for r in select_rows(None)] == [r.name for r in ROWS]
    with pytest.raises(ValueError, match="unknown rows nope"):
        select_rows(["nope"])
    variants = select_rows(["c10_n20_1ep", "c10_n20_10ep"], [("bn", "train.grad_chunks=2")])
    assert [r.name for r in variants][2:] == ["c10_n20_1ep+bn", "c10_n20_10ep+bn"]
    assert variants[2].overrides == ("train.grad_chunks=2",)
    first = select_rows(["c10_n20_official_1ep@1"])[0]
    assert (first.name, first.eval_epochs, first.official, first.schedule_epochs) == (
        "c10_n20_official_1ep@1",
        (1,),
        (0.842,),
        2,
    )
    with pytest.raises(ValueError, match="unknown rows c10_n20_1ep@3"):
        select_rows(["c10_n20_1ep@3"])
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"")
    assert data_overrides("cifar10", {"cifar10": str(tmp_path)}) == [
        "data.source=cifar10",
        f"data.root={tmp_path}",
        "data.download=false",
    ]
    assert data_overrides("cifar10", {"cifar10": "/d/cifar10-jpeg.tar.gz"}) == [
        "data.source=imagefolder",
        "data.path=/d/cifar10-jpeg.tar.gz",
    ]
    assert data_copy(DataConfig(source="cifar10")) == "canonical archive (cifar-10-python.tar.gz)"
    assert data_copy(DataConfig(source="imagefolder", path="/d/cifar10-jpeg.tar.gz")).startswith("JPEG copy")


def test_time_to_accuracy_states_its_protocol_and_the_offset_on_the_same_weights(tmp_path):
    rc = main(
        [
            "bench",
            "time-to-accuracy",
            "--config",
            "quickstart",
            "--device",
            "cpu",
            *[o for o in TINY if not o.startswith("eval.")],
            "data.synthetic_train=100",
            "train.epochs=1",
            "--protocol",
            "official",
            "eval.patches=2",
            "eval.probe_epochs=2",
            "--compare-protocol",
            "cheap",
            "--target",
            "1.01",
            "--eval-every",
            "3",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0
    result = json.loads((tmp_path / "time_to_accuracy.json").read_text())
    assert result["protocol"]["name"] == "custom" and result["protocol"]["eval_patches"] == 2
    assert result["config"]["eval"]["probe_lr"] == 0.03 and result["config"]["eval"]["probe_epochs"] == 2
    assert len(result["evals"]) == 2 and all("cheap_linear_top1" in e for e in result["evals"])
    offset = result["protocol_offset"]
    assert offset["versus"] == "cheap" and offset["per_evaluation"] == [
        pytest.approx(e["linear_top1"] - e["cheap_linear_top1"]) for e in result["evals"]
    ]
    assert result["final_best_top1_on_test"] == result["evals"][-1]["best_top1_on_test"]
    markdown = (tmp_path / "time_to_accuracy.md").read_text()
    assert "**custom protocol**" in markdown and "offset (custom - cheap)" in markdown


def test_time_to_accuracy_defaults_to_the_official_protocol():
    from fastemp.cli import build_parser

    args = build_parser().parse_args(["bench", "time-to-accuracy"])
    assert args.protocol == "official" and args.compare_protocol is None


def test_a_misspelt_variant_or_row_is_one_line_before_anything_runs(tmp_path, capsys):
    assert (
        main(["bench", "accuracy", "--device", "cpu", "--variant", "x", "train.n_pathces=3", "--out", str(tmp_path)])
        == 2
    )
    assert main(["bench", "accuracy", "--device", "cpu", "--rows", "c10_n21", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'n_patches'" in err and "unknown rows c10_n21" in err and not list(tmp_path.iterdir())


def accumulate(tmp_path, seeds: str) -> dict:
    args = ["bench", "accuracy", "--device", "cpu", "--rows", "c10_n20_1ep", "--seeds", seeds, *TINY]
    assert main([*args, "--accumulate", "--out", str(tmp_path)]) == 0
    return json.loads((tmp_path / "accuracy.json").read_text())


def test_seeds_accumulate_in_one_file_and_are_not_measured_twice(tmp_path, monkeypatch):
    monkeypatch.setattr(accuracy, "_SEEDS_IN_THIS_PROCESS", [0])  # as in a fresh process
    first = accumulate(tmp_path, "next:1")
    assert [r["seed"] for r in first["runs"]] == [0] and first["seeds"] == "next:1"
    second = accumulate(tmp_path, "0,1")  # a later machine adds to the same file; seed 0 is not run again
    assert [r["seed"] for r in second["runs"]] == [0, 1] and second["runs"][0] == first["runs"][0]
    (row,) = second["rows"]
    assert row["seeds"] == [0, 1] and row["linear_top1_std"] is not None and row["status"] == "complete"
    assert "seeds [0] already measured" in row["reason"]
    run = second["runs"][-1]
    assert [r["timing"]["warm_cache"] for r in second["runs"]] == [False, True]  # one process here
    assert run["timing"]["steps"] == 3 and run["config_key"] == row["config_key"]
    assert {"linear_top1", "best_top1_on_test", "knn_top1", "train_seconds", "eval_seconds", "images_per_s"} <= set(run)
    # other overrides are another config: a row of its own, its seeds counted apart
    args = ["bench", "accuracy", "--device", "cpu", "--rows", "c10_n20_1ep", "--seeds", "next:1", *TINY]
    assert main([*args, "loss.eps=0.3", "--accumulate", "--out", str(tmp_path)]) == 0
    fourth = json.loads((tmp_path / "accuracy.json").read_text())
    assert [(r["seeds"], r["status"]) for r in fourth["rows"]] == [([0, 1], "earlier runs"), ([0], "complete")]


def test_budget_predicts_a_seed_from_warm_steps():
    def record(first_step, warm_cache, row="r"):
        timing = dict(setup_seconds=5.0, first_step_seconds=first_step, steps=501, warm_step_seconds=0.03)
        return {"row": row, "config_key": "k", "timing": dict(timing, eval_seconds=60.0, warm_cache=warm_cache)}

    cold = record(50.0, False)
    accuracy._SEEDS_IN_THIS_PROCESS[0] = 0
    clock = accuracy.BudgetClock(100.0, [cold])
    assert clock.predict("r", "k") == pytest.approx(5 + 50 + 0.03 * 500 + 60)  # a new process compiles again
    assert clock.fits("r", "k")[0] is False and clock.predict("other", "k") is None
    accuracy._SEEDS_IN_THIS_PROCESS[0] = 1  # this process ran a seed: its compiled code is warm
    assert clock.predict("r", "k") == pytest.approx(5 + accuracy.RECOMPILE_ALLOWANCE_SECONDS + 15 + 60)
    clock.record(record(8.0, True))
    assert clock.predict("r", "k") == pytest.approx(5 + 8 + 15 + 60)  # measured replaces the allowance
    accuracy._SEEDS_IN_THIS_PROCESS[0] = 0


def fastemp_record(seed, top1, **extra):
    base = dict(row="c10_n20_official_1ep@1", recipe="c10_n20_official_1ep", config_key="k", seed=seed)
    base.update(overrides=["train.device=cuda", "model.compile=none"], n_patches=20, epochs_trained=1)
    base.update(schedule_epochs=2, data_file="cifar10-jpeg.tar.gz", protocol="official", official_linear_top1=0.842)
    base.update(linear_top1=top1, best_top1_on_test=top1 + 0.01, knn_top1=top1 - 0.05, images_per_s=3400.0)
    return {**base, "train_seconds": 15.0, "first_step_seconds": 40.0, "eval_seconds": 70.0, **extra}


def peer_result(status, seed, top1, overrides=("model.compile=none",)):
    return {
        "status": status,
        "official": {"seed": seed, "n_patches": 20, "schedule_epochs": 2},
        "training": {"epochs": [{"done": True, "loop_seconds": 140.0}], "images_per_s": 340.0},
        "evaluation": {"epochs_trained": 1, "eval_protocol": "official", "linear_top1": top1, "eval_seconds": 65.0}
        if top1
        else {},
        "data": {"path": "/x/cifar10-jpeg.tar.gz"},
        "overrides": list(overrides),
        "environment": {"commit": "abc"},
    }


def test_official_runs_join_the_file_and_the_difference_has_its_uncertainty(tmp_path):
    path, peer = tmp_path / "accuracy.json", tmp_path / "official_peer.json"
    path.write_text(json.dumps({"benchmark": "accuracy", "runs": [fastemp_record(0, 0.80), fastemp_record(1, 0.82)]}))
    assert accuracy.plan(path) == {"official_seed": 0, "eval_seconds": round(70 * 1.25 + 15)}
    peer.write_text(json.dumps(peer_result("TIMEOUT", 0, None)))
    accuracy.add_official(path, peer)
    assert accuracy.read_result(path)["comparison"] == []  # a failed run is listed, never compared
    peer.write_text(json.dumps(peer_result("PASS", 0, 0.79)))
    result = accuracy.add_official(path, peer)
    assert accuracy.plan(path)["official_seed"] == 1
    (c,) = result["comparison"]
    std = statistics.stdev([0.80, 0.82])
    assert c["delta"] == pytest.approx(0.81 - 0.79) and c["images_per_s_ratio"] == pytest.approx(10.0)
    assert c["delta_standard_error"] == pytest.approx(std * math.sqrt(1 / 2 + 1)) and "standing in" in c["uncertainty"]
    peer.write_text(json.dumps(peer_result("PASS", 1, 0.77)))
    (c,) = accuracy.add_official(path, peer)["comparison"]
    assert c["delta"] == pytest.approx(0.81 - 0.78) and "both sides" in c["uncertainty"]
    assert c["delta_standard_error"] == pytest.approx(math.sqrt(std**2 / 2 + statistics.stdev([0.79, 0.77]) ** 2 / 2))
    peer.write_text(json.dumps(peer_result("PASS", 2, 0.5, overrides=())))  # another evaluation: not paired
    result = accuracy.add_official(path, peer)
    assert result["comparison"][0]["official_seeds"] == [0, 1] and len(result["official_runs"]) == 4
    markdown = (tmp_path / "accuracy.md").read_text()
    assert "fastemp - official" in markdown and "Δ = +3.00 ± " in markdown and "84.20" in markdown
    assert "| TIMEOUT |" in markdown and "best on test" in markdown and "official code on the same data" in markdown
    assert accuracy.difference([0.8], [0.7])[1] is None
