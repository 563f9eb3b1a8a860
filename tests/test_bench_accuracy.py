"""The accuracy driver (`fastemp bench accuracy` and `time-to-accuracy`) over the Trainer's periodic evaluation, on
tiny synthetic runs: seeds, rows, the results file they accumulate in, the budget, the official code's runs beside
fastemp's with the uncertainty of the difference, and time to accuracy with its milestones."""

import json
import math
import statistics

import pytest

from fastemp.benchmarks import accuracy, accuracy_report
from fastemp.benchmarks.accuracy import ROWS, data_names, data_overrides, parse_seeds, select_rows
from fastemp.cli import main
from fastemp.config import DataConfig
from fastemp.errors import UserError

TINY = "data.source=synthetic data.synthetic_train=60 data.synthetic_test=20 model.width=8 model.hidden_dim=32"
TINY += " model.z_dim=16 train.n_patches=2 train.batch_size=20 eval.patches=2 eval.probe_epochs=2"
TINY = [*TINY.split(), "eval.probe_batch_size=20", "eval.batch_size=10"]
ROW_KEYS = {"dataset", "data_copy", "n_patches", "epochs_trained", "schedule_epochs", "eval_patches", "probe_epochs"}
ROW_KEYS |= {"protocol", "seeds", "linear_top1", "linear_top1_mean", "linear_top1_std", "best_top1_on_test_mean"}
ROW_KEYS |= {"knn_top1_mean", "official_linear_top1", "train_seconds", "train_seconds_mean", "eval_seconds"}


def bench(tmp_path, *argv: str) -> dict:
    assert main(["bench", "accuracy", "--device", "cpu", *argv, *TINY, "--out", str(tmp_path)]) == 0
    return json.loads((tmp_path / "accuracy.json").read_text())


def test_every_seed_beside_the_official_figure(tmp_path):
    result = bench(tmp_path, "--rows", "c10_n20_official_1ep", "--seeds", "2", "--variant", "v", "eval.probe_epochs=3")
    assert result["benchmark"] == "accuracy" and result["partial"] is False and result["environment"]["torch"]
    rows = {r["row"]: r for r in result["rows"]}
    names = ["c10_n20_official_1ep@1", "c10_n20_official_1ep@2", "c10_n20_official_1ep+v@1", "c10_n20_official_1ep+v@2"]
    assert list(rows) == names
    for row in rows.values():
        assert ROW_KEYS <= set(row) and row["status"] == "complete" and row["seeds"] == [0, 1]
        assert row["linear_top1_mean"] == pytest.approx(sum(row["linear_top1"]) / 2) and row["schedule_epochs"] == 2
    first, second = rows["c10_n20_official_1ep@1"], rows["c10_n20_official_1ep@2"]
    assert (first["epochs_trained"], first["official_linear_top1"], second["official_linear_top1"]) == (1, 0.842, None)
    assert all(a < b for a, b in zip(first["train_seconds"], second["train_seconds"]))  # one run, two evaluations
    assert first["protocol"] == "custom" and rows["c10_n20_official_1ep+v@1"]["probe_epochs"] == 3
    run = result["runs"][0]
    assert run["step"] == 3 and run["timing"]["steps"] == 6 and run["first_step_seconds"] > 0 and run["runtime"]
    markdown = (tmp_path / "accuracy.md").read_text()
    assert "not an accuracy claim" in markdown and "84.20" in markdown and "variant v" in markdown


def test_seeds_accumulate_in_one_file_and_the_budget_skips_what_would_not_fit(tmp_path, monkeypatch):
    monkeypatch.setattr(accuracy, "_SEEDS_IN_THIS_PROCESS", [0])  # as in a fresh process
    first = bench(tmp_path, "--rows", "c10_n20_1ep", "--seeds", "next:1", "--accumulate")
    assert [r["seed"] for r in first["runs"]] == [0] and first["seeds"] == "next:1"
    second = bench(tmp_path, "--rows", "c10_n20_1ep", "--seeds", "0,1", "--accumulate")  # seed 0 is not run again
    assert [r["seed"] for r in second["runs"]] == [0, 1] and second["runs"][0] == first["runs"][0]
    (row,) = second["rows"]
    assert (
        row["seeds"] == [0, 1] and row["linear_top1_std"] is not None and "seeds [0] already measured" in row["reason"]
    )
    assert [r["timing"]["warm_cache"] for r in second["runs"]] == [False, True]
    third = bench(tmp_path, "--rows", "c10_n20_1ep", "--seeds", "next:2", "--accumulate", "--budget", "0.001")
    assert third["rows"][0]["status"] == "partial" and "predicted" in third["rows"][0]["reason"]
    assert len(third["runs"]) == 2  # nothing run: every seed was predicted to end past the budget
    fourth = bench(tmp_path, "--rows", "c10_n20_1ep", "--seeds", "next:1", "loss.eps=0.3", "--accumulate")
    assert [(r["seeds"], r["status"]) for r in fourth["rows"]] == [([0, 1], "earlier runs"), ([0], "complete")]


