"""When a run saves (every N steps, every T seconds, on SIGTERM) and the background writer."""

from __future__ import annotations

import os
import signal
import threading

import pytest
import torch
from helpers import main_exit_code

from convshard.run import checkpoint, saving
from convshard.run.config import RunSettings

TINY = ["train", "--dataset", "synthetic", "--synthetic-shape", "1,16,16", "--synthetic-size", "96", "--kernels",
        "2,4", "--batch-size", "8", "--devices", "cpu@0", "--strategy", "single", "--epochs", "1", "--quiet"]


def test_a_write_runs_while_the_caller_goes_on_and_the_next_waits_for_it():
    """``submit`` returns while the write is still blocked; ``wait`` returns once it is done."""
    writer, release, done = saving.Writer(), threading.Event(), []
    writer.submit(lambda: (release.wait(10), done.append(1)))
    assert done == []  # the caller goes on: the write has not finished
    release.set()
    writer.wait()
    assert done == [1]


def test_a_failed_write_raises_in_the_training_thread():
    writer = saving.Writer()
    writer.submit(lambda: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        writer.wait()
    writer.wait()  # raised once


def test_the_verdict_follows_steps_seconds_and_sigterm(monkeypatch):
    """One rank, no process group: every N steps, once T seconds passed since
    the last save (rank 0's clock), and STOP once a SIGTERM arrived; nothing
    without a checkpoint directory."""
    now = [100.0]
    monkeypatch.setattr(saving.time, "monotonic", lambda: now[0])
    with saving.StopSignal() as stop:
        schedule = saving.Schedule(RunSettings(checkpoint_dir="d", checkpoint_every=5, checkpoint_every_seconds=30),
                                   stop, rank=0, group=None)
        assert [schedule.after_step(s) for s in (1, 4, 5)] == [saving.GO_ON, saving.GO_ON, saving.SAVE]
        now[0] += 31
        assert schedule.after_step(6) == saving.SAVE
        schedule.saved()
        assert schedule.after_step(7) == saving.GO_ON
        os.kill(os.getpid(), signal.SIGTERM)  # the handler asks the run to stop: this process goes on
        assert schedule.after_step(8) == saving.STOP and schedule.stopping
    assert signal.getsignal(signal.SIGTERM) is not stop._on_sigterm  # the previous handler is back
    idle = saving.Schedule(RunSettings(checkpoint_every=1), stop, rank=0, group=None)
    assert idle.after_step(1) == saving.GO_ON


def test_an_unarmed_stop_signal_leaves_sigterm_alone():
    before = signal.getsignal(signal.SIGTERM)
    with saving.StopSignal(armed=False):
        assert signal.getsignal(signal.SIGTERM) is before


def test_checkpoint_every_seconds_saves_through_the_loop(tmp_path):
    """With a tiny T every step saves (``--keep-last`` keeps each save's file);
    without the option only the epoch's end does."""
    for name, extra in (("timed", ["--checkpoint-every-seconds", "1e-9"]), ("plain", [])):
        directory = tmp_path / name
        assert main_exit_code([*TINY, "--checkpoint-dir", str(directory), "--keep-last", "100", *extra]) == 0
        steps = sorted(int(p.stem.removeprefix(checkpoint.KEPT_PREFIX))
                       for p in directory.glob(f"{checkpoint.KEPT_PREFIX}*.pt"))
        assert steps == (list(range(1, 13)) if name == "timed" else [12]), steps
        saved = torch.load(directory / checkpoint.FILENAME, weights_only=True)
        assert saved["progress"]["step"] == 12 and saved["progress"]["plans"][0]["devices"] == ["cpu@0"]
