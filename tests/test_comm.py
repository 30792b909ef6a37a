"""The collectives each ``comm`` helper issues, counted, and the values they deliver.

One job per world size 1-4 (``launch_local`` on gloo, one thread per
worker) runs every helper under ``CommDebugMode``, which sees the c10d
collectives that torch.distributed dispatches, and compares each result with
a reference computed on one rank from the same seed. Kernel counts per world
size are uneven and include a rank with none. The expectations: one
all-gather in a sharded layer's forward, one all-reduce in its backward (or
one reduce-scatter, in the gather's backward, when the gradient arrives as
partial sums), one broadcast per dtype, and nothing at all at world size 1.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import join_gloo
from torch.distributed.tensor.debug import CommDebugMode

from convshard.parallel import comm
from convshard.run.launch import launch_local

# Kernels per rank for each world size: uneven, and from world 2 on one set gives a rank none.
COUNTS = {1: [(5,)], 2: [(5, 0), (2, 3)], 3: [(0, 4, 1), (3, 3, 2)], 4: [(2, 0, 5, 1), (1, 1, 1, 4)]}
C_IN, BATCH, SIZE = 3, 2, 6  # the conv's input (BATCH, C_IN, SIZE, SIZE)


def _kind(op: object) -> str:
    """'all_gather', 'all_reduce', 'broadcast' for c10d and functional collectives alike."""
    name = str(op).split(".")[-1].replace("_", "")
    kinds = {"allgather": "all_gather", "allreduce": "all_reduce", "reducescatter": "reduce_scatter",
             "broadcast": "broadcast"}
    return next((kind for key, kind in kinds.items() if key in name), str(op))


class _Counted:
    """Collectives issued inside the block, by kind: ``with _Counted(log, "name"): ...``."""

    def __init__(self, log: dict[str, dict[str, int]], name: str) -> None:
        self.log, self.name, self.mode = log, name, CommDebugMode()

    def __enter__(self) -> None:
        self.mode.__enter__()

    def __exit__(self, *exc) -> None:
        self.mode.__exit__(*exc)
        counts = Counter()
        for op, n in self.mode.get_comm_counts().items():
            counts[_kind(op)] += n
        self.log[self.name] = dict(counts)


def _sharded_layer(log: dict, errors: dict, counts: tuple[int, ...], rank: int, group, *, input_grad: bool) -> None:
    """conv2d_on_shards then gather_from_shards, against the unsharded conv:
    the output, dX (the sum over ranks) and this rank's dW, db."""
    tag = f"{counts} input_grad={input_grad}"
    gen = torch.Generator().manual_seed(sum(counts))
    weight = torch.randn(sum(counts), C_IN, 3, 3, generator=gen, dtype=torch.float64)
    bias = torch.randn(sum(counts), generator=gen, dtype=torch.float64)
    x = torch.randn(BATCH, C_IN, SIZE, SIZE, generator=gen, dtype=torch.float64)
    grad_out = torch.randn(BATCH, sum(counts), SIZE - 2, SIZE - 2, generator=gen, dtype=torch.float64)

    x_ref, w_ref, b_ref = (t.clone().requires_grad_(True) for t in (x, weight, bias))
    y_ref = F.conv2d(x_ref, w_ref, b_ref)
    y_ref.backward(grad_out)

    start, mine = sum(counts[:rank]), counts[rank]
    w = weight[start : start + mine].clone().requires_grad_(True)
    b = bias[start : start + mine].clone().requires_grad_(True)
    x = x.clone().requires_grad_(input_grad)
    # conv2d refuses an empty kernel bank: a rank without kernels convolves one
    # zero kernel and drops its output, as ShardedConv2d does
    w_run = torch.cat([w, w.new_zeros(1, *w.shape[1:])]) if mine == 0 else w
    b_run = torch.cat([b, b.new_zeros(1)]) if mine == 0 else b
    with _Counted(log, f"conv2d_on_shards forward {tag}"):
        y_local = comm.conv2d_on_shards(x, w_run, b_run, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                                        group=group)
    with _Counted(log, f"gather_from_shards forward {tag}"):
        y = comm.gather_from_shards(y_local[:, :mine], counts, group=group)  # (B, C, H', W')
    with _Counted(log, f"sharded layer backward {tag}"):
        y.backward(grad_out)
    errors[f"output {tag}"] = (y - y_ref).abs().max().item()
    errors[f"dW {tag}"] = (w.grad - w_ref.grad[start : start + mine]).abs().max().item() if mine else 0.0
    errors[f"db {tag}"] = (b.grad - b_ref.grad[start : start + mine]).abs().max().item() if mine else 0.0
    if input_grad:
        errors[f"dX {tag}"] = (x.grad - x_ref.grad).abs().max().item()