def test_a_row_without_its_data_is_skipped_not_downloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no archive under the default data.root
    assert (
        main(["bench", "accuracy", "--device", "cpu", "--rows", "c100_n20_official_1ep", "--out", str(tmp_path)]) == 0
    )
    (row,) = json.loads((tmp_path / "accuracy.json").read_text())["rows"]
    assert row["status"] == "skipped" and "cifar100" in row["reason"] and row["linear_top1"] == []


def test_rows_seeds_and_data_copies(tmp_path):
    assert parse_seeds("3") == [0, 1, 2] and parse_seeds("4,7") == [4, 7] and parse_seeds("next:2") == 2
    assert parse_seeds("3,") == [3]
    for bad in ("0", "next:0", "x", "1,x"):
        with pytest.raises(UserError, match="--seeds"):
            parse_seeds(bad)
    assert [r.name for r in select_rows(None)] == [r.name for r in ROWS]
    variants = select_rows(["c10_n20_1ep", "c10_n20_10ep"], [("bn", "train.grad_chunks=2")])
    assert [r.name for r in variants][2:] == ["c10_n20_1ep+bn", "c10_n20_10ep+bn"]
    first = select_rows(["c10_n20_official_1ep@1"])[0]
    assert (first.eval_epochs, first.official, first.schedule_epochs) == ((1,), (0.842,), 2)
    with pytest.raises(UserError, match="unknown rows c10_n20_1ep@3"):
        select_rows(["c10_n20_1ep@3"])
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"")
    canonical = ["data.source=cifar10", f"data.root={tmp_path}", "data.download=false"]
    assert data_overrides("cifar10", str(tmp_path)) == canonical
    assert data_overrides("cifar10", str(tmp_path / "cifar-10-python.tar.gz")) == canonical
    assert data_overrides("cifar10", "/d/cifar10-jpeg.tar.gz") == [
        "data.source=imagefolder",
        "data.path=/d/cifar10-jpeg.tar.gz",
    ]
    assert data_names(DataConfig(source="cifar10")) == (
        "cifar-10-python.tar.gz",
        "canonical archive (cifar-10-python.tar.gz)",
    )
    assert data_names(DataConfig(source="imagefolder", path="/d/cifar10-jpeg.tar.gz"))[1].startswith("JPEG copy")


def test_the_budget_predicts_a_seed_from_warm_steps(monkeypatch):
    def record(first_step, warm_cache):
        timing = dict(setup_seconds=5.0, first_step_seconds=first_step, steps=501, warm_step_seconds=0.03)
        return {"row": "r", "config_key": "k", "timing": dict(timing, eval_seconds=60.0, warm_cache=warm_cache)}

    monkeypatch.setattr(accuracy, "_SEEDS_IN_THIS_PROCESS", [0])
    history = [record(50.0, False)]
    assert accuracy.predict(history, "r", "k") == pytest.approx(5 + 50 + 0.03 * 500 + 60)  # a new process compiles
    assert accuracy.predict(history, "other", "k") is None
    accuracy._SEEDS_IN_THIS_PROCESS[0] = 1  # this process ran a seed: its compiled code is warm
    assert accuracy.predict(history, "r", "k") == pytest.approx(5 + accuracy.RECOMPILE_ALLOWANCE_SECONDS + 15 + 60)
    history.append(record(8.0, True))
    assert accuracy.predict(history, "r", "k") == pytest.approx(5 + 8 + 15 + 60)  # measured replaces the allowance


def fastemp_record(seed, top1):
    base = dict(row="c10_n20_official_1ep@1", recipe="c10_n20_official_1ep", config_key="k", seed=seed)
    base.update(overrides=["train.device=cuda", "model.compile=none"], n_patches=20, epochs_trained=1)
    base.update(schedule_epochs=2, data_file="cifar10-jpeg.tar.gz", protocol="official", official_linear_top1=0.842)
    base.update(linear_top1=top1, best_top1_on_test=top1 + 0.01, knn_top1=top1 - 0.05, images_per_s=3400.0)
    return {**base, "train_seconds": 15.0, "first_step_seconds": 40.0, "eval_seconds": 70.0}


def peer_result(status, seed, top1, overrides=("model.compile=none",)):
    evaluation = {"epochs_trained": 1, "eval_protocol": "official", "linear_top1": top1, "eval_seconds": 65.0}
    return {
        "status": status,
        "official": {"seed": seed, "n_patches": 20, "schedule_epochs": 2},
        "training": {"epochs": [{"done": True, "loop_seconds": 140.0}], "images_per_s": 340.0},
        "evaluation": evaluation if top1 else {},
        "data": {"path": "/x/cifar10-jpeg.tar.gz"},
        "overrides": list(overrides),
        "environment": {"commit": "abc"},
    }


