"""Several hosts on one machine: kernels sharded across torchrun nodes.

Three "hosts" are network namespaces, each with its own address on a
private subnet, joined by veth pairs to a bridge inside a fourth namespace
(the switch). Nothing is attached to the machine's own network: traffic can
only flow between these namespaces. One host's link is shaped with ``tc`` to
a low bandwidth. One torchrun per host trains a
few steps with every conv layer's kernels split across the three hosts (c10d
rendezvous, the recipe in the README), and the result must equal a one-device
run from the same seed.

Needs root and iproute2 (``ip``, ``tc``); skips with the reason otherwise,
and fails instead under ``CI=true`` (``helpers.require_namespaces``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import helpers
import pytest
import torch

from convshard.cli import main
from convshard.run import checkpoint
from convshard.tools import netns

SHAPED_RATE = "20mbit"
TINY = ["--dataset", "synthetic", "--synthetic-shape", "1,16,16", "--synthetic-size", "64",
        "--kernels", "4,8", "--batch-size", "16", "--threads", "1", "--quiet", "--epochs", "1"]


@pytest.fixture
def hosts():
    """Three namespaces on one bridge, the third one's link shaped to SHAPED_RATE."""
    helpers.require_namespaces()
    try:
        with netns.hosts(3, rate=SHAPED_RATE, shaped=[2]) as built:
            yield built
    except subprocess.CalledProcessError as exc:
        helpers.cannot_run_here(f"cannot build network namespaces here: {(exc.stderr or '').strip()}")


@pytest.mark.parametrize("ci", ["true", ""])
def test_missing_namespaces_skip_here_and_fail_under_ci(monkeypatch, ci):
    """The rule every namespace test follows: skip with the reason, but fail with it under CI=true."""
    monkeypatch.setenv("CI", ci)
    monkeypatch.setattr(netns, "unavailable", lambda: "needs root to create network namespaces")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    outcome = pytest.fail.Exception if ci else pytest.skip.Exception
    for require in (helpers.require_namespaces, helpers.require_mount_namespaces):
        with pytest.raises(outcome, match="needs root"):
            require()


def test_kernels_sharded_across_three_hosts(hosts, tmp_path):
    reference_dir, sharded_dir = tmp_path / "reference", tmp_path / "sharded"
    assert main(["train", *TINY, "--strategy", "single", "--devices", "cpu@0",
                 "--checkpoint-dir", str(reference_dir), "--metrics-out", str(tmp_path / "ref.json")]) == 0
    metrics = tmp_path / "hosts.json"
    devices = ["cpu@0", "cpu@1", "cpu@1"]
    procs = [netns.torchrun(host, nnodes=3, rendezvous=hosts[0], run_id="convshard-test",
                            args=["train", *TINY, "--devices", devices[i], "--checkpoint-dir", str(sharded_dir),
                                  "--metrics-out", str(metrics)])
             for i, host in enumerate(hosts)]
    helpers.finish_all(procs, timeout=90)

    sent = netns.bytes_sent(hosts[2])
    assert sent > 100_000, f"the shaped link carried only {sent} bytes"  # the gathers did cross it

    got = json.loads(metrics.read_text())
    # c10d rendezvous numbers the hosts in the order they join
    assert got["world_size"] == 3 and sorted(got["devices"]) == devices
    assert {k: sorted(v) for k, v in got["shares"].items()} == {"features.0": [1, 1, 2], "features.3": [2, 3, 3]}
    reference = json.loads((tmp_path / "ref.json").read_text())
    assert got["train_loss"] == pytest.approx(reference["train_loss"], rel=1e-5)
    expected = torch.load(reference_dir / checkpoint.FILENAME, weights_only=True)["model"]
    sharded = torch.load(sharded_dir / checkpoint.FILENAME, weights_only=True)["model"]
    helpers.assert_same_weights(sharded, expected, rtol=1e-5, atol=1e-6)


def test_torchrun_process_count_must_match_devices(tmp_path):
    """torchrun starting 2 processes for a host whose --devices lists 1 is refused, naming both."""
    env = helpers.torchrun_env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "convshard", "train", *TINY, "--devices", "cpu@0"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode != 0
    assert "torchrun started 2 processes on this host but --devices 'cpu@0' lists 1" in proc.stderr


def test_port_in_use_fails_fast(tmp_path):
    """A rendezvous port that is taken makes the job fail within seconds, naming the port."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = helpers.torchrun_env()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
               "--master-addr", "127.0.0.1", "--master-port", str(port),
               "-m", "convshard", "train", *TINY, "--devices", "cpu@0,cpu@1"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode != 0
    assert str(port) in proc.stderr and "EADDRINUSE" in proc.stderr
