"""Tests for convshard.models: the built-in CNNs (shapes, parameter counts,
torchvision's names and initialisation) and ``package.module:function``
factories, with the factories in tests/factory_models.py."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_same_weights
from torch import nn

from convshard.errors import ConfigError
from convshard.models import DEFAULT_KERNELS, MODELS, build_model, is_model_name

CIFAR_MODELS = ("resnet18", "resnet34", "resnet50", "vgg11", "vgg16")
SMALL_KERNELS = {"paper": (4, 8), "vgg": (4, 8, 8)}  # the others: base width 4


def _parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _vgg_parameters(widths: list[int], c_in: int, classes: int) -> int:
    """Parameters of a CIFAR VGG: bias-free 3x3 convs, BatchNorm (weight, bias), one linear layer."""
    total = 0
    for width in widths:
        total += 9 * c_in * width + 2 * width
        c_in = width
    return total + c_in * classes + classes


# The CIFAR forms, 10 classes. ResNets: torchvision's counts at 1000 classes
# (11,689,512; 21,797,672; 25,557,032) with the 7x7 stem (3*64*49 weights)
# replaced by a 3x3 one (3*64*9) and fc (F*1000 + 1000) by F*10 + 10, F = 512 or 2048.
EXPECTED_PARAMETERS = {
    "resnet18": 11_689_512 - 3 * 64 * 40 - 512 * 990 - 990,
    "resnet34": 21_797_672 - 3 * 64 * 40 - 512 * 990 - 990,
    "resnet50": 25_557_032 - 3 * 64 * 40 - 2048 * 990 - 990,
    "vgg11": _vgg_parameters([64, 128, 256, 256, 512, 512, 512, 512], 3, 10),
    "vgg16": _vgg_parameters([64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512], 3, 10),
}


def test_resnet18_has_the_cifar_parameter_count() -> None:
    assert EXPECTED_PARAMETERS["resnet18"] == 11_173_962
    assert _parameters(build_model("resnet18", (3, 32, 32), 10)) == 11_173_962


@pytest.mark.parametrize("name", CIFAR_MODELS)
def test_parameter_counts_match_torchvision_cifar_forms(name: str) -> None:
    assert _parameters(build_model(name, (3, 32, 32), 10)) == EXPECTED_PARAMETERS[name]


@pytest.mark.parametrize(("name", "shape"), [
    (name, shape) for name in MODELS for shape in [(3, 32, 32), (1, 28, 28), (2, 9, 13)]
    if name != "paper" or min(shape[1:]) >= 16  # the paper's network needs 16x16
], ids=str)
def test_builtin_models_run_forward_and_backward(name: str, shape: tuple[int, int, int]) -> None:
    """Any input channels, sizes and class count; narrow widths keep it fast."""
    model = build_model(name, shape, 3, SMALL_KERNELS.get(name, (4,)))
    out = model(torch.randn(2, *shape))
    assert out.shape == (2, 3)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", CIFAR_MODELS)
def test_every_conv_is_bias_free_and_followed_by_batchnorm(name: str) -> None:
    model = build_model(name, (3, 32, 32), 10, (8,))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(convs) == len(norms) and all(c.bias is None for c in convs)
    assert all(r.inplace for r in model.modules() if isinstance(r, nn.ReLU))
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules()) or name.startswith("vgg")


def test_resnets_use_torchvisions_names() -> None:
    keys = set(build_model("resnet18", (3, 32, 32), 10, (8,)).state_dict())
    assert {"conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer1.1.bn2.weight",
            "layer2.0.downsample.0.weight", "layer2.0.downsample.1.running_var", "layer4.1.conv2.weight",
            "fc.weight", "fc.bias"} <= keys
    assert "layer1.0.downsample.0.weight" not in keys  # same width and stride 1: identity shortcut
    keys = set(build_model("resnet50", (3, 32, 32), 10, (8,)).state_dict())
    assert {"layer1.0.conv3.weight", "layer1.0.bn3.weight", "layer1.0.downsample.0.weight"} <= keys


def test_vgg_uses_torchvisions_names_and_one_linear_layer() -> None:
    model = build_model("vgg11", (3, 32, 32), 7, (8,))
    keys = set(model.state_dict())
    assert {"features.0.weight", "features.1.weight", "features.1.running_mean", "classifier.weight"} <= keys
    assert isinstance(model.classifier, nn.Linear) and model.classifier.in_features == 64
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.features) == 5


def test_base_width_scales_every_stage() -> None:
    model = build_model("resnet50", (3, 32, 32), 10, (16,))
    assert [model.layer1[0].conv1.out_channels, model.layer4[0].conv1.out_channels] == [16, 128]
    assert model.fc.in_features == 4 * 128
    assert DEFAULT_KERNELS["resnet18"] == (64,) and build_model("resnet18", (3, 32, 32), 10).conv1.out_channels == 64


def test_torchvision_initialisation() -> None:
    torch.manual_seed(0)
    model = build_model("resnet34", (3, 32, 32), 10)
    conv = model.layer3[0].conv2  # 256 kernels of 256 x 3 x 3: fan_out = 256 * 9
    assert conv.weight.std().item() == pytest.approx((2 / (256 * 9)) ** 0.5, rel=0.02)
    assert torch.equal(model.bn1.weight, torch.ones(64)) and torch.equal(model.bn1.bias, torch.zeros(64))
    vgg = build_model("vgg16", (3, 32, 32), 10)
    assert vgg.classifier.weight.std().item() == pytest.approx(0.01, rel=0.1)
    assert torch.equal(vgg.classifier.bias, torch.zeros(10))


@pytest.mark.parametrize("name", MODELS)
def test_same_seed_same_model(name: str) -> None:
    states = []
    for _ in range(2):
        torch.manual_seed(3)
        states.append(build_model(name, (1, 28, 28), 10, SMALL_KERNELS.get(name, (4,))).state_dict())
    assert_same_weights(states[1], states[0])


@pytest.mark.parametrize(("name", "kernels", "needle"), [
    ("resnet18", (4, 8), "1 kernel count (the base width), got --kernels 4,8"),
    ("paper", (4,), "2 kernel counts, got --kernels 4"),
    ("resnet", None, "'resnet'"),
])
def test_bad_builtin_requests(name: str, kernels: tuple[int, ...] | None, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        build_model(name, (3, 32, 32), 10, kernels)


# --- factories ---------------------------------------------------------------


def test_factory_builds_the_se_depthwise_net() -> None:
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(build_model("factory_models:se_depthwise_net", (3, 16, 16), 5))
    model, again = models
    assert_same_weights(again.state_dict(), model.state_dict())
    assert model(torch.randn(4, 3, 16, 16)).shape == (4, 5)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert any(c.groups == c.in_channels > 1 for c in convs), "no depthwise conv"
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_factory_arguments_follow_its_signature() -> None:
    assert build_model("factory_models:takes_kwargs", (2, 5, 5), 3)(torch.randn(1, 2, 5, 5)).shape == (1, 3)
    assert build_model("factory_models:takes_nothing", (3, 32, 32), 4)(torch.randn(1, 1, 28, 28)).shape == (1, 10)
    model = build_model("factory_models:widths", (3, 8, 8), 4, (6,))
    assert model[0].out_channels == 6


def test_factory_from_the_current_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A module beside the user resolves as under ``python -m``, even when the cwd is not on sys.path."""
    (tmp_path / "cwd_factory_for_test.py").write_text(
        "from torch import nn\ndef net(classes):\n    return nn.Linear(4, classes)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", os.getcwd())])
    monkeypatch.delitem(sys.modules, "cwd_factory_for_test", raising=False)
    assert build_model("cwd_factory_for_test:net", (1, 2, 2), 6).out_features == 6
    monkeypatch.delitem(sys.modules, "cwd_factory_for_test")


@pytest.mark.parametrize(("name", "kernels", "needle"), [
    ("no_such_module_for_convshard:net", None, "cannot import no_such_module_for_convshard"),
    ("factory_models:missing", None, "has no callable 'missing'"),
    ("factory_models:SqueezeExcite.__name__", None, "has no callable"),
    ("factory_models:not_a_module", None, "returned str, not a torch.nn.Module"),
    ("factory_models:raises", None, "raised RuntimeError: cannot build a model for 10 classes"),
    ("factory_models:se_depthwise_net", (4,), "takes no kernels parameter"),
    (":net", None, "not of the form package.module:function"),
])
def test_bad_factories_raise_one_line_config_errors(name: str, kernels: tuple[int, ...] | None, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_model(name, (3, 32, 32), 10, kernels)
    message = str(info.value)
    assert needle in message and repr(name) in message and "\n" not in message


def test_model_names() -> None:
    assert all(is_model_name(name) for name in MODELS)
    assert is_model_name("torchvision.models:resnet18") and is_model_name("mymodels:net")
    assert not any(is_model_name(name) for name in ("resnet", "mymodels:", ":net", "mymodels"))
