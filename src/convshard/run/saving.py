"""When a run saves, and how the bytes reach the disk while it trains on.

A run with ``--checkpoint-dir`` saves (``checkpoint.save_checkpoint``):

- at each epoch's end and at each ``--eval-every`` evaluation;
- every N optimizer steps (``--checkpoint-every N``);
- when T seconds of rank 0's clock have passed since its last save
  (``--checkpoint-every-seconds T``);
- when any rank is asked to stop: a SIGTERM (a scheduler's pre-emption,
  torchrun shrinking or growing the job) ends the step in progress, every
  rank saves, and the run raises ``Stopped`` (exit code 143, a SIGTERM's,
  which torchrun counts as a failure and restarts from).

Gathering the unsharded state is a collective, so every rank must save at
the same step: after each step the ranks agree on a verdict, train on, save
or save and stop, from one sum all-reduce of two flags (a SIGTERM arrived
here, rank 0's seconds are up), through shared memory where the ranks share
a host. Runs without a checkpoint directory skip it, and a SIGTERM ends them
as it ends any process.

At most the work since the last save is lost to a crash: N steps, or T
seconds plus one step. A SIGTERM loses none.

``Writer``: the state a save gathered is CPU copies; rank 0 hands it to a
thread that writes it (``torch.save``, fsync, atomic rename) while training
goes on. The next save, and the end of the run, wait for that write first;
a write that failed raises there.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING

import torch

from ..errors import TrainingError
from ..parallel import comm
from . import checkpoint, join, launch

if TYPE_CHECKING:
    from .config import RunSettings

log = logging.getLogger(__name__)

GO_ON, SAVE, STOP = 0, 1, 2  # the verdict after a step
STOPPED_EXIT_CODE = 128 + signal.SIGTERM  # the exit code of a process a SIGTERM ended


class Stopped(TrainingError):
    """The run was asked to stop (SIGTERM) and saved its progress first."""

    def __init__(self, message: str, *, exit_code: int = STOPPED_EXIT_CODE) -> None:
        super().__init__(message, exit_code=exit_code)


def stopped(step: int, directory: str) -> Stopped:
    """The error a run stopped by SIGTERM at ``step`` ends with, once its checkpoint is in ``directory``."""
    return Stopped(f"stopped by SIGTERM at step {step}, its checkpoint saved in {directory}: a torchrun restart, "
                   f"or the same command with --resume, goes on from there")


def resume_point(settings: RunSettings, group: comm.Group) -> dict | None:
    """The checkpoint the job resumes from, the same on every rank (a
    collective): the newest any host holds (``join.read_newest``); None to
    start from scratch."""
    if settings.checkpoint_dir is None:
        return None
    saved = join.read_newest(lambda: _on_this_host(settings), group=group)
    if saved is None and _asked(settings):
        log.warning("no checkpoint in %s on any host: starting from scratch", settings.checkpoint_dir)
    return saved


def _asked(settings: RunSettings) -> bool:
    """Whether the run must resume: ``--resume``, or torchrun restarted a failed job."""
    return settings.resume or launch.restart_count() > 0


def _on_this_host(settings: RunSettings) -> dict | None:
    """The checkpoint in ``settings.checkpoint_dir`` on this host to resume
    from: when ``_asked``, or, under torchrun, one of the same rendezvous id
    (``--rdzv-id``), which torchrun re-formed for other members (that
    restart counts as none). None: none to resume from here."""
    asked = _asked(settings)
    if not (asked or launch.run_id()):
        return None
    saved = checkpoint.load_checkpoint(settings.checkpoint_dir)
    return saved if asked or (saved is not None and saved.get("run_id") == launch.run_id()) else None


class StopSignal:
    """Inside the block, a SIGTERM asks the run to stop after its step
    (``requested``) instead of ending the process; a second SIGTERM ends it
    as the default action would. Only the main thread may install a handler:
    elsewhere, or unarmed, the block changes nothing."""

    def __init__(self, armed: bool = True) -> None:
        self.armed = armed  # False: the block changes nothing (a run without checkpoints has nothing to save)
        self.requested = False
        self._previous: Callable | int | None = None

    def __enter__(self) -> StopSignal:
        if self.armed and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:  # asked twice: stop now
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.raise_signal(signal.SIGTERM)
        self.requested = True


class Schedule:
    """The verdict after each step, the same on every rank (a collective
    when the run saves and has more than one rank)."""

    def __init__(self, settings: RunSettings, stop: StopSignal | None, *, rank: int, group: comm.Group) -> None:
        self.active = settings.checkpoint_dir is not None
        self.every_steps, self.every_seconds = settings.checkpoint_every, settings.checkpoint_every_seconds
        self.stop, self.rank, self.group = stop, rank, group
        self.stopping = False  # agreed: the run stops after its save
        self.last_save = time.monotonic()

    def after_step(self, step: int) -> int:
        """GO_ON, SAVE or STOP after optimizer step ``step`` (1-based), agreed by every rank."""
        if not self.active:
            return GO_ON
        asked = self.stop is not None and self.stop.requested
        # rank 0's clock alone decides, so that every rank's verdict is the same
        due = bool(self.every_seconds) and self.rank == 0 and time.monotonic() - self.last_save >= self.every_seconds
        flags = torch.tensor([float(asked), float(due)], dtype=torch.float64, device=comm.rank_device())
        asked, due = (total > 0 for total in comm.all_reduce_sum_(flags, group=self.group).tolist())
        verdict = STOP if asked else SAVE if due or (self.every_steps and step % self.every_steps == 0) else GO_ON
        if verdict == STOP:
            self.stopping = True
            if self.rank == 0:
                log.warning("asked to stop (SIGTERM) at step %d: saving a checkpoint first", step)
        return verdict

    def saved(self) -> None:
        """A save happened: the seconds count from now."""
        self.last_save = time.monotonic()


class Writer:
    """Writes one checkpoint at a time on a background thread."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, write: Callable[[], None]) -> None:
        """Run ``write()`` in the background, once the previous write is done."""
        self.wait()
        self._thread = threading.Thread(target=self._run, args=(write,), name="convshard-checkpoint", daemon=True)
        self._thread.start()

    def _run(self, write: Callable[[], None]) -> None:
        try:
            write()
        except BaseException as exc:  # noqa: BLE001 - raised again in the training thread (``wait``)
            self._error = exc

    def wait(self) -> None:
        """Return once the write in flight is on disk; raise what it raised."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
