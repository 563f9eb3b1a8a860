"""The official EMP-SSL encoder: ResNet-18 (CIFAR or ImageNet stem) and projector (docs/training.md).

The official forward returns the unit z; `forward` here returns the raw projection p, which the fused
cosine-to-mean kernel and the loss normalise themselves.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

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


def ghost_batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, groups: int) -> torch.Tensor:
    """Train-mode BatchNorm of `groups` equal runs of x's rows apart, as `groups` successive BatchNorm calls
    would normalise them and update the running statistics; bf16/fp16 are normalised in float32."""
    xs = x.unflatten(0, (groups, x.shape[0] // groups))  # a view, channels_last included
    xf = xs.float() if x.dtype in (torch.bfloat16, torch.float16) else xs
    dims = (1, *range(3, xs.dim()))
    var, mean = torch.var_mean(xf, dim=dims, correction=0, keepdim=True)  # (groups, 1, C, 1, 1)
    shape = (1, 1, -1) + (1,) * (xs.dim() - 3)
    y = (xf - mean) * torch.rsqrt(var + bn.eps) * bn.weight.view(shape) + bn.bias.view(shape)
    with torch.no_grad():
        count = xs.numel() // (groups * xs.shape[2])  # values per channel in one group
        m = bn.momentum
        # after the groups in order: (1 - m)^g r + sum_k m (1 - m)^(g - 1 - k) s_k
        weights = m * (1 - m) ** torch.arange(groups - 1, -1, -1, device=x.device, dtype=torch.float64)
        weights = weights.to(bn.running_mean.dtype)
        batch_mean = mean.reshape(groups, -1).to(bn.running_mean.dtype)
        batch_var = var.reshape(groups, -1).to(bn.running_var.dtype) * (count / max(count - 1, 1))
        keep = (1 - m) ** groups
        bn.running_mean.copy_(keep * bn.running_mean + weights @ batch_mean)
        bn.running_var.copy_(keep * bn.running_var + weights @ batch_var)
        bn.num_batches_tracked.add_(groups)
    return y.to(x.dtype).flatten(0, 1)


class _GhostGroups:
    """BatchNorm whose training-mode statistics are per group of rows when `groups` > 1 (ghost BN)."""

    groups = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.groups > 1:
            return ghost_batch_norm(self, x, self.groups)
        return super().forward(x)


class BatchNorm2d(_GhostGroups, nn.BatchNorm2d):
    pass


class BatchNorm1d(_GhostGroups, nn.BatchNorm1d):
    pass


def set_batchnorm_groups(model: nn.Module, groups: int) -> None:
    """Every BatchNorm of the model normalises `groups` equal runs of its batch apart (1: the whole batch)."""
    for m in model.modules():
        if isinstance(m, _GhostGroups):
            m.groups = groups


class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = BatchNorm2d(out_ch)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class ResNet18Cifar(nn.Module):
    """torchvision's ResNet-18 (same names) with the CIFAR (default) or the ImageNet stem; returns pooled features."""

    def __init__(self, width: int = 64, stem: str = "cifar"):
        super().__init__()
        # recompute each stage in backward; the recomputation leaves BatchNorm's running statistics alone
        self.checkpoint_activations = False
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        else:
            self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
            self.maxpool = None
        self.bn1 = BatchNorm2d(width)
        chans = [width, 2 * width, 4 * width, 8 * width]
        in_ch = width
        for i, (ch, stride) in enumerate(zip(chans, [1, 2, 2, 2])):
            setattr(self, f"layer{i + 1}", nn.Sequential(BasicBlock(in_ch, ch, stride), BasicBlock(ch, ch, 1)))
            in_ch = ch
        self.out_dim = in_ch
        for m in self.modules():  # torchvision's initialisation (BatchNorm's 1 and 0 are torch's default)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if stem == "cifar":
            # The official model swaps torchvision's conv1 for this 3x3 one after torchvision's initialisation,
            # so its stem keeps PyTorch's default Conv2d initialisation (uniform, bound 1/sqrt(fan_in)).
            self.conv1.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        if self.maxpool is not None:
            x = self.maxpool(x)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            if self.checkpoint_activations and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(
                    stage,
                    x,
                    use_reentrant=False,
                    context_fn=lambda stage=stage: (nullcontext(), frozen_batchnorm_stats(stage)),
                )
            else:
                x = stage(x)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


class EMPEncoder(nn.Module):
    """Backbone + projector. `encode` gives h (evaluation feature), `forward` the raw projection p."""

    def __init__(self, width: int = 64, hidden_dim: int = 4096, z_dim: int = 1024, stem: str = "cifar"):
        super().__init__()
        self.backbone = ResNet18Cifar(width, stem)
        self.pre_feature = nn.Sequential(
            nn.Linear(self.backbone.out_dim, hidden_dim), BatchNorm1d(hidden_dim), nn.ReLU()
        )
        self.projection = nn.Sequential(
            nn.Linear(hidden_dim, hidden_dim), BatchNorm1d(hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, z_dim)
        )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.pre_feature(self.backbone(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.encode(x))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The unit projection z = p / |p| in fp32 (eval.embedding=proj)."""
        return F.normalize(self(x).float(), dim=-1)


def build_model(cfg: ModelConfig) -> EMPEncoder:
    return EMPEncoder(cfg.width, cfg.hidden_dim, cfg.z_dim, cfg.stem)


def prepare_projector(model: EMPEncoder, cfg: ModelConfig) -> EMPEncoder:
    """model.projector_init (the projection layers from an encoder export) and model.freeze_projector (no
    gradient; BatchNorm still updates its running statistics), as kachayev/ssl-in-one-epoch (docs/training.md)."""
    if cfg.projector_init:
        from .weights import read_projector

        tensors = read_projector(cfg.projector_init, cfg)
        model.projection.load_state_dict({k.removeprefix("projection."): v for k, v in tensors.items()})
    model.projection.requires_grad_(not cfg.freeze_projector)
    return model


def flops_per_patch(cfg: ModelConfig, image_size: int = 32, training: bool = True) -> float:
    """Convolution and matmul FLOPs (2 per multiply-add) of one `image_size` patch: forward, or forward and
    backward (x3). BatchNorm, ReLU, pooling and adds are left out (<1%, memory-bound)."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        build_model(cfg).eval()(torch.zeros(1, 3, image_size, image_size))
    return float(counter.get_total_flops()) * (3.0 if training else 1.0)
