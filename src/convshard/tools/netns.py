"""Several hosts on one machine, for benchmarks and tests: network namespaces on a bridge.

``hosts(n)`` creates n namespaces ("hosts"), each with an address on a
private subnet and a veth pair to a bridge inside one more namespace (the
switch). Nothing is attached to the machine's own network: traffic flows
only between these namespaces. ``rate`` shapes the egress of the chosen
hosts' links with a ``tc`` token bucket, so every transfer between hosts
crosses a link of that bandwidth. Everything is deleted on exit. Needs root
and iproute2 (``ip``, ``tc``): ``unavailable()`` says why not.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

SUBNET = "10.213.7"  # addresses exist only inside the namespaces
RENDEZVOUS_PORT = 29617


@dataclass(frozen=True)
class Host:
    namespace: str
    address: str


def unavailable() -> str | None:
    """Why namespaces cannot be built here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if not (shutil.which("ip") and shutil.which("tc")):
        return "needs iproute2 (ip, tc)"
    return None


def _run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=20).stdout


def _bucket(rate: str) -> str:
    """A token-bucket burst of 10 ms at ``rate`` (at least 32 KiB): tbf needs rate / HZ at least."""
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "bit": 1}
    unit = next(u for u in units if rate.endswith(u))
    bits = float(rate[: -len(unit)]) * units[unit]
    return str(max(32 * 1024, int(bits / 8 / 100)))


@contextmanager
def hosts(n: int, *, rate: str | Sequence[str | None] | None = None, shaped: Sequence[int] | None = None,
          subnet: str = SUBNET) -> Iterator[list[Host]]:
    """n hosts on one bridge; with ``rate`` (e.g. "1gbit") the links of the
    hosts in ``shaped`` (default: all) send at most that; a list of n rates
    gives each host its own (None: unshaped). Raises
    ``subprocess.CalledProcessError`` when the kernel refuses a step."""
    rates = list(rate) if isinstance(rate, (list, tuple)) else [rate] * n
    if len(rates) != n:
        raise ValueError(f"{len(rates)} rates for {n} hosts")
    tag = f"cs{os.getpid() % 100000}"
    switch, names = f"{tag}sw", [f"{tag}h{i}" for i in range(n)]
    created: list[str] = []
    try:
        for ns in (switch, *names):
            _run("ip", "netns", "add", ns)
            created.append(ns)
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        _run("ip", "-n", switch, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", switch, "link", "set", "br0", "up")
        for i, ns in enumerate(names):
            port = f"{tag}p{i}"
            _run("ip", "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _run("ip", "link", "set", port, "netns", switch)
            _run("ip", "-n", switch, "link", "set", port, "master", "br0", "up")
            _run("ip", "-n", ns, "addr", "add", f"{subnet}.{i + 1}/24", "dev", "eth0")
            _run("ip", "-n", ns, "link", "set", "eth0", "up")
            if rates[i] and (shaped is None or i in shaped):
                _run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "eth0", "root", "tbf",
                     "rate", rates[i], "burst", _bucket(rates[i]), "latency", "100ms")
        yield [Host(ns, f"{subnet}.{i + 1}") for i, ns in enumerate(names)]
    finally:
        for ns in created:  # deleting a namespace deletes its veth ends too
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)


def bytes_sent(host: Host) -> int:
    """Bytes the host's shaped link has sent (from ``tc -s``)."""
    shown = _run("ip", "netns", "exec", host.namespace, "tc", "-s", "qdisc", "show", "dev", "eth0")
    return int(shown.split("Sent ")[1].split(" bytes")[0])


def torchrun(host: Host, *, nnodes: int | str, rendezvous: Host, args: Sequence[str], run_id: str = "convshard",
             port: int = RENDEZVOUS_PORT, options: Sequence[str] = (), rdzv_conf: str = "") -> subprocess.Popen:
    """Start one torchrun (one process) in ``host`` running ``python -m convshard ARGS``,
    c10d rendezvous served by ``rendezvous``. ``nnodes`` may be elastic
    ("1:2"); ``options`` are more of torchrun's (``--max-restarts 2``),
    ``rdzv_conf`` more of its rendezvous settings (``last_call_timeout=1``).
    Output is piped; the agent leads a session of its own (``stop`` ends it and its workers)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "eth0",
           "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}  # PyTorch issue 135712: a restart must not reuse addresses
    conf = f"is_host={int(host == rendezvous)}" + (f",{rdzv_conf}" if rdzv_conf else "")
    cmd = ["ip", "netns", "exec", host.namespace, sys.executable, "-m", "torch.distributed.run",
           "--nnodes", str(nnodes), "--nproc-per-node", "1", "--rdzv-id", run_id,
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{rendezvous.address}:{port}",
           # the namespaces share the machine's hostname: name each host's address and
           # which host serves the store, which torchrun would otherwise derive from the hostname
           "--local-addr", host.address, "--rdzv-conf", conf, *options,
           "-m", "convshard", *args]
    return subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int | None, str]:
    """Wait up to ``timeout`` s for a torchrun; stop it and its workers if it is
    still running (returncode None then). Returns (returncode, output)."""
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        workers = descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)  # the agent stops its workers
        try:
            out, _ = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        for pid in workers:  # each worker leads a session of its own: end what is left
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return None, out or ""


def descendants(pid: int) -> list[int]:
    """PIDs of the children of ``pid``, their children, and so on."""
    try:
        direct = [int(c) for c in open(f"/proc/{pid}/task/{pid}/children").read().split()]
    except OSError:
        return []
    return direct + [g for c in direct for g in descendants(c)]
