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
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .config import ModelConfig, choices


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
    """Train-mode BatchNorm with statistics per group: x's rows split into `groups` equal runs, each
    normalised by its own batch mean and (biased) variance, as `groups` separate BatchNorm calls would.

    The running statistics take the groups' statistics in order, as `groups` successive calls would
    update them (closed form of r <- (1 - m) r + m s_k), and num_batches_tracked counts the groups.
    bf16/fp16 inputs are normalised in float32 and returned in their dtype.
    """
    if x.shape[0] % groups:
        raise ValueError(f"{x.shape[0]} rows do not split into {groups} equal BatchNorm groups")
    xs = x.unflatten(0, (groups, x.shape[0] // groups))  # a view, channels_last included
    xf = xs.float() if x.dtype in (torch.bfloat16, torch.float16) else xs
    dims = (1, *range(3, xs.dim()))
    var, mean = torch.var_mean(xf, dim=dims, correction=0, keepdim=True)  # (groups, 1, C, 1, 1)
    y = (xf - mean) * torch.rsqrt(var + bn.eps)
    if bn.affine:
        shape = (1, 1, -1) + (1,) * (xs.dim() - 3)
        y = y * bn.weight.view(shape) + bn.bias.view(shape)
    if bn.track_running_stats and bn.running_mean is not None:
        with torch.no_grad():
            count = xs.numel() // (groups * xs.shape[2])  # values per channel in one group
            m = bn.momentum
            if m is None:
                raise ValueError("ghost BatchNorm needs a momentum (a cumulative average is not supported)")
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


STEMS = choices(ModelConfig, "stem")


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
            self.maxpool = None
        self.bn1 = BatchNorm2d(width)
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
        """The unit projection z = p / |p| in fp32 (the evaluation embedding under eval.embedding=proj)."""
        return F.normalize(self(x).float(), dim=-1)


def compile_model(module: nn.Module, mode: str, device: torch.device, cudnn_benchmark: bool = False):
    """The forward the Trainer calls: `module` through torch.compile in `mode` ('none': eager), with cuDNN's
    autotuning set as asked on CUDA (process-wide: torch has one switch).

    mode reduce-overhead replays the model's forward and backward as CUDA graphs. Only the model is in
    the graph (the loss, its Cholesky and custom autograd Function run eagerly after it); a replay
    reuses the memory of the previous replay's outputs, so a caller that keeps outputs of several
    calls (the gradient cache's first pass) copies them, and the Trainer marks each step's start."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cudnn_benchmark
    return module if mode == "none" else torch.compile(module, mode=mode)


def build_model(cfg: ModelConfig) -> EMPEncoder:
    return EMPEncoder(cfg.width, cfg.hidden_dim, cfg.z_dim, cfg.stem)


def prepare_projector(model: EMPEncoder, cfg: ModelConfig) -> EMPEncoder:
    """model.projector_init: the projection layers (weights and BatchNorm statistics) from an encoder export;
    model.freeze_projector: their parameters take no gradient, so LARS, its weight decay and SGD pass them
    by. Their BatchNorm still uses batch statistics in training and updates its running ones, as in
    kachayev/ssl-in-one-epoch, which freezes the parameters only (docs/training.md)."""
    if cfg.projector_init:
        from .export import read_projector

        tensors = read_projector(cfg.projector_init, cfg)
        model.projection.load_state_dict({k.removeprefix("projection."): v for k, v in tensors.items()})
    model.projection.requires_grad_(not cfg.freeze_projector)
    return model


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
