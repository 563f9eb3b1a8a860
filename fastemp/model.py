"""ResNet-18 with the CIFAR or the ImageNet stem, and the EMP-SSL projector.

Matches the official encoder: torchvision's ResNet-18 with conv1 = 3x3 stride 1 pad 1, no
maxpool (arch resnet18-cifar), or torchvision's own 7x7 stride 2 pad 3 conv1 + 3x3 stride 2
maxpool (arch resnet18-imagenet, model.stem=imagenet), fc removed (512-d); then h = ReLU(BN(Linear(512, 4096))) -- the evaluation feature --
and Linear(4096, 4096) -> BN -> ReLU -> Linear(4096, 1024). The official forward returns the
L2-normalised z; here `forward` returns the raw projector output p, because the fused
cosine-to-mean kernel normalises p itself and the loss normalises it for the TCR term.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
import torch.utils.checkpoint
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


@contextmanager
def frozen_batchnorm_stats(model: nn.Module):
    """Train-mode BatchNorm (batch statistics) that leaves running statistics untouched."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(norms, saved):
            m.momentum = momentum


class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


STEMS = ("cifar", "imagenet")


class ResNet18Cifar(nn.Module):
    """torchvision-style ResNet-18 (same layer names) with the CIFAR (default) or the ImageNet stem;
    returns pooled features."""

    def __init__(self, width: int = 64, stem: str = "cifar"):
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"unknown stem '{stem}' (choose {' or '.join(STEMS)})")
        # Activation checkpointing per stage: keep only stage inputs, recompute the rest in backward.
        # BatchNorm keeps full-batch statistics; the recomputation leaves running stats alone.
        self.checkpoint_activations = False
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        else:
            self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(width)
        chans = [width, 2 * width, 4 * width, 8 * width]
        in_ch = width
        for i, (ch, stride) in enumerate(zip(chans, [1, 2, 2, 2])):
            setattr(self, f"layer{i + 1}", nn.Sequential(BasicBlock(in_ch, ch, stride), BasicBlock(ch, ch, 1)))
            in_ch = ch
        self.out_dim = in_ch
        # torchvision's initialisation
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            if self.checkpoint_activations and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(
                    stage, x, use_reentrant=False,
                    context_fn=lambda stage=stage: (nullcontext(), frozen_batchnorm_stats(stage)))
            else:
                x = stage(x)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


class EMPEncoder(nn.Module):
    """Backbone + projector. `encode` gives h (evaluation feature), `forward` the raw projection p."""

    def __init__(self, width: int = 64, hidden_dim: int = 4096, z_dim: int = 1024, stem: str = "cifar"):
        super().__init__()
        self.backbone = ResNet18Cifar(width, stem)
        self.pre_feature = nn.Sequential(
            nn.Linear(self.backbone.out_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU()
        )
        self.projection = nn.Sequential(
            nn.Linear(hidden_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, z_dim)
        )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.pre_feature(self.backbone(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.encode(x))


def build_model(cfg: ModelConfig) -> EMPEncoder:
    return EMPEncoder(cfg.width, cfg.hidden_dim, cfg.z_dim, cfg.stem)


def flops_per_patch(cfg: ModelConfig, image_size: int = 32, training: bool = True) -> float:
    """Matmul/conv FLOPs (2 per multiply-add) for one patch: forward, or forward+backward (x3).

    Counts convolutions and linear layers only (BN, ReLU, pooling and adds are <1% and memory-
    bound). The count follows the stem and `image_size` (the patch side): the standard model
    on 32x32 patches is 3.47 GFLOP per training patch; benchmarks pass augment.crop_size.
    """
    model = build_model(cfg)
    macs = 0
    hooks = []

    def conv_hook(m: nn.Conv2d, inp, out):
        nonlocal macs
        macs += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def linear_hook(m: nn.Linear, inp, out):
        nonlocal macs
        macs += out.numel() * m.in_features

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, image_size, image_size))
    for h in hooks:
        h.remove()
    return 2.0 * macs * (3.0 if training else 1.0)
