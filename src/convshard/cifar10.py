"""CIFAR-10 (Krizhevsky, 2009) from its python archive: 50,000 train and 10,000 test images of (3, 32, 32).

``load`` reads ``data_dir`` (the extracted ``cifar-10-batches-py/`` folder
or the ``.tar.gz``); ``download_cifar10`` (``convshard download cifar10``)
fetches and verifies the archive. The batch files are pickles, so they are
read with an unpickler that admits only the few numpy globals an array needs.
"""

from __future__ import annotations

import _codecs
import hashlib
import http.client
import logging
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .data import Dataset, Tensors, one_line
from .errors import ConfigError

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct

log = logging.getLogger(__name__)

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_ARCHIVE = "cifar-10-python.tar.gz"
_CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST_FILE = "test_batch"
_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR_STD = (0.2470, 0.2435, 0.2616)
_CIFAR_PIXELS = 3 * 32 * 32
_CIFAR_CLASSES = 10
_CIFAR_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


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
        raise ConfigError(f"cannot write to data directory {root}: {one_line(exc)}") from exc
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
            raise ConfigError(f"cannot download {url}: {one_line(exc)}") from exc
        got = digest.hexdigest()
        if got != md5.lower():
            raise ConfigError(f"MD5 mismatch for {url}: got {got}, expected {md5}")
        archive = root / _CIFAR_ARCHIVE
        os.replace(part, archive)
    finally:
        part.unlink(missing_ok=True)
    return _extract_cifar10(archive, root)


def load(data_dir: str | os.PathLike | None) -> Dataset:
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
        Tensors(_planar(train_x), torch.from_numpy(train_y)), Tensors(_planar(test_x), torch.from_numpy(test_y)),
        _CIFAR_CLASSES, _CIFAR_NAMES, _CIFAR_MEAN, _CIFAR_STD,
    )


def _planar(pixels: np.ndarray) -> torch.Tensor:
    """(N, 3072) uint8 rows -> (N, 3, 32, 32) uint8 images: each row holds the red plane, then green, then blue."""
    return torch.from_numpy(pixels).view(-1, 3, 32, 32)


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
        raise ConfigError(f"cannot extract CIFAR-10 archive {archive}: {one_line(exc)}; {hint}") from exc
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
        raise ConfigError(f"CIFAR-10 batch file {path} is unreadable ({one_line(exc)}); {hint}") from exc
    if not (isinstance(pixels, np.ndarray) and pixels.dtype == np.uint8 and pixels.ndim == 2
            and pixels.shape[1] == _CIFAR_PIXELS):
        raise ConfigError(f"CIFAR-10 batch file {path} has no (N, {_CIFAR_PIXELS}) uint8 data; {hint}")
    if labels.shape != (len(pixels),) or (labels.size and not 0 <= labels.min() <= labels.max() < _CIFAR_CLASSES):
        raise ConfigError(f"CIFAR-10 batch file {path} has labels that do not match its {len(pixels)} images; {hint}")
    return pixels, labels
