"""Images read from disk as they are needed: an image folder, or a user's dataset.

``load`` lists a folder with one sub-folder per class (class ``i`` is the
``i``-th sub-folder in sorted name order): JPEG, PNG and every format
Pillow reads. With ``train/`` and ``val/`` sub-folders (each one
sub-folder per class) those are the training and test images; otherwise a
share ``val_fraction`` of each class, spread over it in file name order
(0.2: the 5th, 10th, ... image), is held out for test: the split depends on
the files only, never on the seed. Only the file names are held: an image
is decoded when it is read (``decode``), so memory does not grow with the
folder. Images are RGB, or grayscale (one channel) when every image of
the normalisation sample (``data.STATS_SAMPLE``, spread over the training
images) is; both splits are normalised with that sample's mean and std.

``load_user`` calls ``package.module:function`` for each split
(``data``'s docstring states the contract).
"""

from __future__ import annotations

import importlib
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .data import STATS_SAMPLE, Box, Dataset, Images, one_line, pixel_stats, resized_crop
from .errors import ConfigError

log = logging.getLogger(__name__)

_GRAYSCALE_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})  # Pillow modes without colour


class Files(Images):
    """Images in files, decoded when read: ``paths[i]`` has label ``labels[i]``,
    read as (channels, size, size) uint8."""

    decodes = True

    def __init__(self, paths: Sequence[Path], labels: Sequence[int], *, channels: int, size: int) -> None:
        self.paths = [str(p) for p in paths]
        self._labels = torch.tensor(list(labels), dtype=torch.long)
        self.channels, self.size = channels, size
        self.shape = (channels, size, size)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def labels(self) -> torch.Tensor:
        return self._labels

    def read(self, i: int, box: Box | None = None) -> torch.Tensor:
        return decode(self.paths[i], channels=self.channels, size=self.size, box=box)


def decode(path: str | os.PathLike, *, channels: int, size: int, box: Box | None = None) -> torch.Tensor:
    """The image at ``path`` as (channels, size, size) uint8: grayscale
    (``channels`` 1) or RGB (3); the box ``box(width, height)`` of it, or
    without one its centred square (the shorter side), resized bilinearly
    to size x size. A JPEG decodes at the smallest of 1/1, 1/2, 1/4, 1/8
    of its scale that keeps the box at least ``size`` wide (Pillow's
    ``draft``), the box scaled with it. A file that does not decode is a
    ConfigError naming it."""
    mode = "L" if channels == 1 else "RGB"
    try:
        with Image.open(path) as image:
            width, height = image.size
            left, top, right, bottom = box(width, height) if box is not None else _centre_square(width, height)
            wanted = (math.ceil(width * size / (right - left)), math.ceil(height * size / (bottom - top)))
            image.draft(mode, wanted)
            sx, sy = image.size[0] / width, image.size[1] / height
            fitted = image.convert(mode).resize((size, size), Image.Resampling.BILINEAR,
                                                box=(left * sx, top * sy, right * sx, bottom * sy))
            pixels = torch.from_numpy(np.asarray(fitted).copy())
    except Exception as exc:  # a damaged file can fail with almost any exception type
        raise ConfigError(f"cannot decode image {path}: {one_line(exc)}") from exc
    return pixels.unsqueeze(0) if channels == 1 else pixels.permute(2, 0, 1).contiguous()


def _centre_square(width: int, height: int) -> tuple[float, float, float, float]:
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side


