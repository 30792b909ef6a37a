"""``convshard export``: a checkpoint's model as a file that plain torch runs, its spec beside it.

The exported program is loaded in a fresh Python that never imports
convshard, fed images normalised with the spec's mean and std alone, and
must give the checkpoint's predictions: ``convshard predict``'s printed
probabilities, and ``inference.predict`` of ``load_model`` to float32
rounding (the program computes the same ops; a lost BatchNorm statistic, a
wrong normalisation or a batch size fixed at export would move them by far
more).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import child_env, main_exit_code
from PIL import Image

from convshard import folder, load_model
from convshard.cli import main
from convshard.run import export, inference

CLASSES = ("dark", "light")

# In a fresh interpreter: the program and its spec, as someone without convshard uses them.
PLAIN_TORCH = """
import json, sys, torch
program_path, pixels_path, out_path = sys.argv[1:]
program = torch.export.load(program_path).module()
spec = json.load(open(program_path[:-len(".pt2")] + ".json"))
mean = torch.tensor(spec["mean"]).view(1, -1, 1, 1)
std = torch.tensor(spec["std"]).view(1, -1, 1, 1)
pixels = torch.load(pixels_path)  # (N, C, H, W) uint8
x = (pixels.float() / 255 - mean) / std
with torch.no_grad():
    torch.save({"all": program(x).softmax(1), "one": program(x[:1]).softmax(1)}, out_path)
assert "convshard" not in sys.modules
"""


def _folder(root: Path) -> Path:
    """Two classes of 16x16 RGB noise around two grey levels, 4 images each."""
    for c, (name, level) in enumerate(zip(CLASSES, (60, 190))):
        (root / name).mkdir(parents=True)
        for i in range(4):
            pixels = np.random.default_rng(10 * c + i).normal(level, 40, (16, 16, 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A paper model trained two steps on the folder, checkpointed in ckpt/."""
    tmp = tmp_path_factory.mktemp("run")
    assert main(["train", "--model", "paper", "--kernels", "4,8", "--image-size", "16", "--batch-size", "4",
                 "--devices", "cpu@0", "--threads", "1", "--seed", "0", "--dataset", "folder", "--data-dir",
                 str(_folder(tmp / "photos")), "--val-fraction", "0.5", "--max-steps", "2", "--quiet",
                 "--checkpoint-dir", str(tmp / "ckpt")]) == 0
    return tmp


def test_exported_program_gives_the_checkpoints_predictions_without_convshard(trained, tmp_path, capsys):
    files = sorted((trained / "photos").glob("*/*.png"))[1:6]  # 5 images: a batch other than export's
    assert main(["export", "--checkpoint", str(trained / "ckpt"), "--out", str(tmp_path / "m.pt2")]) == 0
    assert main(["predict", "--checkpoint", str(trained / "ckpt"), *map(str, files)]) == 0
    printed = [float(line.split()[2]) for line in capsys.readouterr().out.splitlines()]

    spec = json.loads((tmp_path / "m.json").read_text())
    model, info = inference.load(trained / "ckpt")
    assert (spec["format"], spec["class_names"], spec["input_shape"]) == ("torch", list(CLASSES), [3, 16, 16])
    assert spec["mean"] == pytest.approx(info.mean) and spec["std"] == pytest.approx(info.std)
    assert len(spec["mean"]) == 3 and spec["mean"][0] > 0.1  # the folder's own statistics, not none
    pixels = torch.stack([folder.decode(f, channels=3, size=16) for f in files])  # (5, 3, 16, 16) uint8
    torch.save(pixels, tmp_path / "pixels.pt")
    run = subprocess.run([sys.executable, "-c", PLAIN_TORCH, str(tmp_path / "m.pt2"), str(tmp_path / "pixels.pt"),
                          str(tmp_path / "p.pt")], env=child_env(), capture_output=True, text=True, timeout=120,
                         stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr[-3000:]
    got = torch.load(tmp_path / "p.pt", weights_only=True)

    expected = inference.predict(model, inference.images(files, info))  # (5, 2)
    assert expected.max(1).values.std() > 1e-4  # the images get different predictions: a real check
    torch.testing.assert_close(got["all"], expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(got["one"], expected[:1], rtol=0, atol=1e-6)  # N is free: one image too
    assert got["all"].max(1).values.tolist() == pytest.approx(printed, abs=1e-4)


@pytest.mark.parametrize("model, kernels", [("vgg", "4,8,8"), ("resnet18", "4")])
def test_builtin_models_export_and_reload(tmp_path, model, kernels):
    """vgg and resnet18 (BatchNorm, residual adds) trace too; the reloaded program is the model."""
    assert main(["train", "--model", model, "--kernels", kernels, "--dataset", "synthetic", "--synthetic-shape",
                 "3,16,16", "--batch-size", "4", "--devices", "cpu@0", "--threads", "1", "--max-steps", "1",
                 "--quiet", "--checkpoint-dir", str(tmp_path / "ckpt")]) == 0
    program, spec = export.export(tmp_path / "ckpt", tmp_path / "m.pt2")
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(torch.export.load(program).module()(x), load_model(tmp_path / "ckpt")(x),
                                   rtol=0, atol=1e-5)
    assert json.loads(spec.read_text())["model"] == model


@pytest.mark.skipif(all(importlib.util.find_spec(p) for p in export.ONNX_PACKAGES), reason="onnx is installed")
def test_onnx_without_the_package_names_the_extra(trained, tmp_path, capsys):
    capsys.readouterr()
    code = main_exit_code(["export", "--checkpoint", str(trained / "ckpt"), "--out", str(tmp_path / "m.onnx"),
                           "--format", "onnx"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "pip install 'convshard[onnx]'" in err[0]
    assert not (tmp_path / "m.onnx").exists()


def test_onnx_when_installed(trained, tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    assert main(["export", "--checkpoint", str(trained / "ckpt"), "--out", str(tmp_path / "m.onnx"),
                 "--format", "onnx"]) == 0
    proto = onnx.load(str(tmp_path / "m.onnx"))
    onnx.checker.check_model(proto)
    assert [i.name for i in proto.graph.input] == ["images"] and [o.name for o in proto.graph.output] == ["logits"]
    assert json.loads((tmp_path / "m.json").read_text())["format"] == "onnx"


@pytest.mark.parametrize("case", ["missing checkpoint", "out under a file", "out named like the spec"])
def test_bad_inputs_say_so_in_one_line_and_exit_2(trained, tmp_path, capsys, case):
    (tmp_path / "file").write_text("x")
    checkpoint, out, said = {
        "missing checkpoint": (tmp_path / "nowhere", tmp_path / "m.pt2", f"no checkpoint at {tmp_path / 'nowhere'}"),
        "out under a file": (trained / "ckpt", tmp_path / "file" / "m.pt2",
                             f"cannot write --out {tmp_path / 'file' / 'm.pt2'}: "),
        "out named like the spec": (trained / "ckpt", tmp_path / "m.json",
                                    f"--out {tmp_path / 'm.json'} ends in .json"),
    }[case]
    capsys.readouterr()
    assert main_exit_code(["export", "--checkpoint", str(checkpoint), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"convshard: error: {said}"), err
    assert not out.exists()
