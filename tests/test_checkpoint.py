"""Checkpoint files: a save killed half-way, truncated files, stale temporaries."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from convshard.errors import ConfigError
from convshard.run import checkpoint

SAVER = """
import sys, torch
from convshard.run import checkpoint
big = {"w": torch.full((64, 1024, 1024), 2.0)}  # 256 MiB: a save takes a while
while True:
    checkpoint.save_checkpoint(sys.argv[1], {"model": big, "optimizer": {}, "progress": {"step": 2}})
"""


def _payload(step: int) -> dict:
    return {"model": {"w": torch.full((4,), float(step))}, "optimizer": {}, "progress": {"step": step}}


def test_kill_during_save_keeps_the_previous_checkpoint(tmp_path):
    """SIGKILL a process in the middle of writing: the last complete checkpoint
    survives and loads; the next save clears the half-written temporary.

    The process saves in a loop, so it is always in the middle of a save (the
    temporary file exists) whatever the machine's speed; which checkpoint was
    the last complete one (step 1, or its own step 2) depends on that speed."""
    checkpoint.save_checkpoint(tmp_path, _payload(1))
    proc = subprocess.Popen([sys.executable, "-c", SAVER, str(tmp_path)], stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60  # a guard against a hang
        while not list(tmp_path.glob(".checkpoint.pt.*.tmp")):
            assert proc.poll() is None and time.monotonic() < deadline, "no save started"
            time.sleep(0.01)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    assert list(tmp_path.glob(".checkpoint.pt.*.tmp")), "the kill did not land mid-save"
    assert checkpoint.load_checkpoint(tmp_path)["progress"]["step"] in (1, 2)
    checkpoint.save_checkpoint(tmp_path, _payload(3))
    assert [p.name for p in tmp_path.iterdir()] == [checkpoint.FILENAME]
    assert checkpoint.load_checkpoint(tmp_path)["progress"]["step"] == 3


@pytest.mark.parametrize("keep", [0.5, 0.01])
def test_truncated_checkpoint_is_a_clear_error(tmp_path, keep):
    path = checkpoint.save_checkpoint(tmp_path, _payload(1))
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ConfigError, match=str(path)):
        checkpoint.load_checkpoint(tmp_path)


def test_foreign_file_is_not_a_checkpoint(tmp_path):
    torch.save({"weights": torch.ones(2)}, tmp_path / checkpoint.FILENAME)
    with pytest.raises(ConfigError, match="not a convshard checkpoint"):
        checkpoint.load_checkpoint(tmp_path)


def test_pickled_code_is_never_run(tmp_path):
    """weights_only=True: a checkpoint carrying a pickled callable is refused, not executed."""
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"model": Evil(), "optimizer": {}, "progress": {}}, tmp_path / checkpoint.FILENAME)
    with pytest.raises(ConfigError):
        checkpoint.load_checkpoint(tmp_path)
    assert not marker.exists()


def test_changes_name_each_flag_that_differs():
    from convshard.run.checkpoint import changes

    saved = {"batch_size": 64, "epochs": 8, "max_steps": None, "lr": 0.05, "model": "paper"}
    now = {"batch_size": 32, "epochs": 8, "max_steps": 100, "lr": 0.1, "model": "vgg"}
    assert changes(saved, now) == "--batch-size 64 (now 32), --max-steps unset (now 100), --lr 0.05 (now 0.1)"
    assert changes(saved, saved) == ""
