"""Several hosts on one machine: kernels sharded across torchrun nodes.

Three "hosts" are network namespaces, each with its own address on a
private subnet, joined by veth pairs to a bridge inside a fourth namespace
(the switch). Nothing is attached to the machine's own network: traffic can
only flow between these namespaces. One host's link is shaped with ``tc`` to
a low bandwidth. One torchrun per host trains a
few steps with every conv layer's kernels split across the three hosts (c10d
rendezvous, the recipe in the README), and the result must equal a one-device
run from the same seed.

Needs root and iproute2 (``ip``, ``tc``); skips with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import torchrun_procs
from convshard import checkpoint
from convshard.cli import main

SUBNET = "10.213.7"  # addresses exist only inside the test's namespaces
PORT = 29617
SHAPED_RATE = "20mbit"
TINY = ["--dataset", "synthetic", "--synthetic-shape", "1,16,16", "--synthetic-size", "64",
        "--kernels", "4,8", "--batch-size", "16", "--threads", "1", "--quiet", "--epochs", "1"]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=20)


@pytest.fixture
def hosts():
    """Three namespaces on one bridge; yields [(namespace, address), ...]."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces")
    if not (shutil.which("ip") and shutil.which("tc")):
        pytest.skip("needs iproute2 (ip, tc)")
    tag = f"cs{os.getpid() % 100000}"
    switch, names = f"{tag}sw", [f"{tag}h{i}" for i in range(3)]
    created: list[str] = []
    try:
        for ns in (switch, *names):
            _ip("netns", "add", ns)
            created.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", switch, "link", "set", "br0", "up")
        for i, ns in enumerate(names):
            port = f"{tag}p{i}"
            _ip("link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("link", "set", port, "netns", switch)
            _ip("-n", switch, "link", "set", port, "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{SUBNET}.{i + 1}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
        subprocess.run(["ip", "netns", "exec", names[2], "tc", "qdisc", "add", "dev", "eth0", "root",
                        "tbf", "rate", SHAPED_RATE, "burst", "32kbit", "latency", "100ms"],
                       check=True, capture_output=True, timeout=20)
    except subprocess.CalledProcessError as exc:
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)
        pytest.skip(f"cannot build network namespaces here: {exc.stderr.strip()}")
    yield [(ns, f"{SUBNET}.{i + 1}") for i, ns in enumerate(names)]
    for ns in created:  # deleting a namespace deletes its veth ends too
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)


def _torchrun(ns: str, addr: str, device: str, is_host: bool, extra: list[str]):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "eth0"}
    cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "torch.distributed.run",
           "--nnodes", "3", "--nproc-per-node", "1", "--rdzv-id", "convshard-test",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{SUBNET}.1:{PORT}",
           # the namespaces share the machine's hostname: name each host's address and
           # which host serves the store, which torchrun would otherwise derive from the hostname
           "--local-addr", addr, "--rdzv-conf", f"is_host={int(is_host)}",
           "-m", "convshard", "train", *TINY, "--devices", device, *extra]
    return torchrun_procs.start(cmd, env)


def test_kernels_sharded_across_three_hosts(hosts, tmp_path):
    reference_dir, sharded_dir = tmp_path / "reference", tmp_path / "sharded"
    assert main(["train", *TINY, "--strategy", "single", "--devices", "cpu@0",
                 "--checkpoint-dir", str(reference_dir), "--metrics-out", str(tmp_path / "ref.json")]) == 0
    metrics = tmp_path / "hosts.json"
    devices = ["cpu@0", "cpu@1", "cpu@1"]
    procs = [_torchrun(ns, addr, devices[i], i == 0, ["--checkpoint-dir", str(sharded_dir), "--metrics-out", str(metrics)])
             for i, (ns, addr) in enumerate(hosts)]
    try:
        for p in procs:
            out = torchrun_procs.finish(p, timeout=90)
            assert p.returncode == 0, f"torchrun exited {p.returncode}:\n{out[-3000:]}"
    finally:
        for p in procs:  # a failed host leaves the others waiting: stop them too
            if p.poll() is None:
                try:
                    torchrun_procs.finish(p, timeout=1)
                except AssertionError:
                    pass

    shaped = subprocess.run(["ip", "netns", "exec", hosts[2][0], "tc", "-s", "qdisc", "show", "dev", "eth0"],
                            check=True, capture_output=True, text=True, timeout=20).stdout
    sent = int(shaped.split("Sent ")[1].split(" bytes")[0])
    assert sent > 100_000, f"the shaped link carried only {sent} bytes"  # the gathers did cross it

    got = json.loads(metrics.read_text())
    # c10d rendezvous numbers the hosts in the order they join
    assert got["world_size"] == 3 and sorted(got["devices"]) == devices
    assert {k: sorted(v) for k, v in got["shares"].items()} == {"features.0": [1, 1, 2], "features.3": [2, 3, 3]}
    reference = json.loads((tmp_path / "ref.json").read_text())
    assert got["train_loss"] == pytest.approx(reference["train_loss"], rel=1e-5)
    expected = torch.load(reference_dir / checkpoint.FILENAME, weights_only=True)["model"]
    sharded = torch.load(sharded_dir / checkpoint.FILENAME, weights_only=True)["model"]
    for key, value in expected.items():
        torch.testing.assert_close(sharded[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_torchrun_process_count_must_match_devices(tmp_path):
    """torchrun starting 2 processes for a host whose --devices lists 1 is refused, naming both."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
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
        env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
               "--master-addr", "127.0.0.1", "--master-port", str(port),
               "-m", "convshard", "train", *TINY, "--devices", "cpu@0,cpu@1"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode != 0
    assert str(port) in proc.stderr and "EADDRINUSE" in proc.stderr
