"""`fastemp eval --weights FILE --format fastemp|official|torchvision` (fastemp/weights.py, startup.evaluate_weights):
each format mapped strictly onto fastemp's encoder, against a float64 reference written from the official
definition (always) and the official model itself (from .official/ with torchvision, skipped otherwise); one-line
errors naming the keys; the same result as `fastemp eval RUN`; transfer to another dataset; and the official
peer (`bench official-peer`) scoring through the same call.

tests/official_encoder_keys.json is the official encoder's state_dict as main.py saves it (names and shapes), made
from the checkout with torchvision 0.28 by:

    PYTHONPATH=.official python -c "import json, torch, torchvision; from model.model import encoder
    out = {'torchvision': torchvision.__version__, 'source': '...'}
    for arch in ('resnet18-cifar', 'resnet18-imagenet'):
        net = torch.nn.DataParallel(encoder(arch=arch))
        out[arch] = {k: 'x'.join(map(str, v.shape)) for k, v in net.state_dict().items()}
    print(json.dumps(out, indent=1))" > tests/official_encoder_keys.json
"""

import dataclasses
import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from official_checkout import official_encoder_class
from tiny_run import TINY, TINY_CONFIG

import fastemp.data.cifar as cifar
from fastemp import checkpoint
from fastemp.checkpoint import CheckpointError
from fastemp.cli import main
from fastemp.config import AugmentConfig, EvalConfig, load_config
from fastemp.data import load_split
from fastemp.evaluate import extract_features
from fastemp.model import EMPEncoder, ResNet18Cifar
from fastemp.patches import normalize_images
from fastemp.runtime import resolve
from fastemp.startup import evaluate_weights
from fastemp.weights import load_weights, read_weights

OFFICIAL_KEYS = json.loads((Path(__file__).parent / "official_encoder_keys.json").read_text())
NARROW = {64: 8, 128: 16, 256: 32, 512: 64, 4096: 32, 1024: 16}  # width 64 -> 8, hidden 4096 -> 32, z 1024 -> 16
SMALL = ["data.synthetic_train=40", "data.synthetic_test=20"]  # evaluation on fewer images: data.* may change
EVAL_ONLY = [o for o in TINY_CONFIG if not o.startswith("model.")] + SMALL  # the weights set the architecture


def shape(text: str, narrow: bool) -> tuple[int, ...]:
    dims = tuple(int(d) for d in text.split("x") if d)
    return tuple(NARROW.get(d, d) for d in dims) if narrow else dims


def official_state(arch="resnet18-cifar", seed=0, narrow=True) -> dict[str, torch.Tensor]:
    """Random float64 tensors in the official layout (narrowed: width 8, hidden 32, z 16), BatchNorm statistics
    random too (fresh ones would hide a mix-up)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, text in OFFICIAL_KEYS[arch].items():
        size = shape(text, narrow)
        if name.endswith("num_batches_tracked"):
            state[name] = torch.tensor(7)
        elif name.endswith("running_var"):
            state[name] = torch.rand(size, generator=gen, dtype=torch.float64) + 0.5
        else:
            state[name] = 0.3 * torch.randn(size, generator=gen, dtype=torch.float64)
    return state


def reference_forward(sd: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(feature, z) of the official resnet18-cifar encoder in eval mode, computed straight from its tensors."""

    def bn(t, name):
        w, b, mean, var = (sd[f"{name}.{k}"] for k in ("weight", "bias", "running_mean", "running_var"))
        return F.batch_norm(t, mean, var, w, b, training=False, eps=1e-5)

    def conv(t, name, stride=1, padding=1):
        return F.conv2d(t, sd[f"{name}.weight"], stride=stride, padding=padding)

    def linear(t, name):
        return F.linear(t, sd[f"{name}.weight"], sd[f"{name}.bias"])

    h = F.relu(bn(conv(x, "module.backbone.conv1"), "module.backbone.bn1"))
    for layer in range(1, 5):
        for block in (0, 1):
            p = f"module.backbone.layer{layer}.{block}"
            stride = 2 if layer > 1 and block == 0 else 1
            out = F.relu(bn(conv(h, f"{p}.conv1", stride), f"{p}.bn1"))
            out = bn(conv(out, f"{p}.conv2"), f"{p}.bn2")
            if layer > 1 and block == 0:
                h = bn(conv(h, f"{p}.downsample.0", stride, 0), f"{p}.downsample.1")
            h = F.relu(out + h)
    feature = F.relu(bn(linear(h.mean((2, 3)), "module.pre_feature.0"), "module.pre_feature.1"))
    z = linear(F.relu(bn(linear(feature, "module.projection.0"), "module.projection.1")), "module.projection.3")
    return feature, F.normalize(z, dim=1)


