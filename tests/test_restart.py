"""torchrun --max-restarts: a job that loses a worker resumes from its checkpoint by itself."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import helpers
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


def test_restarted_job_resumes_and_matches_an_uninterrupted_run(tmp_path):
    """SIGKILL one worker after the first checkpoint: torchrun restarts the job,
    which resumes from that checkpoint and ends bitwise equal to a run never interrupted."""
    straight, restarted = tmp_path / "straight", tmp_path / "restarted"
    out = helpers.finish(_torchrun(straight, "--max-restarts", "0"), timeout=240)
    assert checkpoint.load_checkpoint(straight)["progress"]["step"] == STEPS, out[-2000:]

    proc = _torchrun(restarted, "--max-restarts", "1")
    try:
        helpers.wait_for(lambda: checkpoint.load_checkpoint(restarted) is not None
                                and helpers.worker_pid(proc.pid, 1) is not None, 120, "the first checkpoint")
        killed_at = checkpoint.load_checkpoint(restarted)["progress"]["step"]
        os.kill(helpers.worker_pid(proc.pid, 1), signal.SIGKILL)
    finally:
        out = helpers.finish(proc, timeout=240)
    assert proc.returncode == 0, out[-3000:]
    assert f"resuming from {restarted}" in out and killed_at < STEPS, out[-3000:]
    final = checkpoint.load_checkpoint(restarted)
    assert final["progress"]["step"] == STEPS
    expected = torch.load(straight / checkpoint.FILENAME, weights_only=True)["model"]
    helpers.assert_same_weights(final["model"], expected)
