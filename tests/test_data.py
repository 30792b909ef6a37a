"""Tests for convshard.data: the bundled MNIST subset, CIFAR-10 archives in the
real file format (generated small), image folders (written with Pillow),
synthetic data, epoch orders and augmentation. No network."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from convshard.cifar10 import download_cifar10
from convshard.data import DATASETS, Dataset, epoch_permutation, load_dataset
from convshard.errors import ConfigError

TRAIN_PER_BATCH, TEST_SIZE = 20, 10
CIFAR_MEAN = torch.tensor((0.4914, 0.4822, 0.4465)).view(3, 1, 1)
CIFAR_STD = torch.tensor((0.2470, 0.2435, 0.2616)).view(3, 1, 1)


def write_batch(path: Path, pixels: np.ndarray, labels: list[int]) -> None:
    """One batch file as CIFAR-10 ships it: a protocol-2 pickle with bytes keys."""
    batch = {
        b"batch_label": path.name.encode(),
        b"labels": labels,
        b"data": pixels,
        b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))],
    }
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)


def make_cifar_folder(root: Path, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Write ``root/cifar-10-batches-py`` with 5 x 20 train and 10 test images.

    Returns the train pixels (100, 3072) and the test pixels (10, 3072) as written.
    """
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train = []
    for i in range(1, 6):
        pixels = rng.integers(0, 256, (TRAIN_PER_BATCH, 3072), dtype=np.uint8)
        write_batch(folder / f"data_batch_{i}", pixels, rng.integers(0, 10, TRAIN_PER_BATCH).tolist())
        train.append(pixels)
    test = rng.integers(0, 256, (TEST_SIZE, 3072), dtype=np.uint8)
    write_batch(folder / "test_batch", test, list(range(TEST_SIZE)))
    return np.concatenate(train), test


def make_cifar_archive(root: Path) -> tuple[Path, np.ndarray]:
    """Write ``root/cifar-10-python.tar.gz``; returns it and its train pixels."""
    staging = root / "staging"
    train, _ = make_cifar_folder(staging)
    archive = root / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(staging / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return archive, train


def unnormalise(images: torch.Tensor) -> np.ndarray:
    """(N, 3, 32, 32) normalised -> (N, 3072) uint8."""
    return (images * CIFAR_STD + CIFAR_MEAN).mul(255).round().to(torch.uint8).flatten(1).numpy()


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


# --- mnist -------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist() -> Dataset:
    return load_dataset("mnist")


def test_mnist_shapes_and_dtypes(mnist: Dataset) -> None:
    assert mnist.name == "mnist" and mnist.classes == 10
    assert mnist.train_x.shape == (4000, 1, 28, 28) and mnist.test_x.shape == (1000, 1, 28, 28)
    assert mnist.train_y.shape == (4000,) and mnist.test_y.shape == (1000,)
    assert mnist.train_x.dtype == torch.float32 and mnist.train_y.dtype == torch.int64
    assert mnist.input_shape == (1, 28, 28)
    assert set(mnist.train_y.tolist()) == set(range(10)) == set(mnist.test_y.tolist())


def test_mnist_is_normalised(mnist: Dataset) -> None:
    assert abs(mnist.train_x.mean().item()) < 0.1
    assert abs(mnist.train_x.std().item() - 1) < 0.1
    assert mnist.train_x.min().item() == pytest.approx(-0.1307 / 0.3081, abs=1e-5)


def test_mnist_split_is_fixed_across_seeds(mnist: Dataset) -> None:
    other = load_dataset("mnist", seed=123)
    assert torch.equal(other.test_x, mnist.test_x) and torch.equal(other.test_y, mnist.test_y)
    assert torch.equal(other.train_y, mnist.train_y)


# --- cifar10 -----------------------------------------------------------------


def test_cifar_folder_loads_and_round_trips(tmp_path: Path) -> None:
    train, test = make_cifar_folder(tmp_path)
    ds = load_dataset("cifar10", data_dir=tmp_path)
    assert ds.classes == 10 and ds.input_shape == (3, 32, 32)
    assert ds.train_x.shape == (5 * TRAIN_PER_BATCH, 3, 32, 32) and ds.train_x.dtype == torch.float32
    assert ds.test_x.shape == (TEST_SIZE, 3, 32, 32)
    assert ds.train_y.dtype == torch.int64 and ds.test_y.tolist() == list(range(TEST_SIZE))
    np.testing.assert_array_equal(unnormalise(ds.train_x[[0, 45, 99]]), train[[0, 45, 99]])
    np.testing.assert_array_equal(unnormalise(ds.test_x), test)


def test_cifar_channels_are_planar(tmp_path: Path) -> None:
    """The first 1024 values of a row are the red plane, row-major."""
    folder = tmp_path / "cifar-10-batches-py"
    make_cifar_folder(tmp_path)
    pixels = np.zeros((1, 3072), np.uint8)
    pixels[0, 1] = 255  # red, row 0, column 1
    pixels[0, 1024 + 32] = 255  # green, row 1, column 0
    write_batch(folder / "test_batch", pixels, [3])
    image = load_dataset("cifar10", data_dir=tmp_path).test_x[0] * CIFAR_STD + CIFAR_MEAN
    assert torch.nonzero(image > 0.5).tolist() == [[0, 0, 1], [1, 1, 0]]


def test_cifar_archive_is_extracted_and_loads(tmp_path: Path) -> None:
    archive, train = make_cifar_archive(tmp_path / "src")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    os.replace(archive, data_dir / archive.name)
    ds = load_dataset("cifar10", data_dir=data_dir)
    assert (data_dir / "cifar-10-batches-py" / "test_batch").is_file()
    np.testing.assert_array_equal(unnormalise(ds.train_x[:1]), train[:1])
    assert sorted(p.name for p in data_dir.iterdir()) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]


