"""Hosts without shared storage: rank 0 reads the checkpoint and the profile cache for every rank.

Two torchrun agents on this machine, one worker each, rendezvous on
127.0.0.1 (static rendezvous: the first agent is node 0, so its worker is
rank 0). The second agent runs in a mount namespace of its own
(``unshare --mount``) with an empty tmpfs mounted over the checkpoint and
profile directories: its "host" has neither file. A resume from the
checkpoint must still end bitwise equal to a run never interrupted, and a
profile cached on the first host only must be used by both ranks, without
the second measuring on its own (which would leave the ranks in different
collectives until the timeout).

Needs root (mount) and ``unshare``; skips with the reason otherwise, and
fails instead under ``CI=true`` (``helpers.require_mount_namespaces``).
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import helpers
import pytest

from convshard.cli import main
from convshard.run import checkpoint

JOB = ["--dataset", "synthetic", "--synthetic-shape", "1,16,16", "--synthetic-size", "128",
       "--kernels", "4,8", "--batch-size", "16", "--threads", "1", "--timeout", "60"]
TRAIN = ["train", *JOB, "--epochs", "2"]
STEPS = 2 * 128 // 16
DEVICES = ("cpu@0", "cpu@1")  # node 0's worker, node 1's worker
AGENT_TIMEOUT = 180  # seconds: guards against a hang; a run takes seconds


@pytest.fixture(scope="module")
def mount_namespaces() -> None:
    """Skip (fail under CI) unless this process may mount a tmpfs inside a private mount namespace."""
    helpers.require_mount_namespaces()


def _two_hosts(args: list[str], hidden: list[Path]) -> list[str]:
    """Run ``convshard ARGS`` under two torchrun agents; the second sees an empty
    tmpfs over each of ``hidden``. Returns both agents' output."""
    port = helpers.free_port()
    env = helpers.torchrun_env()

    def agent(node: int) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port),
                "-m", "convshard", *args, "--devices", DEVICES[node]]

    mounts = " && ".join(f"mount -t tmpfs none {shlex.quote(str(d))} && test -z \"$(ls -A {shlex.quote(str(d))})\""
                         for d in hidden)
    second = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
              f"{mounts} && exec {shlex.join(agent(1))}"]
    procs = [helpers.start(agent(0), env), helpers.start(second, env)]
    return helpers.finish_all(procs, timeout=AGENT_TIMEOUT, what="agent")


def test_resume_needs_the_checkpoint_on_rank_0s_host_only(mount_namespaces, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    for d in (straight, split):
        d.mkdir()
    two_cpus = ["--devices", ",".join(DEVICES), "--quiet"]
    assert main([*TRAIN, *two_cpus, "--checkpoint-dir", str(straight)]) == 0
    assert main([*TRAIN, *two_cpus, "--checkpoint-dir", str(split), "--max-steps", "5"]) == 0

    first, _ = _two_hosts([*TRAIN, "--checkpoint-dir", str(split), "--resume",
                           "--metrics-out", str(tmp_path / "m.json")], hidden=[split])
    assert f"resuming from {split} at step 5" in first, first[-3000:]
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["devices"] == list(DEVICES) and metrics["steps"] == STEPS
    expected = checkpoint.load_checkpoint(straight)
    resumed = checkpoint.load_checkpoint(split)
    assert resumed["progress"]["step"] == expected["progress"]["step"] == STEPS
    helpers.assert_same_weights(resumed["model"], expected["model"])


def test_profile_cached_on_rank_0s_host_only_is_used_by_every_rank(mount_namespaces, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    path = cache / "profile.json"
    assert main(["profile", *JOB, "--devices", ",".join(DEVICES), "--profile", str(path)]) == 0
    measured = path.read_text()

    outputs = _two_hosts([*TRAIN, "--shares", "auto", "--rebalance", "off", "--max-steps", "2",
                          "--profile", str(path), "--metrics-out", str(tmp_path / "m.json")], hidden=[cache])
    assert f"profile: reusing {path}" in outputs[0], outputs[0][-3000:]
    assert not any("profiling" in out for out in outputs), outputs
    metrics = json.loads((tmp_path / "m.json").read_text())
    planned = {group["name"]: group["counts"] for group in metrics["job_plan"]["groups"]}
    assert metrics["devices"] == metrics["job_plan"]["devices"] and metrics["shares"] == planned  # the split, or
    assert set(metrics["job_plan"]["devices"]) <= set(DEVICES)  # one of the devices alone: the plan decides
    assert path.read_text() == measured  # reused, not measured again
