"""Training runs end to end: checkpoints, resume, torchrun, the learning-rate schedule."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from convshard.cli import main
from convshard.models import build_model
from convshard.run import checkpoint
from convshard.run.config import TrainConfig
from convshard.run.optim import learning_rate

TINY = ["--dataset", "synthetic", "--synthetic-shape", "1,16,16", "--synthetic-size", "64",
        "--kernels", "4,8", "--batch-size", "16", "--threads", "1", "--quiet"]


def _train(tmp: Path, name: str, *extra: str) -> dict:
    """Run ``convshard train`` in-process on the tiny job; returns its metrics."""
    out = tmp / f"{name}.json"
    assert main(["train", *TINY, "--metrics-out", str(out), *extra]) == 0
    return json.loads(out.read_text())


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    return torch.load(directory / checkpoint.FILENAME, weights_only=True)["model"]


def test_checkpoint_is_the_unsharded_model(tmp_path):
    """The checkpoint loads with weights_only=True into a plain, unsharded model."""
    _train(tmp_path, "run", "--devices", "cpu@0,cpu@1", "--epochs", "1",
           "--checkpoint-dir", str(tmp_path / "ckpt"))
    payload = torch.load(tmp_path / "ckpt" / checkpoint.FILENAME, weights_only=True)
    model = build_model("paper", (1, 16, 16), 10, (4, 8))
    model.load_state_dict(payload["model"])  # strict: same keys and shapes
    assert payload["progress"]["epoch"] == 1 and payload["progress"]["step"] == 4
    assert payload["config"]["devices"] == "cpu@0,cpu@1"
    momentum = payload["optimizer"]["state"][0]["momentum_buffer"]
    assert momentum.shape == model.features[0].weight.shape  # gathered from both shards
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == [checkpoint.FILENAME]


@pytest.mark.parametrize("resume_devices, bitwise", [("cpu@0,cpu@1", True), ("cpu@0,cpu@1,cpu@1", False)])
def test_resume_matches_an_uninterrupted_run(tmp_path, resume_devices, bitwise):
    """Two epochs straight equal one epoch, a stop, and a resumed second epoch:
    bitwise on the same devices, up to rounding when the kernels are re-split."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    _train(tmp_path, "a", "--devices", "cpu@0,cpu@1", "--epochs", "2", "--checkpoint-dir", str(straight))
    _train(tmp_path, "b1", "--devices", "cpu@0,cpu@1", "--epochs", "2", "--max-steps", "4",
           "--checkpoint-dir", str(split))
    resumed = _train(tmp_path, "b2", "--devices", resume_devices, "--epochs", "2", "--resume",
                     "--checkpoint-dir", str(split))
    assert resumed["steps"] == 8 and resumed["epochs"] == 2
    expected, got = _weights(straight), _weights(split)
    for key in expected:
        if bitwise:
            assert torch.equal(got[key], expected[key]), key
        else:
            torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)


def test_resume_mid_epoch_continues_the_epoch(tmp_path):
    """A run stopped after 2 of 4 steps resumes at step 3 of the same epoch."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    _train(tmp_path, "a", "--devices", "cpu@0", "--epochs", "1", "--checkpoint-dir", str(straight))
    _train(tmp_path, "b1", "--devices", "cpu@0", "--epochs", "1", "--max-steps", "2",
           "--checkpoint-dir", str(split))
    assert torch.load(split / checkpoint.FILENAME, weights_only=True)["progress"]["batch"] == 2
    _train(tmp_path, "b2", "--devices", "cpu@0", "--epochs", "1", "--resume", "--checkpoint-dir", str(split))
    for key, value in _weights(straight).items():
        assert torch.equal(_weights(split)[key], value), key


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """A save that dies half-way leaves the last good checkpoint and no temporary file."""
    checkpoint.save_checkpoint(tmp_path, {"model": {"w": torch.ones(3)}, "optimizer": {}, "progress": {}})

    def dies_half_way(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(tmp_path, {"model": {"w": torch.zeros(3)}, "optimizer": {}, "progress": {}})
    assert [p.name for p in tmp_path.iterdir()] == [checkpoint.FILENAME]
    assert torch.equal(checkpoint.load_checkpoint(tmp_path)["model"]["w"], torch.ones(3))


def test_cosine_schedule():
    config = TrainConfig(lr=0.1)
    assert learning_rate(config, 0, 100) == pytest.approx(0.1)
    assert learning_rate(config, 50, 100) == pytest.approx(0.05)
    assert learning_rate(config, 100, 100) == pytest.approx(0.0)
    assert learning_rate(TrainConfig(lr=0.1, schedule="constant"), 70, 100) == 0.1


def test_same_job_under_torchrun(tmp_path):
    """torchrun starts the workers itself; the run equals the local launch's."""
    local = _train(tmp_path, "local", "--devices", "cpu@0,cpu@1", "--max-steps", "3")
    out = tmp_path / "torchrun.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "convshard", "train", *TINY, "--devices", "cpu@0,cpu@1", "--max-steps", "3",
           "--metrics-out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    remote = json.loads(out.read_text())
    assert remote["world_size"] == 2 and remote["devices"] == ["cpu@0", "cpu@1"]
    assert remote["shares"] == local["shares"] == {"features.0": [2, 2], "features.3": [4, 4]}
    assert remote["train_loss"] == local["train_loss"]


