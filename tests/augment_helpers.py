"""Helpers shared by the patch-backend test modules."""

import dataclasses
import math

import torch
import torch.nn.functional as F

from fastemp.config import AugmentConfig

OFF = dict(
    flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)
)


def aug_off(**kw) -> AugmentConfig:
    """Every random op off and normalisation the identity, except what `kw` turns back on."""
    return dataclasses.replace(AugmentConfig(), **{**OFF, **kw})


def random_images(n=8, h=32, w=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, h, w, 3), generator=g, dtype=torch.uint8)


def binomial_ok(count, n, p, k=5.0):
    """A count of hits in n Bernoulli(p) draws within k standard deviations (+1 for tiny n*p)."""
    return abs(count - n * p) <= k * math.sqrt(n * p * (1 - p)) + 1


def ref_blur(x, sigma, mode="replicate"):
    """Separable sampled Gaussian truncated at ceil(3 sigma), by a 2-D convolution in float64."""
    radius = math.ceil(3 * sigma)
    d = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-(d**2) / (2 * sigma**2))
    k = k / k.sum()
    k2 = (k[:, None] * k[None, :])[None, None].repeat(3, 1, 1, 1)
    padded = F.pad(x[None], (radius,) * 4, mode=mode)
    return F.conv2d(padded, k2, groups=3)[0]


def gate_image() -> torch.Tensor:
    """The (1, 32, 32, 3) uint8 image of assert_ops_change_exactly_the_drawn_patches: coloured, asymmetric."""
    y, x = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    return torch.stack([x * 8, 255 - y * 8, (x * y) % 256], -1).to(torch.uint8)[None]


def assert_ops_change_exactly_the_drawn_patches(make_backend, images_count: int) -> None:
    """Each op alone at its default p: the patches it changes are exactly those whose gate fired,
    the others come out bit-identical; the observed frequency is near p. 20 patches per image.
    make_backend(aug): a backend over gate_image() as image 0."""
    index = torch.zeros(images_count, dtype=torch.long)
    base = aug_off(blur_sigma=(0.5, 2.0))  # sigma near 0.1 would leave a blurred patch unchanged in float32
    plain = make_backend(base)(index, 20, seed=2)
    defaults = AugmentConfig()
    for field, flag in (
        ("flip_p", "flip"),
        ("jitter_p", "jitter"),
        ("grayscale_p", "gray"),
        ("blur_p", "blur"),
        ("solarize_p", "solarize"),
    ):
        aug = dataclasses.replace(base, **{field: getattr(defaults, field)})
        backend = make_backend(aug)
        out = backend(index, 20, seed=2)
        fired = getattr(backend.params(index, 20, seed=2), flag)
        changed = (out != plain).flatten(1).any(1)
        assert torch.equal(changed, fired), field
        assert binomial_ok(int(fired.sum()), 20 * images_count, getattr(defaults, field)), field