def test_cifar_archive_escaping_data_dir_is_refused(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with tarfile.open(data_dir / "cifar-10-python.tar.gz", "w:gz") as tar:
        member = tarfile.TarInfo("../escaped")
        tar.addfile(member, io.BytesIO(b""))
    with pytest.raises(ConfigError, match="cifar-10-python.tar.gz"):
        load_dataset("cifar10", data_dir=data_dir)
    assert not (tmp_path / "escaped").exists()


def test_cifar_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="convshard download cifar10") as err:
        load_dataset("cifar10", data_dir=tmp_path / "nowhere")
    assert "nowhere" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="--data-dir"):
        load_dataset("cifar10")


def test_cifar_missing_batch_file(tmp_path: Path) -> None:
    make_cifar_folder(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(ConfigError, match="data_batch_4.*missing"):
        load_dataset("cifar10", data_dir=tmp_path)


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda raw: raw[: len(raw) // 2], id="truncated"),
        pytest.param(lambda raw: bytes(range(256)) * 4, id="garbage"),
        pytest.param(lambda raw: b"", id="empty"),
        pytest.param(lambda raw: pickle.dumps([1, 2, 3], protocol=2), id="not-a-dict"),
    ],
)
def test_cifar_corrupt_batch_names_the_file(tmp_path: Path, damage) -> None:
    make_cifar_folder(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ConfigError) as err:
        load_dataset("cifar10", data_dir=tmp_path)
    message = str(err.value)
    assert str(path) in message and "convshard download cifar10" in message and "\n" not in message


