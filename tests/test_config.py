"""Configs: every shipped YAML loads, overrides are typed, typos are errors with a suggestion."""

from pathlib import Path

import pytest

from fastemp.config import Config, ConfigError, apply_overrides, load_config, save_config

CONFIGS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_shipped_configs_are_the_documented_ones():
    assert {
        "quickstart",
        "cifar10_n20_1ep",
        "cifar10_n200_1ep",
        "cifar10_n20_10ep",
        "cifar100_n20_1ep",
        "imagefolder_example",
        "imagenet100_n20",
        "tinyimagenet_n20",
    } <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_shipped_config_loads(name):
    cfg = load_config(name)
    assert cfg.name == name
    assert cfg.train.n_patches >= 2 and cfg.train.batch_size >= 1


def test_reference_defaults():
    cfg = Config()
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.nesterov, cfg.optim.weight_decay) == (0.3, 0.9, True, 1e-4)
    assert (cfg.optim.lars_eta, cfg.optim.lars_clip, cfg.optim.warmup_steps) == (0.005, True, 0)
    assert (cfg.loss.eps, cfg.loss.invariance_weight, cfg.loss.tcr_weight) == (0.2, 200.0, 1.0)
    assert (cfg.train.batch_size, cfg.train.n_patches) == (100, 20)
    assert (cfg.model.hidden_dim, cfg.model.z_dim, cfg.model.width) == (4096, 1024, 64)
    assert cfg.augment.crop_scale == (0.25, 0.25) and cfg.augment.hue == 0.2
    assert (cfg.eval.patches, cfg.eval.probe_epochs, cfg.eval.probe_lr, cfg.eval.knn_k) == (128, 100, 0.03, 20)


def test_overrides_are_typed():
    cfg = apply_overrides(
        Config(),
        ["train.n_patches=8", "optim.lr=0.1", "eval.knn=true", "augment.crop_scale=[0.2, 0.3]", "data.source=cifar10"],
    )
    assert cfg.train.n_patches == 8 and cfg.optim.lr == 0.1 and cfg.eval.knn is True
    assert cfg.augment.crop_scale == (0.2, 0.3) and cfg.data.source == "cifar10"


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.n_pathces=8", "unknown config key 'train.n_pathces'; did you mean 'n_patches'?"),
        ("trian.epochs=2", "unknown config key 'trian'; did you mean 'train'?"),
        ("train.n_patches=eight", "train.n_patches: expected an integer"),
        ("optim.lr=fast", "optim.lr: expected a number"),
        ("augment.crop_scale=0.2", "augment.crop_scale: expected a list of 2 numbers"),
        ("train.epochs", "not of the form section.key=value"),
    ],
)
def test_bad_override_names_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("?", r"\?").replace("[", r"\[")):
        apply_overrides(Config(), [override])


def test_bad_key_in_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  batchsize: 64\n")
    with pytest.raises(ConfigError, match="unknown config key 'train.batchsize'; did you mean 'batch_size'"):
        load_config(path)


def test_unknown_builtin_name_suggests():
    with pytest.raises(ConfigError, match="did you mean 'quickstart'"):
        load_config("quikstart")


def test_round_trip(tmp_path):
    cfg = load_config("cifar10_n200_1ep", ["train.seed=3"])
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg


@pytest.mark.parametrize(
    "override, key, value",
    [
        ("optim.lr=1e-3", "lr", 1e-3),  # YAML 1.1 reads these as strings
        ("optim.weight_decay=5e-4", "weight_decay", 5e-4),
        ("optim.lr=1e30", "lr", 1e30),
        ("loss.fused=on", "fused", "on"),  # ...and these as booleans
        ("loss.fused=off", "fused", "off"),
        ("name=2024", "name", "2024"),
        ("data.path=2024", "path", "2024"),
        ("data.path=/data/a: b.tar", "path", "/data/a: b.tar"),
        ("eval.knn=on", "knn", True),
        ("train.epochs=2.0", "epochs", 2),
    ],
)
def test_values_are_coerced_by_the_declared_type(override, key, value):
    cfg = apply_overrides(Config(), [override])
    section = cfg if override.startswith("name") else getattr(cfg, override.split(".")[0])
    assert getattr(section, key) == value and type(getattr(section, key)) is type(value)


