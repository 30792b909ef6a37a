"""torchrun --max-restarts: a job that loses a worker resumes from its checkpoint by itself."""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path

import helpers
import pytest
import torch

from convshard.run import checkpoint

JOB = ["--dataset", "synthetic", "--synthetic-shape", "1,16,16", "--synthetic-size", "8192",
       "--kernels", "4,8", "--batch-size", "16", "--threads", "1", "--epochs", "2",
       "--devices", "cpu@0,cpu@1", "--checkpoint-every", "20"]
STEPS = 2 * 8192 // 16


def _torchrun(directory: Path, *extra: str):
    # The workaround for PyTorch issue 135712: without it a restarted job may
    # read the previous attempt's addresses from torchrun's shared store.
    env = helpers.torchrun_env(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *extra,
           "-m", "convshard", "train", *JOB, "--checkpoint-dir", str(directory)]
    return helpers.start(cmd, env)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict:
    """The final weights of the job never interrupted."""
    directory = tmp_path_factory.mktemp("straight")
    out = helpers.finish(_torchrun(directory, "--max-restarts", "0"), timeout=240)
    assert checkpoint.load_checkpoint(directory)["progress"]["step"] == STEPS, out[-2000:]
    return torch.load(directory / checkpoint.FILENAME, weights_only=True)["model"]


@pytest.mark.parametrize("sent", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_restarted_job_resumes_and_matches_an_uninterrupted_run(tmp_path, straight, sent):
    """Signal one worker after the first checkpoint: torchrun restarts the job,
    which resumes by itself and ends bitwise equal to a run never interrupted.
    SIGKILL loses the steps since the last checkpoint; SIGTERM (pre-emption)
    saves the step in progress first, the job's workers exit 143 together,
    and the restart resumes at that very step."""
    restarted = tmp_path / "restarted"
    proc = _torchrun(restarted, "--max-restarts", "1")
    try:
        helpers.wait_for(lambda: checkpoint.load_checkpoint(restarted) is not None
                                and helpers.worker_pid(proc.pid, 1) is not None, 120, "the first checkpoint")
        killed_at = checkpoint.load_checkpoint(restarted)["progress"]["step"]
        os.kill(helpers.worker_pid(proc.pid, 1), sent)
    finally:
        out = helpers.finish(proc, timeout=240)
    assert proc.returncode == 0, out[-3000:]
    assert f"resuming from {restarted}" in out and killed_at < STEPS, out[-3000:]
    if sent == signal.SIGTERM:
        stopped = re.search(r"stopped by SIGTERM at step (\d+)", out)
        assert stopped and "exitcode: 143" in out, out[-3000:]
        assert f"resuming from {restarted} at step {stopped[1]}" in out, out[-3000:]
    final = checkpoint.load_checkpoint(restarted)
    assert final["progress"]["step"] == STEPS
    helpers.assert_same_weights(final["model"], straight)
