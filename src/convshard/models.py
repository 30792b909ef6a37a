"""The CNNs convshard trains: the paper's network, a small nested VGG, the
CIFAR forms of ResNet and VGG, and any model a user's factory builds.

``paper`` (Marques et al. 2018): input -> conv5x5(k1) -> ReLU -> maxpool2 ->
conv5x5(k2) -> ReLU -> maxpool2 -> linear -> classes, no padding. On
CIFAR-10 (3x32x32) the paper used k1, k2 = 500, 1500: the spatial sizes run
32 -> 28 -> 14 -> 10 -> 5, so the linear layer sees k2 * 5 * 5 features.

``vgg``: three nested blocks that exercise what ``shard_model`` must handle:
padding 1, a strided conv, a dilated conv with reflect padding, convs
without bias followed by BatchNorm, and a global average pool.

``resnet18``, ``resnet34`` (BasicBlock), ``resnet50`` (Bottleneck) (He et
al. 2016) and ``vgg11``, ``vgg16`` with BatchNorm (Simonyan and Zisserman
2015), in their CIFAR form: torchvision's modules, parameter names and
initialisation, but a 3x3 stride-1 stem without max-pool (ResNet), one
linear layer after a global average pool (VGG), and every conv without bias
(each is followed by BatchNorm). Their single kernel count is the base width w:
the four ResNet stages have w, 2w, 4w, 8w kernels (times 4 at a Bottleneck's
output), the VGG stages w, 2w, 4w, 8w, 8w; w = 64 gives torchvision's widths.

``package.module:function`` imports ``function`` and calls it, passing
``input_shape`` and ``classes`` (and ``kernels`` when given) as keyword
arguments where its signature takes them; it must return an ``nn.Module``.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import sys
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .errors import ConfigError

log = logging.getLogger(__name__)

MODELS: tuple[str, ...] = ("paper", "vgg", "resnet18", "resnet34", "resnet50", "vgg11", "vgg16")
DEFAULT_KERNELS: dict[str, tuple[int, ...]] = {
    "paper": (32, 64), "vgg": (32, 64, 64),
    "resnet18": (64,), "resnet34": (64,), "resnet50": (64,), "vgg11": (64,), "vgg16": (64,),
}


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


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


def _conv1x1(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)): (B, c_in, H, W) -> (B, width, H/s, W/s).

    conv1 is 3x3 with stride s, conv2 3x3; the shortcut is ``downsample``
    (conv1x1 with stride s, BatchNorm) where the shape changes, else x.
    """

    expansion = 1

    def __init__(self, c_in: int, width: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(c_in, width, stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(width, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """relu(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x)))))))) + shortcut(x)):
    (B, c_in, H, W) -> (B, 4 * width, H/s, W/s).

    conv1 1x1 to ``width``, conv2 3x3 with stride s (torchvision's ResNet
    v1.5), conv3 1x1 to 4 * width; the shortcut as in ``BasicBlock``.
    """

    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv1x1(c_in, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv1x1(width, width * self.expansion)
        self.bn3 = nn.BatchNorm2d(width * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """CIFAR-form ResNet: (B, C, H, W) -> (B, classes).

    conv1 3x3 (stride 1, no max-pool) -> bn1 -> relu -> layer1..layer4 of
    ``depths`` blocks with w, 2w, 4w, 8w kernels (layers 2-4 open with
    stride 2: H -> H/8 in all) -> global average pool -> fc. Any H, W >= 1.
    """

    def __init__(self, block: type[BasicBlock | Bottleneck], depths: Sequence[int],
                 input_shape: tuple[int, int, int], classes: int, width: int) -> None:
        super().__init__()
        self.inplanes = width
        self.conv1 = _conv3x3(input_shape[0], width)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._layer(block, width, depths[0], stride=1)
        self.layer2 = self._layer(block, 2 * width, depths[1], stride=2)
        self.layer3 = self._layer(block, 4 * width, depths[2], stride=2)
        self.layer4 = self._layer(block, 8 * width, depths[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8 * width * block.expansion, classes)
        _init_like_torchvision(self)

    def _layer(self, block: type[BasicBlock | Bottleneck], width: int, depth: int, *, stride: int) -> nn.Sequential:
        c_out = width * block.expansion
        downsample = None
        if stride != 1 or self.inplanes != c_out:
            downsample = nn.Sequential(_conv1x1(self.inplanes, c_out, stride), nn.BatchNorm2d(c_out))
        blocks = [block(self.inplanes, width, stride, downsample)]
        blocks += [block(c_out, width) for _ in range(depth - 1)]
        self.inplanes = c_out
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))  # (B, w, H, W)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, 8w * expansion, H/8, W/8)
        return self.fc(self.avgpool(x).flatten(1))


# Kernels per conv as multiples of the base width; "M" is a 2x2 max-pool (torchvision's configs A and D).
_VGG_CONFIGS: dict[str, tuple[int | str, ...]] = {
    "vgg11": (1, "M", 2, "M", 4, 4, "M", 8, 8, "M", 8, 8, "M"),
    "vgg16": (1, 1, "M", 2, 2, "M", 4, 4, 4, "M", 8, 8, 8, "M", 8, 8, 8, "M"),
}


class VGG(nn.Module):
    """CIFAR-form VGG with BatchNorm: (B, C, H, W) -> (B, classes).

    ``features``: conv3x3 (padding 1, no bias: BatchNorm follows) -> BatchNorm
    -> ReLU per entry of the config, five 2x2 max-pools with ceil_mode (32 -> 1
    and 28 -> 1 pixel);
    ``avgpool``: global average pool, (B, 8w, 1, 1); ``classifier``: one
    linear layer 8w -> classes.
    """

    def __init__(self, config: Sequence[int | str], input_shape: tuple[int, int, int], classes: int,
                 width: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = input_shape[0]
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                c_out = item * width
                layers += [_conv3x3(c_in, c_out), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
                c_in = c_out
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_in, classes)
        _init_like_torchvision(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


def _init_like_torchvision(model: nn.Module) -> None:
    """Convs: Kaiming normal (fan_out, ReLU gain); BatchNorm: weight 1, bias 0;
    VGG's linear layer: N(0, 0.01), bias 0 (ResNet's keeps PyTorch's default)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and isinstance(model, VGG):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


_BUILTIN: dict[str, Callable[[tuple[int, int, int], int, Sequence[int]], nn.Module]] = {
    "paper": PaperCNN,
    "vgg": SmallVGG,
    "resnet18": lambda shape, classes, k: ResNet(BasicBlock, (2, 2, 2, 2), shape, classes, k[0]),
    "resnet34": lambda shape, classes, k: ResNet(BasicBlock, (3, 4, 6, 3), shape, classes, k[0]),
    "resnet50": lambda shape, classes, k: ResNet(Bottleneck, (3, 4, 6, 3), shape, classes, k[0]),
    "vgg11": lambda shape, classes, k: VGG(_VGG_CONFIGS["vgg11"], shape, classes, k[0]),
    "vgg16": lambda shape, classes, k: VGG(_VGG_CONFIGS["vgg16"], shape, classes, k[0]),
}


def is_model_name(name: str) -> bool:
    """Whether ``name`` is a built-in model or has the form ``package.module:function``."""
    module, sep, attr = name.partition(":")
    return name in MODELS or bool(sep and module and attr)


def build_model(
    name: str, input_shape: tuple[int, int, int], classes: int, kernels: Sequence[int] | None = None
) -> nn.Module:
    """Build model ``name`` for inputs of ``input_shape`` (C, H, W) with ``kernels`` per conv layer
    (for the ResNets and VGGs: the base width). ``name`` is one of ``MODELS`` or
    ``package.module:function``."""
    if ":" in name:
        return _from_factory(name, input_shape, classes, kernels)
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; choose from {', '.join(MODELS)} or package.module:function")
    kernels = tuple(kernels or DEFAULT_KERNELS[name])
    want = len(DEFAULT_KERNELS[name])
    if len(kernels) != want:
        counts = "1 kernel count (the base width)" if want == 1 else f"{want} kernel counts"
        raise ConfigError(f"model {name!r} takes {counts}, got --kernels {','.join(map(str, kernels))}")
    if name == "paper":
        _, h, w = input_shape
        if min(h, w) < 16:
            raise ConfigError(f"model 'paper' needs inputs of at least 16x16, got {h}x{w}")
    return _BUILTIN[name](input_shape, classes, kernels)


def _from_factory(
    name: str, input_shape: tuple[int, int, int], classes: int, kernels: Sequence[int] | None
) -> nn.Module:
    """Import ``package.module:function`` and call it with the keyword arguments
    its signature takes (all of them when it has ``**kwargs``)."""
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"--model {name!r} is not of the form package.module:function")
    # Resolve the module as `python -m` does: the current directory first.
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # an import can fail with any exception the module raises
        raise ConfigError(f"--model {name!r}: cannot import {module_name}: {_one_line(exc)}") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"--model {name!r}: {module_name} has no callable {attr!r}")
    offered = {"input_shape": tuple(input_shape), "classes": classes}
    if kernels:
        offered["kernels"] = tuple(kernels)
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # no signature to read (some builtins): offer nothing
        parameters = ()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        accepted = set(offered)
    else:
        accepted = {p.name for p in parameters if p.kind is not inspect.Parameter.POSITIONAL_ONLY} & set(offered)
    if kernels and "kernels" not in accepted:
        raise ConfigError(f"--model {name!r} takes no kernels parameter, so --kernels cannot apply")
    try:
        model = factory(**{key: offered[key] for key in accepted})
    except Exception as exc:  # the user's code: any exception is its error
        raise ConfigError(f"--model {name!r} raised {type(exc).__name__}: {_one_line(exc)}") from exc
    if not isinstance(model, nn.Module):
        raise ConfigError(f"--model {name!r} returned {type(model).__name__}, not a torch.nn.Module")
    log.debug("model %s: %s(%s)", name, attr, ", ".join(sorted(accepted)))
    return model


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
