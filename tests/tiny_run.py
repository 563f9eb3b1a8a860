"""Configs small enough for a CLI test in a second or two, shared by the tests that run them."""

# a training run: config overrides (TINY_CONFIG) and the CLI's argument list (TINY)
TINY_CONFIG = [
    "data.synthetic_train=120",
    "data.synthetic_test=60",
    "model.width=4",
    "model.hidden_dim=32",
    "model.z_dim=16",
    "train.n_patches=4",
    "train.batch_size=20",
    "train.log_every=2",
    "eval.mode=plain",
    "eval.probe_epochs=2",
    "eval.probe_batch_size=20",
]
TINY = [*TINY_CONFIG, "--no-progress"]

# a benchmark: the quickstart at width 8 on the CPU, one thread
BENCH_TINY = [
    "model.width=8",
    "model.hidden_dim=64",
    "model.z_dim=32",
    "data.synthetic_train=64",
    "data.synthetic_test=32",
    "eval.knn=false",
    "eval.random_init=false",
]
BENCH_CPU = ["--config", "quickstart", "--device", "cpu", "--threads", "1"]
