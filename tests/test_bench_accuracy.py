"""`fastemp bench accuracy` and the protocol options of `bench time-to-accuracy`, on tiny synthetic runs."""

import json

import pytest

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
    assert "not an accuracy claim" in markdown and "84.2" in markdown
    assert (tmp_path / "accuracy.png").stat().st_size > 0


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
    assert written and written[0]["partial"] and written[0]["rows"][0]["linear_top1"] == row["linear_top1"]


def test_a_row_without_its_data_is_skipped_not_downloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no archive under the default data.root
    result = run_accuracy(select_rows(["c100_n20_official_1ep"]), [0], ["train.device=cpu"], {})
    row = result["rows"][0]
    assert row["status"] == "skipped" and "cifar100" in row["reason"] and row["linear_top1"] == []


def test_rows_seeds_and_data_copies(tmp_path):
    assert parse_seeds("3") == [0, 1, 2] and parse_seeds("4,7") == [4, 7]
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
