"""Start one worker process per device: locally by spawning, or under torchrun.

Workers always find their place in the job the way torchrun tells them:
the environment variables RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
MASTER_ADDR and MASTER_PORT, read by ``init_from_env``. Under torchrun they
are set by torchrun; locally ``launch_local`` sets them. So one training
function serves both.

``launch_local`` hosts the rendezvous store itself on 127.0.0.1, on a port the
kernel picks (no race for a "free" port), as torchrun's agent does. Its
workers start from a fork server that has imported the training loop (and
torch) once, instead of importing torch afresh in each; each gets the
launcher's environment, stdout and stderr as they are when the job
starts. It then watches the workers: the first one to fail (an
exception, a signal, a lost process) stops the job. The others are
terminated at once, and ``WorkerFailed`` names the failed rank, its device
and its error. Each worker also dies with the launcher (``PR_SET_PDEATHSIG``
on the fork server, which ends with the launcher), and one whose launcher
died while it was still starting exits at once, so none is left behind.
"""

from __future__ import annotations

import ctypes
import json
import logging
import multiprocessing as mp
import multiprocessing.connection
from multiprocessing import reduction
import os
import pickle
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.distributed as dist

from ..errors import ConfigError, TrainingError
from ..parallel import shm, wire

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


class WorkerFailed(RuntimeError):
    """A worker process failed; the message names its rank and device."""

    def __init__(self, rank: int, label: str, reason: str, details: str = "") -> None:
        super().__init__(f"worker rank {rank} ({label}) failed: {reason}")
        self.rank, self.label, self.reason, self.details = rank, label, reason, details


def in_torchrun() -> bool:
    """True inside a process started by torchrun or ``launch_local``."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def restart_count() -> int:
    """How often torchrun has restarted this job (``--max-restarts``); 0 on the first attempt."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))


def run_id() -> str | None:
    """torchrun's rendezvous id (``--rdzv-id``), the same for every job it
    forms for one run, restarts and changes of members included; None
    outside torchrun, or for its default id ``none``."""
    given = os.environ.get("TORCHELASTIC_RUN_ID") if in_torchrun() else None
    return given if given not in (None, "", "none") else None


def local_rank() -> int:
    """This process's rank among the job's processes on its host (LOCAL_RANK); 0 outside a job."""
    return int(os.environ.get("LOCAL_RANK", 0))


def init_from_env(backend: str, *, timeout: float) -> tuple[int, int, int]:
    """Join the job described by the environment; returns (rank, world size, local rank).

    ``backend`` is the one the devices this rank knows ask for
    (``devices.backend_for`` of its host's ``--devices``, or of the plan's);
    the job's is agreed with every other rank first (``_agree``), as are the
    switches that decide collectives (rank 0's). Outside torchrun and
    ``launch_local`` there is no job: (0, 1, 0), and no process group is
    created. ``timeout`` (seconds) bounds every collective.
    """
    if not in_torchrun():
        return 0, 1, 0
    _die_with_parent()  # a worker never outlives its launcher or torchrun agent
    shm.timeout_seconds = timeout
    if not dist.is_initialized():
        store, rank, world = _job_store(timeout), int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        dist.init_process_group(_agree(store, backend), store=store, rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout))
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0))
    if restarts and dist.get_rank() == 0 and os.environ.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE") != "1":
        log.warning("torchrun --max-restarts %d shares its rendezvous store with the workers, which can hand "
                    "a restarted job stale addresses (PyTorch issue 135712): start torchrun with "
                    "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1", restarts)
    return dist.get_rank(), dist.get_world_size(), local_rank()


