"""What the tests share: one home for helpers used by more than one test file.

- Machine requirements: ``require_namespaces`` and ``require_mount_namespaces``
  skip a test with the reason when this machine cannot build what it needs,
  and fail it instead under ``CI=true``: the CI machine is root with
  iproute2 and util-linux, so a missing capability there is a fault, not a
  reason to pass silently.
- Child processes: the environment a child runs in (one intra-op thread,
  gloo on loopback), a free port, torchrun agents started in a session of
  their own and always stopped with their workers, bounded waits, and
  ``main``'s exit code whether returned or raised by argparse.
- Workers of ``launch_local``: joining the gloo process group with one thread.
- Weights: comparing a state dict with a reference, bitwise or within a
  tolerance, and the worst error over a reference's floating-point tensors.
- Profiles made up for the cost model and the planner: ``make_profile`` from
  per-rank speeds, ``random_profile`` with values read by later groups.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from typing import NoReturn

import pytest
import torch

from convshard.tools import netns

# --- machine requirements ----------------------------------------------------


def in_ci() -> bool:
    """Whether the environment says this is a CI run (``CI=true``, as CI services set it)."""
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


def cannot_run_here(reason: str) -> NoReturn:
    """Skip the test with ``reason``; under CI fail it with ``reason`` instead."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: this machine is expected to run it)", pytrace=False)
    pytest.skip(reason)


def require_namespaces() -> None:
    """Network namespaces with ``ip`` and ``tc`` (root and iproute2), or skip / fail under CI."""
    reason = netns.unavailable()
    if reason:
        cannot_run_here(reason)


def require_mount_namespaces() -> None:
    """A tmpfs mounted inside a private mount namespace (root and ``unshare``), or skip / fail under CI."""
    if os.geteuid() != 0:
        cannot_run_here("needs root to mount a tmpfs in a mount namespace")
    if shutil.which("unshare") is None:
        cannot_run_here("needs unshare (util-linux)")
    probe = subprocess.run(["unshare", "--mount", "sh", "-c", "mount -t tmpfs none /mnt"], check=False,
                           capture_output=True, text=True, timeout=20)
    if probe.returncode != 0:
        cannot_run_here(f"cannot mount a tmpfs in a mount namespace here: {probe.stderr.strip()}")


# --- child processes ---------------------------------------------------------

children = netns.descendants


def worker_pid(agent: int, local_rank: int) -> int | None:
    """The PID of torchrun agent ``agent``'s worker with LOCAL_RANK == local_rank, if it runs."""
    for pid in children(agent):
        try:
            environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if f"LOCAL_RANK={local_rank}".encode() in environ:
            return pid
    return None


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment for a child: one intra-op thread, plus ``extra``."""
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def torchrun_env(**extra: str) -> dict[str, str]:
    """``child_env`` for a torchrun agent on this machine: gloo on the loopback interface."""
    return child_env(GLOO_SOCKET_IFNAME="lo", **extra)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (at the time of asking)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
    """Start ``cmd`` leading a session of its own, stdout and stderr together in one text pipe."""
    return subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float) -> str:
    """Wait up to ``timeout`` s for ``proc``; stop it and its workers if still running
    (``convshard.tools.netns.finish``), failing the test then. Returns its output."""
    code, out = netns.finish(proc, timeout)
    if code is None:
        raise AssertionError(f"torchrun still running after {timeout} s:\n{out[-3000:]}")
    return out


def finish_all(procs: Sequence[subprocess.Popen], timeout: float, what: str = "torchrun") -> list[str]:
    """Wait for each of ``procs`` (``timeout`` s each) and require exit code 0. Whatever
    happens none is left running: one failing leaves the others waiting for it.
    Returns their outputs in order."""
    outputs = []
    try:
        for proc in procs:
            out = finish(proc, timeout)
            assert proc.returncode == 0, f"{what} exited {proc.returncode}:\n{out[-3000:]}"
            outputs.append(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                try:
                    finish(proc, timeout=1)
                except AssertionError:
                    pass
    return outputs


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, every: float = 0.2) -> None:
    """Poll ``predicate`` every ``every`` s until true; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


def main_exit_code(argv: list[str]) -> int:
    """``convshard.cli.main(argv)``'s exit code, whether returned or raised by argparse.
    The CLI is imported here: most users of this module never run it."""
    from convshard.cli import main

    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


# --- workers of launch_local -------------------------------------------------


def join_gloo(timeout: float = 120) -> tuple[int, int]:
    """In a ``launch_local`` worker: one intra-op thread, join the gloo group; (rank, world size)."""
    from convshard.run.launch import init_from_env

    torch.set_num_threads(1)
    rank, world, _ = init_from_env("gloo", timeout=timeout)
    return rank, world


# --- weights -----------------------------------------------------------------


def assert_same_weights(got: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], *,
                        rtol: float | None = None, atol: float | None = None) -> None:
    """Every tensor of ``expected`` equals ``got``'s under the same key: bitwise, or
    within ``rtol``/``atol`` when given. The failure names the key."""
    for key, value in expected.items():
        if rtol is None and atol is None:
            assert torch.equal(got[key], value), key
        else:
            torch.testing.assert_close(got[key], value, rtol=rtol, atol=atol, msg=key)


def worst_state_error(full: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor],
                      error: Callable[[torch.Tensor, torch.Tensor], float]) -> float:
    """The largest ``error(full[key], value)`` over ``reference``'s floating-point
    tensors (0.0 when it has none); every key of ``reference`` must have its shape in ``full``."""
    worst = 0.0
    for key, value in reference.items():
        assert full[key].shape == value.shape, key
        if value.is_floating_point():
            worst = max(worst, error(full[key], value))
    return worst