def test_strategies_train_the_same_model(tmp_path):
    """single, kernel and ddp end an epoch with the same weights, also when the
    global batch splits unevenly over 3 ddp workers and the last batch is short
    (71 images in batches of 16: 16 = 5+5+6, and 7 = 2+2+3 at the end)."""
    runs = {}
    for strategy in ("single", "kernel", "ddp"):
        directory = tmp_path / strategy
        _train(tmp_path, strategy, "--strategy", strategy, "--devices", "cpu@0,cpu@1,cpu@1",
               "--synthetic-size", "71", "--epochs", "1", "--checkpoint-dir", str(directory))
        runs[strategy] = _weights(directory)
    for strategy in ("kernel", "ddp"):
        for key, value in runs["single"].items():
            torch.testing.assert_close(runs[strategy][key], value, rtol=1e-4, atol=1e-5, msg=f"{strategy} {key}")


def test_resuming_a_finished_run_changes_nothing(tmp_path):
    """--resume on a run that already reached --epochs takes no step and writes
    strict JSON (no NaN): the timings are null."""
    directory = tmp_path / "ckpt"
    _train(tmp_path, "a", "--devices", "cpu@0", "--epochs", "1", "--checkpoint-dir", str(directory))
    before = _weights(directory)
    again = _train(tmp_path, "b", "--devices", "cpu@0", "--epochs", "1", "--resume",
                   "--checkpoint-dir", str(directory))
    assert again["steps"] == 4 and again["mean_step_seconds"] is None and again["images_per_second"] is None
    json.loads((tmp_path / "b.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    assert all(torch.equal(_weights(directory)[k], v) for k, v in before.items())


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    """A diverging run stops with one line (exit 1) and leaves the checkpoint
    of its last finite step, which still loads."""
    directory = tmp_path / "ckpt"
    code = main(["train", *TINY, "--devices", "cpu@0,cpu@1", "--epochs", "3", "--lr", "1e12",
                 "--schedule", "constant", "--checkpoint-every", "1", "--checkpoint-dir", str(directory)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1 and "training loss became" in err[0] and "--lr" in err[0], err
    saved = checkpoint.load_checkpoint(directory)
    failed_at = int(err[0].split(" at step ")[1].split(";")[0])
    assert saved["progress"]["step"] == failed_at - 1
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())


def test_checkpoint_every_n_steps(tmp_path):
    """--checkpoint-every 3 saves mid-epoch; resuming from it matches a straight run."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    _train(tmp_path, "a", "--devices", "cpu@0,cpu@1", "--epochs", "2", "--checkpoint-dir", str(straight))
    _train(tmp_path, "b1", "--devices", "cpu@0,cpu@1", "--epochs", "2", "--max-steps", "7",
           "--checkpoint-every", "3", "--checkpoint-dir", str(split))
    # the last save before the stop at step 7 is the end-of-run save; the one before was step 6 (3 x 2)
    assert torch.load(split / checkpoint.FILENAME, weights_only=True)["progress"]["step"] == 7
    _train(tmp_path, "b2", "--devices", "cpu@0,cpu@1", "--epochs", "2", "--resume", "--checkpoint-dir", str(split))
    for key, value in _weights(straight).items():
        assert torch.equal(_weights(split)[key], value), key


def test_checkpoint_of_another_model_is_refused(tmp_path, capsys):
    """Resuming with other --kernels names the mismatched keys, exit 2."""
    directory = tmp_path / "ckpt"
    _train(tmp_path, "a", "--devices", "cpu@0", "--epochs", "1", "--checkpoint-dir", str(directory))
    capsys.readouterr()
    code = main(["train", *TINY, "--devices", "cpu@0", "--kernels", "4,6", "--epochs", "2", "--resume",
                 "--checkpoint-dir", str(directory)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "features.3.weight" in err[0], err
