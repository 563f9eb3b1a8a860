"""Linear probe and weighted kNN against independent computations."""

import torch
import torch.nn.functional as F

from fastemp.config import AugmentConfig, EvalConfig
from fastemp.evaluate import extract_features, knn_top1, linear_probe
from fastemp.model import EMPEncoder


def blobs(n, classes=4, dim=16, spread=0.3, seed=0):
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(1234)) * 2  # shared by all splits
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    return centres[y] + spread * torch.randn(n, dim, generator=g), y


def test_linear_probe_learns_separable_features_and_reports_final_epoch():
    x, y = blobs(400)
    tx, ty = blobs(200, seed=1)
    result = linear_probe(x, y, tx, ty, 4, EvalConfig(probe_epochs=5, probe_batch_size=50))
    assert len(result.curve) == 5
    assert result.final_top1 == result.curve[-1] and result.best_top1_on_test == max(result.curve)
    assert result.final_top1 > 0.95


def test_linear_probe_is_deterministic():
    x, y = blobs(200, spread=3.0)
    a = linear_probe(x, y, x, y, 4, EvalConfig(probe_epochs=3, probe_batch_size=50), seed=5)
    b = linear_probe(x, y, x, y, 4, EvalConfig(probe_epochs=3, probe_batch_size=50), seed=5)
    assert a.curve == b.curve


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
    plain = extract_features(model, images, EvalConfig(mode="plain", batch_size=4), AugmentConfig())
    assert plain.shape == (10, 24) and model.training  # restored afterwards
    cfg = EvalConfig(mode="patches", patches=3, batch_size=4)
    feats = extract_features(model, images, cfg, AugmentConfig(), seed=1)
    again = extract_features(model, images, cfg, AugmentConfig(), seed=1)
    assert feats.shape == (10, 24) and torch.equal(feats, again)
    assert not torch.allclose(feats, plain)