@pytest.mark.parametrize(
    ("pixels", "labels"),
    [
        pytest.param(np.zeros((2, 3071), np.uint8), [0, 1], id="short-rows"),
        pytest.param(np.zeros((2, 3072), np.float32), [0, 1], id="float-pixels"),
        pytest.param(np.zeros((2, 3072), np.uint8), [0], id="label-count"),
        pytest.param(np.zeros((2, 3072), np.uint8), [0, 10], id="label-range"),
    ],
)
def test_cifar_malformed_batch(tmp_path: Path, pixels: np.ndarray, labels: list[int]) -> None:
    make_cifar_folder(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    write_batch(path, pixels, labels)
    with pytest.raises(ConfigError, match="test_batch"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_cifar_pickle_with_forbidden_global_is_not_executed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    monkeypatch.setattr(os, "system", lambda command: calls.append(command))
    make_cifar_folder(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    path.write_bytes(b"cos\nsystem\n(S'echo pwned'\ntR.")  # protocol 0: os.system('echo pwned')
    with pytest.raises(ConfigError, match="os.system") as err:
        load_dataset("cifar10", data_dir=tmp_path)
    assert str(path) in str(err.value)
    assert calls == []


# --- download_cifar10 --------------------------------------------------------


def test_download_from_file_url(tmp_path: Path) -> None:
    archive, train = make_cifar_archive(tmp_path / "mirror")
    data_dir = tmp_path / "data"
    folder = download_cifar10(data_dir, url=archive.as_uri(), md5=md5_of(archive), progress=False)
    assert folder == data_dir / "cifar-10-batches-py"
    assert (data_dir / "cifar-10-python.tar.gz").read_bytes() == archive.read_bytes()
    ds = load_dataset("cifar10", data_dir=data_dir)
    np.testing.assert_array_equal(unnormalise(ds.train_x[:1]), train[:1])
    assert sorted(p.name for p in data_dir.iterdir()) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]
    # Already present: nothing is fetched, so an unreachable URL does no harm.
    bad_url = (tmp_path / "absent.tar.gz").as_uri()
    assert download_cifar10(data_dir, url=bad_url, progress=False) == folder


def test_download_md5_mismatch_leaves_nothing(tmp_path: Path) -> None:
    archive, _ = make_cifar_archive(tmp_path / "mirror")
    data_dir = tmp_path / "data"
    with pytest.raises(ConfigError) as err:
        download_cifar10(data_dir, url=archive.as_uri(), md5="0" * 32, progress=False)
    message = str(err.value)
    assert archive.as_uri() in message and md5_of(archive) in message and "0" * 32 in message
    assert list(data_dir.iterdir()) == []


def test_download_unreachable_url(tmp_path: Path) -> None:
    url = (tmp_path / "absent.tar.gz").as_uri()
    with pytest.raises(ConfigError, match="cannot download") as err:
        download_cifar10(tmp_path / "data", url=url, progress=False)
    assert url in str(err.value) and "\n" not in str(err.value)
    assert list((tmp_path / "data").iterdir()) == []


def test_download_replaces_broken_folder(tmp_path: Path) -> None:
    archive, _ = make_cifar_archive(tmp_path / "mirror")
    data_dir = tmp_path / "data"
    (data_dir / "cifar-10-batches-py").mkdir(parents=True)
    download_cifar10(data_dir, url=archive.as_uri(), md5=md5_of(archive), progress=False)
    assert load_dataset("cifar10", data_dir=data_dir).train_x.shape[0] == 5 * TRAIN_PER_BATCH


# --- synthetic ---------------------------------------------------------------


def test_synthetic_shapes_and_determinism() -> None:
    kwargs = dict(synthetic_shape=(2, 8, 6), synthetic_sizes=(64, 16), classes=5)
    a = load_dataset("synthetic", seed=1, **kwargs)
    b = load_dataset("synthetic", seed=1, **kwargs)
    c = load_dataset("synthetic", seed=2, **kwargs)
    assert a.train_x.shape == (64, 2, 8, 6) and a.test_x.shape == (16, 2, 8, 6)
    assert a.train_x.dtype == torch.float32 and a.train_y.dtype == torch.int64
    assert a.input_shape == (2, 8, 6) and a.classes == 5
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(a.train_x, c.train_x)
    labels = torch.cat([a.train_y, a.test_y])
    assert 0 <= labels.min() and labels.max() < 5 and len(labels.unique()) > 1


def test_synthetic_labels_are_linearly_learnable() -> None:
    ds = load_dataset("synthetic", synthetic_shape=(1, 4, 4), synthetic_sizes=(2000, 500), classes=3)
    x = ds.train_x.flatten(1)
    weights = torch.linalg.lstsq(x, torch.nn.functional.one_hot(ds.train_y, 3).float()).solution
    accuracy = ((ds.test_x.flatten(1) @ weights).argmax(1) == ds.test_y).float().mean()
    assert accuracy > 0.8


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(synthetic_sizes=(0, 10)),
        dict(synthetic_sizes=(10, -1)),
        dict(synthetic_shape=(3, 0, 32)),
        dict(synthetic_shape=(3, 32)),
        dict(classes=0),
    ],
)
def test_synthetic_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        load_dataset("synthetic", **kwargs)


# --- epoch_permutation and names ----------------------------------------------


@settings(max_examples=30)
@given(n=st.integers(0, 300), seed=st.integers(0, 2**32), epoch=st.integers(0, 1000))
def test_epoch_permutation_is_a_deterministic_permutation(n: int, seed: int, epoch: int) -> None:
    order = epoch_permutation(n, seed=seed, epoch=epoch)
    assert order.dtype == torch.int64
    assert torch.equal(order.sort().values, torch.arange(n))
    assert torch.equal(order, epoch_permutation(n, seed=seed, epoch=epoch))


def test_epoch_permutation_varies_with_epoch_and_seed() -> None:
    base = epoch_permutation(1000, seed=0, epoch=0)
    assert not torch.equal(base, epoch_permutation(1000, seed=0, epoch=1))
    assert not torch.equal(base, epoch_permutation(1000, seed=1, epoch=0))
    assert not torch.equal(epoch_permutation(1000, seed=0, epoch=1), epoch_permutation(1000, seed=1, epoch=0))