def _job_store(timeout: float) -> dist.Store:
    """The job's rendezvous store, as ``init_process_group``'s env:// makes
    it: a client of the store torchrun's agent (or ``launch_local``) hosts
    when it shares it (``TORCHELASTIC_USE_AGENT_STORE``), else one that rank
    0 hosts at MASTER_ADDR:MASTER_PORT. Made once: the backend is agreed on
    it, then the process group is made on it."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                         is_master=rank == 0 and not agent, timeout=timedelta(seconds=timeout),
                         multi_tenant=not agent)


def _agree(client: dist.Store, backend: str) -> str:
    """The job's backend, agreed through the rendezvous store ``client``
    before the process group exists: each rank posts the backend its devices
    ask for and reads every rank's; NCCL when all ask for it, else gloo,
    whose one group carries CPU and CUDA ranks alike (a host knows only its
    own ``--devices``, so no rank could decide alone). Rank 0 posts its
    ``wire.SWITCHES`` too, and every rank takes them (``wire.set_switches``)."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.PrefixStore(f"convshard/join/{restart_count()}", client)
    store.set(f"backend/{rank}", backend)
    if rank == 0:
        store.set("switches", json.dumps(wire.local_switches()))
    wire.set_switches(json.loads(store.get("switches")))
    wanted = {store.get(f"backend/{r}").decode() for r in range(world)}
    return "nccl" if wanted == {"nccl"} else "gloo"


def _die_with_parent(launcher: int | None = None) -> None:
    """Have the kernel SIGKILL this process when its parent dies (a
    launcher's worker: the fork server, which ends with the launcher). With
    ``launcher`` (its pid), also exit at once if the launcher is already
    gone: it may die while the worker still starts, before the death signal
    was asked for."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:  # not Linux: the launcher's own clean-up still applies
        pass
    if launcher is not None and not _alive(launcher):
        os._exit(1)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` still runs: a zombie, dead but not yet reaped, does not."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        if Path("/proc/self/stat").exists():
            return False
        try:  # no /proc: whether it can be signalled
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _context() -> mp.context.BaseContext:
    """Where workers start: a fork server that imported the training loop
    once (spawn where there is no fork). A launcher holds threads (gloo's, a
    loader's), which a plain fork would copy mid-lock."""
    if os.name != "posix":
        return mp.get_context("spawn")
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(["convshard.run.train"])
    return context


class _Output:
    """The launcher's stdout and stderr, as they are now, handed to a worker:
    one from the fork server would write where the server's went when it started."""

    def __reduce__(self) -> tuple:
        return _write_to, (reduction.DupFd(1), reduction.DupFd(2))


def _write_to(stdout: Any, stderr: Any) -> None:
    """In the worker, as it is unpickled: make its file descriptors 1 and 2 the launcher's."""
    for handed, fd in ((stdout, 1), (stderr, 2)):
        handed = handed.detach()
        os.dup2(handed, fd)
        os.close(handed)


def _entry(rank: int, env: dict[str, str], fn: Callable, args: tuple, outdir: str, launcher: int,
           output: None = None) -> None:
    """Body of a started worker: take the launcher's environment with
    torchrun's variables (``env``, whole: the fork server's is older), run,
    report. ``output`` was the launcher's stdout and stderr, taken as this
    worker's when it was unpickled."""
    _die_with_parent(launcher)
    os.environ.clear()
    os.environ.update(env)
    out = Path(outdir)
    try:
        result = fn(*args)
        (out / f"{rank}.result").write_bytes(pickle.dumps(result))
        shutdown()
    except BaseException as exc:  # reported to the launcher, which decides the job's fate
        report = {
            "time": time.time(),
            "secondary": _lost_peer(exc),
            "type": type(exc).__name__,
            "message": str(exc),
            "config_error": isinstance(exc, ConfigError),
            "training_error": isinstance(exc, TrainingError),
            "exit_code": getattr(exc, "exit_code", 1),
            "traceback": traceback.format_exc(),
        }
        (out / f"{rank}.error").write_text(json.dumps(report))
        hard_exit(1)
    hard_exit(0)


def _lost_peer(exc: BaseException) -> bool:
    """Whether ``exc`` only reports that another rank went away (a consequence, not a cause)."""
    text = str(exc)
    return isinstance(exc, dist.DistBackendError) or any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe")
    )


def shutdown() -> None:
    """Leave the job cleanly: wait until every rank is done, then destroy the group.

    Destroying it while a peer still talks, or leaving it to interpreter
    teardown, can abort the process inside gloo's threads.
    """
    if dist.is_initialized():
        wire.barrier()
        dist.destroy_process_group()