def test_yaml_file_values_as_users_type_them(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(
        "name: 2024\noptim:\n  lr: 1e-3\n  weight_decay: 5e-4\nloss:\n  fused: off\n"
        "augment:\n  crop_scale: [0.2, 3e-1]\n"
    )
    cfg = load_config(path)
    assert (cfg.name, cfg.optim.lr, cfg.optim.weight_decay, cfg.loss.fused) == ("2024", 1e-3, 5e-4, "off")
    assert cfg.augment.crop_scale == (0.2, 0.3)


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "is empty"),
        ("# only a comment\n", "is empty"),
        ("train:\n  epochs: [1\n", "YAML syntax error at line"),
        ("- 1\n- 2\n", "top level must be a mapping"),
        ("optim:\n  lr: inf\n", "optim.lr: expected a finite number"),
    ],
)
def test_bad_yaml_file_names_the_file(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as err:
        load_config(path)
    assert str(path) in str(err.value) or "optim.lr" in str(err.value)


# ---------------------------------------------------------------- YAML that parses but is refused

ALIAS_BOMB = "".join(
    [f"a: &a [{', '.join(['lol'] * 9)}]\n"]
    + [f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi")]
    + ["train: {epochs: *i}\n"]
)  # 10 lines that expand to 9^9 (~3.9e8) strings


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "train:\n  epochs: 2\nmodel:\n  width: 8\ntrain:\n  batch_size: 10\n",
            "duplicate key 'train' at line 5 (first at line 1); keep one of them",
        ),
        ("train:\n  epochs: 2\n  epochs: 3\n", "duplicate key 'epochs' at line 3 (first at line 2)"),
        ("a: &a [*a]\ntrain: {epochs: *a}\n", "a YAML alias refers to itself"),
        ("train: {epochs: " + "[" * 3000 + "]" * 3000 + "}\n", "YAML nested too deeply"),
    ],
)
def test_repeated_keys_and_recursive_values_are_errors(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(path)


def test_an_alias_bomb_is_refused_in_well_under_a_second(tmp_path):
    import time
    import tracemalloc

    path = tmp_path / "bomb.yaml"
    path.write_text(ALIAS_BOMB)
    assert len(ALIAS_BOMB.splitlines()) == 10
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="YAML aliases expand to more than 100,000 values"):
        load_config(path)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert seconds < 5 and peak < 50 << 20, (seconds, peak)  # generous bounds for a loaded CI machine


def test_messages_quote_a_bounded_prefix_of_a_value():
    from fastemp.config import QUOTE_CHARS, shown

    nested = [[["x" * 1000] * 1000] * 1000] * 1000  # shared lists: rendering it whole would take hours
    assert len(shown(nested)) <= QUOTE_CHARS + 3 and len(shown("y" * 10**6)) <= QUOTE_CHARS + 3
    with pytest.raises(ConfigError) as err:
        apply_overrides(Config(), ["optim.lr=" + "z" * 100_000])
    assert len(str(err.value)) < 300


@pytest.mark.parametrize("override", ["train.seed=1e30", "train.epochs=-1e19", "train.max_steps=9223372036854775808"])
def test_integers_outside_64_bits_are_errors(override):
    with pytest.raises(ConfigError, match="is out of range; write a whole number between -2\\^63 and 2\\^63"):
        apply_overrides(Config(), [override])


def test_an_explicit_config_path_is_never_replaced_by_a_builtin(tmp_path, monkeypatch):
    """--config DIR/NAME (no suffix) is DIR/NAME.yaml even when a built-in NAME exists; a missing path is an
    error, never the built-in."""
    from fastemp.config import resolve_config_path

    (tmp_path / "cifar10_n20_1ep.yaml").write_text("train:\n  epochs: 7\n")
    cfg = load_config(f"{tmp_path}/cifar10_n20_1ep")
    assert cfg.train.epochs == 7 and cfg.name == "cifar10_n20_1ep"
    (tmp_path / "mine.yml").write_text("train:\n  epochs: 3\n")
    assert resolve_config_path(str(tmp_path / "mine")) == tmp_path / "mine.yml"
    for missing in (f"{tmp_path}/quickstart", f"{tmp_path}/quickstart.yaml", "quickstart.yaml"):
        with pytest.raises(ConfigError, match="config file not found.*or use the built-in with --config quickstart"):
            load_config(missing)
    monkeypatch.chdir(tmp_path)
    assert load_config("./cifar10_n20_1ep").train.epochs == 7
    assert load_config("quickstart").name == "quickstart"  # no local file: the built-in
    assert load_config("mine").train.epochs == 3  # no built-in: the local file


def test_a_name_that_is_both_a_local_file_and_a_builtin_is_an_error_listing_both(tmp_path, monkeypatch):
    from fastemp.config import resolve_config_path

    builtin = resolve_config_path("quickstart")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "quickstart.yaml").write_text("train:\n  epochs: 7\n")
    with pytest.raises(ConfigError) as err:
        load_config("quickstart")
    message = str(err.value)
    assert "quickstart.yaml" in message and str(builtin) in message
    assert "\n" not in message
    assert load_config("./quickstart").train.epochs == 7
    assert load_config(str(builtin)).train.epochs != 7
    monkeypatch.chdir(builtin.parent)  # the built-in's own folder: the same file
    assert load_config("quickstart").name == "quickstart"