def test_official_runs_join_the_file_and_the_difference_has_its_uncertainty(tmp_path):
    path, peer = tmp_path / "accuracy.json", tmp_path / "official_peer.json"
    path.write_text(json.dumps({"benchmark": "accuracy", "runs": [fastemp_record(0, 0.80), fastemp_record(1, 0.82)]}))
    assert accuracy_report.plan(path) == {"official_seed": 0, "eval_seconds": round(70 * 1.25 + 15)}
    peer.write_text(json.dumps(peer_result("TIMEOUT", 0, None)))
    assert accuracy_report.add_official(path, peer)["comparison"] == []  # a failed run is listed, never compared
    peer.write_text(json.dumps(peer_result("PASS", 0, 0.79)))
    (c,) = accuracy_report.add_official(path, peer)["comparison"]
    std = statistics.stdev([0.80, 0.82])
    assert accuracy_report.plan(path)["official_seed"] == 1
    assert c["delta"] == pytest.approx(0.81 - 0.79) and c["images_per_s_ratio"] == pytest.approx(10.0)
    assert c["delta_standard_error"] == pytest.approx(std * math.sqrt(1 / 2 + 1)) and "standing in" in c["uncertainty"]
    peer.write_text(json.dumps(peer_result("PASS", 1, 0.77)))
    (c,) = accuracy_report.add_official(path, peer)["comparison"]
    assert c["delta"] == pytest.approx(0.81 - 0.78) and "both sides" in c["uncertainty"]
    assert c["delta_standard_error"] == pytest.approx(math.sqrt(std**2 / 2 + statistics.stdev([0.79, 0.77]) ** 2 / 2))
    peer.write_text(json.dumps(peer_result("PASS", 2, 0.5, overrides=())))  # another evaluation: not paired
    result = accuracy_report.add_official(path, peer)
    assert result["comparison"][0]["official_seeds"] == [0, 1] and len(result["official_runs"]) == 4
    markdown = (tmp_path / "accuracy.md").read_text()
    assert "fastemp - official" in markdown and "| 3.00 | " in markdown and "| TIMEOUT |" in markdown
    assert accuracy_report.difference([0.8], [0.7])["delta_standard_error"] is None


def tta(tmp_path, *argv: str) -> dict:
    tiny = [o for o in TINY if not o.startswith("eval.")] + ["eval.mode=plain", "eval.probe_epochs=1"]
    args = ["bench", "time-to-accuracy", "--config", "quickstart", "--device", "cpu", *tiny]
    assert main([*args, "eval.probe_batch_size=20", *argv, "--out", str(tmp_path)]) == 0
    return json.loads((tmp_path / "time_to_accuracy.json").read_text())


def test_time_to_accuracy_is_the_first_evaluation_reaching_the_target(tmp_path):
    argv = ["--target", "0.01", "--eval-every", "1", "--milestones", "0.005", "--protocol", "cheap"]
    result = tta(tmp_path, "train.epochs=2", *argv)
    assert result["config"]["eval"]["patches"] == 16 and result["protocol"]["probe_epochs"] == 1  # explicit keys win
    assert result["reached"] and len(result["evals"]) == 1  # training stopped at the first evaluation (eval.stop_at)
    assert result["steps"] == 1 and result["images_seen"] == 20 and result["epochs"] == pytest.approx(1 / 3)
    assert result["train_seconds"] == result["evals"][0]["train_seconds_excl_first_step"] == 0
    assert [m["top1"] for m in result["milestones"]] == [0.005, 0.01] and result["protocol"]["eval_every_steps"] == 1
    assert result["first_step_seconds"] > 0 and "synthetic" in result["data"] and result["targets"] == []


def test_short_of_the_target_every_milestone_is_reported(tmp_path):
    result = tta(tmp_path, "train.epochs=1", "--target", "0.99", "--milestones", "0.05,0.98", "--eval-every", "2")
    assert result["config"]["eval"]["patches"] == 128 and result["protocol"]["probe_epochs"] == 1  # official, then ours
    assert not result["reached"] and result["train_seconds"] is None and [e["step"] for e in result["evals"]] == [2, 3]
    assert result["best_linear_top1"] == max(e["linear_top1"] for e in result["evals"])
    assert [m["top1"] for m in result["milestones"]] == [0.05, 0.98, 0.99] and result["milestones"][2]["step"] is None
    assert "training seconds to 99%: **not reached (best " in (tmp_path / "time_to_accuracy.md").read_text()