def hard_exit(code: int) -> None:
    """Flush and end the process now, skipping interpreter finalization.

    A worker's result is on disk by then; gloo's C++ threads must not run
    destructors under a dying interpreter (they can abort with "terminate
    called without an active exception", even after destroy_process_group).
    """
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def launch_local(
    fn: Callable[..., Any],
    world_size: int,
    *,
    args: tuple = (),
    labels: Sequence[str] | None = None,
    timeout: float | None = None,
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Run ``fn(*args)`` in ``world_size`` spawned processes; return each rank's result.

    ``fn`` must be importable by name (spawn pickles it). It calls
    ``init_from_env`` to join the job. ``labels`` name the ranks in errors
    (device specs). ``timeout`` bounds the whole run, in seconds. A
    ``ConfigError`` or ``TrainingError`` raised in a worker is raised again
    here, as it is; any other failure raises ``WorkerFailed``.
    """
    labels = list(labels) if labels is not None else [f"rank {r}" for r in range(world_size)]
    store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False)
    base_env = {
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
        "GROUP_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(store.port),
        # The launcher hosts the store; every rank connects as a client.
        "TORCHELASTIC_USE_AGENT_STORE": "True",
        "TORCHELASTIC_RESTART_COUNT": "0",
        **({"GLOO_SOCKET_IFNAME": "lo"} if "GLOO_SOCKET_IFNAME" not in os.environ else {}),
        **(env or {}),
    }
    ctx = _context()
    with tempfile.TemporaryDirectory(prefix="convshard-") as outdir:
        procs = []
        try:
            for r in range(world_size):
                worker_env = {**os.environ, **base_env, "RANK": str(r), "LOCAL_RANK": str(r)}
                # not daemonic, so that a worker may start loader processes: it dies with the
                # launcher all the same (``_die_with_parent``), and ``_stop`` ends it on any exit
                p = ctx.Process(
                    target=_entry, args=(r, worker_env, fn, args, outdir, os.getpid(), _Output()),
                    name=f"convshard-rank{r}", daemon=False,
                )
                p.start()
                log.debug("worker rank %d (%s) pid %d", r, labels[r], p.pid)
                procs.append(p)
            _watch(procs, labels, Path(outdir), timeout)
            return [pickle.loads((Path(outdir) / f"{r}.result").read_bytes()) for r in range(world_size)]
        finally:
            _stop(procs)
            del store


def _watch(procs: list, labels: list[str], outdir: Path, timeout: float | None) -> None:
    """Wait for every worker; raise on the first failure or at the deadline."""
    deadline = None if timeout is None else time.monotonic() + timeout
    running = {p.sentinel: r for r, p in enumerate(procs)}
    while running:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready = mp.connection.wait(list(running), timeout=left)
        if not ready:
            r = min(running.values())
            raise WorkerFailed(r, labels[r], f"still running after the {timeout:g} s limit")
        failed = []
        for sentinel in ready:
            r = running.pop(sentinel)
            procs[r].join()
            if procs[r].exitcode != 0:
                failed.append(r)
        if failed:
            _raise_failure(failed, labels, [p.exitcode for p in procs], outdir)


def _raise_failure(failed: list[int], labels: list[str], exitcodes: list, outdir: Path) -> None:
    """Raise for the root cause among workers seen failing together: a worker
    that lost a peer failed because of another one, so it is named last;
    otherwise the earliest failure wins."""
    reports = {r: json.loads(p.read_text()) for r in failed if (p := outdir / f"{r}.error").exists()}
    rank = min(failed, key=lambda r: (reports[r]["secondary"], reports[r]["time"]) if r in reports
               else (False, 0.0))  # no report: killed by a signal, a cause
    label, exitcode = labels[rank], exitcodes[rank]
    if rank in reports:
        report = reports[rank]
        if report["config_error"]:
            raise ConfigError(report["message"])
        if report["training_error"]:
            raise TrainingError(report["message"], exit_code=report["exit_code"])
        reason = f"{report['type']}: {report['message']}".splitlines()[0]
        raise WorkerFailed(rank, label, reason, report["traceback"])
    if exitcode < 0:
        reason = f"killed by {signal.Signals(-exitcode).name}"
    else:
        reason = f"exited with code {exitcode}"
    raise WorkerFailed(rank, label, reason)


def _stop(procs: list, grace: float = 3.0) -> None:
    """Terminate the workers still alive: SIGTERM, then SIGKILL after ``grace`` s."""
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.terminate()
    deadline = time.monotonic() + grace
    for p in alive:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()
