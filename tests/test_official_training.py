"""fastemp's training steps against the official training loop itself: tsb0601/EMP-SSL's main.py, lars.py and
loss.py from the git-ignored checkout .official/, when it and torchvision are here (skipped in CI).

Both start from the same weights and train on the same patches for several steps, in float64; then every
weight, BatchNorm statistic and the learning rate of every step agree. The official loop runs as written:
main.py's `main`, `chunk_avg`, `Similarity_Loss` and `cal_TCR` are executed from its source with only `.cuda()`
removed (no GPU here), over the objects its module-level code builds, built here with the same arguments.

Why float64: in float32 the two part by ~1e-3 after one step at this tiny batch, as much as fastemp parts from
itself with channels_last switched off (rounding that the 8-patch BatchNorm amplifies); float64 is the
comparison that can see a wrong rule."""

import argparse
import ast
import os

import pytest
import torch
from official_checkout import OFFICIAL, official_encoder_class, official_module
from torch import nn, optim
from torch.optim.lr_scheduler import CosineAnnealingLR

from fastemp.config import load_config
from fastemp.train import Trainer

N, B, STEPS_PER_EPOCH, EPOCHS, SCHEDULE_STEPS = 2, 4, 2, 3, 8  # 6 steps of an 8-step cosine
HIDDEN, Z = 128, 32  # the official encoder takes these; the backbone is torchvision's full-width ResNet-18


class _WithoutCuda(ast.NodeTransformer):
    def visit_Call(self, node: ast.Call):
        self.generic_visit(node)
        is_cuda = isinstance(node.func, ast.Attribute) and node.func.attr == "cuda" and not node.args
        return node.func.value if is_cuda else node


def official_main(namespace: dict) -> dict:
    """main.py's loop and loss helpers, compiled from its source into `namespace` (its module globals)."""
    tree = ast.parse((OFFICIAL / "main.py").read_text())
    wanted = {"main", "chunk_avg", "Similarity_Loss", "cal_TCR"}
    body = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name in wanted]
    assert {n.name for n in body} == wanted
    module = ast.fix_missing_locations(_WithoutCuda().visit(ast.Module(body=body, type_ignores=[])))
    exec(compile(module, str(OFFICIAL / "main.py"), "exec"), namespace)
    return namespace


class StoredPatches:
    """A patch backend that hands out given batches in order (fastemp's contract: (n*B, 3, 32, 32), patch-major)."""

    name, reason = "stored", "test"

    def __init__(self, batches: list[torch.Tensor]):
        self.batches, self.calls = batches, 0

    def take(self, key, request):
        self.calls += 1
        return self.batches[self.calls - 1].contiguous(memory_format=torch.channels_last)

    def prefetch(self, key, request):
        pass


class OfficialEpochs:
    """main.py's DataLoader: each epoch yields STEPS_PER_EPOCH (data, label) pairs, data = a list of n patch
    tensors of shape (B, 3, 32, 32), the next batches each time."""

    def __init__(self, batches: list[torch.Tensor]):
        self.batches = iter(batches)

    def __iter__(self):
        for _ in range(STEPS_PER_EPOCH):
            yield list(next(self.batches).view(N, B, 3, 32, 32).unbind(0)), torch.zeros(B, dtype=torch.long)


class RecordedCosine(CosineAnnealingLR):
    """main.py's scheduler, noting the learning rate each step used (before stepping past it)."""

    def step(self, *args, **kwargs):
        if hasattr(self, "used"):
            self.used.append(self.optimizer.param_groups[0]["lr"])
        else:
            self.used = []  # the constructor's own first call
        super().step(*args, **kwargs)


