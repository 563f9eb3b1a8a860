"""fastemp export: torchvision's names and shapes, the exported backbone against an independent re-creation
and against torchvision itself (in a process that never imports fastemp), the CLI and its metadata; and
model.projector_init / model.freeze_projector, which read an encoder export.

tests/torchvision_resnet18_keys.json is torchvision's resnet18 state_dict (names and shapes) with each
stem's changes, so CI checks the names without torchvision. It was made with torchvision 0.28 by:

    python -c "import json, torch, torchvision; out = {'torchvision': torchvision.__version__}
    for stem in ('cifar', 'imagenet'):
        net = torchvision.models.resnet18()
        if stem == 'cifar':
            net.conv1, net.maxpool = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False), torch.nn.Identity()
        net.fc = torch.nn.Identity()
        out[stem] = {k: 'x'.join(map(str, v.shape)) for k, v in net.state_dict().items()}
    print(json.dumps(out, indent=1))" > tests/torchvision_resnet18_keys.json
"""

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_run import TINY

from fastemp import checkpoint
from fastemp.cli import main
from fastemp.config import ModelConfig
from fastemp.model import ResNet18Cifar, build_model
from fastemp.weights import export_tensors

TORCHVISION_KEYS = json.loads((Path(__file__).parent / "torchvision_resnet18_keys.json").read_text())


def random_model(width=64, stem="cifar", channels_last=True):
    """A model whose BatchNorm statistics and affine parameters are random (fresh ones would hide a mix-up)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(width=width, stem=stem, hidden_dim=32, z_dim=16))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
    model = model.to(memory_format=torch.channels_last) if channels_last else model
    return model.eval()


def plain_resnet18(t: dict, x: torch.Tensor, stem: str) -> torch.Tensor:
    """torchvision's ResNet-18 forward (fc removed) written out from its tensor names, in eval mode."""

    def bn(x, name):
        w, b, mean, var = (t[f"{name}.{k}"] for k in ("weight", "bias", "running_mean", "running_var"))
        return F.batch_norm(x, mean, var, w, b, training=False, eps=1e-5)

    x = F.relu(
        bn(
            F.conv2d(x, t["conv1.weight"], stride=1 if stem == "cifar" else 2, padding=1 if stem == "cifar" else 3),
            "bn1",
        )
    )
    if stem == "imagenet":
        x = F.max_pool2d(x, 3, 2, 1)
    for layer, stride in zip((1, 2, 3, 4), (1, 2, 2, 2)):
        for block in (0, 1):
            name, s = f"layer{layer}.{block}", stride if block == 0 else 1
            out = F.relu(bn(F.conv2d(x, t[f"{name}.conv1.weight"], stride=s, padding=1), f"{name}.bn1"))
            out = bn(F.conv2d(out, t[f"{name}.conv2.weight"], padding=1), f"{name}.bn2")
            if f"{name}.downsample.0.weight" in t:
                x = bn(F.conv2d(x, t[f"{name}.downsample.0.weight"], stride=s), f"{name}.downsample.1")
            x = F.relu(out + x)
    return x.mean(dim=(2, 3))


# loads each (weights, stem, inputs, outputs) job into torchvision's resnet18 with strict=True, runs it in eval mode
CHILD = textwrap.dedent(
    """
    import json, sys
    import torch, torchvision
    from safetensors.torch import load_file, save_file
    for weights, stem, inputs, outputs in json.loads(sys.argv[1]):
        net = torchvision.models.resnet18()
        if stem == "cifar":
            net.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = torch.nn.Identity()
        net.fc = torch.nn.Identity()
        net.load_state_dict(load_file(weights), strict=True)
        with torch.no_grad():
            save_file({"y": net.eval()(load_file(inputs)["x"])}, outputs)
    assert not [m for m in sys.modules if m.split(".")[0] == "fastemp"], "the child imported fastemp"
    """
)


@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
def test_backbone_has_torchvisions_names_and_shapes(stem):
    tensors = export_tensors(random_model(stem=stem).state_dict(), "backbone")
    got = {k: "x".join(map(str, v.shape)) for k, v in tensors.items()}
    assert got == TORCHVISION_KEYS[stem]
    assert all(v.is_contiguous() for v in tensors.values())  # the model is channels_last


