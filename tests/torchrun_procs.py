"""Start torchrun from a test and always stop it, workers included (see ``convshard.netns.finish``)."""

from __future__ import annotations

import subprocess
import time

from convshard import netns

children = netns.descendants


def start(cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float) -> str:
    """Wait up to ``timeout`` s for ``proc``; stop it and its workers if still running. Returns its output."""
    code, out = netns.finish(proc, timeout)
    if code is None:
        raise AssertionError(f"torchrun still running after {timeout} s:\n{out[-3000:]}")
    return out


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