def load(data_dir: str | os.PathLike | None, size: int, val_fraction: float,
         normalisation: tuple[Sequence[float], Sequence[float]] | None) -> Dataset:
    """The image folder at ``data_dir``, its images ``size`` x ``size``."""
    if data_dir is None:
        raise ConfigError("dataset 'folder' needs a data directory: pass --data-dir DIR (one sub-folder per class)")
    if size <= 0:
        raise ConfigError(f"--image-size must be positive, got {size}")
    root = Path(data_dir)
    if not root.is_dir():
        raise ConfigError(f"folder dataset {root} is not a directory")
    train: list[tuple[Path, int]] = []
    test: list[tuple[Path, int]] = []
    if (root / "train").is_dir() and (root / "val").is_dir():
        by_class = _class_images(root / "train")
        names = list(by_class)
        val = _class_images(root / "val", allow_empty=True)
        extra = sorted(val.keys() - by_class.keys())
        if extra:
            raise ConfigError(f"class folder {root / 'val' / extra[0]} has no counterpart in {root / 'train'}")
        train = [(path, names.index(name)) for name, paths in by_class.items() for path in paths]
        test = [(path, names.index(name)) for name, paths in val.items() for path in paths]
        if not test:
            raise ConfigError(f"folder dataset {root}: {root / 'val'} holds no images")
    else:
        if not 0 < val_fraction < 1:
            raise ConfigError(f"--val-fraction must be between 0 and 1, got {val_fraction:g}")
        by_class = _class_images(root)
        names = list(by_class)
        for label, paths in enumerate(by_class.values()):
            for i, path in enumerate(paths):
                (test if _held_out(i, val_fraction) else train).append((path, label))
        if not test:
            raise ConfigError(f"folder dataset {root} has no test images at --val-fraction {val_fraction:g}: "
                              f"a class needs at least {math.ceil(1 / val_fraction - 1e-9)} images, or give "
                              f"{root}/train and {root}/val")
    if normalisation is not None:
        channels = len(normalisation[0])
    else:
        sample = [train[int(i)][0] for i in np.linspace(0, len(train) - 1, min(len(train), STATS_SAMPLE))]
        channels = 1 if all(_image_mode(path) in _GRAYSCALE_MODES for path in sample) else 3
    splits = [Files([p for p, _ in files], [label for _, label in files], channels=channels, size=size)
              for files in (train, test)]
    mean, std = normalisation if normalisation is not None else pixel_stats(splits[0])
    log.debug("folder dataset %s: classes %s, %d channel(s)", root, names, channels)
    return Dataset("folder", *splits, len(names), tuple(names), tuple(mean), tuple(std))


def _held_out(i: int, fraction: float) -> bool:
    """Whether the ``i``-th image of a class (name order) is a test image:
    when floor((i + 1) f) passes an integer, so that a share f of every
    class is held out, spread over it (f = 0.2: the 5th, 10th, ...)."""
    return math.floor((i + 1) * fraction + 1e-9) > math.floor(i * fraction + 1e-9)


def _class_images(root: Path, *, allow_empty: bool = False) -> dict[str, list[Path]]:
    """Class name -> its images in name order, for every sub-folder of ``root`` (sorted by name)."""
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs and not allow_empty:
        raise ConfigError(f"folder dataset {root} has no class sub-folders (one per class, holding its images)")
    extensions = Image.registered_extensions()
    out = {}
    for folder in class_dirs:
        out[folder.name] = sorted(p for p in folder.iterdir()
                                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in extensions)
        if not out[folder.name] and not allow_empty:
            raise ConfigError(f"class folder {folder} holds no images")
    return out


def _image_mode(path: Path) -> str:
    """The Pillow mode of the image at ``path``, from its header."""
    try:
        with Image.open(path) as image:
            return image.mode
    except Exception as exc:  # a damaged file can fail with almost any exception type
        raise ConfigError(f"cannot read image {path}: {one_line(exc)}") from exc


