"""One rank of a torchrun job training alone while the others stand by.

A plan can prefer one device over all of them together: across a slow link
every split moves more data than it saves time (docs/heterogeneous.md). A
local job then starts one process; a torchrun job's processes are fixed, so
the plan's device (``best_single``) trains in a process group of its own and
every other rank stands by until it is done, at no cost to its step.

They meet through the job's rendezvous store (MASTER_ADDR:MASTER_PORT, which
torchrun and ``launch_local`` set), under keys of their own:

- the lone rank adds to ``beats`` every BEAT_SECONDS from a thread, and sets
  ``done`` when it has finished, or ``failed`` with its error's one line;
- a standing-by rank polls those keys every BEAT_SECONDS. ``done`` ends its
  wait; ``failed``, or beats silent for SILENCE_SECONDS (the lone process was
  killed), fail it with a ``TrainingError`` naming the lone rank.

Both then leave through ``launch.shutdown``, whose barrier they reach within
a poll of each other.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch.distributed as dist

from ..errors import TrainingError
from . import launch

BEAT_SECONDS = 1.0
SILENCE_SECONDS = 15.0


def _store(timeout: float) -> dist.Store:
    """A client of the job's rendezvous store, under this attempt's own keys."""
    client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                           timeout=timedelta(seconds=timeout))
    return dist.PrefixStore(f"convshard/alone/{launch.restart_count()}", client)


def group_of(rank: int) -> dist.ProcessGroup | None:
    """The process group of ``rank`` alone (a collective: every rank calls
    it); None on the other ranks."""
    group = dist.new_group([rank])
    return None if group == dist.GroupMember.NON_GROUP_MEMBER else group


@contextmanager
def training_alone(timeout: float) -> Iterator[None]:
    """Around the lone rank's training: beats while it runs, then ``done``,
    or ``failed`` with the error that ends it."""
    store, stop = _store(timeout), threading.Event()

    def beat() -> None:
        beats = _store(timeout)  # a client per thread
        while not stop.wait(BEAT_SECONDS):
            beats.add("beats", 1)

    thread = threading.Thread(target=beat, name="convshard-alone-beat", daemon=True)
    thread.start()
    try:
        yield
    except BaseException as exc:
        store.set("failed", f"{type(exc).__name__}: {exc}".splitlines()[0])
        raise
    finally:
        stop.set()
        thread.join()
    store.set("done", "1")


def stand_by(rank: int, label: str, timeout: float) -> None:
    """Wait, as a rank the plan leaves idle, until rank ``rank`` (on device
    ``label``) has trained alone; a ``TrainingError`` if it failed or fell silent."""
    store = _store(timeout)
    beats, heard = -1, time.monotonic()
    while not store.check(["done"]):
        if store.check(["failed"]):
            raise TrainingError(f"rank {rank} ({label}), which trained alone, failed: "
                                f"{store.get('failed').decode()}")
        now = store.add("beats", 0)
        if now != beats:
            beats, heard = now, time.monotonic()
        elif time.monotonic() - heard > SILENCE_SECONDS:
            raise TrainingError(f"rank {rank} ({label}), which trained alone, fell silent for "
                                f"{SILENCE_SECONDS:.0f} s: its process is gone")
        time.sleep(BEAT_SECONDS)
