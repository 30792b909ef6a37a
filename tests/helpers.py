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
"""

from __future__ import annotations

import os
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


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` until true; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


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