def _partial_sums(log: dict, errors: dict, counts: tuple[int, ...], rank: int, world: int, group) -> None:
    """reduce_scatter_uneven, and a gather whose gradient arrives as per-rank
    partial sums (rank r contributes r + 1 everywhere): each rank's slice of
    the sum is world (world + 1) / 2."""
    total = world * (world + 1) / 2
    partial = torch.full((2, sum(counts), 3), rank + 1.0, dtype=torch.float64)
    with _Counted(log, f"reduce_scatter_uneven {counts}"):
        mine = comm.reduce_scatter_uneven(partial, counts, dim=1, group=group)
    errors[f"reduce_scatter_uneven {counts}"] = (mine - total).abs().max().item() if counts[rank] else 0.0
    errors[f"reduce_scatter_uneven shape {counts}"] = float(mine.shape != (2, counts[rank], 3))
    shard = torch.zeros(2, max(counts[rank], 1), 3, dtype=torch.float64, requires_grad=True)  # placeholder at c_r = 0
    with _Counted(log, f"gather_from_shards partial forward {counts}"):
        whole = comm.gather_from_shards(shard, counts, group=group, partial=True)
    with _Counted(log, f"gather_from_shards partial backward {counts}"):
        whole.backward(torch.full_like(whole, rank + 1.0))
    expected = torch.full_like(shard, total)
    expected[:, counts[rank]:] = 0.0  # the placeholder channel of a rank without kernels
    errors[f"partial gather dX {counts}"] = (shard.grad - expected).abs().max().item()


def _count_worker() -> tuple[dict, dict]:
    """Run every helper once per count set; returns (collectives per call, max errors)."""
    rank, world = join_gloo(timeout=60)
    group = dist.group.WORLD
    log: dict[str, dict[str, int]] = {}
    errors: dict[str, float] = {}
    for counts in COUNTS[world]:
        # rank r's slice holds r * 100 + its position, so the gathered tensor is known everywhere
        parts = [100 * r + torch.arange(2 * c * 3, dtype=torch.float32).view(2, c, 3) for r, c in enumerate(counts)]
        with _Counted(log, f"all_gather_uneven {counts}"):
            gathered = comm.all_gather_uneven(parts[rank], counts, dim=1, group=group)
        errors[f"all_gather_uneven {counts}"] = (gathered - torch.cat(parts, dim=1)).abs().max().item()
        for input_grad in (True, False):
            _sharded_layer(log, errors, counts, rank, group, input_grad=input_grad)
        _partial_sums(log, errors, counts, rank, world, group)

    value = torch.full((4,), float(rank + 1))
    with _Counted(log, "all_reduce_sum_"):
        comm.all_reduce_sum_(value, group=group)
    errors["all_reduce_sum_"] = (value - world * (world + 1) / 2).abs().max().item()
    value = torch.full((4,), float(rank + 1))
    with _Counted(log, "start_all_reduce_sum"):
        pending = comm.start_all_reduce_sum(value, group=group)
        summed = pending.wait()
    errors["start_all_reduce_sum"] = (summed - world * (world + 1) / 2).abs().max().item()

    floats = [torch.full((3,), float(rank)), torch.full((2, 2), float(rank))]
    ints = [torch.full((5,), rank, dtype=torch.int64)]
    with _Counted(log, "broadcast_ two dtypes"):
        comm.broadcast_([*floats, *ints], group=group)
    with _Counted(log, "broadcast_ one dtype"):
        comm.broadcast_(floats, group=group)
    with _Counted(log, "broadcast_ nothing"):
        comm.broadcast_([], group=group)
    errors["broadcast_"] = max(t.abs().max().item() for t in (*floats, *ints))  # rank 0's zeros everywhere
    return log, errors


def _expected(world: int) -> dict[str, dict[str, int]]:
    """Collectives per call: none at world size 1."""
    def n(**kinds: int) -> dict[str, int]:
        return kinds if world > 1 else {}

    out = {}
    for counts in COUNTS[world]:
        out[f"all_gather_uneven {counts}"] = n(all_gather=1)
        for input_grad in (True, False):
            tag = f"{counts} input_grad={input_grad}"
            out[f"conv2d_on_shards forward {tag}"] = {}
            out[f"gather_from_shards forward {tag}"] = n(all_gather=1)
            # the backward of the gather is a split; the conv sums dX, when X needs it
            out[f"sharded layer backward {tag}"] = n(all_reduce=1) if input_grad else {}
        out[f"reduce_scatter_uneven {counts}"] = n(reduce_scatter=1)
        out[f"gather_from_shards partial forward {counts}"] = n(all_gather=1)
        out[f"gather_from_shards partial backward {counts}"] = n(reduce_scatter=1)
    out |= {"all_reduce_sum_": n(all_reduce=1), "start_all_reduce_sum": n(all_reduce=1),
            "broadcast_ two dtypes": n(broadcast=2), "broadcast_ one dtype": n(broadcast=1),
            "broadcast_ nothing": {}}
    return out


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_collectives_per_helper(world: int) -> None:
    """gloo's own path (CONVSHARD_SHM=0): the collectives counted, the values checked."""
    reports = launch_local(_count_worker, world, timeout=120, env={"OMP_NUM_THREADS": "1", "CONVSHARD_SHM": "0"})
    expected = _expected(world)
    for rank, (log, errors) in enumerate(reports):
        assert log == expected, f"rank {rank}"
        worst = {name: e for name, e in errors.items() if e > 1e-10}
        assert not worst, f"rank {rank}: {worst}"


