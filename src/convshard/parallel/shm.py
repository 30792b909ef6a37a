"""Collectives through shared memory, for a group whose ranks share one host.

gloo moves a collective's bytes over TCP even between processes on one host
(about 0.5 GB/s over loopback on a small VM), and a kernel split sends a
conv's activations at every layer. When every rank of a group runs on the
same host (the same boot and the same network namespace), the bytes go
through a shared-memory file instead:

- every rank owns a slot; a collective writes this rank's part into its
  slot, meets the others at a gloo barrier, and reads what it needs from the
  others' slots: all-gather, reduce-scatter, all-to-all, all-reduce (sum),
  broadcast;
- two sets of slots alternate, so a rank overwrites a set only after every
  rank has passed the next barrier, that is, finished reading the set;
- ranks meet at a barrier in shared memory: each rank stores its turn in
  its own cache line and waits, spinning and then yielding its core
  (yielding at once when another rank shares the core), until every rank
  has stored it. A gloo barrier costs about 0.3 ms over
  loopback (``scripts/latencies.py``), and a step meets twice per
  kernel-split conv and twice per batch-mode BatchNorm. The wait is
  bounded by ``--timeout`` and ends early, with the rank named, when a
  peer's process is gone. Where stores may be seen out of order (not
  x86-64) or the flags cannot be made, the ranks meet at gloo's barrier.
  Slots grow (a collective decision: every rank knows
  every size) up to ``MAX_SLOT_BYTES``, and only as far as /dev/shm has
  room: rank 0 reserves the file's pages up front (a small /dev/shm, as in
  a container, then refuses the growth instead of failing a later write),
  and a collective that does not fit takes gloo's own path, as do CUDA
  tensors and every collective under ``CONVSHARD_SHM=0`` (rank 0's value,
  ``wire.switch``).

The file lives in /dev/shm only until every rank has mapped it.
"""

from __future__ import annotations

import os
import platform
import time
import uuid
from pathlib import Path

import torch
import torch.distributed as dist

from . import wire

MAX_SLOT_BYTES = 1 << 30
_ALIGN = 64
_SHM_DIR = Path("/dev/shm")
_slots: dict[object, SharedSlots | None] = {}
_FLAG_STRIDE = 8  # int64s per rank's flag: one cache line each
_SPINS = 2000  # polls before a waiting rank yields its core (none when another rank shares the core)
timeout_seconds = 300.0  # how long a rank waits at a barrier; the job's --timeout (``launch.init_from_env``)


class PeerGone(RuntimeError):
    """A rank of the group exited while this one waited for it."""


def _host_identity() -> str:
    """This process's host as shared memory sees it: the boot and the network
    namespace (namespaces on one machine stand for separate hosts)."""
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return f"{boot}/{os.stat('/proc/self/ns/net').st_ino}"


def slots_for(group: dist.ProcessGroup | None) -> SharedSlots | None:
    """The shared slots of ``group``, or None when its ranks do not share a
    host. A collective on first use per group: every rank must call it."""
    key = group if group is not None else dist.group.WORLD
    if key not in _slots:
        _slots[key] = _open(key)
    return _slots[key]


def _open(group: dist.ProcessGroup) -> SharedSlots | None:
    if not wire.switch("CONVSHARD_SHM"):  # rank 0's value on every rank: all skip the exchange alike
        return None
    try:
        identity = _host_identity() if _SHM_DIR.is_dir() else None
    except OSError:
        identity = None
    everyone = wire.gather_objects((identity, os.getpid(), sorted(os.sched_getaffinity(0))), group=group)
    if identity is None or any(other != identity for other, _, _ in everyone):
        return None
    mine = set(everyone[dist.get_rank(group)][2])
    shared_core = sum(bool(mine & set(cores)) for _, _, cores in everyone) > 1  # counting this rank
    return SharedSlots(group, [pid for _, pid, _ in everyone], spins=0 if shared_core else _SPINS)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _reserve_file(nbytes: int) -> str | None:
    """A new file of ``nbytes`` in /dev/shm with its pages reserved, or None
    when there is no room (a write past the room would kill the process)."""
    path = _SHM_DIR / f"convshard-{uuid.uuid4().hex}"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:
        return None
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError:
        os.close(fd)
        path.unlink(missing_ok=True)
        return None
    os.close(fd)
    return str(path)