# Synthetic profiles for the cost model and the planner: rank r's costs are the
# base costs divided by speeds[r]; ``random_profile`` draws a model whose values
# skip ahead to several readers, as a ResNet's do.

LINKS = ("all_gather", "all_reduce", "reduce_scatter", "broadcast", "all_to_all", "ddp_all_reduce")


def make_profile(speeds=(1.0, 1.0, 1.0), *, kernels=(512, 1024), a=1e-3, per_kernel=1e-4, gather_bytes=1000,
                 input_grad_bytes=10_000, rest=1e-3, param_bytes=100_000_000, replicated_param_bytes=10_000,
                 bandwidth=1e9, latency=1e-5, batchnorms=0, update=0.0) -> dict:
    """A chain of len(kernels) groups on len(speeds) ranks; the first group's input needs no gradient."""
    world = len(speeds)
    layers = [
        {
            "name": f"conv{i}",
            "kernels": k,
            "gather_bytes_per_kernel": gather_bytes,
            "input_grad_bytes": input_grad_bytes if i else 0,
            "input_grad_scatter_bytes": 0,
            "a": [a / s for s in speeds],
            "b": [per_kernel / s for s in speeds],
            # batch mode: the group's whole work on ceil(64 / W) rows
            "batch_rows": -(-64 // world),
            "batch_seconds": [(a + per_kernel * k) / s * -(-64 // world) / 64 for s in speeds],
            "param_bytes": (param_bytes - replicated_param_bytes) // len(kernels),
            "batchnorms": batchnorms,
            "inputs": [{"bytes": input_grad_bytes, "grad": bool(i)}],
            "outputs": [{"bytes": gather_bytes * k, "elements": 1,
                         "convs": [f"conv{i + 1}"] if i + 1 < len(kernels) else [], "whole": i + 1 == len(kernels)}],
        }
        for i, k in enumerate(kernels)
    ]
    link = {"latency": latency, "bandwidth": bandwidth}
    return {
        "version": 2,
        "batch_size": 64,
        "devices": [f"cpu@{r}" for r in range(world)],
        "layers": layers,
        "rest_seconds": [rest / s for s in speeds],
        "update_seconds_per_byte": [update / s for s in speeds],
        "param_bytes": param_bytes,
        "replicated_param_bytes": replicated_param_bytes,
        "links": {kind: dict(link) for kind in LINKS} if world > 1 else {},
    }


def write_profile(path, speeds=(1.0,), batch=64, model="m1") -> dict:
    """A profile file as ``convshard profile --profile`` writes it (``make_profile``
    of ``len(speeds)`` devices, with its key), for a cluster file to name."""
    measured = make_profile(speeds, kernels=(64, 128))
    world = len(speeds)
    measured["key"] = {"devices": measured["devices"], "threads": [1] * world, "hosts": ["x"] * world,
                       "model": model, "input_shape": [3, 32, 32], "batch_size": batch, "torch": "2"}
    measured["batch_size"] = batch
    path.write_text(json.dumps(measured))
    return measured


def random_profile(rng: random.Random, *, groups: int, world: int) -> dict:
    """``groups`` groups in graph order; each value is read by one to three later
    groups (skips included), now and then by an earlier one (a tied group), or by
    the classifier; costs, bytes and links drawn at random."""
    speeds = [rng.uniform(0.2, 1.0) for _ in range(world)]
    names = [f"g{i}" for i in range(groups)]
    layers = []
    for i, name in enumerate(names):
        later = names[i + 1:]
        readers = rng.sample(later, min(len(later), rng.randint(1, 3))) if later else []
        if i and rng.random() < 0.3:  # a tied group that spans ahead: an earlier group reads this one
            readers.append(names[rng.randrange(i)])
        k = rng.randint(world, 64)
        work = rng.uniform(1e-3, 5e-2)
        layers.append({
            "name": name, "kernels": k, "gather_bytes_per_kernel": 0, "input_grad_bytes": 0,
            "input_grad_scatter_bytes": 0,
            "a": [rng.uniform(0, 1e-3) / s for s in speeds], "b": [work / k / s for s in speeds],
            "batch_rows": -(-64 // world), "batch_seconds": [work * rng.uniform(0.3, 0.8) / s for s in speeds],
            "param_bytes": rng.choice([1e3, 1e5, 1e7]), "batchnorms": rng.randint(0, 2),
            "inputs": [{"bytes": rng.choice([1e4, 1e6]), "grad": i > 0 and rng.random() < 0.3}],
            "outputs": [{"bytes": rng.choice([1e4, 1e6, 1e8]), "elements": 1, "convs": readers,
                         "whole": not readers or rng.random() < 0.2}],
        })
    bandwidth = 10 ** rng.uniform(7, 10)
    return {"version": 2, "batch_size": 64, "devices": [f"cpu@{r}" for r in range(world)], "layers": layers,
            "rest_seconds": [rng.uniform(1e-3, 1e-2) / s for s in speeds],
            "update_seconds_per_byte": [1e-10 / s for s in speeds],
            "param_bytes": sum(layer["param_bytes"] for layer in layers) + 1e4, "replicated_param_bytes": 1e4,
            "links": {kind: {"latency": rng.uniform(0, 1e-3), "bandwidth": bandwidth} for kind in LINKS}}