@pytest.mark.parametrize("world", [2, 4])
def test_shared_memory_path_delivers_the_same_values(world: int) -> None:
    """Ranks on one host move the bytes through shared memory: every helper
    delivers the same values, and no gloo all-gather, all-reduce or
    reduce-scatter carries tensor data (gloo only synchronises)."""
    for rank, (log, errors) in enumerate(launch_local(_count_worker, world, timeout=120,
                                                        env={"OMP_NUM_THREADS": "1"})):
        worst = {name: e for name, e in errors.items() if e > 1e-10}
        assert not worst, f"rank {rank}: {worst}"
        kinds = {kind for name, counts in log.items() for kind in counts if not name.startswith("all_gather_uneven")}
        assert not kinds & {"all_reduce", "reduce_scatter"}, (rank, log)


def _no_room_worker() -> dict:
    """/dev/shm without room for slots above 1 MiB (rank 0's reservation is
    refused): a larger collective takes gloo's own path, on every rank alike."""
    from convshard.parallel import shm

    rank, world = join_gloo(timeout=60)
    reserve = shm._reserve_file
    shm._reserve_file = lambda nbytes: reserve(nbytes) if nbytes <= 2 * world * (1 << 20) else None
    shm.slots_for(dist.group.WORLD)  # the ranks find they share a host (two all-gathers of objects)
    log: dict[str, dict[str, int]] = {}
    errors = {}
    for name, columns in (("small", 8), ("large", 1 << 17)):  # 64 B and 1 MiB per row: the large one cannot fit
        parts = [torch.full((2, 1 + r, columns), float(r)) for r in range(world)]
        with _Counted(log, name):
            whole = comm.all_gather_uneven(parts[rank], [1 + r for r in range(world)], dim=1, group=dist.group.WORLD)
        errors[name] = (whole - torch.cat(parts, dim=1)).abs().max().item()
    return {"log": log, "errors": errors, "limit": shm.slots_for(dist.group.WORLD).limit}


def test_shared_memory_without_room_falls_back_to_gloo():
    for report in launch_local(_no_room_worker, 2, timeout=120, env={"OMP_NUM_THREADS": "1"}):
        assert report["errors"] == {"small": 0.0, "large": 0.0}, report
        assert "all_gather" not in report["log"]["small"], report  # shared memory carried it
        assert report["log"]["large"].get("all_gather") == 1, report  # gloo carried it
        assert report["limit"] < 2 * 2 * (1 << 17) * 4, report


def _meet_worker() -> dict:
    """Rank 0 waits at the shared-memory barrier for a rank that never comes:
    once with the rank's process gone, once with it alive past the timeout."""
    import subprocess

    from convshard.parallel import shm

    rank, _ = join_gloo(timeout=60)
    slots = shm.slots_for(None)
    answers = {"flags": slots.flags is not None}
    if rank == 0:
        alive = slots.pids[1]
        gone = subprocess.Popen(["true"])
        gone.wait()
        slots.pids[1] = gone.pid  # rank 1 as if its process had exited
        try:
            slots._meet(10)
        except shm.PeerGone as exc:
            answers["gone"] = str(exc)
        slots.pids[1] = alive
        shm.timeout_seconds = 0.5
        try:
            slots._meet(11)
        except TimeoutError as exc:
            answers["timeout"] = str(exc)
    dist.barrier()
    return answers


@pytest.mark.skipif(__import__("platform").machine() != "x86_64", reason="the shared-memory barrier is x86-64 only")
def test_shared_memory_barrier_names_a_gone_peer_and_times_out():
    answers = launch_local(_meet_worker, 2, timeout=60)[0]
    assert answers["flags"]
    assert answers["gone"].startswith("rank 1 (pid ") and "exited during a collective" in answers["gone"]
    assert answers["timeout"] == "ranks [1] did not reach a collective within 0.5 s"
