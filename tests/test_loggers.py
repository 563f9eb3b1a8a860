"""train.loggers (fastemp/loggers.py): tensorboard and csv hold metrics.jsonl's records (the same steps and values),
csv is rewritten from metrics.jsonl when it opens (a resumed run), wandb is offline unless configured, --force
replaces a run folder holding their outputs, and a bad or uninstalled logger is one line."""

import csv
import importlib.machinery
import sys
import types

import pytest
from tiny_run import TINY

from fastemp import loggers, run_folder, runs
from fastemp.cli import main
from fastemp.config import load_config
from fastemp.validate import check_config


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    """A TINY run of 6 steps, logged every 2 and evaluated every 3, into tensorboard and csv."""
    run = tmp_path_factory.mktemp("loggers") / "run"
    argv = ["train", *TINY, "train.max_steps=6", "eval.every=3", "eval.at_end=false", "train.loggers=tensorboard,csv"]
    assert main([*argv, "--out", str(run)]) == 0
    return run


def _split(records: list[dict]) -> tuple[list[dict], list[dict]]:
    return [r for r in records if "loss" in r], [r for r in records if "linear_top1" in r]


def _rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_csv_holds_the_records_of_metrics_jsonl(logged_run):
    steps, evaluations = _split(runs.read_lines(logged_run / "metrics.jsonl"))
    assert [r["step"] for r in steps] == [1, 2, 4, 6] and [r["step"] for r in evaluations] == [3, 6]
    for records, name in ((steps, "metrics.csv"), (evaluations, "evaluations.csv")):
        rows = _rows(logged_run / name)
        assert len(rows) == len(records)
        for row, record in zip(rows, records):
            assert row.keys() == record.keys()
            assert all(row[k] == str(v) for k, v in record.items()), (row, record)


def test_tensorboard_holds_the_records_of_metrics_jsonl(logged_run):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logged_run / "tensorboard")).Reload()
    steps, evaluations = _split(runs.read_lines(logged_run / "metrics.jsonl"))
    for kind, records in (("train", steps), ("eval", evaluations)):
        for key in ("epoch", "loss", "loss_sim", "lr", "images_per_s") if kind == "train" else ("linear_top1",):
            scalars = events.Scalars(f"{kind}/{key}")
            assert [s.step for s in scalars] == [r["step"] for r in records]
            assert [s.value for s in scalars] == pytest.approx([r[key] for r in records], rel=1e-6)
    assert "train/step" not in events.Tags()["scalars"] and "eval/eval_protocol" not in events.Tags()["scalars"]


def test_a_run_folder_with_logger_outputs_is_replaced_under_force(logged_run):
    assert {"tensorboard", "metrics.csv", "evaluations.csv"} <= {p.name for p in logged_run.iterdir()}
    run_folder.check_run_dir(logged_run, force=True)  # a fastemp run folder: no error


def test_csv_is_rewritten_from_metrics_jsonl_when_it_opens(tmp_path):
    """A resumed run: metrics.jsonl was cut back to the checkpoint's step, the csv still has the steps past it."""
    for step in (1, 2):
        runs.append_line(tmp_path / "metrics.jsonl", {"step": step, "loss": -float(step)})
    (tmp_path / "metrics.csv").write_text("step,loss\n1,-1.0\n2,-2.0\n3,-3.0\n4,-4.0\n")
    with loggers.Records(load_config("quickstart", ["train.loggers=csv"]), tmp_path, total_steps=40) as records:
        records.write({"step": 3, "loss": -3.5})
    assert _rows(tmp_path / "metrics.csv") == [
        {"step": str(s), "loss": str(v)} for s, v in ((1, -1.0), (2, -2.0), (3, -3.5))
    ]


def test_wandb_is_offline_unless_configured(tmp_path, monkeypatch):
    calls = []

    class Run:
        def log(self, values, step):
            calls.append(("log", values, step))

        def finish(self):
            calls.append(("finish",))

    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kwargs: calls.append(("init", kwargs)) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = load_config("quickstart", ["train.loggers=wandb", "name=tiny"])
    with loggers.Records(cfg, tmp_path, total_steps=40) as records:
        records.write({"step": 5, "loss": -1.5, "eval_protocol": "cheap"})
        records.write({"step": 5, "linear_top1": 0.5})
    init = calls[0][1]
    assert init["mode"] == "offline" and init["name"] == "tiny" and init["dir"] == str(tmp_path)
    assert init["config"]["train"]["loggers"] == "wandb"
    assert calls[1:] == [("log", {"train/loss": -1.5}, 5), ("log", {"eval/linear_top1": 0.5}, 5), ("finish",)]
    monkeypatch.setenv("WANDB_API_KEY", "set")
    loggers.Records(cfg, tmp_path, total_steps=40).write({"step": 6, "loss": -1.0})
    assert calls[-2][0] == "init" and calls[-2][1]["mode"] is None  # wandb's own settings decide


def test_a_bad_or_missing_logger_is_one_line(tmp_path, monkeypatch, capsys):
    def error(*overrides):
        assert main(["train", *TINY, *overrides, "--out", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("fastemp: error: ") and "\n" not in err
        return err

    assert "unknown logger 'tensorbord'; use a comma-separated list of tensorboard, csv, wandb" in error(
        "train.loggers=csv,tensorbord"
    )
    real = importlib.import_module

    def without_tensorboard(name):
        if name == "torch.utils.tensorboard":
            raise ImportError("TensorBoard logging requires TensorBoard version 1.15 or above")
        return real(name)

    monkeypatch.setattr(loggers.importlib, "import_module", without_tensorboard)
    assert 'needs the tensorboard package; pip install tensorboard (pip install -e ".[tensorboard]")' in error(
        "train.loggers=tensorboard"
    )
    assert not (tmp_path / "run").exists()  # found before any work
    check_config(load_config("quickstart", ["train.loggers=tensorboard"]))  # evaluating a run needs no logger
    assert loggers.logger_names(" none ") == [] and loggers.logger_names("csv, tensorboard") == ["csv", "tensorboard"]


def test_loggers_may_change_when_a_run_resumes():
    from fastemp.checkpoint import _safe

    assert _safe("train.loggers")


def test_metrics_records_print_as_progress_lines():
    from fastemp.progress import line

    record = {"step": 20, "loss": -221.9, "loss_sim": -0.85, "loss_tcr": -51.2, "images_per_s": 20.0}
    assert line(record, 40, 100) == "step 20/40 loss -221.9000 sim -0.8500 tcr -51.2000 images/s 20.0 ETA 0:01:40"
    evaluation = {"step": 20, "linear_top1": 0.663, "knn_top1": 0.555, "eval_seconds": 12.34}
    assert line(evaluation, 40, 100) == "step 20/40 evaluation: linear_top1 0.6630 knn_top1 0.5550 (12.3 s)"


def test_only_rank_0_writes_records(tmp_path, monkeypatch):
    monkeypatch.setattr(loggers.distributed, "is_main", lambda: False)
    with loggers.Records(load_config("quickstart", ["train.loggers=csv"]), tmp_path, total_steps=40) as records:
        records.write({"step": 1, "loss": -1.0})
    assert list(tmp_path.iterdir()) == []
