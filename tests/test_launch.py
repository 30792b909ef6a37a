"""Faults never hang a job: ``launch_local`` and the ``convshard`` command stop on the first failure.

Worker functions live at module level so that spawn can import them by
name. Every job passes its world size explicitly and a ``timeout``; workers
run with ``OMP_NUM_THREADS=1``. Worker PIDs are learned from the launcher's
debug log line ``worker rank R (DEVICE) pid N`` (caplog in-process, stderr
end to end), and the tests only ever signal those PIDs or their own
subprocesses. Their timeouts only guard against a hang: no test bounds how
fast a job starts or stops (``scripts/latencies.py`` measures that).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import helpers
import pytest
import torch.distributed as dist

from convshard.errors import ConfigError
from convshard.run.launch import WorkerFailed, init_from_env, launch_local

PID_LINE = re.compile(r"worker rank (\d+) \((.+?)\) pid (\d+)")
JOB_TIMEOUT = 60  # seconds: the launcher's limit for jobs expected to end much sooner


@pytest.fixture(autouse=True)
def one_thread_workers(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Spawned workers inherit OMP_NUM_THREADS=1; the launcher's PID lines are captured."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    caplog.set_level(logging.DEBUG, logger="convshard.run.launch")


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists (a zombie counts: it has not been reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _assert_gone(pids: list[int]) -> None:
    """Every pid disappears (exited and reaped); JOB_TIMEOUT only guards against a hang."""
    deadline = time.monotonic() + JOB_TIMEOUT
    while any(map(_running, pids)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in pids if _running(pid)], f"processes left behind among {pids}"


def _kill_worker_if_alive(pid: int) -> None:
    """Clean-up: SIGKILL a worker PID we learned, if it still runs a spawned worker."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return
    if b"multiprocessing" in cmdline:  # guard against a recycled PID
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _wait_for_files(paths: list[Path], timeout: float) -> None:
    """Poll until every path exists; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not all(path.exists() for path in paths):
        if time.monotonic() > deadline:
            pytest.fail(f"not all of {[str(p) for p in paths]} appeared within {timeout} s")
        time.sleep(0.05)


def _logged_pids(caplog: pytest.LogCaptureFixture) -> dict[int, int]:
    """rank -> pid, from the launcher's debug log in this process."""
    found = (PID_LINE.search(record.getMessage()) for record in caplog.records)
    return {int(m[1]): int(m[3]) for m in found if m}


def _launch_expecting(error: type[Exception], fn, world_size: int, caplog, *, args=(), labels=None,
                      timeout: float = JOB_TIMEOUT) -> tuple[pytest.ExceptionInfo, dict[int, int]]:
    """Run a job that must raise ``error``; return it and rank -> pid."""
    try:
        with pytest.raises(error) as info:
            launch_local(fn, world_size, args=args, labels=labels, timeout=timeout,
                         env={"OMP_NUM_THREADS": "1"})
        return info, _logged_pids(caplog)
    finally:
        for pid in _logged_pids(caplog).values():
            _kill_worker_if_alive(pid)


# --- worker functions (module level: spawn imports them by name) ---

def _boom_on_rank_1(work_dir: str, wait_for_go: bool = False) -> None:
    """Rank 1 raises while the others wait for it in a barrier. Files in ``work_dir``:
    ``<rank>.pid``; ``ready<rank>`` once joined; ``failed<rank>`` when the barrier
    fails. With ``wait_for_go`` rank 1 raises only once ``go`` exists."""
    work = Path(work_dir)
    (work / f"{os.environ['RANK']}.pid").write_text(str(os.getpid()))
    rank, _, _ = init_from_env("gloo", timeout=60)
    (work / f"ready{rank}").touch()
    if rank == 1:
        deadline = time.monotonic() + 30
        while wait_for_go and not (work / "go").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        raise RuntimeError("boom on rank 1")
    try:
        dist.barrier()  # waits for a peer that never comes
    except BaseException:
        (work / f"failed{rank}").touch()
        raise


