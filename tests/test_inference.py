"""After training: folder layouts, checkpoints people keep, resuming, ``evaluate``, ``predict``, ``load_model``."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import main_exit_code
from PIL import Image

import convshard
from convshard import data, folder
from convshard.cli import main
from convshard.run import checkpoint, inference

CLASSES = ("dark", "light")
TINY = ["--model", "paper", "--kernels", "4,8", "--image-size", "16", "--batch-size", "8", "--devices", "cpu@0",
        "--threads", "1", "--seed", "0"]


def _image(path: Path, level: int, seed: int) -> None:
    """A 16x16 RGB image of noise around grey ``level``: the classes are told apart by brightness."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(rng.normal(level, 30, (16, 16, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _folder(root: Path, *, split: bool, per_class: int = 10) -> Path:
    """Two classes, ``dark`` and ``light``; with ``split``, in train/ and val/ (4 validation images each)."""
    for c, (name, level) in enumerate(zip(CLASSES, (60, 190))):
        for i in range(per_class):
            where = root / ("val" if i < 4 else "train") / name if split else root / name
            _image(where / f"{i:02d}.png", level, 100 * c + i)
    return root


def test_train_and_val_folders_are_the_split(tmp_path):
    dataset = data.load_dataset("folder", data_dir=_folder(tmp_path / "d", split=True), image_size=8)
    assert dataset.class_names == CLASSES and len(dataset.train_y) == 12 and len(dataset.test_y) == 8
    assert dataset.test_y.tolist() == [0] * 4 + [1] * 4
    assert len(dataset.mean) == len(dataset.std) == 3


@pytest.mark.parametrize("fraction, test_indices", [(0.2, [4, 9]), (0.5, [1, 3, 5, 7, 9]), (0.3, [3, 6, 9])])
def test_val_fraction_holds_out_a_share_of_each_class(tmp_path, fraction, test_indices):
    root = _folder(tmp_path / "d", split=False)
    dataset = data.load_dataset("folder", data_dir=root, image_size=8, val_fraction=fraction)
    assert len(dataset.test_y) == 2 * len(test_indices) and len(dataset.train_y) == 20 - 2 * len(test_indices)
    first = data.load_dataset("folder", data_dir=root, image_size=8, val_fraction=0.99)
    assert len(first.train_y) == 0 or len(first.test_y) >= 18  # nearly all held out
    pixels = folder.decode(root / "dark" / f"{test_indices[0]:02d}.png", channels=3, size=8).float() / 255
    expected = (pixels - torch.tensor(dataset.mean).view(3, 1, 1)) / torch.tensor(dataset.std).view(3, 1, 1)
    torch.testing.assert_close(dataset.test_x[0], expected)


