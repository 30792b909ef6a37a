"""After training: the plain model from a checkpoint, its evaluation and its predictions.

A checkpoint (``convshard.run.checkpoint``) carries under ``inference``
what a model needs once training is over, written by ``spec``:

    {"model": a built-in name (``convshard.models.MODELS``) or package.module:function,
     "kernels": its --kernels (None: the model's default),
     "input_shape": [C, H, W],
     "class_names": one name per output, in label order,
     "mean", "std": per channel: a pixel p in [0, 1] enters the model as (p - mean) / std
                    (empty for synthetic data, which has no pixels),
     "dataset": what it was trained on,
     "data_dir": where its data was, as an absolute path,
     "module_root": for a package.module:function model, the directory its
                    package was imported from (absolute; None for a built-in)}

``load_model`` rebuilds the plain, unsharded ``nn.Module`` from it: one
device, no process group. ``evaluate`` counts a confusion matrix over a
dataset; ``predict`` gives each image file's class and probability.
``convshard evaluate`` and ``convshard predict`` print them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import data, folder
from ..errors import ConfigError
from ..models import build_model
from . import checkpoint
from .config import RunSettings, TrainConfig


@dataclass(frozen=True)
class ModelSpec:
    """What a checkpoint's model takes and gives (the module docstring's ``inference``)."""

    model: str
    kernels: tuple[int, ...] | None
    input_shape: tuple[int, int, int]  # (C, H, W)
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    dataset: str


def spec(config: RunSettings, dataset: data.Dataset) -> dict:
    """The ``inference`` entry of a checkpoint of ``config``'s model trained on ``dataset``."""
    names = dataset.class_names or tuple(str(i) for i in range(dataset.classes))
    return {"model": config.model, "kernels": list(config.kernels) if config.kernels else None,
            "input_shape": list(dataset.input_shape), "class_names": list(names), "mean": list(dataset.mean),
            "std": list(dataset.std), "dataset": dataset.name, "data_dir": os.path.abspath(config.data_dir),
            "module_root": _module_root(config.model)}


def _module_root(model: str) -> str | None:
    """The directory from which a ``package.module:function`` model's module
    was imported (the one that holds its top package); None for a built-in
    or a module without a file."""
    name = model.partition(":")[0] if ":" in model else None
    module = sys.modules.get(name) if name else None
    if module is None or not getattr(module, "__file__", None):
        return None
    path = Path(module.__file__).resolve()
    up = name.count(".") + (path.name == "__init__.py")  # pkg/sub/mod.py: 2 levels; pkg/__init__.py: 1
    return str(path.parents[up])


def load(path: str | os.PathLike) -> tuple[nn.Module, ModelSpec]:
    """The plain model of the checkpoint at ``path`` (a checkpoint file or
    its directory) in eval mode, float32 on the CPU, and its spec."""
    return from_checkpoint(checkpoint.read_checkpoint(path), path)


def from_checkpoint(payload: dict, path: str | os.PathLike) -> tuple[nn.Module, ModelSpec]:
    """``load`` of a checkpoint already read from ``path``."""
    saved = payload.get("inference")
    if not isinstance(saved, dict):
        raise ConfigError(f"checkpoint {path} holds no inference record (written by an earlier convshard): "
                          f"train it again, or rebuild the model with convshard.models.build_model")
    info = ModelSpec(saved["model"], tuple(saved["kernels"]) if saved["kernels"] else None,
                     tuple(saved["input_shape"]), tuple(saved["class_names"]), tuple(saved["mean"]),
                     tuple(saved["std"]), saved["dataset"])
    root = saved.get("module_root")
    if root and root not in sys.path:  # the factory's package, wherever this runs from
        sys.path.append(root)
    try:
        model = build_model(info.model, info.input_shape, len(info.class_names), info.kernels)
    except ConfigError as exc:
        where = f"it was imported from {root}" if root else "its module must be importable here"
        raise ConfigError(f"checkpoint {path}: {exc} ({where}; put its directory on PYTHONPATH)") from exc
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as exc:
        raise ConfigError(f"checkpoint {path} does not fit --model {info.model}: "
                          f"{' '.join(str(exc).split())[:300]}") from None
    return model.float().eval(), info


def load_model(path: str | os.PathLike) -> nn.Module:
    """The trained model of a convshard checkpoint as a plain ``nn.Module``.

    ``path`` is a ``--checkpoint-dir`` (its ``checkpoint.pt``) or a
    checkpoint file (``best.pt``, ``checkpoint-<step>.pt``). The model is
    rebuilt from the spec the checkpoint records (built-in name and width,
    or the ``package.module:function`` factory, which must import here),
    loaded with the unsharded weights and BatchNorm statistics, and returned
    in eval mode, float32, on the CPU: ``model(x)`` maps (N, C, H, W)
    normalised images to (N, classes) logits. ``load(path)[1]`` gives the
    input shape, class names and normalisation.
    """
    return load(path)[0]