def fastemp_trainer(**options) -> Trainer:
    overrides = [
        "data.source=synthetic",
        f"data.synthetic_train={B * STEPS_PER_EPOCH}",
        "data.synthetic_test=4",
        f"train.n_patches={N}",
        f"train.batch_size={B}",
        f"train.max_steps={SCHEDULE_STEPS}",
        f"model.hidden_dim={HIDDEN}",
        f"model.z_dim={Z}",
        "model.compile=none",
        "model.precision=fp32",
        "train.device=cpu",
        *(f"{k}={v}" for k, v in options.items()),
    ]
    batches = [
        torch.randn(N * B, 3, 32, 32, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
        for s in range(EPOCHS * STEPS_PER_EPOCH)
    ]
    trainer = Trainer(load_config("cifar10_n20_1ep", overrides), progress=False, patches=StoredPatches(batches))
    trainer.model.double()  # in place: the optimizer keeps the same parameters
    return trainer


def run_official(initial: dict, batches: list[torch.Tensor], tmp_path) -> tuple[nn.Module, list[float]]:
    lars, loss = official_module("lars"), official_module("loss")
    net = nn.DataParallel(official_encoder_class()(z_dim=Z, hidden_dim=HIDDEN, arch="resnet18-cifar").double())
    net.module.load_state_dict(initial)
    # main.py's module-level objects, with its arguments
    opt = optim.SGD(net.parameters(), lr=0.3, momentum=0.9, weight_decay=1e-4, nesterov=True)
    opt = lars.LARSWrapper(opt, eta=0.005, clip=True, exclude_bias_n_norm=True)
    scheduler = RecordedCosine(opt, T_max=SCHEDULE_STEPS, eta_min=0, last_epoch=-1)  # main.py: T_max=num_converge
    g = official_main(
        {
            "torch": torch,
            "nn": nn,
            "F": torch.nn.functional,
            "os": os,
            "tqdm": lambda it: it,
            "args": argparse.Namespace(epoch=EPOCHS, patch_sim=200, tcr=1),
            "num_patches": N,
            "dir_name": str(tmp_path),
            "dataloader": OfficialEpochs(batches),
            "net": net,
            "opt": opt,
            "scheduler": scheduler,
            "criterion": loss.TotalCodingRate(eps=0.2),
        }
    )
    g["contractive_loss"] = g["Similarity_Loss"]()
    g["main"]()
    return net.module, scheduler.used


def train_both(tmp_path, **options) -> tuple[Trainer, nn.Module, list[float], list[float]]:
    trainer = fastemp_trainer(**options)
    batches = list(trainer.patches.batches)
    initial = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    official, official_lrs = run_official(initial, batches, tmp_path)
    lrs = []
    for _ in range(EPOCHS * STEPS_PER_EPOCH):
        trainer.train_step()
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
    return trainer, official, lrs, official_lrs


def largest_difference(trainer: Trainer, official: nn.Module) -> tuple[float, str]:
    ours, theirs = trainer.model.state_dict(), official.state_dict()
    assert ours.keys() == theirs.keys()
    worst = max(
        (
            (ours[k].double() - theirs[k].double()).abs().max().item()
            / (theirs[k].double().abs().max().item() + 1e-12),
            k,
        )
        for k in ours
        if ours[k].is_floating_point()
    )
    return worst


def test_training_steps_equal_the_official_loop(tmp_path):
    trainer, official, lrs, official_lrs = train_both(tmp_path)
    assert len(lrs) == EPOCHS * STEPS_PER_EPOCH and lrs == pytest.approx(official_lrs, rel=1e-12, abs=1e-15)
    worst, name = largest_difference(trainer, official)
    assert worst < 1e-10, (name, worst)  # 5e-13 seen: float64 rounding over 6 steps
    assert torch.equal(trainer.model.backbone.bn1.num_batches_tracked, official.backbone.bn1.num_batches_tracked)


@pytest.mark.parametrize(
    "change",
    [{"optim.lars_eta": 0.004}, {"optim.nesterov": False}, {"optim.warmup_steps": 1}, {"loss.invariance_weight": 150}],
)
def test_a_changed_recipe_is_told_apart(tmp_path, change):
    """The comparison can fail: one value off and the weights part after the same steps (by 0.16 to 0.52)."""
    trainer, official, _, _ = train_both(tmp_path, **change)
    worst, _ = largest_difference(trainer, official)
    assert worst > 1e-2