def test_bad_val_fraction_exits_2_naming_it(tmp_path, capsys):
    assert main_exit_code(["train", "--dataset", "folder", "--data-dir", str(tmp_path), "--val-fraction", "1.5"]) == 2
    assert "--val-fraction" in capsys.readouterr().err


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A folder-trained model: 3 epochs on one device, the last 2 checkpoints and the best kept, logs written."""
    tmp = tmp_path_factory.mktemp("run")
    root = _folder(tmp / "photos", split=True)
    assert main(["train", *TINY, "--dataset", "folder", "--data-dir", str(root), "--epochs", "3", "--lr", "0.05",
                 "--checkpoint-dir", str(tmp / "ckpt"), "--keep-last", "2", "--keep-best", "--quiet",
                 "--log-dir", str(tmp / "logs"), "--metrics-out", str(tmp / "m.json")]) == 0
    return tmp


def test_keep_last_and_keep_best(trained):
    names = sorted(p.name for p in (trained / "ckpt").iterdir())
    assert names == [checkpoint.BEST, "checkpoint-000000004.pt", "checkpoint-000000006.pt", checkpoint.FILENAME]
    latest = torch.load(trained / "ckpt" / checkpoint.FILENAME, weights_only=True)
    assert latest["progress"]["step"] == 6
    best = torch.load(trained / "ckpt" / checkpoint.BEST, weights_only=True)
    history = json.loads((trained / "m.json").read_text())["history"]
    top = max(h["test_accuracy"] for h in history)
    first_top = next(h for h in history if h["test_accuracy"] == top)
    assert best["progress"]["step"] == first_top["steps"] and best["progress"]["best_accuracy"] == top


def test_log_dir_holds_steps_and_epochs(trained):
    steps = list(csv.DictReader((trained / "logs" / "steps.csv").open()))
    epochs = list(csv.DictReader((trained / "logs" / "epochs.csv").open()))
    assert [int(r["step"]) for r in steps] == list(range(1, 7)) and [int(r["epoch"]) for r in epochs] == [1, 2, 3]
    assert set(steps[0]) == {"step", "epoch", "loss", "lr", "ms", "images_per_s"}
    assert float(steps[0]["lr"]) == pytest.approx(0.05) and all(float(r["ms"]) > 0 for r in steps)
    history = json.loads((trained / "m.json").read_text())["history"]
    assert [float(r["test_accuracy"]) for r in epochs] == pytest.approx([h["test_accuracy"] for h in history])


def test_evaluate_prints_accuracy_per_class_and_confusion(trained, capsys):
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(trained / "ckpt")]) == 0
    out = capsys.readouterr().out.splitlines()
    model, info = inference.load(trained / "ckpt")
    assert info.class_names == CLASSES and info.input_shape == (3, 16, 16) and info.model == "paper"
    dataset = data.load_dataset("folder", data_dir=trained / "photos", image_size=16,
                                normalisation=(info.mean, info.std))
    confusion = inference.evaluate(model, [(dataset.test_x, dataset.test_y)], classes=2)
    assert int(confusion.sum()) == 8 and confusion.sum(1).tolist() == [4, 4]
    right = int(confusion.trace())
    assert f"accuracy {right / 8:.4f} ({right}/8)" in out
    rows = out[out.index("confusion matrix (rows: true class, columns: predicted class):") + 2:]
    assert [[int(v) for v in row.split()[1:]] for row in rows] == confusion.tolist()
    history = json.loads((trained / "m.json").read_text())["history"]
    assert right / 8 == pytest.approx(history[-1]["test_accuracy"])  # the loop's own test accuracy


def test_evaluate_matches_classes_by_name(trained, tmp_path, capsys):
    """A folder of one class only: its images are counted under the model's class of that name."""
    _image(tmp_path / "other" / "light" / "a.png", 190, 7)
    _image(tmp_path / "other" / "light" / "b.png", 190, 8)
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(trained / "ckpt"), "--data-dir", str(tmp_path / "other"),
                 "--val-fraction", "0.5"]) == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert ["dark", "-", "0"] in lines  # per class: no dark image to score
    light = [line[1:] for line in lines if line[0] == "light"]  # its per-class line and its confusion row
    per_class = [row for row in light if "." in row[0]]
    counts = [[int(v) for v in row] for row in light if all(v.isdigit() for v in row)]
    assert len(per_class) == 1 and per_class[0][1] == "1"  # one light image scored, whichever class it got
    assert len(counts) == 1 and sum(counts[0]) == 1 and counts[0][1] == int(float(per_class[0][0]))


def test_predict_and_load_model(trained, capsys):
    files = [trained / "photos" / "val" / name / "00.png" for name in CLASSES]
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(trained / "ckpt" / checkpoint.BEST), *map(str, files)]) == 0
    lines = capsys.readouterr().out.splitlines()
    model = convshard.load_model(trained / "ckpt" / checkpoint.BEST)
    _, info = inference.load(trained / "ckpt" / checkpoint.BEST)
    assert isinstance(model, torch.nn.Module) and not model.training
    probabilities = model(inference.images(files, info)).softmax(1)
    for line, file, p in zip(lines, files, probabilities):
        path, name, shown = line.split()
        assert path == str(file) and name == CLASSES[int(p.argmax())]
        assert float(shown) == pytest.approx(p.max().item(), abs=1e-4)


