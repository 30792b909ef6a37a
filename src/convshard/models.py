"""The CNNs convshard trains: the paper's network and a deeper nested one.

``paper`` (Marques et al. 2018): input -> conv5x5(k1) -> ReLU -> maxpool2 ->
conv5x5(k2) -> ReLU -> maxpool2 -> linear -> classes, no padding. On
CIFAR-10 (3x32x32) the paper used k1, k2 = 500, 1500: the spatial sizes run
32 -> 28 -> 14 -> 10 -> 5, so the linear layer sees k2 * 5 * 5 features.

``vgg``: three nested blocks that exercise what ``shard_model`` must handle:
padding 1, a strided conv, a dilated conv with reflect padding, convs
without bias followed by BatchNorm, and a global average pool.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .errors import ConfigError

MODELS: tuple[str, ...] = ("paper", "vgg")
DEFAULT_KERNELS: dict[str, tuple[int, ...]] = {"paper": (32, 64), "vgg": (32, 64, 64)}


class PaperCNN(nn.Module):
    """The paper's CNN: two 5x5 conv layers of k1 and k2 kernels, then a linear classifier."""

    def __init__(self, input_shape: tuple[int, int, int], classes: int, kernels: Sequence[int]) -> None:
        super().__init__()
        c, h, w = input_shape
        k1, k2 = kernels
        self.features = nn.Sequential(
            nn.Conv2d(c, k1, 5), nn.ReLU(), nn.MaxPool2d(2),  # (B, k1, (H-4)/2, (W-4)/2)
            nn.Conv2d(k1, k2, 5), nn.ReLU(), nn.MaxPool2d(2),  # (B, k2, H2, W2)
        )
        h2, w2 = ((h - 4) // 2 - 4) // 2, ((w - 4) // 2 - 4) // 2
        self.classifier = nn.Linear(k2 * h2 * w2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def _block(c_in: int, c_out: int, *, stride: int = 1, dilation: int = 1, mode: str = "zeros") -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=dilation, dilation=dilation,
                  bias=False, padding_mode=mode),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    )


class SmallVGG(nn.Module):
    """Three nested conv blocks (plain, strided, dilated+reflect) and a linear head."""

    def __init__(self, input_shape: tuple[int, int, int], classes: int, kernels: Sequence[int]) -> None:
        super().__init__()
        k1, k2, k3 = kernels
        self.stem = nn.Conv2d(input_shape[0], k1, 3, padding=1)
        self.body = nn.Sequential(
            nn.Sequential(_block(k1, k1), _block(k1, k2, stride=2)),
            nn.Sequential(_block(k2, k3, dilation=2, mode="reflect")),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(k3, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(torch.relu(self.stem(x))))


def build_model(
    name: str, input_shape: tuple[int, int, int], classes: int, kernels: Sequence[int] | None = None
) -> nn.Module:
    """Build model ``name`` for inputs of ``input_shape`` (C, H, W) with ``kernels`` per conv layer."""
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    kernels = tuple(kernels or DEFAULT_KERNELS[name])
    want = len(DEFAULT_KERNELS[name])
    if len(kernels) != want:
        raise ConfigError(f"model {name!r} takes {want} kernel counts, got --kernels {','.join(map(str, kernels))}")
    if name == "paper":
        _, h, w = input_shape
        if min(h, w) < 16:
            raise ConfigError(f"model 'paper' needs inputs of at least 16x16, got {h}x{w}")
        return PaperCNN(input_shape, classes, kernels)
    return SmallVGG(input_shape, classes, kernels)
