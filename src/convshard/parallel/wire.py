"""The one door every collective of convshard goes through (``issue``).

Whatever moves between ranks, a tensor through gloo or NCCL, bytes through
shared memory (``convshard.parallel.shm``), a pickled object or a barrier,
is issued here, and so, in one place:

- **checked** (strict devices): with ``CONVSHARD_STRICT_DEVICES=1`` in a
  process's environment (read once), every tensor handed to a collective
  must live on the rank's device, the one its worker pinned itself to
  (``set_rank_device``), and an object collective or a barrier may only
  run once that device is known. NCCL refuses a CPU tensor on a CUDA rank,
  and pickles objects onto the current CUDA device, so these are the
  mistakes that would fail, or hang, on GPUs; the check raises
  ``WrongDevice`` before any byte moves, on gloo as on NCCL, so a CPU-only
  test run finds them.
- **recorded**: inside ``record_wire()`` each collective appends what it
  sent, (op, dtype, numel), so a test can tell which dtype crossed the wire.
- **timed**: ``seconds_in_collectives`` adds up the wall time spent in
  them. A CUDA collective is timed to its completion, not to its enqueue:
  the stream is drained before the clock starts (the compute queued ahead
  of it is not communication) and again before it stops. A collective
  started and waited on later (``comm.Pending``) counts its start and its
  wait, not the compute between them.
- **logged**: ``transfers_since`` lists the collectives issued since a
  moment, each with when it started, when its result was there and how
  long this rank was blocked in it (the rest of its span overlapped compute).

It also holds the job's switches, the environment variables that decide
whether a collective happens: rank 0's values, sent to every rank when it
joins (``run.launch.init_from_env``), so ranks started with different
environments still issue the same collectives.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import NamedTuple, TypeVar

import torch
import torch.distributed as dist

Group = dist.ProcessGroup | None
T = TypeVar("T")

STRICT_ENV = "CONVSHARD_STRICT_DEVICES"
SWITCHES = ("CONVSHARD_SHM", "CONVSHARD_CHECK_BATCH")
"""Environment variables that decide whether a collective happens; each is on unless set to "0"."""


class WrongDevice(RuntimeError):
    """A tensor handed to a collective lies on another device than the rank's (strict devices)."""


class Sent(NamedTuple):
    """One collective as ``record_wire`` saw it: the op (``all_gather``,
    ``reduce_scatter``, ``all_to_all``, ``all_reduce``, ``broadcast``, or an
    object collective or barrier, whose dtype is None and numel 0), the dtype
    of the tensor this rank handed it, and that tensor's element count."""

    op: str
    dtype: torch.dtype | None
    numel: int


_state: dict = {"strict": None, "device": None, "switches": None, "seconds": 0.0, "depth": 0}
_records: list[list[Sent]] = []
_transfers: deque[list] = deque(maxlen=4096)  # [op, start, blocked seconds, end] per collective, perf_counter


def world_size(group: Group = None) -> int:
    """Ranks in ``group``; 1 when torch.distributed is not initialised."""
    return dist.get_world_size(group) if dist.is_initialized() else 1


def rank(group: Group = None) -> int:
    """This process's rank in ``group``; 0 when torch.distributed is not initialised."""
    return dist.get_rank(group) if dist.is_initialized() else 0


# --- the rank's device and strict mode -------------------------------------


def set_rank_device(device: torch.device) -> None:
    """Make ``device`` the rank's device: where every tensor it hands a collective lives."""
    _state["device"] = torch.device(device)


def rank_device() -> torch.device:
    """The rank's device (``set_rank_device``); CPU until one is set."""
    return _state["device"] or torch.device("cpu")


def strict() -> bool:
    """Whether strict devices are on in this process (``CONVSHARD_STRICT_DEVICES=1``, read once)."""
    if _state["strict"] is None:
        _state["strict"] = os.environ.get(STRICT_ENV, "0") == "1"
    return _state["strict"]


def _check(op: str, tensors: Sequence[torch.Tensor], group: Group) -> None:
    """Strict devices: raise ``WrongDevice`` unless the rank's device is known
    and every tensor lies on it (the same type; the same index where both name one)."""
    want = _state["device"]
    if want is None:
        raise WrongDevice(f"{op}: a collective before this rank set its device ({STRICT_ENV}=1); NCCL would "
                          "run it on whatever CUDA device is current")
    for t in tensors:
        got = t.device
        if got.type != want.type or (want.index is not None and got.index is not None and got.index != want.index):
            backend = dist.get_backend(group) if dist.is_initialized() else "no"
            raise WrongDevice(f"{op}: a tensor on {got} sent by a rank whose device is {want} ({STRICT_ENV}=1, "
                              f"{backend} backend); NCCL refuses a tensor off the rank's device")


# --- recording and timing -------------------------------------------------


@contextmanager
def record_wire() -> Iterator[list[Sent]]:
    """Record every collective this process issues inside the block.

    Yields a list that fills, in issue order, with one ``Sent`` (op, dtype,
    numel) per collective: the dtype and element count of the tensor this
    rank handed it (before padding to equal sizes), whichever path carried
    it (gloo, NCCL, shared memory). Blocks may nest; each sees everything
    issued while it is open.
    """
    mine: list[Sent] = []
    _records.append(mine)
    try:
        yield mine
    finally:
        _records.remove(mine)