def test_predict_on_a_file_that_is_no_image_exits_2(trained, tmp_path, capsys):
    bad = tmp_path / "x.png"
    bad.write_bytes(b"not an image")
    assert main_exit_code(["predict", "--checkpoint", str(trained / "ckpt"), str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0]


def test_resume_with_another_batch_size_says_so(trained, tmp_path, capsys):
    shutil.copytree(trained / "ckpt", tmp_path / "ckpt")
    capsys.readouterr()
    args = [*TINY, "--dataset", "folder", "--data-dir", str(trained / "photos"), "--checkpoint-dir",
            str(tmp_path / "ckpt"), "--resume", "--quiet"]
    assert main(["train", *args, "--batch-size", "6", "--epochs", "4"]) == 0
    said = [line for line in capsys.readouterr().err.splitlines() if "was written with" in line]
    assert len(said) == 1 and said[0].endswith(
        f"{tmp_path / 'ckpt' / checkpoint.FILENAME} was written with --batch-size 8 (now 6), --epochs 3 (now 4): "
        f"continuing with this run's")


def test_checkpoint_of_another_model_names_file_config_and_mismatch(trained, tmp_path, capsys):
    shutil.copytree(trained / "ckpt", tmp_path / "ckpt")
    capsys.readouterr()
    code = main(["train", "--model", "paper", "--kernels", "4,6", "--image-size", "16", "--batch-size", "8",
                 "--devices", "cpu@0",
                 "--dataset", "folder", "--data-dir", str(trained / "photos"), "--epochs", "4", "--quiet",
                 "--checkpoint-dir", str(tmp_path / "ckpt"), "--resume"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert str(tmp_path / "ckpt" / checkpoint.FILENAME) in err[0]
    assert "--model paper --kernels 4,8 --dataset folder" in err[0] and "--kernels 4,6" in err[0]
    assert "features.3.weight" in err[0]


FACTORY = '''import torch.nn as nn


def build(input_shape, classes):
    c, h, w = input_shape
    return nn.Sequential(nn.Conv2d(c, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * h * w, classes))
'''


def _convshard(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        p for p in (str(Path(convshard.__file__).parents[1]), os.environ.get("PYTHONPATH")) if p)}
    return subprocess.run([sys.executable, "-m", "convshard", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL)


def test_an_own_models_checkpoint_is_evaluated_from_anywhere(tmp_path):
    """Trained with ``--model tinycnn:build`` on a folder given relative to the
    training directory, the checkpoint is evaluated and predicts from another
    directory: it keeps where the factory was imported from and where the
    data was. Without the data there, one line names --data-dir."""
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    elsewhere.mkdir()
    _folder(project / "photos", split=True)
    (project / "tinycnn.py").write_text(FACTORY)
    trained = _convshard(["train", "--model", "tinycnn:build", "--dataset", "folder", "--data-dir", "photos",
                          "--image-size", "16", "--batch-size", "8", "--devices", "cpu@0", "--strategy", "single",
                          "--epochs", "1", "--checkpoint-dir", "ckpt", "--quiet"], project)
    assert trained.returncode == 0, trained.stderr[-2000:]
    evaluated = _convshard(["evaluate", "--checkpoint", "../project/ckpt"], elsewhere)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert "--model tinycnn:build on folder" in evaluated.stdout and "accuracy" in evaluated.stdout
    image = next((project / "photos" / "val").rglob("*.png"))
    predicted = _convshard(["predict", "--checkpoint", "../project/ckpt", str(image)], elsewhere)
    assert predicted.returncode == 0 and str(image) in predicted.stdout, predicted.stderr[-2000:]
    (project / "photos").rename(project / "moved")
    missing = _convshard(["evaluate", "--checkpoint", "../project/ckpt"], elsewhere)
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1
    assert f"{project / 'photos'}, which is not there" in missing.stderr and "--data-dir" in missing.stderr
