"""Tests for convshard.loader and the streamed datasets: the same batches
from files as from memory, memory bounded by the prefetch depth, each image
decoded once per host, mid-epoch resume, users' datasets and --eval-every."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from convshard import data, loader
from convshard.data import Dataset, Tensors, load_dataset
from convshard.errors import ConfigError
from convshard.loader import DEPTH, PREFETCH, Host, Position, TrainBatches

TESTS = Path(__file__).parent
ALL = ("resized-crop", "jitter", "rotate", "crop", "flip")


def _alone() -> Host:
    return Host(None, 0, (lambda n: slice(0, n),))


def _batches(dataset: Dataset, steps: int, *, workers: int, transforms=ALL, batch_size: int = 8,
             start: Position | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    stream = TrainBatches(dataset, seed=3, batch_size=batch_size, transforms=transforms,
                          start=start or Position(0, 0, steps), host=_alone(), workers=workers)
    out = [stream.next()[:2] for _ in range(steps)]
    stream.close()
    return out


def _write_folder(root: Path, pixels: np.ndarray, labels: np.ndarray, mode: str) -> None:
    """Image i as ``root/c<label>/<i>.png`` (lossless): class-major, in index order within a class."""
    for i, (image, label) in enumerate(zip(pixels, labels)):
        folder = root / f"c{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[0] if mode == "L" else image.transpose(1, 2, 0), mode).save(folder / f"{i:04d}.png")


@pytest.mark.parametrize(("shape", "mode"), [((3, 32, 32), "RGB"), ((1, 28, 28), "L")], ids=["cifar", "mnist"])
def test_streamed_folder_gives_bitwise_the_batches_of_memory(tmp_path: Path, shape, mode) -> None:
    """The same pixels as PNG files (decoded in a loader process) and as a
    uint8 tensor give bitwise equal augmented batches, every transform on."""
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", 40), ("val", 8)):
        pixels = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
        labels = np.sort(rng.integers(0, 3, n))  # class-major, as the folder lists them
        labels[:3] = [0, 1, 2]
        labels.sort()
        _write_folder(tmp_path / split, pixels, labels, mode)
        splits[split] = Tensors(torch.from_numpy(pixels), torch.from_numpy(labels))
    streamed = load_dataset("folder", data_dir=tmp_path, image_size=shape[1])
    assert streamed.input_shape == shape and streamed.train.decodes
    held = Dataset("held", splits["train"], splits["val"], 3, mean=streamed.mean, std=streamed.std)
    for (x, y), (x_held, y_held) in zip(_batches(streamed, 5, workers=1), _batches(held, 5, workers=0)):
        assert x.shape == (8, *shape) and torch.equal(x, x_held) and torch.equal(y, y_held)
    assert torch.equal(streamed.test_x, held.test_x)


def test_mid_stream_start_gives_the_same_batches(tmp_path: Path) -> None:
    """A stream started at step 3 (a resume) continues the order and the augmentation."""
    held = load_dataset("synthetic", synthetic_shape=(3, 12, 12), synthetic_sizes=(40, 8))
    whole = _batches(held, 8, workers=0)  # 5 steps per epoch: crosses into epoch 1
    rest = _batches(held, 5, workers=0, start=Position(0, 3, 5))
    for (x, y), (x_rest, y_rest) in zip(whole[3:], rest):
        assert torch.equal(x, x_rest) and torch.equal(y, y_rest)


class Counted(data.Images):
    """A decoding source that appends a line to ``log`` for each image read."""

    decodes = True

    def __init__(self, n: int, log: Path) -> None:
        self.n, self.log, self.shape = n, str(log), (1, 4, 4)

    def __len__(self) -> int:
        return self.n

    @property
    def labels(self) -> torch.Tensor:
        return torch.zeros(self.n, dtype=torch.long)

    def read(self, i: int, box=None) -> torch.Tensor:
        with open(self.log, "a") as f:
            f.write(f"{i}\n")
        return torch.full(self.shape, i % 256, dtype=torch.uint8)


@pytest.mark.parametrize("workers", [0, 1])
def test_reading_ahead_is_bounded_by_the_prefetch_depth(tmp_path: Path, workers: int) -> None:
    """However large the dataset, the loader has read at most the batches
    taken, DEPTH finished ones and PREFETCH per loader process ahead; over a
    whole stream it reads every image of every step once."""
    log = tmp_path / "reads"
    log.touch()
    source = Counted(10_000, log)
    dataset = Dataset("counted", source, source, 1, mean=(0.5,), std=(0.5,))
    batch, steps = 4, 30
    stream = TrainBatches(dataset, seed=0, batch_size=batch, transforms=(), start=Position(0, 0, steps),
                          host=_alone(), workers=workers)
    for taken in range(1, 4):
        stream.next()
        time.sleep(0.5)  # room to read ahead as far as it may
        reads = len(log.read_text().split())
        assert taken * batch <= reads <= (taken + DEPTH + 1 + workers * PREFETCH) * batch
    for _ in range(steps - 3):
        stream.next()
    stream.close()
    read = [int(i) for i in log.read_text().split()]
    order = data.epoch_permutation(10_000, seed=0, epoch=0)[:steps * batch].tolist()
    assert sorted(read) == sorted(order) and stream.decoded == steps * batch


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get(
        "PYTHONPATH", "")])}


def _train(*args: str, out: Path) -> dict:
    cmd = [sys.executable, "-m", "convshard", "train", "--quiet", "--threads", "1", "--metrics-out", str(out), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 training JPEGs of 3 classes, 40x56, and 12 held out."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(1)
    for c in range(3):
        for i in range(20):
            pixels = np.clip(rng.normal(50 + 70 * c, 40, (40, 56, 3)), 0, 255).astype(np.uint8)
            (root / f"class{c}").mkdir(exist_ok=True)
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i:02d}.jpg", quality=90)
    return root


FOLDER = ("--dataset", "folder", "--image-size", "16", "--model", "paper", "--kernels", "4,8", "--batch-size", "8",
          "--augment", "resized-crop,flip,jitter", "--lr", "0.02")


def test_every_plan_reads_the_same_batches_and_a_host_decodes_each_image_once(photo_folder: Path,
                                                                               tmp_path: Path) -> None:
    """One device, a kernel split and a batch split over two workers train
    alike on streamed, augmented images; the two workers decode each
    training image once between them."""
    runs = {strategy: _train(*FOLDER, "--data-dir", str(photo_folder), "--max-steps", "3", "--strategy", strategy,
                             *(("--devices", "cpu@0", "--workers", "0") if strategy == "single" else
                               ("--devices", "cpu@0,cpu@1")),
                             out=tmp_path / f"{strategy}.json")
            for strategy in ("single", "kernel", "ddp")}
    np.testing.assert_allclose(runs["kernel"]["step_loss"], runs["single"]["step_loss"], rtol=1e-4)
    for strategy in ("kernel", "ddp"):  # ddp's rank 0 sees half of each batch: its mean over the run's images
        assert runs[strategy]["train_loss"] == pytest.approx(runs["single"]["train_loss"], rel=1e-4)
        assert list(runs[strategy]["data"]["decoded_per_image"].values()) == [1.0]  # one host
    assert list(runs["single"]["data"]["decoded_per_image"].values()) == [1.0]
    assert runs["single"]["data"]["wait_share"] is not None and len(runs["kernel"]["timeline"]["data_seconds"]) == 2


def test_resume_mid_epoch_gives_bitwise_the_uninterrupted_weights(photo_folder: Path, tmp_path: Path) -> None:
    """Six steps an epoch: stopping at step 4 and resuming to 9 gives the
    weights of 9 steps in one go (same order, same augmentation)."""
    common = (*FOLDER, "--data-dir", str(photo_folder), "--devices", "cpu@0", "--epochs", "2", "--workers", "0")
    _train(*common, "--max-steps", "9", "--checkpoint-dir", str(tmp_path / "whole"), out=tmp_path / "w.json")
    _train(*common, "--max-steps", "4", "--checkpoint-dir", str(tmp_path / "cut"), out=tmp_path / "c1.json")
    _train(*common, "--max-steps", "9", "--checkpoint-dir", str(tmp_path / "cut"), "--resume", out=tmp_path / "c2.json")
    whole, cut = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=False)["model"] for d in ("whole", "cut"))
    assert whole.keys() == cut.keys() and all(torch.equal(whole[k], cut[k]) for k in whole)


def test_a_users_dataset_loads_and_trains(tmp_path: Path) -> None:
    sys.path.insert(0, str(TESTS))
    try:
        squares = load_dataset("factory_data:squares")
        assert squares.input_shape == (3, 16, 16) and squares.class_names == ("left", "right")
        assert len(squares.mean) == 3 and len(squares.train) == 96 and len(squares.test) == 32
        photos = load_dataset("factory_data:photos", image_size=10)
        assert photos.input_shape == (3, 10, 10) and photos.train_y.tolist() == [0, 1] * 6
        with pytest.raises(ConfigError, match="'classes' attribute"):
            load_dataset("factory_data:no_classes")
        with pytest.raises(ConfigError, match="cannot import 'nothing'"):
            load_dataset("factory_data:nothing")
    finally:
        sys.path.remove(str(TESTS))
    metrics = _train("--dataset", "factory_data:squares", "--kernels", "4,8", "--batch-size", "16", "--epochs", "2",
                     "--devices", "cpu@0,cpu@1", "--augment", out=tmp_path / "m.json")
    assert metrics["steps"] == 12 and metrics["config"]["augment"] == ["resized-crop", "flip"]


def test_eval_every_measures_between_epochs_and_keeps_the_best(tmp_path: Path) -> None:
    metrics = _train("--devices", "cpu@0", "--kernels", "4,8", "--max-steps", "4", "--eval-every", "2",
                     "--checkpoint-dir", str(tmp_path / "ck"), "--keep-best", out=tmp_path / "m.json")
    assert [e["step"] for e in metrics["evals"]] == [2, 4]
    assert all(0 <= e["test_accuracy"] <= 1 for e in metrics["evals"]) and (tmp_path / "ck" / "best.pt").is_file()


def test_default_workers_suit_the_source_and_the_device() -> None:
    held = load_dataset("synthetic", synthetic_sizes=(8, 4))
    assert loader.default_workers(held, torch.device("cpu")) == 0
    files = Dataset("f", Counted(4, Path(os.devnull)), Counted(4, Path(os.devnull)), 1)
    assert loader.default_workers(files, torch.device("cpu")) == 1
    assert loader.default_workers(files, torch.device("cuda")) == 4
