"""Hosts without shared storage: one rank reads the checkpoint and the profile cache for every rank.

Two torchrun agents on this machine, one worker each, rendezvous on
127.0.0.1 (static rendezvous: the first agent is node 0, so its worker is
rank 0). The second agent runs in a mount namespace of its own
(``unshare --mount``) with an empty tmpfs mounted over the checkpoint and
profile directories: its "host" has neither file. A resume from the
checkpoint that either host alone holds must still end bitwise equal to a
run never interrupted, and a
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


def _two_hosts(args: list[str], hidden: list[Path], *, hidden_on: int = 1) -> list[str]:
    """Run ``convshard ARGS`` under two torchrun agents; node ``hidden_on``
    sees an empty tmpfs over each of ``hidden``. Returns both agents' output."""
    port = helpers.free_port()
    env = helpers.torchrun_env()

    def agent(node: int) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port),
                "-m", "convshard", *args, "--devices", DEVICES[node]]

    mounts = " && ".join(f"mount -t tmpfs none {shlex.quote(str(d))} && test -z \"$(ls -A {shlex.quote(str(d))})\""
                         for d in hidden)
    cmds = [agent(0), agent(1)]
    if hidden:
        cmds[hidden_on] = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                           f"{mounts} && exec {shlex.join(cmds[hidden_on])}"]
    procs = [helpers.start(cmd, env) for cmd in cmds]
    return helpers.finish_all(procs, timeout=AGENT_TIMEOUT, what="agent")


@pytest.mark.parametrize("holder", [0, 1], ids=["on rank 0's host", "on rank 1's host"])
def test_resume_needs_the_checkpoint_on_one_host_only(mount_namespaces, tmp_path, holder):
    """The checkpoint on one host only, rank 0's or another's (torchrun
    numbers ranks anew when it re-forms a job): the rank that holds it sends
    it, and the resumed run ends as a run never interrupted."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    for d in (straight, split):
        d.mkdir()
    two_cpus = ["--devices", ",".join(DEVICES), "--quiet"]
    assert main([*TRAIN, *two_cpus, "--checkpoint-dir", str(straight), "--metrics-out",
                 str(tmp_path / "straight.json")]) == 0
    assert main([*TRAIN, *two_cpus, "--checkpoint-dir", str(split), "--max-steps", "5"]) == 0

    first, _ = _two_hosts([*TRAIN, "--checkpoint-dir", str(split), "--resume",
                           "--metrics-out", str(tmp_path / "m.json")], hidden=[split], hidden_on=1 - holder)
    assert f"resuming from {split} at step 5" in first, first[-3000:]
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["devices"] == list(DEVICES) and metrics["steps"] == STEPS
    expected = json.loads((tmp_path / "straight.json").read_text())
    assert metrics["history"][-1]["train_loss"] == expected["history"][-1]["train_loss"]
    if holder == 0:  # rank 0 wrote its final checkpoint where this test can read it
        resumed = checkpoint.load_checkpoint(split)
        assert resumed["progress"]["step"] == STEPS
        helpers.assert_same_weights(resumed["model"], checkpoint.load_checkpoint(straight)["model"])


def test_profile_cached_on_rank_0s_host_only_is_used_by_every_rank(mount_namespaces, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    path = cache / "profile.json"
    # measured by a job on these two hosts, which both see the cache (a profile keys each device by its host)
    _two_hosts([*TRAIN, "--shares", "auto", "--rebalance", "off", "--max-steps", "1", "--profile", str(path)],
               hidden=[])
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
