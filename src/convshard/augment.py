"""Augmentation of one training image, drawn from (seed, epoch, index): the same on every rank and plan.

An image's random draws (``Draw``) are a pure function of the run's seed,
the epoch and the image's index in the training split, so every rank of a
job, every plan, a streamed or an in-memory copy of the data, and a run
resumed mid-epoch augment each image alike. The transforms
(``AUGMENTS``), as torchvision's reference recipes use them:

* ``resized-crop`` (at decode): a box of 8-100% of the image's area and
  aspect ratio in [3/4, 4/3] (``Draw.box``), resized to the output size;
* ``jitter``: brightness, contrast and saturation, each by a factor in
  [1 - JITTER, 1 + JITTER], in that order;
* ``rotate``: a turn about the centre by an angle in +-ROTATE_DEGREES;
* ``crop``: a shift by up to an eighth of the side, in the padding of a
  black border (torchvision's RandomCrop with padding);
* ``flip``: a left-right mirror with probability 1/2.

``finish`` applies all but the resized crop to an image of pixels in
[0, 1] (uint8 images are scaled first) and then normalises it, so the
padding and the rotation's corners are black, whatever the mean.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ConfigError

AUGMENTS: tuple[str, ...] = ("crop", "flip", "rotate", "resized-crop", "jitter")
ROTATE_DEGREES = 15.0  # ``rotate`` turns each image by an angle drawn uniformly from +-this
JITTER = 0.4  # ``jitter`` scales brightness, contrast and saturation by factors in [1 - this, 1 + this]
_SCALE, _RATIO = (0.08, 1.0), (3 / 4, 4 / 3)  # the resized crop's share of the area, and its aspect ratios
_ATTEMPTS = 10  # boxes tried before the resized crop falls back to the centre
_DRAWS = 4 * _ATTEMPTS + 7  # uniforms per image: 4 per box tried, shift (2), flip, angle, jitter (3)


def default_augment(dataset: str) -> tuple[str, ...]:
    """The transforms that suit ``dataset``: digits are not mirror images (a
    flipped 2 is no 2) but are written at a slant, so MNIST is cropped and
    rotated; CIFAR-sized photos are shifted and flipped; larger photos (an
    image folder, a user's dataset) take a random resized crop and a flip."""
    if dataset == "mnist":
        return ("crop", "rotate")
    return ("crop", "flip") if dataset in ("cifar10", "synthetic") else ("resized-crop", "flip")


def check(transforms: Sequence[str]) -> None:
    """Raise ConfigError for a transform that is not one of AUGMENTS."""
    unknown = [t for t in transforms if t not in AUGMENTS]
    if unknown:
        raise ConfigError(f"unknown augmentation {unknown[0]!r}: choose from {', '.join(AUGMENTS)}")


@dataclass(frozen=True, eq=False)
class Draw:
    """One training image's random numbers: ``u``, _DRAWS uniforms in [0, 1)."""

    u: np.ndarray

    @classmethod
    def of(cls, seed: int, epoch: int, index: int) -> Draw:
        key = hashlib.blake2b(f"augment,{seed},{epoch},{index}".encode(), digest_size=8).digest()
        return cls(np.random.default_rng(int.from_bytes(key, "little")).random(_DRAWS))

    def box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """The resized crop's box (left, top, right, bottom) in a ``width`` x
        ``height`` image, as torchvision's RandomResizedCrop draws it: area
        s W H with s uniform in _SCALE, log aspect ratio uniform in
        log _RATIO, w = round(sqrt(s W H r)), h = round(sqrt(s W H / r)), at a
        uniform position; after _ATTEMPTS boxes that do not fit, the
        largest centred box of ratio clamped to _RATIO."""
        area = width * height
        for k in range(_ATTEMPTS):
            s, r, top, left = self.u[4 * k: 4 * k + 4]
            target = area * (_SCALE[0] + s * (_SCALE[1] - _SCALE[0]))
            ratio = math.exp(math.log(_RATIO[0]) + r * (math.log(_RATIO[1]) - math.log(_RATIO[0])))
            w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
            if 0 < w <= width and 0 < h <= height:
                y, x = int(top * (height - h + 1)), int(left * (width - w + 1))
                return x, y, x + w, y + h
        ratio = width / height
        w, h = ((width, round(width / _RATIO[0])) if ratio < _RATIO[0] else
                (round(height * _RATIO[1]), height) if ratio > _RATIO[1] else (width, height))
        x, y = (width - w) // 2, (height - h) // 2
        return x, y, x + w, y + h

    def shift(self, pad: int) -> tuple[int, int]:
        """``crop``'s offset (dy, dx) in [0, 2 pad]^2 of the padded image."""
        base = 4 * _ATTEMPTS
        return int(self.u[base] * (2 * pad + 1)), int(self.u[base + 1] * (2 * pad + 1))

    @property
    def flip(self) -> bool:
        return bool(self.u[4 * _ATTEMPTS + 2] < 0.5)

    @property
    def angle(self) -> float:
        """``rotate``'s angle in radians, uniform in +-ROTATE_DEGREES."""
        return (2 * self.u[4 * _ATTEMPTS + 3] - 1) * math.radians(ROTATE_DEGREES)

    @property
    def jitter(self) -> tuple[float, float, float]:
        """Brightness, contrast and saturation factors, each uniform in [1 - JITTER, 1 + JITTER]."""
        u = self.u[4 * _ATTEMPTS + 4: _DRAWS]
        return tuple(float(1 - JITTER + 2 * JITTER * v) for v in u)


def finish(image: torch.Tensor, draw: Draw | None, transforms: Sequence[str], *,
           mean: Sequence[float] = (), std: Sequence[float] = ()) -> torch.Tensor:
    """One image (C, H, W), uint8 pixels or float values, as the model sees
    it: float32, jittered, turned, shifted and flipped as ``draw`` says (for
    the ``transforms`` asked; none without a draw: test images), then
    normalised: (p - mean[c]) / std[c] in channel c when ``mean`` is given.
    Without a draw a batch (B, C, H, W) is finished at once, each value as
    image by image.
    uint8 pixels are scaled to [0, 1] first; the padding and what a turn
    brings in from outside are 0, a black pixel."""
    x = image.float().div_(255) if image.dtype == torch.uint8 else image.float()
    if draw is not None:
        if "jitter" in transforms:
            x = _jitter(x, draw.jitter)
        if "rotate" in transforms:
            x = _rotate(x, draw.angle)
        if "crop" in transforms:
            x = _shift(x, draw)
        if "flip" in transforms and draw.flip:
            x = x.flip(-1)
    if mean:
        x = (x - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)
    return x.contiguous()


def _shift(x: torch.Tensor, draw: Draw) -> torch.Tensor:
    """The H x W window at ``draw.shift`` of x padded with p = ceil(min(H, W) / 8) zeros (4 at 28 and 32)."""
    _, h, w = x.shape
    pad = math.ceil(min(h, w) / 8)
    dy, dx = draw.shift(pad)
    return F.pad(x, (pad, pad, pad, pad))[:, dy:dy + h, dx:dx + w]


def _jitter(x: torch.Tensor, factors: tuple[float, float, float]) -> torch.Tensor:
    """Brightness b: x b; contrast c: m + c (x - m) with m the mean grey; saturation s
    (colour only): g + s (x - g) with g each pixel's grey (ITU-R 601 weights); clamped to [0, 1]."""
    b, c, s = factors
    x = (x * b).clamp_(0, 1)
    grey = _grey(x)
    x = (grey.mean() + c * (x - grey.mean())).clamp_(0, 1)
    if x.shape[0] == 3:
        grey = _grey(x)
        x = (grey + s * (x - grey)).clamp_(0, 1)
    return x


def _grey(x: torch.Tensor) -> torch.Tensor:
    if x.shape[0] != 3:
        return x
    return (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]).unsqueeze(0)


def _rotate(x: torch.Tensor, angle: float) -> torch.Tensor:
    """Turn (C, H, W) by ``angle`` radians about its centre. In grid_sample's
    coordinates, x and y in [-1, 1] across W and H, output pixel (x, y) reads
    the input at (cos a x - sin a (H / W) y, sin a (W / H) x + cos a y): a
    rotation in pixels, however the image is shaped; outside the input reads 0."""
    _, h, w = x.shape
    cos, sin = math.cos(angle), math.sin(angle)
    theta = torch.tensor([[[cos, -sin * h / w, 0.0], [sin * w / h, cos, 0.0]]], dtype=x.dtype)
    grid = F.affine_grid(theta, [1, *x.shape], align_corners=False)
    return F.grid_sample(x[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