def _config_error() -> None:
    raise ConfigError("bad value 'x'")


def _sleep() -> None:
    time.sleep(60)


def _rank_times_ten(env_dir: str) -> int:
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")
    Path(env_dir, f"{os.environ['RANK']}.json").write_text(json.dumps({k: os.environ.get(k) for k in keys}))
    rank, _, _ = init_from_env("gloo", timeout=60)
    return rank * 10


# --- tests ---

def test_exception_on_one_rank_stops_the_job(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Rank 1 raises while ranks 0 and 2 block in a barrier: WorkerFailed names rank 1,
    its device and its error, carries the traceback, and no worker survives."""
    info, pids = _launch_expecting(WorkerFailed, _boom_on_rank_1, 3, caplog, args=(str(tmp_path),),
                                            labels=["cpu@0", "cpu@1", "cpu@1"])
    message = str(info.value)
    assert "rank 1" in message and "cpu@1" in message and "boom on rank 1" in message
    assert info.value.rank == 1 and info.value.label == "cpu@1"
    assert "Traceback" in info.value.details and "boom on rank 1" in info.value.details
    assert sorted(pids) == [0, 1, 2]
    assert {int(p.read_text()) for p in tmp_path.glob("*.pid")} == set(pids.values())
    _assert_gone(list(pids.values()))


# Runs launch_local in its own process (argv: tests dir, work dir), so the test can stop it.
_STOPPABLE_LAUNCHER = """
import sys
sys.path.insert(0, sys.argv[1])
import test_launch
from convshard.run.launch import WorkerFailed, launch_local
try:
    launch_local(test_launch._boom_on_rank_1, 3, args=(sys.argv[2], True),
                 labels=["cpu@0", "cpu@1", "cpu@1"], timeout=60)
except WorkerFailed as exc:
    sys.exit(f"{exc}")
"""


def test_root_cause_is_named_when_failures_are_seen_together(tmp_path: Path) -> None:
    """The launcher is stopped while rank 1 fails and ranks 0 and 2 fail in turn (their peer
    is gone); once it resumes it must still name rank 1's error, not a consequence of it.
    A busy machine that deschedules the launcher produces the same situation."""
    proc = subprocess.Popen([sys.executable, "-c", _STOPPABLE_LAUNCHER, str(Path(__file__).parent), str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=helpers.child_env())
    try:
        _wait_for_files([tmp_path / f"ready{rank}" for rank in range(3)], timeout=30)
        os.kill(proc.pid, signal.SIGSTOP)
        (tmp_path / "go").touch()
        _wait_for_files([tmp_path / "failed0", tmp_path / "failed2"], timeout=30)
        time.sleep(0.5)  # let them exit
        os.kill(proc.pid, signal.SIGCONT)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
            proc.wait()
    assert "worker rank 1 (cpu@1) failed: RuntimeError: boom on rank 1" in stderr, stderr[-2000:]


def test_config_error_in_a_worker_is_reraised(caplog: pytest.LogCaptureFixture) -> None:
    """A worker's ConfigError comes back as ConfigError with its message, not as WorkerFailed."""
    info, pids = _launch_expecting(ConfigError, _config_error, 2, caplog)
    assert str(info.value) == "bad value 'x'"
    _assert_gone(list(pids.values()))


def test_hanging_worker_hits_the_time_limit(caplog: pytest.LogCaptureFixture) -> None:
    """A worker that never returns fails the job at the limit, and every worker is stopped."""
    info, pids = _launch_expecting(WorkerFailed, _sleep, 2, caplog, timeout=3)
    assert "3 s limit" in str(info.value)
    assert sorted(pids) == [0, 1]
    _assert_gone(list(pids.values()))


def test_results_and_environment(tmp_path: Path) -> None:
    """launch_local returns each rank's result in rank order; workers see torchrun's variables."""
    assert launch_local(_rank_times_ten, 2, args=(str(tmp_path),), timeout=JOB_TIMEOUT,
                        env={"OMP_NUM_THREADS": "1"}) == [0, 10]
    for rank in range(2):
        env = json.loads((tmp_path / f"{rank}.json").read_text())
        assert env == {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1"}


class _StderrLines:
    """Collects a subprocess's stderr lines in a thread, so waiting for one is bounded."""

    def __init__(self, stream) -> None:
        self.lines: list[str] = []
        self._queue: queue.Queue[str] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream) -> None:
        for line in stream:
            self.lines.append(line)
            self._queue.put(line)

    def wait_for(self, pattern: re.Pattern, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                if match := pattern.search(self._queue.get(timeout=left)):
                    return match
            except queue.Empty:
                break
        pytest.fail(f"no stderr line matching {pattern.pattern!r} within {timeout} s: {''.join(self.lines)[-2000:]}")

    def text(self, timeout: float = 10) -> str:
        self._thread.join(timeout)
        return "".join(self.lines)


def test_sigkill_of_a_worker_ends_the_command(tmp_path: Path, record_property) -> None:
    """SIGKILL one worker of a running `convshard train`: the command exits with code 1
    (a failed worker, as the CLI documents), its last stderr line names rank 1, its
    device and the signal, and it takes rank 0 down with it. The
    seconds from the kill to the exit are recorded as ``sigkill_to_exit_seconds``,
    not bounded.

    The first epoch's checkpoint proves training is under way before the kill
    (no log wording involved); the kill lands about a second into epoch 2.
    """
    cmd = [sys.executable, "-m", "convshard", "train", "-v", "--devices", "cpu@0,cpu@1", "--threads", "1",
           "--dataset", "synthetic", "--synthetic-shape", "1,16,16", "--synthetic-size", "4096",
           "--kernels", "4,8", "--batch-size", "16", "--epochs", "50", "--quiet",
           "--checkpoint-dir", str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=helpers.child_env())
    stderr = _StderrLines(proc.stderr)
    pids: dict[int, int] = {}
    try:
        while len(pids) < 2:
            match = stderr.wait_for(PID_LINE, timeout=30)
            pids[int(match[1])] = int(match[3])
        _wait_for_files([tmp_path / "checkpoint.pt"], timeout=60)
        time.sleep(1)
        os.kill(pids[1], signal.SIGKILL)
        killed = time.monotonic()
        code = proc.wait(timeout=JOB_TIMEOUT)
        seconds = time.monotonic() - killed
        record_property("sigkill_to_exit_seconds", round(seconds, 3))
        print(f"SIGKILL to launcher exit: {seconds:.2f} s")
        text = stderr.text()
        assert code == 1, text[-2000:]
        errors = [line for line in text.splitlines() if line.startswith("convshard: error:")]
        assert len(errors) == 1 and text.splitlines()[-1] == errors[0], text[-2000:]
        assert "rank 1" in errors[0] and "cpu@1" in errors[0] and "SIGKILL" in errors[0], errors[0]
        assert "Traceback" not in text, text[-2000:]
        _assert_gone([pids[0]])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in pids.values():
            _kill_worker_if_alive(pid)


def test_a_worker_whose_launcher_died_while_it_started_exits(tmp_path: Path) -> None:
    """A launcher that dies while its worker is still starting (before the
    worker asked for the death signal) leaves no worker behind: the worker
    sees another parent and exits instead of running."""
    marker = tmp_path / "ran"
    code = f"""
import os, sys, time
from convshard.run.launch import _die_with_parent
launcher = os.getpid()
if os.fork() == 0:  # the worker, orphaned while it starts
    deadline = time.monotonic() + 30
    while os.getppid() == launcher and time.monotonic() < deadline:
        time.sleep(0.01)
    open({str(tmp_path / "pid")!r}, "w").write(str(os.getpid()))
    _die_with_parent(launcher)
    open({str(marker)!r}, "w").write("ran")
    os._exit(0)
"""  # the launcher returns at once
    subprocess.run([sys.executable, "-c", code], check=True, timeout=JOB_TIMEOUT, env=helpers.child_env())
    _wait_for_files([tmp_path / "pid"], timeout=60)
    _assert_gone([int((tmp_path / "pid").read_text())])
    assert not marker.exists()


LAUNCHER = """
import multiprocessing as mp, os, sys, time
from convshard.run import launch

def _after(launcher: int) -> None:  # unpickled in the worker, before it runs: hold it until the launcher died
    while True:
        try:
            state = open(f"/proc/{launcher}/stat").read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return
        if state == "Z":
            return
        time.sleep(0.01)

class LateArgument:
    def __reduce__(self):
        return _after, (os.getpid(),)

def work(*args) -> None:
    open(sys.argv[1] + "/ran", "w").write("ran")

if __name__ == "__main__":
    p = launch._context().Process(target=launch._entry,
                                  args=(0, dict(os.environ), work, (LateArgument(),), sys.argv[1], os.getpid()))
    p.start()
    open(sys.argv[1] + "/pid", "w").write(str(p.pid))
    os._exit(0)  # the launcher dies while its worker starts
"""


def test_a_worker_from_the_fork_server_whose_launcher_died_while_it_started_exits(tmp_path: Path) -> None:
    """The same for a worker of ``launch_local``, whose parent is the fork
    server: it learns of the launcher's death from multiprocessing's pipe."""
    script = tmp_path / "launcher.py"
    script.write_text(LAUNCHER)
    subprocess.run([sys.executable, str(script), str(tmp_path)], check=True, timeout=JOB_TIMEOUT,
                   env=helpers.child_env())
    _wait_for_files([tmp_path / "pid"], timeout=60)
    _assert_gone([int((tmp_path / "pid").read_text())])
    assert not (tmp_path / "ran").exists()


@pytest.fixture
def job_store(monkeypatch: pytest.MonkeyPatch):
    """A rendezvous store on loopback, named by the environment as torchrun names it."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(store.port))
    yield store


def _lone_rank(work) -> threading.Thread:
    """A thread playing the rank that trains alone, running ``work`` inside ``training_alone``."""
    from convshard.run import alone

    def run() -> None:
        try:
            with alone.training_alone(10):
                work()
        except ValueError:
            pass  # the failure the standing-by rank must report

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_standing_by_rank_waits_until_the_lone_rank_is_done(job_store, monkeypatch) -> None:
    from convshard.run import alone

    monkeypatch.setattr(alone, "BEAT_SECONDS", 0.05)
    thread = _lone_rank(lambda: time.sleep(0.5))
    alone.stand_by(1, "cpu@1", 10)
    thread.join(5)
    assert not thread.is_alive()
    keys = dist.PrefixStore("convshard/alone/0", job_store)  # this attempt's keys
    assert keys.check(["done"]) and keys.get("done") == b"1"
    assert keys.add("beats", 0) >= 3  # it beat while it trained


def test_a_standing_by_rank_fails_with_the_lone_ranks_error(job_store, monkeypatch) -> None:
    from convshard.errors import TrainingError
    from convshard.run import alone

    monkeypatch.setattr(alone, "BEAT_SECONDS", 0.05)

    def fail() -> None:
        time.sleep(0.2)
        raise ValueError("bad batch\nsecond line")

    _lone_rank(fail)
    with pytest.raises(TrainingError, match=r"^rank 1 \(cpu@1\), which trained alone, failed: ValueError: bad batch$"):
        alone.stand_by(1, "cpu@1", 10)


def test_a_standing_by_rank_fails_when_the_lone_rank_falls_silent(job_store, monkeypatch) -> None:
    """No beat at all (the lone process was killed before or while training)."""
    from convshard.errors import TrainingError
    from convshard.run import alone

    monkeypatch.setattr(alone, "BEAT_SECONDS", 0.05)
    monkeypatch.setattr(alone, "SILENCE_SECONDS", 0.5)
    with pytest.raises(TrainingError, match=r"rank 0 \(cuda:0\), which trained alone, fell silent"):
        alone.stand_by(0, "cuda:0", 10)