class SharedSlots:
    """Two sets of one slot per rank in a shared file; see the module docstring."""

    def __init__(self, group: dist.ProcessGroup, pids: list[int], spins: int = _SPINS) -> None:
        self.group, self.world, self.rank = group, dist.get_world_size(group), dist.get_rank(group)
        self.capacity, self.buffer, self.turn = 0, torch.empty(0, dtype=torch.uint8), 0
        self.limit = MAX_SLOT_BYTES  # lowered when /dev/shm had no room for a larger slot
        self.pids, self.spins = pids, spins
        self.flags = self._flags() if platform.machine() in ("x86_64", "AMD64") else None

    def _flags(self):
        """Every rank's barrier turn, one cache line each, as a shared numpy
        array (None without room in /dev/shm; a collective)."""
        name = wire.broadcast_object(_reserve_file(self.world * _FLAG_STRIDE * 8) if self.rank == 0 else None,
                                     group=self.group)
        if name is None:
            return None
        flags = torch.from_file(name, shared=True, size=self.world * _FLAG_STRIDE, dtype=torch.int64)
        wire.barrier(self.group)
        if self.rank == 0:
            os.unlink(name)
        # a peer whose process this one cannot see (another PID namespace) is never reported gone
        self.pids = [pid if _alive(pid) else None for pid in self.pids]
        return flags.numpy()

    def _meet(self, turn: int) -> None:
        """Wait until every rank has reached ``turn`` (see the module docstring)."""
        if self.flags is None:
            wire.barrier(self.group)
            return
        flags, mine = self.flags, turn + 1
        flags[self.rank * _FLAG_STRIDE] = mine
        polls, deadline, check = 0, None, 0.0
        while True:
            behind = [r for r in range(self.world) if flags[r * _FLAG_STRIDE] < mine]
            if not behind:
                return
            polls += 1
            if polls < self.spins:
                continue
            os.sched_yield()
            now = time.monotonic()
            if deadline is None:
                deadline, check = now + timeout_seconds, now + 0.2
            elif now > check:
                check = now + 0.2
                gone = [r for r in behind if self.pids[r] is not None and not _alive(self.pids[r])]
                if gone:
                    raise PeerGone(f"rank {gone[0]} (pid {self.pids[gone[0]]}) exited during a collective")
                if now > deadline:
                    raise TimeoutError(f"ranks {behind} did not reach a collective within {timeout_seconds:g} s")

    def fits(self, nbytes: int) -> bool:
        """Whether a collective of ``nbytes`` per rank goes through the slots,
        growing them if needed (a collective: every rank asks with the same size)."""
        if nbytes > self.limit:
            return False
        self._reserve(nbytes)
        return nbytes <= self.capacity

    def _reserve(self, nbytes: int) -> None:
        """Grow every slot to at least ``nbytes``, or lower ``limit`` below it
        when /dev/shm has no room (every rank asks for the same size)."""
        if nbytes <= self.capacity:
            return
        capacity = max(-(-nbytes // _ALIGN) * _ALIGN, 2 * self.capacity, 1 << 20)
        total = 2 * self.world * capacity
        name = wire.broadcast_object(_reserve_file(total) if self.rank == 0 else None, group=self.group)
        if name is None:
            self.limit = min(self.limit, nbytes - 1)
            return
        self.buffer = torch.from_file(name, shared=True, size=total, dtype=torch.uint8)
        wire.barrier(self.group)
        if self.rank == 0:
            os.unlink(name)  # every rank has it mapped
        self.capacity = capacity

    def _slot(self, turn: int, rank: int, like: torch.Tensor, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        shape = tuple(like.shape) if shape is None else shape
        start = ((turn % 2) * self.world + rank) * self.capacity
        count = like.element_size() * int(torch.Size(shape).numel())
        return self.buffer[start : start + count].view(like.dtype).view(shape)

    def _next_turn(self) -> int:
        """The turn of the collective starting now; its slots are set turn % 2."""
        self.turn += 1
        return self.turn - 1

    def _exchange(self, mine: torch.Tensor) -> int:
        """Write ``mine`` into this rank's slot and meet the others; returns the turn to read."""
        turn = self._next_turn()
        self._slot(turn, self.rank, mine).copy_(mine)
        self._meet(turn)
        return turn

    def all_gather_uneven(self, tensor: torch.Tensor, counts: list[int], dim: int) -> torch.Tensor:
        """Slices of ``counts[r]`` along ``dim`` from every rank, concatenated in
        rank order: each rank writes its slice once, each reads all of them once."""
        shape = list(tensor.shape)
        shape[dim] = max(counts)
        turn = self._next_turn()
        self._slot(turn, self.rank, tensor, tuple(shape)).narrow(dim, 0, tensor.size(dim)).copy_(tensor)
        self._meet(turn)
        return torch.cat([self._slot(turn, r, tensor, tuple(shape)).narrow(dim, 0, c) for r, c in enumerate(counts)],
                         dim=dim)

    def reduce_scatter_uneven(self, tensor: torch.Tensor, counts: list[int], dim: int) -> torch.Tensor:
        """Every rank's ``tensor`` (size ``sum(counts)`` along ``dim``) summed; this
        rank receives its slice [o_r, o_r + counts[r]) of the sum."""
        turn = self._exchange(tensor.contiguous())
        start, count = sum(counts[: self.rank]), counts[self.rank]
        out = self._slot(turn, 0, tensor).narrow(dim, start, count).to(_accumulator(tensor), copy=True)
        for s in range(1, self.world):
            out += self._slot(turn, s, tensor).narrow(dim, start, count)
        return out.to(tensor.dtype)

    def all_to_all(self, send: torch.Tensor, sizes: list[list[int]]) -> list[torch.Tensor]:
        """Rank s's ``send`` holds its pieces for ranks 0..p-1 (``sizes[s][t]``
        elements each); this rank receives its piece from every rank."""
        turn = self._exchange(send)
        offsets = [sum(row[: self.rank]) for row in sizes]
        return [self._slot(turn, s, send, (sum(row),)).narrow(0, offsets[s], row[self.rank]).clone()
                for s, row in enumerate(sizes)]

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the ranks, in place (every rank adds in rank order: equal results)."""
        turn = self._exchange(tensor)
        total = self._slot(turn, 0, tensor).to(_accumulator(tensor), copy=True)
        for s in range(1, self.world):
            total += self._slot(turn, s, tensor)
        return tensor.copy_(total)

    def broadcast_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Group rank 0's ``tensor`` on every rank, in place."""
        turn = self._next_turn()
        if self.rank == 0:
            self._slot(turn, 0, tensor).copy_(tensor)
        self._meet(turn)
        if self.rank != 0:
            tensor.copy_(self._slot(turn, 0, tensor))
        return tensor


def _accumulator(tensor: torch.Tensor) -> torch.dtype:
    """The dtype a sum of ``tensor``s runs in: float32 for bf16 and fp16, so
    that a sum over many ranks rounds once; the tensor's own otherwise."""
    return torch.float32 if tensor.dtype in (torch.bfloat16, torch.float16) else tensor.dtype