def seconds_in_collectives() -> float:
    """Wall seconds this process has spent inside its collectives, waiting
    for slower peers included. A step's time minus this is the time its rank
    was busy computing, which is what rebalancing compares."""
    return _state["seconds"]


def count_collective_seconds(seconds: float) -> None:
    """Add ``seconds`` this process waited on a collective run outside
    ``issue`` (DDP's reducer: ``run.engines``) to ``seconds_in_collectives``."""
    _state["seconds"] += seconds


def _drain(tensors: Sequence[torch.Tensor]) -> None:
    for device in {t.device for t in tensors if t.is_cuda}:
        torch.cuda.current_stream(device).synchronize()


@contextmanager
def clocked(tensors: Sequence[torch.Tensor] = ()) -> Iterator[None]:
    """Count the block's wall time in ``seconds_in_collectives``; for CUDA
    ``tensors``, from a drained stream to the collective's completion."""
    _drain(tensors)
    t0 = time.perf_counter()
    try:
        yield
    finally:
        _drain(tensors)
        _state["seconds"] += time.perf_counter() - t0


def issue(op: str, group: Group, tensors: Sequence[torch.Tensor], send: Callable[[], T], *,
          timed: bool = True) -> T:
    """Run one collective, ``send()``, over ``group``: checked (strict
    devices), recorded (``record_wire``) and, unless ``timed`` is False (its
    caller times it: DDP's buckets, ``run.engines``), timed, as the module
    docstring says. ``tensors`` are the ones this rank hands it, on its own
    device (empty for an object collective or a barrier). A collective
    issued inside another (shared memory's barrier) is checked only."""
    if strict():
        _check(op, tensors, group)
    if _state["depth"]:
        return send()
    for record in _records:
        record.extend(Sent(op, t.dtype, t.numel()) for t in tensors)
        if not tensors:
            record.append(Sent(op, None, 0))
    _state["depth"] += 1
    entry = [op, time.perf_counter(), 0.0, 0.0]
    _transfers.append(entry)
    try:
        with clocked(tensors) if timed else nullcontext():
            return send()
    finally:
        _state["depth"] -= 1
        entry[3] = time.perf_counter()
        entry[2] = entry[3] - entry[1]


def last_transfer() -> list:
    """The log entry of the collective issued last (``waited`` completes a started one's)."""
    return _transfers[-1]


def waited(entry: list, seconds: float) -> None:
    """A started collective's result arrived after this rank waited ``seconds`` for it, now."""
    entry[2] += seconds
    entry[3] = time.perf_counter()


def transfers_since(t0: float) -> list[tuple[str, float, float, float]]:
    """The collectives issued since ``time.perf_counter()`` was ``t0``, in
    issue order: (op, start, end, blocked), seconds after ``t0``: from its
    start to its result (a started one's: to the end of its wait), and how
    long this rank was blocked in it (its start and its wait)."""
    since = []
    for op, start, blocked, end in reversed(_transfers):  # in issue order: the newest last; stop at the older
        if start < t0:
            break
        since.append((op, start - t0, end - t0, blocked))
    return since[::-1]


# --- collectives of objects and scalars -------------------------------------


def gather_objects(obj: object, *, group: Group = None) -> list:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` without a job."""
    if world_size(group) == 1:
        return [obj]
    everyone: list = [None] * world_size(group)
    issue("all_gather_object", group, (), lambda: dist.all_gather_object(everyone, obj, group=group))
    return everyone


def broadcast_object(obj: object, *, group: Group = None, src: int = 0) -> object:
    """Group rank ``src``'s ``obj`` (picklable), on every rank; what others pass is ignored."""
    if world_size(group) == 1:
        return obj
    box = [obj]
    issue("broadcast_object", group, (), lambda: dist.broadcast_object_list(box, group=group, group_src=src))
    return box[0]


def barrier(group: Group = None) -> None:
    """Wait until every rank of ``group`` has reached this point."""
    if world_size(group) > 1:
        issue("barrier", group, (), lambda: dist.barrier(group=group))


def reduce_scalar(value: float, *, op: str, group: Group = None) -> float:
    """``value`` reduced over the ranks of ``group`` (``op``: "min", "max" or
    "sum"), the same on every rank; one float64 all-reduce on the rank's device."""
    if world_size(group) == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=rank_device())
    reduce_op = {"min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX, "sum": dist.ReduceOp.SUM}[op]
    issue("all_reduce", group, (t,), lambda: dist.all_reduce(t, op=reduce_op, group=group))
    return t.item()


# --- the job's switches ---------------------------------------------------


def local_switches() -> dict[str, bool]:
    """This process's own values of ``SWITCHES``, from its environment."""
    return {name: os.environ.get(name, "1") != "0" for name in SWITCHES}


def set_switches(values: dict[str, bool]) -> None:
    """Make ``values`` (rank 0's ``local_switches``) the job's switches in this process."""
    _state["switches"] = {name: bool(values[name]) for name in SWITCHES}


def switch(name: str) -> bool:
    """The job's value of switch ``name``: rank 0's once the rank joined
    (``set_switches``), this process's own environment before."""
    agreed = _state["switches"]
    return (agreed if agreed is not None else local_switches())[name]
