"""The embedded synthetic dataset: 10 classes of shape and texture, never of colour (docs/data.md#the-synthetic-set).

Bit-identical for the same seed on any machine with the same torch: every draw comes from a CPU generator,
geometry uses only IEEE-exact elementwise operations (no FMA-fusing or transcendental ops: cos/sin are Taylor
sums), edges are 2x2 supersampled binary masks, and compositing, gradient and noise are integer arithmetic.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch

from ..config import DataConfig
from .listing import fingerprint, pillow

CLASSES: tuple[str, ...] = (
    "disc",
    "ring",
    "square-outline",
    "filled-square",
    "triangle",
    "cross",
    "horizontal-stripes",
    "vertical-stripes",
    "checkerboard",
    "diagonal-stripes",
)
N_CLASSES = len(CLASSES)

_CHUNK = 1024  # images rendered at a time (bounds memory; the result does not depend on it)

# Nuisance strengths
SCALE = (0.30, 0.45)  # the object's half-size s, a fraction of the image side: its box spans 60-90% of the width
MAX_ROTATION = 20.0  # degrees: rotation is uniform in [-MAX_ROTATION, MAX_ROTATION]
ASPECT = 0.15  # half-sizes s (1 + e) and s / (1 + e), e uniform in [-ASPECT, ASPECT]
POSITION_SLACK = 0.06  # how far (a fraction of the side) the object may stick out of the image
PERIOD = (5.0, 8.0)  # stripe / checker period in pixels, before the aspect stretch
MIN_CONTRAST = 48  # least luminance difference of foreground and background (0..255)
FG_BRIGHTER_P = 0.8  # probability that the object is the brighter colour (0.5: no polarity cue)
GRADIENT = 40  # peak-to-peak brightness change of a linear illumination gradient
NOISE = 10  # per-pixel integer noise in [-NOISE, NOISE]

# Shape constants chosen so that every class covers an expected area of 2 s^2, i.e. half of the
# (2s x 2s) bounding square of the texture classes (s: the object's half-size in pixels).
_DISC_R = math.sqrt(2.0 / math.pi)  # pi r^2 = 2
_RING_INNER = math.sqrt(1.0 - 2.0 / math.pi)  # outer radius 1: pi (1 - ri^2) = 2
_OUTLINE_INNER = math.sqrt(0.5)  # 4 - 4 t^2 = 2
_FILLED_HALF = math.sqrt(0.5)  # 4 h^2 = 2
_CROSS_HALF_WIDTH = 1.0 - math.sqrt(0.5)  # 8 w - 4 w^2 = 2
# triangle: apex (0, -1), base from (-1, 1) to (1, 1): area 2


def _cos_sin(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of float64 angles in [-pi, pi] as explicit Taylor sums (machine-independent)."""
    t2 = theta * theta
    c = torch.ones_like(theta)
    s = theta.clone()
    term_c = torch.ones_like(theta)
    term_s = theta.clone()
    for k in range(1, 20):  # pi^39 / 39! < 1e-26: exact to float64 rounding
        term_c = term_c * (-t2) / float((2 * k - 1) * (2 * k))
        term_s = term_s * (-t2) / float((2 * k) * (2 * k + 1))
        c = c + term_c
        s = s + term_s
    return c, s


def _uniform(gen: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return lo + torch.rand(n, generator=gen, dtype=torch.float64) * (hi - lo)


def _colour_pairs(gen: torch.Generator, n: int):
    """(fg, bg): (n, 3) int64 RGB pairs from one distribution whose luminances differ by >= MIN_CONTRAST,
    fg the brighter with probability FG_BRIGHTER_P. Rejection sampling, redrawing only the failing rows."""
    a = torch.randint(0, 256, (n, 3), generator=gen)
    b = torch.randint(0, 256, (n, 3), generator=gen)
    weights = torch.tensor([299, 587, 114])  # integer Rec.601 luma x 1000: exact
    while True:
        bad = ((a * weights).sum(1) - (b * weights).sum(1)).abs() < MIN_CONTRAST * 1000
        n_bad = int(bad.sum())
        if n_bad == 0:
            break
        a[bad] = torch.randint(0, 256, (n_bad, 3), generator=gen)
        b[bad] = torch.randint(0, 256, (n_bad, 3), generator=gen)
    a_brighter = (a * weights).sum(1) > (b * weights).sum(1)
    fg_bright = torch.rand(n, generator=gen) < FG_BRIGHTER_P
    swap = a_brighter != fg_bright  # make fg the brighter colour exactly when fg_bright
    fg = torch.where(swap[:, None], b, a)
    bg = torch.where(swap[:, None], a, b)
    return fg, bg


def _class_mask(
    cls: int, u: torch.Tensor, v: torch.Tensor, tu: torch.Tensor, tv: torch.Tensor, flip: torch.Tensor
) -> torch.Tensor:
    """Binary mask of class `cls`. u, v: the object frame in half-sizes (|u|, |v| <= 1 is the bounding square);
    tu, tv: the same frame in stripe periods, phase included; flip (n, 1, 1): mirrors the diagonal stripes."""
    if cls == 0:  # disc
        r2 = u * u + v * v
        return r2 <= _DISC_R * _DISC_R
    if cls == 1:  # ring
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= _RING_INNER * _RING_INNER)
    au, av = u.abs(), v.abs()
    inside = (au <= 1.0) & (av <= 1.0)
    if cls == 2:  # square outline
        return inside & ((au >= _OUTLINE_INNER) | (av >= _OUTLINE_INNER))
    if cls == 3:  # filled square
        return (au <= _FILLED_HALF) & (av <= _FILLED_HALF)
    if cls == 4:  # triangle, apex up
        return (v <= 1.0) & (v >= au + au - 1.0)
    if cls == 5:  # cross (plus sign)
        return inside & ((au <= _CROSS_HALF_WIDTH) | (av <= _CROSS_HALF_WIDTH))
    if cls == 6:  # horizontal stripes: the stripe index runs along v
        return inside & ((torch.floor(tv).to(torch.int64) & 1) == 0)
    if cls == 7:  # vertical stripes
        return inside & ((torch.floor(tu).to(torch.int64) & 1) == 0)
    if cls == 8:  # checkerboard
        return inside & (((torch.floor(tu).to(torch.int64) + torch.floor(tv).to(torch.int64)) & 1) == 0)
    # 9: diagonal stripes, "/" or "\" (a nuisance: horizontal flips swap them anyway)
    d = torch.where(flip, tu - tv, tu + tv) * math.sqrt(0.5)  # same period as the others
    return inside & ((torch.floor(d).to(torch.int64) & 1) == 0)