def saved(path: Path, state) -> Path:
    torch.save(state, path)
    return path


def one_line_error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastemp: error: ") and "\n" not in err
    return err


# ------------------------------------------------------------------------------ the formats


@pytest.mark.parametrize("arch, stem", [("resnet18-cifar", "cifar"), ("resnet18-imagenet", "imagenet")])
def test_the_official_layout_is_fastemps_names_under_module(arch, stem):
    with torch.device("meta"):
        ours = EMPEncoder(stem=stem).state_dict()
    assert {f"module.{k}": "x".join(map(str, v.shape)) for k, v in ours.items()} == OFFICIAL_KEYS[arch]


def test_official_weights_give_the_official_outputs(tmp_path):
    official = official_state()
    weights = read_weights(saved(tmp_path / "0.pt", official), "official")
    assert weights.architecture() == {"width": 8, "stem": "cifar", "hidden_dim": 32, "z_dim": 16}
    model = EMPEncoder(width=8, hidden_dim=32, z_dim=16).double().eval()
    load_weights(model, weights)
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    feature, z = reference_forward(official, x)
    with torch.no_grad():
        torch.testing.assert_close(model.encode(x), feature, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(F.normalize(model(x), dim=1), z, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("arch", ["resnet18-cifar", "resnet18-imagenet"])  # -tinyimagenet: -imagenet's network
def test_the_official_model_from_its_checkout_maps_exactly(arch, tmp_path):
    net = torch.nn.DataParallel(official_encoder_class()(arch=arch)).double()
    with torch.no_grad():  # random BatchNorm statistics, so eval mode checks they are mapped too
        for name, buf in net.named_buffers():
            if name.endswith(("running_mean", "running_var")):
                buf.copy_(torch.rand_like(buf) + 0.5)
    layout = {k: "x".join(map(str, v.shape)) for k, v in net.state_dict().items()}
    assert layout == OFFICIAL_KEYS[arch]
    weights = read_weights(saved(tmp_path / "0.pt", net.state_dict()), "official")
    model = EMPEncoder(stem=weights.architecture()["stem"]).double()
    load_weights(model, weights)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for train in (False, True) if arch == "resnet18-cifar" else (False,):
        net.train(train)
        model.train(train)
        with torch.no_grad():
            z, feature = net.module(x, is_test=True)
            torch.testing.assert_close(model.encode(x), feature, rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(F.normalize(model(x), dim=1), z, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
def test_torchvision_weights_are_a_backbone_and_fc_is_dropped(stem, tmp_path):
    backbone = ResNet18Cifar(8, stem).state_dict()  # torchvision's names (tests/test_export.py checks them)
    state = {**backbone, "fc.weight": torch.zeros(10, 64), "fc.bias": torch.zeros(10)}
    weights = read_weights(saved(tmp_path / "tv.pth", state), "torchvision")
    assert weights.backbone_only and weights.architecture() == {"width": 8, "stem": stem}
    model = EMPEncoder(width=8, hidden_dim=32, z_dim=16, stem=stem)
    load_weights(model, weights)
    assert all(torch.equal(model.backbone.state_dict()[k], v) for k, v in backbone.items())


def test_the_backbone_embedding_is_the_pooled_backbone_output():
    model = EMPEncoder(width=4, hidden_dim=24, z_dim=16).eval()
    images = torch.randint(0, 256, (5, 32, 32, 3), dtype=torch.uint8)
    aug = AugmentConfig()
    runtime = resolve(load_config("quickstart", TINY_CONFIG), torch.device("cpu"), training=False)
    feats = extract_features(model, images, EvalConfig(mode="plain", embedding="backbone", batch_size=2), aug, runtime)
    with torch.no_grad():
        expected = model.backbone(normalize_images(images, aug.mean, aug.std))
    assert feats.shape == (5, 32)
    torch.testing.assert_close(feats, expected)


def _drop(state):
    state.pop("module.backbone.layer3.0.downsample.1.running_var")


@pytest.mark.parametrize(
    "change, fmt, message",
    [
        (_drop, "official", "missing module.backbone.layer3.0.downsample.1.running_var;"),
        (lambda s: s.update({"module.backbone.fc.weight": torch.zeros(10, 64)}), "official", "unexpected module.ba"),
        (
            lambda s: s.update({"module.projection.3.weight": torch.zeros(16, 31)}),
            "official",
            "(16, 31) (model (16, 32))",
        ),
        (lambda s: s.update({f"module.extra{i}": torch.zeros(1) for i in range(5)}), "official", "extra2 and 2 more"),
        (lambda s: s["module.pre_feature.0.bias"].fill_(float("nan")), "official", "non-finite weights (module.pre_"),
        (lambda s: s.update({"backbone.bn1.weight": torch.ones(8)}), "official", "without the `module.`"),
        (lambda s: None, "torchvision", "unexpected module.backbone.conv1.weight, module.backbone.bn1.weight"),
        (lambda s: None, "fastemp", "lacks model, optimizer"),
    ],
)
def test_a_file_that_does_not_fit_is_one_line_naming_the_keys(change, fmt, message, tmp_path, capsys):
    state = official_state()
    change(state)
    path = saved(tmp_path / "0.pt", state)
    err = one_line_error(capsys, ["eval", "--weights", str(path), "--format", fmt, *EVAL_ONLY, "--no-progress"])
    assert message in err, err


def test_unreadable_files_are_one_line(tmp_path, capsys):
    class Crafted:
        def __reduce__(self):
            return (print, ("ran",))

    (tmp_path / "text.pt").write_text("not weights")
    assert "is not weights" in one_line_error(
        capsys, ["eval", "--weights", str(tmp_path / "text.pt"), "--format", "official"]
    )
    saved(tmp_path / "crafted.pt", {"x": Crafted()})
    assert "not plain tensors" in one_line_error(
        capsys, ["eval", "--weights", str(tmp_path / "crafted.pt"), "--format", "official"]
    )
    assert "is not a file" in one_line_error(capsys, ["eval", "--weights", str(tmp_path / "none.pt")])
    assert "one of them" in one_line_error(capsys, ["eval", str(tmp_path), "--weights", str(tmp_path / "text.pt")])
    assert "go with --weights" in one_line_error(capsys, ["eval", str(tmp_path), "--format", "official"])


# ------------------------------------------------------------------------------ the same result as eval RUN


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A TINY run (width 4, 10 synthetic classes) of two steps, and its two exports."""
    run = tmp_path_factory.mktemp("weights") / "tiny"
    assert main(["train", *TINY, "train.max_steps=2", "eval.at_end=false", "--out", str(run)]) == 0
    for part in ("backbone", "encoder"):
        assert main(["export", str(run), "--part", part]) == 0
    return run


def _result(capsys, argv: list[str]) -> dict:
    capsys.readouterr()
    assert main([*argv, *SMALL, "--no-progress"]) == 0
    return json.loads(capsys.readouterr().out)


SCORES = ("step", "eval_mode", "eval_patches", "probe_epochs", "linear_top1", "best_top1_on_test", "eval_protocol")


def test_a_runs_checkpoint_and_exports_score_as_the_run(tiny_run, tmp_path, capsys):
    run = _result(capsys, ["eval", str(tiny_run), "eval.knn=true"])
    out = tmp_path / "result.json"
    weights = _result(
        capsys, ["eval", "--weights", str(tiny_run / "checkpoint.pt"), "eval.knn=true", "--out", str(out)]
    )
    assert {k: weights[k] for k in (*SCORES, "knn_top1")} == {k: run[k] for k in (*SCORES, "knn_top1")}
    assert json.loads(out.read_text()) == weights and weights["format"] == "fastemp" and weights["step"] == 2
    backbone = _result(capsys, ["eval", str(tiny_run), "eval.embedding=backbone"])
    exported = _result(capsys, ["eval", "--weights", str(tiny_run / "backbone.safetensors")])
    assert {k: exported[k] for k in SCORES} == {k: backbone[k] for k in SCORES}
    assert backbone["eval_protocol"] == "custom"
    model = checkpoint.read(tiny_run / "checkpoint.pt")["model"]
    for part in ("encoder", "backbone"):
        read = read_weights(tiny_run / f"{part}.safetensors")
        assert read.step == 2 and read.config["model"]["width"] == 4 and read.backbone_only == (part == "backbone")
        assert read.tensors.keys() == {k for k in model if part == "encoder" or k.startswith("backbone.")}
        assert all(torch.equal(v, model[k]) for k, v in read.tensors.items())
    # the architecture is the weights': an override that contradicts it, or asks a backbone for h, is refused
    ckpt, bb = str(tiny_run / "checkpoint.pt"), str(tiny_run / "backbone.safetensors")
    assert "model.width=4; drop model.width=8" in one_line_error(capsys, ["eval", "--weights", ckpt, "model.width=8"])
    assert "holds a backbone alone" in one_line_error(capsys, ["eval", "--weights", bb, "eval.embedding=features"])


def tiny_cifar100(root: Path, monkeypatch) -> Path:
    """A CIFAR-100 python archive of 40 train and 20 test images in 3 classes, registered with its md5."""
    rng = np.random.default_rng(0)

    def batch(n):
        return {
            b"fine_labels": rng.integers(0, 3, n).tolist(),
            b"coarse_labels": [0] * n,
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        }

    root.mkdir()
    meta = {b"fine_label_names": [b"apple", b"bear", b"cup"], b"coarse_label_names": [b"x"]}
    with tarfile.open(root / "cifar-100-python.tar.gz", "w:gz") as tar:
        for name, obj in (("train", batch(40)), ("test", batch(20)), ("meta", meta)):
            payload = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    archives = dict(cifar.CIFAR_ARCHIVES)
    archives["cifar100"] = dataclasses.replace(archives["cifar100"], md5=cifar._md5(root / "cifar-100-python.tar.gz"))
    monkeypatch.setattr(cifar, "CIFAR_ARCHIVES", archives)
    return root


def test_transfer_trained_on_synthetic_scored_on_cifar100(tiny_run, tmp_path, monkeypatch, capsys):
    root = tiny_cifar100(tmp_path / "data", monkeypatch)
    data = ["data.source=cifar100", f"data.root={root}", "data.download=false"]
    run = _result(capsys, ["eval", str(tiny_run), *data, "eval.knn=true"])
    weights = _result(capsys, ["eval", "--weights", str(tiny_run / "checkpoint.pt"), *data, "eval.knn=true"])
    assert {k: run[k] for k in (*SCORES, "knn_top1")} == {k: weights[k] for k in (*SCORES, "knn_top1")}
    assert round(run["linear_top1"] * 20) == pytest.approx(run["linear_top1"] * 20)  # over the 20 test images
    assert "was trained with model.width=4" in one_line_error(capsys, ["eval", str(tiny_run), *data, "model.width=8"])


# ------------------------------------------------------------------------------ the official peer


@pytest.mark.parametrize("source", ["official layout", "official checkout"])
def test_the_official_peer_scores_as_eval_weights(source, tmp_path, capsys):
    if source == "official layout":
        state = official_state()
    else:
        state = torch.nn.DataParallel(official_encoder_class()(arch="resnet18-cifar")).state_dict()
    path = saved(tmp_path / "0.pt", state)
    cli = _result(
        capsys, ["eval", "--weights", str(path), "--format", "official", "--config", "quickstart", *EVAL_ONLY]
    )
    cfg = load_config("quickstart", [*TINY_CONFIG, *SMALL])  # the peer's config: its model.* give way to the weights'
    train, test = load_split(cfg.data, "train"), load_split(cfg.data, "test")
    peer = evaluate_weights(path, "official", cfg, progress=False, train_set=train, test_set=test)  # as the peer
    assert {k: peer[k] for k in cli} == cli and peer["tensors"] == len(state) == 136


def test_a_wrong_file_stops_the_peer_in_one_line(tmp_path):
    cfg = load_config("quickstart", [*TINY_CONFIG, *SMALL])
    path = saved(tmp_path / "0.pt", {k.removeprefix("module."): v for k, v in official_state().items()})
    with pytest.raises(CheckpointError, match="without the `module.` of main.py's nn.DataParallel"):
        evaluate_weights(path, "official", cfg)  # as the peer calls it; refused before its splits are read