@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
def test_exported_backbone_equals_fastemps_in_eval_mode(stem, tmp_path):
    """The file through an independent forward of torchvision's ResNet-18 (fc removed), in eval mode."""
    model = random_model(stem=stem)
    save_file(export_tensors(model.state_dict(), "backbone"), tmp_path / "b.safetensors")
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ours = model.backbone(x.contiguous(memory_format=torch.channels_last))
        plain = plain_resnet18(load_file(tmp_path / "b.safetensors"), x, stem)
    assert (plain - ours).abs().max() <= 1e-6 * ours.abs().max()


@pytest.fixture(scope="module")
def width64_run(tmp_path_factory):
    """A run of one step with the standard backbone width (and a small projector), evaluated."""
    run = tmp_path_factory.mktemp("export") / "run"
    assert (
        main(
            [
                "train",
                *TINY,
                "model.width=64",
                "train.n_patches=2",
                "train.batch_size=10",
                "train.max_steps=1",
                "eval.random_init=false",
                "eval.knn=false",
                "--out",
                str(run),
            ]
        )
        == 0
    )
    return run


def test_cli_export_round_trip_and_metadata(width64_run, capsys):
    run = width64_run
    capsys.readouterr()
    assert main(["export", str(run)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[0].startswith(f"wrote {run / 'backbone.safetensors'}: backbone, 120 tensors, step 1")
    assert "strict=True into torchvision.models.resnet18()" in printed[1]
    state = checkpoint.read(run / "checkpoint.pt")
    tensors = load_file(run / "backbone.safetensors")
    assert tensors.keys() == {k.removeprefix("backbone.") for k in state["model"] if k.startswith("backbone.")}
    assert all(torch.equal(v, state["model"][f"backbone.{k}"]) for k, v in tensors.items())
    with safe_open(run / "backbone.safetensors", framework="pt") as f:
        meta = f.metadata()
    summary = json.loads((run / "summary.json").read_text())
    assert meta["part"] == "backbone" and meta["step"] == "1" and json.loads(meta["config"]) == state["config"]
    assert meta["commit"] == summary["environment"]["commit"] and meta["export_commit"]
    assert json.loads(meta["results"])["summary"]["linear_top1"] == summary["linear_top1"]

    # the trained backbone, through the file, in eval mode: an independent forward, and torchvision's
    model = build_model(ModelConfig(width=64, hidden_dim=32, z_dim=16))
    model.load_state_dict(state["model"])
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ours = model.eval().backbone(x)
        assert (plain_resnet18(tensors, x, "cifar") - ours).abs().max() <= 1e-6 * ours.abs().max()


@pytest.mark.skipif(
    importlib.util.find_spec("torchvision") is None,
    reason="torchvision is not installed (CI has none; PYTHONPATH=/work/tv on the dev machine)",
)
def test_torchvision_holds_the_exports_in_a_process_without_fastemp(width64_run, tmp_path):
    """strict=True into torchvision.models.resnet18 (both stems, random and trained weights), eval-mode outputs
    within 1e-6 of fastemp's backbone; the subprocess asserts it never imported fastemp."""
    trained = build_model(ModelConfig(width=64, hidden_dim=32, z_dim=16))
    trained.load_state_dict(checkpoint.read(width64_run / "checkpoint.pt")["model"])
    models = {"trained": ("cifar", trained.eval()), **{s: (s, random_model(stem=s)) for s in ("cifar", "imagenet")}}
    jobs, ours = [], {}
    for name, (stem, model) in models.items():
        x = torch.randn(4, 3, 32, 32)
        with torch.no_grad():
            ours[name] = model.backbone(x)
        save_file(export_tensors(model.state_dict(), "backbone"), tmp_path / f"{name}.safetensors")
        save_file({"x": x}, tmp_path / f"{name}_x.safetensors")
        jobs.append([str(tmp_path / f"{name}{end}.safetensors") for end in ("", "_x", "_y")])
        jobs[-1].insert(1, stem)
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(jobs)], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    for name, y in ours.items():
        theirs = load_file(tmp_path / f"{name}_y.safetensors")["y"]
        assert (theirs - y).abs().max() <= 1e-6 * y.abs().max(), name


def test_cli_export_refuses_to_overwrite_and_writes_the_encoder(width64_run, tmp_path, capsys):
    out = tmp_path / "encoder.safetensors"
    out.write_text("keep me")
    assert main(["export", str(width64_run), "--part", "encoder", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"fastemp: error: {out} exists; pass --force to overwrite it, or choose another --out"
    assert out.read_text() == "keep me"
    assert main(["export", str(width64_run), "--part", "encoder", "--out", str(out), "--force"]) == 0
    state = checkpoint.read(width64_run / "checkpoint.pt")
    tensors = load_file(out)
    assert tensors.keys() == state["model"].keys()  # backbone.*, pre_feature.*, projection.*: the model's own names
    assert all(torch.equal(v, state["model"][k]) for k, v in tensors.items())
    assert not list(tmp_path.glob("*.tmp"))
    assert main(["export", str(tmp_path / "nothing")]) == 2
    assert "does not exist; give the --out folder of a fastemp train run" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A TINY run (width 4) of two steps and its encoder export."""
    run = tmp_path_factory.mktemp("export") / "tiny"
    assert main(["train", *TINY, "train.max_steps=2", "eval.at_end=false", "--out", str(run)]) == 0
    assert main(["export", str(run), "--part", "encoder"]) == 0
    return run


def test_other_widths_export_with_a_one_line_note(tiny_run, capsys):
    capsys.readouterr()
    assert main(["export", str(tiny_run)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[1].startswith("note: model.width=4, and torchvision's resnet18 has width 64 only")
    ResNet18Cifar(4).load_state_dict(load_file(tiny_run / "backbone.safetensors"), strict=True)
    with safe_open(tiny_run / "backbone.safetensors", framework="pt") as f:
        results = json.loads(f.metadata()["results"])
    assert results["eval"] is None and "linear_top1" not in results["summary"]  # not evaluated


def projection_of(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.startswith("projection.")}


def test_projector_init_loads_the_export_and_freezing_keeps_its_weights(tiny_run, tmp_path):
    exported = projection_of(load_file(tiny_run / "encoder.safetensors"))
    run = tmp_path / "frozen"
    init = [f"model.projector_init={tiny_run / 'encoder.safetensors'}", "model.freeze_projector=true"]
    assert main(["train", *TINY, *init, "train.max_steps=3", "eval.at_end=false", "--out", str(run)]) == 0
    trained = checkpoint.read(run / "checkpoint.pt")["model"]
    for name, value in projection_of(trained).items():
        if name.endswith(("weight", "bias")):  # parameters: frozen
            assert torch.equal(value, exported[name]), name
        else:  # BatchNorm's running statistics keep updating, as in kachayev/ssl-in-one-epoch
            assert not torch.equal(value, exported[name]), name
    before = load_file(tiny_run / "encoder.safetensors")
    assert not torch.equal(trained["pre_feature.0.weight"], before["pre_feature.0.weight"])  # the rest trains

    # resume and eval take the projector from the checkpoint: model.projector_init may change for them
    config = (run / "config.yaml").read_text()
    edited = config.replace(f"projector_init: {tiny_run / 'encoder.safetensors'}", "projector_init: ''")
    assert edited != config
    (run / "config.yaml").write_text(edited)
    assert main(["resume", str(run), "--no-progress"]) == 0
    assert main(["eval", str(run), f"model.projector_init={tmp_path / 'moved.safetensors'}"]) == 2
    assert main(["eval", str(run), "model.projector_init=", "--no-progress"]) == 0

    # the same file, not frozen: loaded at step 0, then trained
    from fastemp.config import load_config
    from fastemp.train import Trainer

    cfg = load_config("quickstart", [o for o in TINY if "=" in o] + init[:1] + ["train.max_steps=1"])
    trainer = Trainer(cfg, progress=False)
    assert all(torch.equal(v, exported[k]) for k, v in projection_of(trainer.model.state_dict()).items())
    assert all(p.requires_grad for p in trainer.model.parameters())
    trainer.train_step()
    assert not torch.equal(trainer.model.projection[0].weight, exported["projection.0.weight"])


def test_bad_projector_init_is_one_line_and_exit_2(tiny_run, tmp_path, capsys):
    text = tmp_path / "notes.safetensors"
    text.write_text("not a tensor file")
    cases = {
        tmp_path / "missing.safetensors": "is not a file; give a file written by fastemp export RUN --part encoder",
        text: "is corrupt or truncated",
        tiny_run / "backbone.safetensors": "is a backbone export, without the projection layers",
        tiny_run / "encoder.safetensors": "was exported from a model with model.hidden_dim=32, this run has 64",
    }
    assert main(["export", str(tiny_run), "--force"]) == 0
    for path, says in cases.items():
        capsys.readouterr()
        out = tmp_path / path.stem
        argv = ["train", *TINY, f"model.projector_init={path}", "model.hidden_dim=64", "--out", str(out)]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and err.startswith(f"fastemp: error: model.projector_init={path} ")
        assert says in err, err
        assert not out.exists()  # found before any work
