"""Helpers shared by the two patch-backend test modules."""

import dataclasses
import math

import torch

from fastemp.config import AugmentConfig

OFF = dict(flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0,
           mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def aug_off(**kw) -> AugmentConfig:
    """Every random op off and normalisation the identity, except what `kw` turns back on."""
    return dataclasses.replace(AugmentConfig(), **{**OFF, **kw})


def random_images(n=8, h=32, w=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, h, w, 3), generator=g, dtype=torch.uint8)


def binomial_ok(count, n, p, k=5.0):
    """A count of hits in n Bernoulli(p) draws within k standard deviations (+1 for tiny n*p)."""
    return abs(count - n * p) <= k * math.sqrt(n * p * (1 - p)) + 1