def test_unknown_dataset_lists_choices() -> None:
    with pytest.raises(ConfigError) as err:
        load_dataset("imagenet")
    assert "imagenet" in str(err.value) and all(name in str(err.value) for name in DATASETS)


# --- folder ------------------------------------------------------------------

RED, BLUE = (200, 30, 30), (20, 40, 220)


def make_image_folder(root: Path, classes: dict[str, tuple[int, ...]], *, per_class: int = 6,
                      mode: str = "RGB") -> Path:
    """``root/<class>/img_<i>.png``: ``per_class`` images of each class, of varied
    sizes, filled with the class's colour plus noise."""
    rng = np.random.default_rng(0)
    for name, colour in classes.items():
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            h, w = 20 + 3 * i, 40 - 2 * i
            pixels = np.clip(np.array(colour) + rng.integers(-20, 21, (h, w, len(colour))), 0, 255).astype(np.uint8)
            Image.fromarray(pixels.squeeze(2) if mode == "L" else pixels, mode).save(folder / f"img_{i}.png")
    return root


def test_folder_loads_resizes_splits_and_normalises(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", {"b_red": RED, "a_blue": BLUE})
    (root / "a_blue" / "notes.txt").write_text("not an image: ignored")
    (root / ".cache").mkdir()  # hidden folders are not classes
    ds = load_dataset("folder", data_dir=root, image_size=12)
    assert ds.name == "folder" and ds.classes == 2 and ds.input_shape == (3, 12, 12)
    # in each class the 5th image (img_4) is the test image, the other five train
    assert ds.train_y.tolist() == [0] * 5 + [1] * 5 and ds.test_y.tolist() == [0, 1]
    assert ds.train_x.dtype == torch.float32 and ds.train_y.dtype == torch.int64
    assert ds.train_x.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert (ds.train_x.std(dim=(0, 2, 3), correction=0) - 1).abs().max() < 1e-3
    # class 0 is a_blue (sorted names): more blue than red, class 1 the reverse
    red, blue = ds.test_x[:, 0].mean(dim=(1, 2)), ds.test_x[:, 2].mean(dim=(1, 2))
    assert blue[0] > red[0] and red[1] > blue[1]


def test_folder_is_grayscale_only_when_every_image_is(tmp_path: Path) -> None:
    gray = make_image_folder(tmp_path / "gray", {"x": (60,), "y": (190,)}, mode="L")
    assert load_dataset("folder", data_dir=gray, image_size=8).input_shape == (1, 8, 8)
    Image.new("RGB", (10, 10), RED).save(gray / "y" / "img_9.png")
    assert load_dataset("folder", data_dir=gray, image_size=8).input_shape == (3, 8, 8)


def test_folder_split_ignores_the_seed(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path, {"r": RED, "b": BLUE}, per_class=11)
    one, other = (load_dataset("folder", data_dir=root, seed=s, image_size=8) for s in (0, 99))
    assert torch.equal(one.test_x, other.test_x) and len(one.test_y) == 4  # images 5 and 10 of each class


def _corrupt(root: Path) -> Path:
    path = root / "red" / "img_2.png"
    path.write_bytes(b"\x89PNG not really")
    return path


def _truncated(root: Path) -> Path:
    path = root / "red" / "img_3.png"
    path.write_bytes(path.read_bytes()[:60])
    return path


@pytest.mark.parametrize("damage", [_corrupt, _truncated], ids=["corrupt", "truncated"])
def test_folder_unreadable_image_names_the_file(tmp_path: Path, damage) -> None:
    root = make_image_folder(tmp_path, {"red": RED, "blue": BLUE})
    path = damage(root)
    with pytest.raises(ConfigError, match=str(path)) as err:
        load_dataset("folder", data_dir=root).train_x  # read when an image is read: every one here
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("prepare", "needle"), [
    (lambda root: None, "is not a directory"),
    (lambda root: root.mkdir(), "has no class sub-folders"),
    (lambda root: (root / "empty").mkdir(parents=True), "class folder {root}/empty holds no images"),
    (lambda root: make_image_folder(root, {"red": RED}, per_class=4), "has no test images"),
], ids=["missing", "no-classes", "empty-class", "too-few-for-a-test-set"])
def test_folder_bad_layouts(tmp_path: Path, prepare, needle: str) -> None:
    root = tmp_path / "data"
    prepare(root)
    with pytest.raises(ConfigError, match=needle.format(root=root)) as err:
        load_dataset("folder", data_dir=root)
    assert str(root) in str(err.value)


def test_folder_needs_a_data_dir() -> None:
    with pytest.raises(ConfigError, match="--data-dir"):
        load_dataset("folder")
