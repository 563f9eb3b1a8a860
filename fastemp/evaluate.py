"""Evaluation as in the paper: frozen features h (averaged over patches), a linear probe whose FINAL epoch is the
headline (the best, selected on test, is `best_top1_on_test`), and a weighted kNN; the protocols value by value:
docs/evaluation.md. Under torchrun the feature batches are dealt round-robin to the ranks and summed; the probe
and kNN run on rank 0 and every rank returns the result.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .config import AugmentConfig, Config, EvalConfig
from .data import ImageSet
from .patches import PatchRequest, make_patch_backend, normalize_images
from .progress import bar
from .runtime import Runtime


@torch.no_grad()
def extract_features(
    model: nn.Module,
    images: torch.Tensor,
    cfg: EvalConfig,
    aug: AugmentConfig,
    runtime: Runtime,
    seed: int = 0,
    desc: str = "features",
    workers: int = 0,
) -> torch.Tensor:
    """(N, hidden) fp32 features of uint8 NHWC `images` (or a StreamedSet of files) as `runtime` runs evaluation,
    the model in eval mode for the duration; workers: data.workers."""
    was_training = model.training
    model.eval()
    embed = {"features": model.encode, "proj": model.project, "backbone": model.backbone}[cfg.embedding]
    mode = runtime.eval_compile_mode
    encode = embed if mode == "none" else torch.compile(embed, mode=mode)
    device = images.device
    # resident images are gathered on their device; streamed files are read by index on the host
    index_device = device if isinstance(images, torch.Tensor) else torch.device("cpu")
    count = len(images)
    patches = (
        make_patch_backend(runtime.backend, images, aug, workers=workers, compile_recipe=runtime.patch_compile)
        if cfg.mode == "patches"
        else None
    )
    out = []
    world, rank = distributed.world_size(), distributed.rank()

    def request(start: int) -> PatchRequest:  # the batch from image `start`; `start` is also its prefetch key
        index = torch.arange(start, min(start + cfg.batch_size, count), device=index_device)
        return PatchRequest(index, cfg.patches, seed + start)

    for number, start in enumerate(bar(range(0, count, cfg.batch_size), desc=desc, unit="batch")):
        if number % world != rank:
            continue
        batch = request(start)
        index = batch.index
        if patches is None and not isinstance(images, torch.Tensor):
            from .patches.pillow_images import whole_images

            x = whole_images(images, index, aug)
        elif patches is None:
            x = normalize_images(images[index], aug.mean, aug.std)
        else:
            x = patches.take(start, batch)
            following = start + world * cfg.batch_size  # this rank's next batch: made while this one runs
            if following < count:
                patches.prefetch(following, request(following))
        if not runtime.channels_last:
            x = x.contiguous()
        with runtime.autocast():  # on runtime.device, where the images are
            h = encode(x).float()
        k = 1 if patches is None else cfg.patches
        out.append((start, h.view(k, index.numel(), -1).mean(0)))
    if hasattr(patches, "close"):  # a streamed backend's worker processes
        patches.close()
    model.train(was_training)
    if world == 1:
        return torch.cat([h for _, h in out])
    # every row is filled by exactly one rank and is zero elsewhere, so the sum is exact
    dim = {"features": model.pre_feature[0].out_features, "proj": model.projection[-1].out_features}
    dim = dim.get(cfg.embedding, model.backbone.out_dim)
    feats = torch.zeros(count, dim, device=device)
    for start, h in out:
        feats[start : start + h.shape[0]] = h
    return distributed.sum_across_ranks(feats)


def linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int,
    cfg: EvalConfig,
    seed: int = 0,
) -> list[float]:
    """Train Linear(dim, C) on cached features; the test top-1 after every epoch (the last one is the headline)."""
    device = train_x.device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # the probe's initialisation from `seed`, the caller's stream untouched
        torch.manual_seed(seed)
        probe = nn.Linear(train_x.shape[1], num_classes).to(device)
    opt = torch.optim.SGD(
        probe.parameters(), lr=cfg.probe_lr, momentum=cfg.probe_momentum, weight_decay=cfg.probe_weight_decay
    )
    steps = train_x.shape[0] // cfg.probe_batch_size  # drop_last, as the official loader
    curve = []
    for epoch in bar(range(cfg.probe_epochs), desc="linear probe", unit="epoch"):
        for g in opt.param_groups:  # cosine over epochs, stepped per epoch (CosineAnnealingLR(T_max=epochs))
            g["lr"] = cfg.probe_lr * 0.5 * (1 + math.cos(math.pi * epoch / cfg.probe_epochs))
        order = torch.randperm(train_x.shape[0], generator=gen).to(device)
        for i in range(steps):
            idx = order[i * cfg.probe_batch_size : (i + 1) * cfg.probe_batch_size]
            loss = F.cross_entropy(probe(train_x[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            curve.append((probe(test_x).argmax(1) == test_y).float().mean())
    return torch.stack(curve).tolist()  # one host sync, not one per epoch


@torch.no_grad()
def knn_top1(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> float:
    """Weighted kNN on cosine similarity: votes exp(sim / T) from the k nearest train features."""
    train_x = F.normalize(train_x, dim=1)
    test_x = F.normalize(test_x, dim=1)
    k = min(k, train_x.shape[0])
    correct = torch.zeros((), dtype=torch.long, device=test_x.device)
    for start in bar(range(0, test_x.shape[0], chunk), desc="kNN", unit="chunk"):
        sim, idx = (test_x[start : start + chunk] @ train_x.T).topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device)
        votes.scatter_add_(1, train_y[idx], (sim / temperature).exp())
        correct += (votes.argmax(1) == test_y[start : start + chunk]).sum()
    return correct.item() / test_x.shape[0]


def evaluate_encoder(
    model: nn.Module, train: ImageSet, test: ImageSet, cfg: Config, runtime: Runtime, prefix=""
) -> dict:
    """Features for both splits, then the probe (and kNN when eval.knn) on rank 0. Keys get `prefix`."""
    seed, protocol = cfg.train.seed, cfg.eval
    feats = [
        extract_features(
            model, getattr(s, "images", s), protocol, cfg.augment, runtime, seed + i, desc, cfg.data.workers
        )
        for i, (desc, s) in enumerate(((f"{prefix}features (train)", train), (f"{prefix}features (test)", test)))
    ]

    def probe_and_knn() -> dict:
        split_data = (feats[0], train.labels, feats[1], test.labels, len(train.classes))
        curve = linear_probe(*split_data, protocol, seed)
        out = {
            f"{prefix}linear_top1": curve[-1],
            f"{prefix}best_top1_on_test": max(curve),
            f"{prefix}eval_protocol": protocol.protocol,
        }
        if protocol.knn:
            out[f"{prefix}knn_top1"] = knn_top1(*split_data, protocol.knn_k, protocol.knn_temperature)
        return out

    return distributed.run_on_main(probe_and_knn)


def first_reaching(evaluations: list[dict], target: float, key: str = "linear_top1") -> dict | None:
    """Time to accuracy: the first evaluation record (Trainer.evaluations: step, epoch, train_seconds, results)
    whose `key` reaches target, or None."""
    return next((record for record in evaluations if record[key] >= target), None)