class UserImages(Images):
    """A user's map-style dataset of (image, label): tensors (C, H, W) kept
    as they are (uint8 pixels or float values), PIL images read as a
    folder's at ``size`` x ``size`` (``channels`` 3, or 1 for grayscale)."""

    decodes = True

    def __init__(self, source: torch.utils.data.Dataset, *, where: str, size: int) -> None:
        self.source, self.where, self.size = source, where, size
        if len(source) == 0:
            raise ConfigError(f"{where} holds no images")
        first, _ = self._item(0)
        if isinstance(first, Image.Image):
            self.shape = (1 if first.mode in _GRAYSCALE_MODES else 3, size, size)
        else:
            self.shape = tuple(self._tensor(first, 0).shape)
        targets = getattr(source, "targets", None)
        self._labels = torch.as_tensor(targets, dtype=torch.long) if targets is not None else None

    def __len__(self) -> int:
        return len(self.source)

    @property
    def labels(self) -> torch.Tensor:
        if self._labels is None:  # no ``targets``: every item read once, for its label
            self._labels = torch.tensor([self._item(i)[1] for i in range(len(self))], dtype=torch.long)
        return self._labels

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, label = self._item(i)
        return self._pixels(image, i, None), label

    def read(self, i: int, box: Box | None = None) -> torch.Tensor:
        return self._pixels(self._item(i)[0], i, box)

    def _item(self, i: int) -> tuple[object, int]:
        try:
            image, label = self.source[i]
        except Exception as exc:  # the user's code: any exception is its error
            raise ConfigError(f"{self.where}: item {i} fails: {type(exc).__name__}: {one_line(exc)}") from exc
        return image, int(label)

    def _pixels(self, image: object, i: int, box: Box | None) -> torch.Tensor:
        if isinstance(image, Image.Image):
            c, size = self.shape[0], self.size
            mode = "L" if c == 1 else "RGB"
            w, h = image.size
            area = box(w, h) if box is not None else (
                (w - min(w, h)) / 2, (h - min(w, h)) / 2, (w + min(w, h)) / 2, (h + min(w, h)) / 2)
            out = torch.from_numpy(np.asarray(image.convert(mode).resize((size, size), Image.Resampling.BILINEAR,
                                                                         box=area)).copy())
            return out.unsqueeze(0) if c == 1 else out.permute(2, 0, 1).contiguous()
        tensor = self._tensor(image, i)
        return tensor if box is None else resized_crop(tensor, box, tensor.shape[1:])

    def _tensor(self, image: object, i: int) -> torch.Tensor:
        tensor = torch.as_tensor(image)
        if tensor.dim() != 3 or (hasattr(self, "shape") and tuple(tensor.shape) != self.shape):
            want = "x".join(map(str, self.shape)) if hasattr(self, "shape") else "(C, H, W)"
            raise ConfigError(f"{self.where}: item {i} is an image of shape {tuple(tensor.shape)}, not {want}")
        return tensor


def load_user(name: str, size: int, normalisation: tuple[Sequence[float], Sequence[float]] | None) -> Dataset:
    """The dataset ``package.module:function`` returns for ``"train"`` and ``"val"``."""
    module_name, _, function_name = name.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"dataset {name!r}: cannot import {function_name!r} from {module_name!r}: "
                          f"{one_line(exc)}") from exc
    splits, classes = [], None
    for split in ("train", "val"):
        try:
            source = factory(split)
        except Exception as exc:  # the user's code: any exception is its error
            raise ConfigError(f"dataset {name!r}: {function_name}({split!r}) fails: {type(exc).__name__}: "
                              f"{one_line(exc)}") from exc
        if not (hasattr(source, "__getitem__") and hasattr(source, "__len__")):
            raise ConfigError(f"dataset {name!r}: {function_name}({split!r}) returned a {type(source).__name__}, "
                              f"not a map-style Dataset of (image, label)")
        classes = classes if classes is not None else getattr(source, "classes", None)
        splits.append(UserImages(source, where=f"dataset {name!r} ({split})", size=size))
    if classes is None:
        raise ConfigError(f"dataset {name!r}: its train split needs a 'classes' attribute (class names or count)")
    names = tuple(str(c) for c in classes) if not isinstance(classes, int) else tuple(map(str, range(classes)))
    if splits[0].shape != splits[1].shape:
        raise ConfigError(f"dataset {name!r}: train images are {splits[0].shape}, val images {splits[1].shape}")
    probe = splits[0].read(0)
    if normalisation is not None:
        mean, std = normalisation
    elif probe.dtype == torch.uint8:
        mean, std = pixel_stats(splits[0])
    else:
        mean, std = (), ()
    return Dataset(name, splits[0], splits[1], len(names), names, tuple(mean), tuple(std))
