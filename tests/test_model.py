"""Architecture and FLOP count of the encoder."""

import pytest
import torch
from official_checkout import moments
from torch import nn

from fastemp.config import ModelConfig
from fastemp.model import EMPEncoder, build_model, flops_per_patch


@pytest.fixture
def meta():
    """Models built on the meta device: shapes and FLOPs without initialising ~30M weights."""
    with torch.device("meta"):
        yield


def test_reference_architecture(meta):
    model = build_model(ModelConfig())
    conv1 = model.backbone.conv1
    assert (conv1.kernel_size, conv1.stride, conv1.padding, conv1.bias) == ((3, 3), (1, 1), (1, 1), None)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    # BatchNorm: torch's, with ghost groups (fastemp.model.BatchNorm1d; plain unless groups are set)
    assert all(isinstance(m, t) for m, t in zip(model.pre_feature, [nn.Linear, nn.BatchNorm1d, nn.ReLU], strict=True))
    assert all(
        isinstance(m, t) for m, t in zip(model.projection, [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear], strict=True)
    )
    assert model.pre_feature[0].in_features == 512 and model.projection[-1].out_features == 1024
    n_backbone = sum(p.numel() for p in model.backbone.parameters())
    assert n_backbone == 11_168_832  # torchvision resnet18 (11,689,512) - fc (513,000) - 7x7 stem + 3x3 stem


@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
def test_initialisation_is_the_official_models(stem):
    """The official encoder (model/model.py): torchvision's resnet18 initialises every conv kaiming-normal
    (fan_out, relu), then resnet18-cifar creates its 3x3 conv1, which keeps PyTorch's default (uniform within
    1/sqrt(fan_in)); BatchNorm ones and zeros; the projector's Linear layers PyTorch's default."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(stem=stem))
    checked = 0
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            fan_in, fan_out = m.weight[0].numel(), m.out_channels * m.weight[0, 0].numel()
            if name == "backbone.conv1" and stem == "cifar":
                assert m.weight.abs().max() <= fan_in**-0.5
                expected = (fan_in**-0.5 / 3**0.5, 1.8)
            else:
                expected = ((2 / fan_out) ** 0.5, 3.0)
        elif isinstance(m, nn.Linear):
            assert m.bias.abs().max() <= m.in_features**-0.5
            expected = (m.in_features**-0.5 / 3**0.5, 1.8)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and not m.bias.any()
            continue
        else:
            continue
        std, kurtosis = moments(m.weight)
        assert std == pytest.approx(expected[0], rel=0.05), name
        assert kurtosis == pytest.approx(expected[1], abs=0.3), name
        checked += 1
    assert checked == 20 + 3  # 17 3x3 convs (stem included) + 3 downsampling convs; 3 Linear layers


def test_shapes():
    model = EMPEncoder(width=8, hidden_dim=32, z_dim=16).eval()
    x = torch.randn(5, 3, 32, 32)
    assert model.encode(x).shape == (5, 32) and model(x).shape == (5, 16)
    assert (model.encode(x) >= 0).all()  # h is post-ReLU


def independent_flops(width=64, hidden=4096, z=1024, size=32):
    """Per-layer count written out by hand: 2 FLOPs per multiply-add."""
    macs = 3 * width * 9 * size * size  # stem
    chans, res = [width, 2 * width, 4 * width, 8 * width], size
    c_in = width
    for i, c in enumerate(chans):
        if i > 0:
            res //= 2
        hw = res * res
        macs += c_in * c * 9 * hw + c * c * 9 * hw  # block 1
        if c_in != c:
            macs += c_in * c * hw  # 1x1 downsample
        macs += 2 * c * c * 9 * hw  # block 2
        c_in = c
    macs += 8 * width * hidden + hidden * hidden + hidden * z
    return 2 * macs


def test_flops_match_independent_count(meta):
    assert flops_per_patch(ModelConfig(), training=False) == independent_flops()
    train = flops_per_patch(ModelConfig(), training=True)
    assert train == 3 * independent_flops()
    assert abs(train / 1e9 - 3.47) < 0.01  # the figure benchmarks use for MFU
    small = ModelConfig(width=16, hidden_dim=256, z_dim=64)
    assert flops_per_patch(small, training=False) == independent_flops(16, 256, 64)


def imagenet_stem_flops(width=64, hidden=4096, z=1024, size=224):
    """The ImageNet stem by hand: 7x7 stride-2 conv (pad 3), 3x3 stride-2 maxpool (pad 1), then the stages."""
    conv_out = (size + 2 * 3 - 7) // 2 + 1
    res = (conv_out + 2 * 1 - 3) // 2 + 1
    macs = 3 * width * 49 * conv_out * conv_out
    c_in = width
    for i, c in enumerate([width, 2 * width, 4 * width, 8 * width]):
        if i > 0:
            res = (res - 1) // 2 + 1  # 3x3 stride-2 pad-1 conv
        hw = res * res
        macs += c_in * c * 9 * hw + c * c * 9 * hw + 2 * c * c * 9 * hw + (c_in * c * hw if c_in != c else 0)
        c_in = c
    macs += 8 * width * hidden + hidden * hidden + hidden * z
    return 2 * macs


def test_imagenet_stem_architecture_and_flops_follow_size(meta):
    cfg = ModelConfig(stem="imagenet")
    model = build_model(cfg)
    conv1 = model.backbone.conv1
    assert (conv1.kernel_size, conv1.stride, conv1.padding) == ((7, 7), (2, 2), (3, 3))
    pool = model.backbone.maxpool
    assert isinstance(pool, nn.MaxPool2d) and (pool.kernel_size, pool.stride, pool.padding) == (3, 2, 1)
    # torchvision resnet18 (11,689,512) minus fc (513,000): the official resnet18-imagenet backbone
    assert sum(p.numel() for p in model.backbone.parameters()) == 11_176_512
    for size in (224, 64, 97):
        assert flops_per_patch(cfg, image_size=size, training=False) == imagenet_stem_flops(size=size)
    # torchvision's ResNet-18 at 224 is 1.81 GMAC of which fc is 0.5 MMAC: the backbone here must agree
    backbone_macs = imagenet_stem_flops(size=224) / 2 - (512 * 4096 + 4096 * 4096 + 4096 * 1024)
    assert abs(backbone_macs / 1e9 - 1.8141) < 0.001
    assert flops_per_patch(ModelConfig(), image_size=64, training=False) == independent_flops(size=64)
    x = torch.randn(2, 3, 64, 64)
    small = EMPEncoder(width=8, hidden_dim=32, z_dim=16, stem="imagenet").eval()
    assert small(x).shape == (2, 16)
