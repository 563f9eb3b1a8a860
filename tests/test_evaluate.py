"""Linear probe and weighted kNN against independent computations."""

import dataclasses
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fastemp.config import (
    EVAL_PROTOCOLS,
    AugmentConfig,
    Config,
    ConfigError,
    EvalConfig,
    ModelConfig,
    apply_overrides,
    load_config,
    to_dict,
)
from fastemp.evaluate import extract_features, knn_top1, linear_probe
from fastemp.model import EMPEncoder
from fastemp.runtime import resolve

EAGER = resolve(Config(model=ModelConfig(width=4)), torch.device("cpu"), training=False)  # fp32, NCHW, torch patches


def blobs(n, classes=4, dim=16, spread=0.3, seed=0):
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(1234)) * 2  # shared by all splits
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    return centres[y] + spread * torch.randn(n, dim, generator=g), y


def test_linear_probe_learns_separable_features_and_reports_final_epoch():
    x, y = blobs(400)
    tx, ty = blobs(200, seed=1)
    curve = linear_probe(x, y, tx, ty, 4, EvalConfig(probe_epochs=5, probe_batch_size=50))
    assert len(curve) == 5 and curve[-1] > 0.95


def test_linear_probe_is_deterministic():
    x, y = blobs(200, spread=3.0)
    a = linear_probe(x, y, x, y, 4, EvalConfig(probe_epochs=3, probe_batch_size=50), seed=5)
    b = linear_probe(x, y, x, y, 4, EvalConfig(probe_epochs=3, probe_batch_size=50), seed=5)
    assert a == b


def brute_force_knn(train_x, train_y, test_x, test_y, classes, k, t):
    train_x, test_x = F.normalize(train_x, dim=1), F.normalize(test_x, dim=1)
    correct = 0
    for x, y in zip(test_x, test_y):
        sims = train_x @ x
        order = sims.argsort(descending=True)[:k]
        votes = [sum(float(torch.exp(sims[i] / t)) for i in order if train_y[i] == c) for c in range(classes)]
        correct += int(max(range(classes), key=lambda c: votes[c]) == y)
    return correct / len(test_y)


def test_knn_matches_brute_force():
    x, y = blobs(300, spread=4.0)
    tx, ty = blobs(80, spread=4.0, seed=2)
    expected = brute_force_knn(x, y, tx, ty, 4, k=20, t=0.07)
    assert knn_top1(x, y, tx, ty, 4, k=20, temperature=0.07, chunk=17) == expected
    assert 0.3 < expected < 1.0  # a task where the vote matters


def test_features_average_patches_in_eval_mode():
    torch.manual_seed(0)
    model = EMPEncoder(width=4, hidden_dim=24, z_dim=8).train()
    images = torch.randint(0, 256, (10, 32, 32, 3), dtype=torch.uint8)
    plain = extract_features(model, images, EvalConfig(mode="plain", batch_size=4), AugmentConfig(), EAGER)
    assert plain.shape == (10, 24) and model.training  # restored afterwards
    cfg = EvalConfig(mode="patches", patches=3, batch_size=4)
    feats = extract_features(model, images, cfg, AugmentConfig(), EAGER, seed=1)
    again = extract_features(model, images, cfg, AugmentConfig(), EAGER, seed=1)
    assert feats.shape == (10, 24) and torch.equal(feats, again)
    assert not torch.allclose(feats, plain)


def test_proj_embedding_is_the_unit_projection_averaged_over_patches_in_eval_mode():
    """eval.embedding=proj: mean over an image's patches of z = p / |p| (not renormalised), model in eval mode,
    as kachayev/ssl-in-one-epoch's encode() with --emb_pool proj."""
    from fastemp.patches import make_patch_backend

    torch.manual_seed(0)
    model = EMPEncoder(width=4, hidden_dim=24, z_dim=8).train()
    images = torch.randint(0, 256, (10, 32, 32, 3), dtype=torch.uint8)
    cfg = EvalConfig(mode="patches", patches=3, batch_size=10, embedding="proj")
    feats = extract_features(model, images, cfg, AugmentConfig(), EAGER, seed=1)
    assert feats.shape == (10, 8) and model.training
    x = make_patch_backend("torch", images, AugmentConfig())(torch.arange(10), 3, seed=1)
    with torch.no_grad():
        expected = F.normalize(model.eval()(x), dim=-1).view(3, 10, 8).mean(0)
    torch.testing.assert_close(feats, expected, rtol=1e-6, atol=1e-7)
    assert (feats.norm(dim=1) < 1).all()  # a mean of unit vectors, left as it is


