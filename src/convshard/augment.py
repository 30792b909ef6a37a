"""Augmentation of a training batch: random crop, horizontal flip and rotation, the same on every rank.

``augment`` is a pure function of the batch, the seed and the step, so every
rank of a job, and every plan, augments each image of the global batch alike.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .data import Dataset
from .errors import ConfigError


AUGMENTS: tuple[str, ...] = ("crop", "flip", "rotate")  # the transforms ``augment`` draws from
ROTATE_DEGREES = 15.0  # ``rotate`` turns each image by an angle drawn uniformly from +-this


def black(dataset: Dataset) -> tuple[float, ...]:
    """The normalised value of a black pixel in each channel, -mean[c] / std[c]
    (MNIST: -0.42); empty for synthetic data, which has no pixels."""
    return tuple(-m / s for m, s in zip(dataset.mean, dataset.std))


def default_augment(dataset: str) -> tuple[str, ...]:
    """The transforms that suit ``dataset``: digits are not mirror images (a
    flipped 2 is no 2) but are written at a slant, so MNIST is cropped and
    rotated; photos are cropped and flipped (a turned photo shows its corners)."""
    return ("crop", "rotate") if dataset == "mnist" else ("crop", "flip")


def augment(images: torch.Tensor, *, seed: int, step: int, transforms: Sequence[str] = ("crop", "flip"),
            fill: Sequence[float] = ()) -> torch.Tensor:
    """Random crop, horizontal flip and/or rotation of a batch: (B, C, H, W) -> (B, C, H, W).

    ``crop``: each image is padded with p = ceil(min(H, W) / 8) pixels on
    every side (4 pixels at 28x28 and 32x32) and an H x W window at a random
    offset (dy, dx) in [0, 2p]^2 is cut from it (without crop, the window at
    (p, p): the image itself). The padding of channel c is ``fill[c]``: a
    black pixel's normalised value -mean[c] / std[c] (``black``), so that a
    shifted digit keeps its black background, as torchvision's RandomCrop
    pads before normalising; zero (the mean) when ``fill`` is empty.
    ``flip``: with probability 1/2 the image is flipped left-right.
    ``rotate`` (first): the image turns about its centre by an angle drawn
    uniformly from +-ROTATE_DEGREES, sampled bilinearly
    (``F.grid_sample``), corners from outside the image taking the fill.
    The offsets, flips and angles are a pure function of (seed, step) and
    the batch shape, drawn on the CPU, so every rank of a job augments the
    same global batch identically. Crop and flip are one gather:
    out[b, c, i, j] = padded[b, c, dy_b + i, dx_b + (W - 1 - j if flip_b else j)].
    """
    unknown = [t for t in transforms if t not in AUGMENTS]
    if unknown:
        raise ConfigError(f"unknown augmentation {unknown[0]!r}: choose from {', '.join(AUGMENTS)}")
    if images.dim() != 4:
        raise ValueError(f"augment takes a (B, C, H, W) batch, got shape {tuple(images.shape)}")
    b, c, h, w = images.shape
    pad = math.ceil(min(h, w) / 8)
    key = hashlib.blake2b(f"augment,{seed},{step}".encode(), digest_size=8).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(key, "little"))
    dy, dx = torch.randint(0, 2 * pad + 1, (2, b), generator=generator)
    flip = torch.randint(0, 2, (b,), generator=generator).bool()
    angle = (torch.rand(b, generator=generator, dtype=torch.float64) * 2 - 1) * math.radians(ROTATE_DEGREES)
    if fill and len(fill) != c:
        raise ValueError(f"augment got {len(fill)} fill values for {c} channels")
    value = torch.tensor(fill or (0.0,) * c, dtype=images.dtype, device=images.device)[:, None, None]  # (C, 1, 1)
    if "rotate" in transforms:
        images = _rotate(images, angle, value)
    if "crop" not in transforms:
        dy, dx = torch.full_like(dy, pad), torch.full_like(dx, pad)
    if "flip" not in transforms:
        flip = torch.zeros_like(flip)
    cols = torch.arange(w)
    rows = dy[:, None] + torch.arange(h)  # (B, H)
    cols = dx[:, None] + torch.where(flip[:, None], cols.flip(0), cols)  # (B, W)
    padded = F.pad(images, (pad, pad, pad, pad))
    if fill:
        border = torch.ones(h + 2 * pad, w + 2 * pad, dtype=torch.bool, device=images.device)
        border[pad:pad + h, pad:pad + w] = False
        padded = torch.where(border, value, padded)  # (B, C, H + 2p, W + 2p)
    index = (torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None],
             rows[:, None, :, None], cols[:, None, None, :])  # broadcast to (B, C, H, W)
    return padded[tuple(i.to(images.device) for i in index)]


def _rotate(images: torch.Tensor, angle: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """Turn image b of (B, C, H, W) by ``angle[b]`` radians about its centre.
    In grid_sample's coordinates, x and y in [-1, 1] across W and H, output
    pixel (x, y) reads the input at (cos a x - sin a (H / W) y,
    sin a (W / H) x + cos a y): a rotation in pixels, however the image is
    shaped. What falls outside the input reads ``fill`` (C, 1, 1)."""
    b, _, h, w = images.shape
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack([torch.stack([cos, -sin * h / w, torch.zeros_like(cos)], 1),
                         torch.stack([sin * w / h, cos, torch.zeros_like(cos)], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images - fill, grid.to(images.device), mode="bilinear", padding_mode="zeros",
                         align_corners=False) + fill