def images(paths: Sequence[str | os.PathLike], info: ModelSpec) -> torch.Tensor:
    """Image files as the model takes them: decoded, fitted to H x W and
    normalised as its training images were; (N, C, H, W) float32."""
    if not info.mean:
        raise ConfigError(f"the model was trained on {info.dataset} data, which has no pixels: "
                          f"there is no normalisation to apply to image files")
    c, h, w = info.input_shape
    if h != w:
        raise ConfigError(f"the model takes {h}x{w} inputs; image files are fitted to squares")
    pixels = torch.stack([folder.decode(p, channels=c, size=h) for p in paths])  # (N, C, H, W) uint8
    mean = torch.tensor(info.mean).view(1, -1, 1, 1)
    std = torch.tensor(info.std).view(1, -1, 1, 1)
    return pixels.float().div_(255).sub_(mean).div_(std)


def predict(model: nn.Module, x: torch.Tensor, *, batch_size: int = 64) -> torch.Tensor:
    """Class probabilities softmax(model(x)): (N, C, H, W) -> (N, classes)."""
    with torch.no_grad():
        return torch.cat([model(x[i:i + batch_size]).softmax(1) for i in range(0, len(x), batch_size)])


def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
             classes: int) -> torch.Tensor:
    """The confusion matrix M (classes, classes), int64, over ``batches`` of
    images x (b, C, H, W) and labels y (b,): M[t, p] counts the images of
    true class t that the model put in class p (argmax of its logits).
    Accuracy is trace(M) / sum(M); class t's is M[t, t] / sum_p M[t, p]."""
    counts = torch.zeros(classes * classes, dtype=torch.long)
    with torch.no_grad():
        for x, y in batches:
            counts += torch.bincount(y * classes + model(x).argmax(1), minlength=classes * classes)
    return counts.view(classes, classes)


def test_data(payload: dict, info: ModelSpec, *, dataset: str | None = None, data_dir: str | None = None,
              val_fraction: float | None = None) -> data.Dataset:
    """The dataset a checkpoint's model is evaluated on: the one it was
    trained on (its config in ``payload``) unless named, a folder read at the
    model's image size and normalised as its training images were."""
    saved, d = payload.get("config", {}), TrainConfig()
    name = dataset or saved.get("dataset", info.dataset)
    size = saved.get("synthetic_size", d.synthetic_size)
    trained_on = payload.get("inference", {}).get("data_dir") or saved.get("data_dir", d.data_dir)
    if data_dir is None and name in ("folder", "cifar10") and not Path(trained_on).is_dir():
        raise ConfigError(f"the model was trained on {name} data in {trained_on}, which is not there: "
                          f"name the data with --data-dir")
    loaded = data.load_dataset(
        name, data_dir=data_dir or trained_on, seed=saved.get("seed", d.seed),
        synthetic_shape=info.input_shape, synthetic_sizes=(size, max(1, size // 4)), image_size=info.input_shape[1],
        val_fraction=val_fraction if val_fraction is not None else saved.get("val_fraction", d.val_fraction),
        normalisation=(info.mean, info.std) if (name == "folder" or ":" in name) and info.mean else None)
    if loaded.input_shape != info.input_shape:
        raise ConfigError(f"dataset {name} has images of {'x'.join(map(str, loaded.input_shape))}; the model "
                          f"takes {'x'.join(map(str, info.input_shape))}")
    return loaded


def labels_in(dataset: data.Dataset, info: ModelSpec) -> torch.Tensor:
    """The dataset's test labels as the model's class indices, matched by
    class name (a folder dataset's classes may be fewer or ordered otherwise)."""
    if not dataset.class_names or dataset.class_names == info.class_names:
        if dataset.classes != len(info.class_names):
            raise ConfigError(f"the dataset has {dataset.classes} classes, the model {len(info.class_names)}")
        return dataset.test_y
    unknown = [n for n in dataset.class_names if n not in info.class_names]
    if unknown:
        raise ConfigError(f"class {unknown[0]!r} of the dataset is not one of the model's: "
                          f"{', '.join(info.class_names)}")
    index = torch.tensor([info.class_names.index(n) for n in dataset.class_names])
    return index[dataset.test_y]


def format_evaluation(confusion: torch.Tensor, names: Sequence[str]) -> str:
    """Accuracy, per-class accuracy and the confusion matrix as text."""
    total, right = int(confusion.sum()), int(confusion.trace())
    width = max(len("class"), *(len(n) for n in names))
    cell = max(6, *(len(n) for n in names), len(str(int(confusion.max()))))
    lines = [f"accuracy {right / max(1, total):.4f} ({right}/{total})",
             f"{'class':<{width}}  accuracy  images"]
    for t, name in enumerate(names):
        n = int(confusion[t].sum())
        shown = f"{int(confusion[t, t]) / n:.4f}" if n else "     -"
        lines.append(f"{name:<{width}}  {shown:>8}  {n:>6}")
    lines.append("confusion matrix (rows: true class, columns: predicted class):")
    lines.append(" " * width + "".join(f"  {n:>{cell}}" for n in names))
    for t, name in enumerate(names):
        lines.append(f"{name:<{width}}" + "".join(f"  {int(v):>{cell}}" for v in confusion[t]))
    return "\n".join(lines)
