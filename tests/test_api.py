"""The Python surface (fastemp/__init__.py): a run from Python in a few lines, with the command line's checks
and one-line errors."""

import subprocess
import sys

import pytest
from tiny_run import TINY_CONFIG

import fastemp


def test_importing_fastemp_is_cheap_and_exports_the_notebook_names():
    code = "import sys, fastemp; print('torch' in sys.modules, sorted(fastemp.__all__))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("False ")  # torch loads when a name needs it
    for name in (
        "load_config",
        "Trainer",
        "run_training",
        "resume_training",
        "evaluate_run",
        "evaluate_weights",
        "UserError",
    ):
        assert name in out and getattr(fastemp, name) is not None
    with pytest.raises(AttributeError):
        fastemp.no_such_name  # noqa: B018


def test_a_run_from_python_trains_evaluates_and_fails_like_the_cli(tmp_path):
    cfg = fastemp.load_config("quickstart", [*TINY_CONFIG, "train.max_steps=4"])
    run = tmp_path / "new" / "run"  # a folder that does not exist yet
    summary = fastemp.run_training(cfg, run, progress=False)
    assert summary["steps"] == 4 and (run / "summary.json").is_file() and 0 <= summary["linear_top1"] <= 1
    result = fastemp.evaluate_run(run, ["eval.knn=true"], progress=False)
    assert result["step"] == 4 and 0 <= result["knn_top1"] <= 1 and (run / "eval.json").is_file()

    missing = fastemp.load_config("quickstart", [*TINY_CONFIG, "data.source=imagefolder", "data.path=/no/such/data"])
    with pytest.raises(fastemp.UserError, match="does not exist") as err:
        fastemp.run_training(missing, tmp_path / "other", progress=False)
    assert isinstance(err.value, fastemp.DataError) and "\n" not in str(err.value)
    with pytest.raises(fastemp.UserError, match="pass --force to replace it"):
        fastemp.run_training(cfg, run, progress=False)
    assert not (tmp_path / "other").exists()


def test_a_trainer_built_in_python_checks_its_config_like_the_cli():
    """Trainer(cfg) resolves the config itself: a value the CLI refuses is refused here too, in one line,
    before anything is loaded."""
    cfg = fastemp.load_config("quickstart", TINY_CONFIG)
    cfg.train.n_patches = 1  # a Config changed in Python, after load_config's checks
    with pytest.raises(fastemp.ConfigError, match="train.n_patches") as err:
        fastemp.Trainer(cfg, None)
    assert "\n" not in str(err.value)
    cfg.train.n_patches, cfg.data.backend, cfg.data.streamed = 4, "pillow", False  # pillow reads streamed files
    with pytest.raises(fastemp.ConfigError, match="data.backend"):
        fastemp.resolve(cfg)
