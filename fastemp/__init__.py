"""fastemp: the fastest correct trainer for EMP-SSL. From Python (docs/training.md, "From Python"):

    import fastemp

    cfg = fastemp.load_config("quickstart", ["train.epochs=1"])
    summary = fastemp.run_training(cfg, "runs/notebook")
    result = fastemp.evaluate_run("runs/notebook", ["eval.knn=true"])
    other = fastemp.evaluate_weights("save_models/0.pt", "official")  # weights fastemp did not train

These take the command line's path (fastemp.startup): the same checks and the same one-line errors, raised
as fastemp.UserError. Importing fastemp is cheap: torch and the trainer load when a name needs them.
"""

from .config import Config, ConfigError, load_config
from .errors import DataError, UserError

_LAZY = {
    "Trainer": "train",
    "run_training": "startup",
    "resume_training": "startup",
    "evaluate_run": "startup",
    "evaluate_weights": "startup",
    "resolve": "runtime",
    "Runtime": "runtime",
    "CheckpointError": "checkpoint",
}

__all__ = ["Config", "ConfigError", "DataError", "UserError", "load_config", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'fastemp' has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f".{_LAZY[name]}", __name__), name)