def make_synthetic(n: int, seed: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Render `n` seeded images: ((N, size, size, 3) uint8, (N,) int64 labels), on CPU; labels balanced
    and shuffled."""
    if size < 4:
        raise ValueError(f"size must be >= 4, got {size}")
    gen = torch.Generator().manual_seed(int(seed))
    S = int(size)

    # ---- per-image parameters (a fixed draw order defines the dataset) ----
    labels = (torch.arange(n) % N_CLASSES)[torch.randperm(n, generator=gen)]
    half = _uniform(gen, n, SCALE[0], SCALE[1]) * S  # half-size s in pixels
    stretch = 1.0 + _uniform(gen, n, -ASPECT, ASPECT)
    half_u, half_v = half * stretch, half / stretch  # area preserved: s_u s_v = s^2
    theta = _uniform(gen, n, -1.0, 1.0) * (MAX_ROTATION * math.pi / 180.0)
    cos_t, sin_t = _cos_sin(theta)
    # centre: keep the rotated bounding box inside, give or take the slack
    ext_u = half_u * cos_t.abs() + half_v * sin_t.abs()
    ext_v = half_u * sin_t.abs() + half_v * cos_t.abs()
    room_x = (S / 2.0 - ext_u + POSITION_SLACK * S).clamp(min=0.0)
    room_y = (S / 2.0 - ext_v + POSITION_SLACK * S).clamp(min=0.0)
    cx = S / 2.0 + _uniform(gen, n, -1.0, 1.0) * room_x
    cy = S / 2.0 + _uniform(gen, n, -1.0, 1.0) * room_y
    per = _uniform(gen, n, PERIOD[0], PERIOD[1])
    phase_u = _uniform(gen, n, 0.0, 1.0)
    phase_v = _uniform(gen, n, 0.0, 1.0)
    flip = torch.rand(n, generator=gen) < 0.5
    fg, bg = _colour_pairs(gen, n)
    grad_x = torch.randint(-GRADIENT, GRADIENT + 1, (n,), generator=gen)
    grad_y = torch.randint(-GRADIENT, GRADIENT + 1, (n,), generator=gen)

    # float32 per-image geometry, as (n, 1, 1) for broadcasting over the supersampled grid
    def col(t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.float32).view(-1, 1, 1)

    cx32, cy32, c32, s32 = col(cx), col(cy), col(cos_t), col(sin_t)
    inv_hu, inv_hv = col(1.0 / half_u), col(1.0 / half_v)
    # texture coordinates: periods along the object's axes, stretched with the object
    inv_pu, inv_pv = col(2.0 / (per * stretch)), col(2.0 * stretch / per)
    # (index 2k and 2k+1 are the two half-periods: stripe on / off)
    ph_u, ph_v = col(phase_u * 2.0), col(phase_v * 2.0)
    flip3 = flip.view(-1, 1, 1)

    # supersampled pixel-centre grid: sample (2i + a) sits at pixel i + (2a + 1) / 4
    grid = (torch.arange(2 * S, dtype=torch.float32) * 2.0 + 1.0) / 4.0
    gy, gx = grid.view(1, -1, 1), grid.view(1, 1, -1)

    # integer illumination gradient over pixel centres: in [-GRADIENT/2, GRADIENT/2] at the image edges
    pos = torch.arange(S, dtype=torch.int64) * 2 + 1 - S  # 2 * (centre - S/2)
    illum = torch.div(
        grad_x.view(-1, 1, 1) * pos.view(1, 1, -1) + grad_y.view(-1, 1, 1) * pos.view(1, -1, 1),
        4 * S,
        rounding_mode="floor",
    )  # (n, S, S)

    images = torch.empty((n, S, S, 3), dtype=torch.uint8)
    for start in range(0, n, _CHUNK):
        sl = slice(start, min(n, start + _CHUNK))
        lab = labels[sl]
        cover = torch.empty((lab.numel(), 2 * S, 2 * S), dtype=torch.bool)
        for cls in range(N_CLASSES):
            idx = (lab == cls).nonzero().flatten()
            if idx.numel() == 0:
                continue
            gi = idx + start
            dx = gx - cx32[gi]
            dy = gy - cy32[gi]
            c, s = c32[gi], s32[gi]
            pu = dx * c + dy * s  # rotate into the object frame (pixels)
            pv = dy * c - dx * s
            u, v = pu * inv_hu[gi], pv * inv_hv[gi]
            tu, tv = pu * inv_pu[gi] + ph_u[gi], pv * inv_pv[gi] + ph_v[gi]
            cover[idx] = _class_mask(cls, u, v, tu, tv, flip3[gi])
        k = cover.view(-1, S, 2, S, 2).to(torch.int32).sum(dim=(2, 4), dtype=torch.int32)  # 0..4
        k = k.unsqueeze(-1)
        f = fg[sl].to(torch.int32).view(-1, 1, 1, 3)
        b = bg[sl].to(torch.int32).view(-1, 1, 1, 3)
        val = torch.div(f * k + b * (4 - k) + 2, 4, rounding_mode="floor")
        val = val + illum[sl].to(torch.int32).unsqueeze(-1)
        val = val + torch.randint(-NOISE, NOISE + 1, val.shape, generator=gen, dtype=torch.int32)
        images[sl] = val.clamp_(0, 255).to(torch.uint8)
    return images, labels.to(torch.int64)


def load_synthetic(cfg: DataConfig, split: str, layout: str = "synthetic"):
    """(images, labels, classes, description, fingerprint, {}) of a split of the synthetic set that `cfg` names."""
    n = cfg.synthetic_train if split == "train" else cfg.synthetic_test  # > 0: fastemp.validate
    seed = 2 * cfg.synthetic_seed + (0 if split == "train" else 1)  # no seed's test set is another's training set
    images, labels = make_synthetic(n, seed, size=cfg.image_size)
    desc = f"synthetic (shapes and textures, {cfg.image_size}x{cfg.image_size}, seed {seed})"
    prints = fingerprint([("synthetic", f"{n} images, seed {seed}", cfg.image_size)])
    return images, labels, list(CLASSES), desc, prints, {}


# ------------------------- JPEG folders at any size: for tests and benchmarks of the data path, not for accuracy

RENDER_CHUNK = 64  # images rendered at once
RENDER_MAX = 128  # larger images are rendered at this size and upscaled (rendering is the slow part)
QUALITY = 90  # like typical camera JPEGs
JPEG_NOISE = 16.0  # std of Gaussian pixel noise (0..255): as many bytes per pixel as photos, which decode slower


def make_folder(
    path: str | Path, classes: int, per_class: int, size: int, seed: int = 0, test_per_class: int = 0
) -> Path:
    """Write a JPEG ImageFolder (train/, and test/ when test_per_class > 0; class folders c000, c001, ...)
    under `path`, overwriting, and return it. Every image keeps a random 75-100% of its width, so images
    differ in size as ImageNet's do (the streamed backends must read each image's own size)."""
    Image = pillow()
    root = Path(path)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    # an image of drawn label L goes to the first class L, L + 10, ... that still needs images: more than 10
    # classes repeat the 10 shapes under new names
    count, chunk = per_class + test_per_class, 0
    rendered: list[list[np.ndarray]] = [[] for _ in range(classes)]
    while any(len(k) < count for k in rendered):
        images, labels = make_synthetic(RENDER_CHUNK, seed * 1_000_003 + chunk, size=min(size, RENDER_MAX))
        chunk += 1
        for image, label in zip(images.numpy(), labels.tolist()):
            target = next((c for c in range(label, classes, len(CLASSES)) if len(rendered[c]) < count), None)
            if target is not None:
                rendered[target].append(image)
    for c, images in enumerate(rendered):
        widths = (size * (0.75 + 0.25 * torch.rand(len(images), generator=gen))).round().int().tolist()
        for k, (image, width) in enumerate(zip(images, widths)):
            split, number = ("train", k) if k < per_class else ("test", k - per_class)
            picture = Image.fromarray(image)
            if picture.width != size:
                picture = picture.resize((size, size), Image.BICUBIC)
            pixels = np.asarray(picture)[:, :width].astype(np.float32)
            pixels = pixels + rng.normal(0.0, JPEG_NOISE, pixels.shape).astype(np.float32)
            folder = root / split / f"c{c:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            buffer = io.BytesIO()
            Image.fromarray(pixels.round().clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=QUALITY)
            (folder / f"{split}_{number:05d}.jpg").write_bytes(buffer.getvalue())
    return root