def test_feature_extraction_makes_each_batch_of_patches_once(monkeypatch):
    """The next batch is prefetched while one is encoded; its call must take those patches, not make them again."""
    from fastemp.patches.torch_backend import TorchPatches

    made, make = [], TorchPatches.make
    monkeypatch.setattr(
        TorchPatches, "make", lambda self, request: made.append(request.index.tolist()) or make(self, request)
    )
    model = EMPEncoder(width=4, hidden_dim=24, z_dim=8)
    images = torch.randint(0, 256, (10, 32, 32, 3), dtype=torch.uint8)
    extract_features(model, images, EvalConfig(mode="patches", patches=2, batch_size=4), AugmentConfig(), EAGER)
    assert made == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


# -- the official protocol ------------------------------------------------------------------------------------


def official_style_probe(train_x, train_y, test_x, test_y, classes, epochs, lr, seed):
    """The official linear() of func.py written out plainly: nn.Linear, torch's SGD and CosineAnnealingLR
    stepped per epoch, shuffled full batches of 100, test accuracy averaged over test batches of 100."""
    gen = torch.Generator().manual_seed(seed)
    probe = torch.nn.Linear(train_x.shape[1], classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe.reset_parameters()
    opt = torch.optim.SGD(probe.parameters(), lr=lr, momentum=0.9, weight_decay=5e-5)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    curve = []
    for _ in range(epochs):
        order = torch.randperm(train_x.shape[0], generator=gen)
        for i in range(train_x.shape[0] // 100):  # drop_last
            idx = order[i * 100 : (i + 1) * 100]
            loss = torch.nn.CrossEntropyLoss()(probe(train_x[idx]), train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        with torch.no_grad():
            batches = [
                (probe(test_x[i : i + 100]).argmax(1) == test_y[i : i + 100]).float().mean().item()
                for i in range(0, test_x.shape[0], 100)
            ]
        curve.append(sum(batches) / len(batches))
    return curve, probe


def test_linear_probe_equals_the_official_probe_on_fixed_features():
    x, y = blobs(500, classes=5, dim=12, spread=2.5)
    tx, ty = blobs(300, classes=5, dim=12, spread=2.5, seed=3)
    cfg = EvalConfig(probe_epochs=6)  # the official protocol's probe, 6 epochs
    curve = linear_probe(x, y, tx, ty, 5, cfg, seed=7)
    official, _ = official_style_probe(x, y, tx, ty, 5, epochs=6, lr=0.03, seed=7)
    assert curve == pytest.approx(official, abs=1e-6)  # test accuracies: equal (300 test points)
    assert 0.4 < curve[-1] < 1.0  # not a trivial task


def official_knn_top1(train_x, train_y, test_x, test_y, k=20, T=0.07, max_distance_matrix_size=int(5e6)):
    """WeightedKNNClassifier.compute of the official func.py (cosine distance), transcribed."""
    train_x, test_x = F.normalize(train_x), F.normalize(test_x)
    num_classes = torch.unique(test_y).numel()
    chunk_size = min(max(1, max_distance_matrix_size // train_y.size(0)), test_y.size(0))
    k = min(k, train_y.size(0))
    top1, total = 0.0, 0
    retrieval_one_hot = torch.zeros(k, num_classes)
    for idx in range(0, test_y.size(0), chunk_size):
        features, targets = test_x[idx : idx + chunk_size], test_y[idx : idx + chunk_size]
        batch_size = targets.size(0)
        similarities, indices = torch.mm(features, train_x.t()).topk(k, largest=True, sorted=True)
        retrieved = torch.gather(train_y.view(1, -1).expand(batch_size, -1), 1, indices)
        retrieval_one_hot.resize_(batch_size * k, num_classes).zero_()
        retrieval_one_hot.scatter_(1, retrieved.view(-1, 1), 1)
        similarities = similarities.clone().div_(T).exp_()
        probs = torch.sum(
            torch.mul(retrieval_one_hot.view(batch_size, -1, num_classes), similarities.view(batch_size, -1, 1)), 1
        )
        _, predictions = probs.sort(1, True)
        top1 += predictions.eq(targets.view(-1, 1)).narrow(1, 0, 1).sum().item()
        total += batch_size
    return top1 * 100.0 / total


def test_knn_equals_the_official_classifier_on_fixed_features():
    x, y = blobs(600, classes=6, dim=10, spread=3.5)
    tx, ty = blobs(250, classes=6, dim=10, spread=3.5, seed=4)
    ours = knn_top1(x, y, tx, ty, 6, k=20, temperature=0.07, chunk=64)
    official = official_knn_top1(x, y, tx, ty, max_distance_matrix_size=600 * 37)  # chunks of 37 test rows
    assert ours * 100 == pytest.approx(official, abs=1e-9)
    assert 30 < official < 100


def documented_protocol_values() -> dict[str, dict[str, str]]:
    """{protocol: {key: value}} from the table of docs/evaluation.md."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "evaluation.md").read_text()
    table = {"official": {}, "cheap": {}}
    for line in doc.splitlines():
        m = re.match(r"\| `eval\.(\w+)` \| ([^|]+) \| ([^|]+) \|", line)
        if m:
            table["official"][m[1]], table["cheap"][m[1]] = m[2].strip(), m[3].strip()
    return table


@pytest.mark.parametrize("name", ["official", "cheap"])
def test_protocol_presets_resolve_to_the_documented_values(name):
    documented = documented_protocol_values()[name]
    assert set(documented) == set(EVAL_PROTOCOLS[name])  # every preset key is documented, and only those
    source = apply_overrides(Config(), [f"eval.protocol={name}"]).eval
    assert source.protocol == name
    for key, text in documented.items():
        value = getattr(source, key)
        assert (value == text) if isinstance(value, str) else value == pytest.approx(float(text), rel=0, abs=0)


def test_the_default_is_official_and_a_changed_value_is_relabelled():
    assert Config().eval.protocol == "official"
    cfg = apply_overrides(Config(), ["eval.protocol=cheap", "eval.patches=32"])
    assert cfg.eval.protocol == "custom" and cfg.eval.patches == 32 and cfg.eval.probe_epochs == 20
    cfg = apply_overrides(cfg, ["eval.protocol=official"])
    assert (cfg.eval.protocol, cfg.eval.patches, cfg.eval.probe_epochs) == ("official", 128, 100)
    with pytest.raises(ConfigError, match="eval.protocol must be one of official, cheap, custom"):
        apply_overrides(Config(), ["eval.protocol=offical"])
    edited = Config().eval  # the name follows the values, whoever sets them: nothing to keep in sync
    edited.patches, edited.probe_epochs = 16, 20
    assert edited.protocol == "cheap" and "protocol" not in to_dict(Config())["eval"]


def test_a_config_file_of_an_earlier_version_with_a_stored_protocol_still_loads(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("eval:\n  protocol: custom\n  patches: 32\n  probe_epochs: 20\n")
    assert (load_config(path).eval.patches, load_config(path).eval.protocol) == (32, "custom")
    path.write_text("eval:\n  patches: 32\n  protocol: cheap\n")  # the preset first, the key beside it on top
    assert (load_config(path).eval.patches, load_config(path).eval.probe_epochs) == (32, 20)


def test_compiled_feature_extraction_equals_eager():
    torch.manual_seed(0)
    model = EMPEncoder(width=4, hidden_dim=16, z_dim=8)
    images = torch.randint(0, 256, (6, 32, 32, 3), dtype=torch.uint8)
    cfg = EvalConfig(mode="patches", patches=2, batch_size=3)
    eager = extract_features(model, images, cfg, AugmentConfig(), EAGER, seed=2)
    compiled_runtime = dataclasses.replace(EAGER, eval_compile_mode="default")
    compiled = extract_features(model, images, cfg, AugmentConfig(), compiled_runtime, seed=2)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
