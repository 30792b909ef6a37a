"""Model factories for ``--model factory_models:NAME`` (the tests put this
folder on ``sys.path``), and models the exactness tests shard.

``se_depthwise_net``: a small CNN with what a real mobile network holds
beyond plain convs: a depthwise conv, squeeze-excite gates, residual adds
and BatchNorm. Built from the global RNG, so ``torch.manual_seed`` fixes it.
"""

from __future__ import annotations

import torch
from torch import nn


class SqueezeExcite(nn.Module):
    """x * sigmoid(expand(relu(reduce(avgpool(x))))): a per-channel gate, (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.relu = nn.ReLU(inplace=True)
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.expand(self.relu(self.reduce(self.pool(x)))))


class DepthwiseSEBlock(nn.Module):
    """relu(se(bn2(pointwise(relu(bn1(depthwise(x)))))) + shortcut(x)):
    (B, c_in, H, W) -> (B, c_out, H, W); the shortcut is conv1x1 + BatchNorm
    when c_in != c_out, else x."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(c_in, c_in, 3, padding=1, groups=c_in, bias=False)
        self.bn1 = nn.BatchNorm2d(c_in)
        self.pointwise = nn.Conv2d(c_in, c_out, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.se = SqueezeExcite(c_out, 4)
        self.shortcut = (nn.Identity() if c_in == c_out
                         else nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.depthwise(x)))
        out = self.se(self.bn2(self.pointwise(out)))
        return torch.relu(out + self.shortcut(x))


class SEDepthwiseNet(nn.Module):
    """stem conv3x3 (8) + BN + ReLU -> block 8->16 (projected shortcut) ->
    block 16->16 (identity shortcut) -> global average pool -> linear:
    (B, C, H, W) -> (B, classes)."""

    def __init__(self, input_shape: tuple[int, int, int], classes: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(input_shape[0], 8, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.blocks = nn.Sequential(DepthwiseSEBlock(8, 16), DepthwiseSEBlock(16, 16))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.blocks(self.stem(x))).flatten(1))


def se_depthwise_net(input_shape: tuple[int, int, int], classes: int) -> nn.Module:
    """The factory: ``--model factory_models:se_depthwise_net``."""
    return SEDepthwiseNet(input_shape, classes)


def not_a_module(input_shape: tuple[int, int, int], classes: int) -> str:
    """A factory that returns something other than a module."""
    return "a string"


def raises(classes: int) -> nn.Module:
    """A factory that fails."""
    raise RuntimeError(f"cannot build a model for {classes} classes")


def takes_kwargs(**kwargs) -> nn.Module:
    """A factory that takes everything as keywords: a linear model on the flattened image."""
    c, h, w = kwargs["input_shape"]
    return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, kwargs["classes"]))


def takes_nothing() -> nn.Module:
    """A factory that takes no arguments: 10 classes of 1x28x28 images."""
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))


def widths(input_shape: tuple[int, int, int], classes: int, kernels: tuple[int, ...]) -> nn.Module:
    """A factory that takes ``--kernels``: one conv of kernels[0] kernels."""
    return nn.Sequential(nn.Conv2d(input_shape[0], kernels[0], 3, padding=1), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(kernels[0], classes))


def no_classifier(input_shape: tuple[int, int, int], classes: int) -> nn.Module:
    """A factory that forgets the classifier: conv3x3 (4) + flatten gives 4 * H * W logits, not ``classes``."""
    return nn.Sequential(nn.Conv2d(input_shape[0], 4, 3, padding=1), nn.Flatten())


def mlp(input_shape: tuple[int, int, int], classes: int) -> nn.Module:
    """A factory with no conv layer: flatten -> linear (32) -> ReLU -> linear, (B, C, H, W) -> (B, classes)."""
    c, h, w = input_shape
    return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, 32), nn.ReLU(), nn.Linear(32, classes))
