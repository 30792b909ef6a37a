"""What every rank of a job must decide alike, whatever its own host says.

- the backend: each host knows only its own ``--devices``, so the ranks
  agree on it through the rendezvous store when they join: NCCL only when
  every rank's device is CUDA, else one gloo group for all;
- the switches that decide whether a collective happens
  (``CONVSHARD_SHM``, ``CONVSHARD_CHECK_BATCH``): rank 0's values, on every
  rank, so that ranks started with different environments enter the same
  collectives;
- what rank 0 reads for everyone (``join.read_on_rank0``): an error there,
  of any type, is raised on every rank at once, not left for the others to
  find at the collective timeout.

Jobs run on gloo with a short collective timeout, so a rank left waiting
fails the test instead of hanging it.
"""

from __future__ import annotations

import os

import torch.distributed as dist
from helpers import join_gloo

from convshard.errors import TrainingError
from convshard.parallel import shm, wire
from convshard.run import join, launch
from convshard.run.launch import launch_local


def _agreed_backend(wants: list[str]) -> str:
    """Rank r asks for ``wants[r]`` (what its device needs); the backend the job agrees on."""
    return launch._agree(launch._job_store(30), wants[int(os.environ["RANK"])])


def test_one_cpu_rank_puts_the_whole_job_on_gloo():
    """A CUDA host and a CPU host in one job: one backend for both, gloo;
    NCCL only when every rank asks for it (decided, not started: no GPU here)."""
    assert launch_local(_agreed_backend, 2, args=(["nccl", "gloo"],), timeout=60) == ["gloo", "gloo"]
    assert launch_local(_agreed_backend, 3, args=(["gloo", "nccl", "nccl"],), timeout=60) == ["gloo"] * 3
    assert launch_local(_agreed_backend, 2, args=(["nccl", "nccl"],), timeout=60) == ["nccl", "nccl"]


def _switches_with_own_environment(values: list[dict[str, str]]) -> tuple[dict[str, bool], bool]:
    """Rank r starts with ``values[r]`` in its environment; the switches it
    then holds, and whether its group passes through shared memory (a
    collective only a rank with shared memory on would enter)."""
    os.environ.update(values[int(os.environ["RANK"])])
    join_gloo(timeout=20)
    return {name: wire.switch(name) for name in wire.SWITCHES}, shm.slots_for(None) is not None


def test_every_rank_takes_rank_0s_switches():
    """Rank 0 turns shared memory off and leaves the batch check on; rank 1
    says the opposite. Both follow rank 0 (had rank 1 followed its own, it
    would wait alone in shared memory's exchange until the timeout)."""
    values = [{"CONVSHARD_SHM": "0", "CONVSHARD_CHECK_BATCH": "1"},
              {"CONVSHARD_SHM": "1", "CONVSHARD_CHECK_BATCH": "0"}]
    expected = {"CONVSHARD_SHM": False, "CONVSHARD_CHECK_BATCH": True}
    assert launch_local(_switches_with_own_environment, 2, args=(values,), timeout=90) == [(expected, False)] * 2
    flipped = [values[1], values[0]]
    assert launch_local(_switches_with_own_environment, 2, args=(flipped,), timeout=90) == \
        [({"CONVSHARD_SHM": True, "CONVSHARD_CHECK_BATCH": False}, True)] * 2


class _Unpicklable(RuntimeError):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.hook = lambda: None  # a lambda does not pickle


def _read_failing_on_rank_0(kind: str) -> tuple[str, str]:
    """Every rank asks rank 0's reader, which raises ``kind``; (type, message) of what each rank raised."""
    errors = {"oserror": OSError(5, "disk gone"), "runtime": RuntimeError("cache corrupt"),
              "unpicklable": _Unpicklable("held a lambda")}

    def read() -> None:
        raise errors[kind]

    join_gloo(timeout=20)
    try:
        join.read_on_rank0(read, group=dist.group.WORLD)
    except Exception as exc:  # noqa: BLE001 - which one is what the test checks
        return type(exc).__name__, str(exc)
    return "nothing", ""


def test_an_error_while_rank_0_reads_for_everyone_reaches_every_rank():
    """The reader fails on rank 0 with an OSError, a RuntimeError, an
    exception that cannot be pickled: every rank raises it (the last as a
    TrainingError naming it), none waits for the 20 s collective timeout."""
    ranks = 2
    got = launch_local(_read_failing_on_rank_0, ranks, args=("oserror",), timeout=90)
    assert got == [("OSError", "[Errno 5] disk gone")] * ranks
    got = launch_local(_read_failing_on_rank_0, ranks, args=("runtime",), timeout=90)
    assert got == [("RuntimeError", "cache corrupt")] * ranks
    got = launch_local(_read_failing_on_rank_0, ranks, args=("unpicklable",), timeout=90)
    assert got[0] == ("_Unpicklable", "held a lambda")
    assert got[1:] == [(TrainingError.__name__, "rank 0 failed reading for the job: _Unpicklable: held a lambda")] \
        * (ranks - 1)
