"""``comm.record_wire``: which collectives crossed the wire, in which dtype.

Every collective goes through ``wire.issue``, so one record sees them all,
through gloo and through shared memory alike. The last test uses it on the
real loop: a kernel split trained in bf16 gathers its activations in bf16,
the same job in float32 gathers them in float32, so a ``--precision`` that
silently did nothing would fail it.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import join_gloo

from convshard import plan
from convshard.parallel import comm, shm
from convshard.run.config import Job, TrainConfig, load_data, model_groups
from convshard.run.launch import launch_local
from convshard.run.local import prepare
from convshard.run.train import train_worker


def _recorded(dtype_name: str) -> tuple[list[tuple], list[tuple], tuple, bool]:
    """One of each tensor collective in ``dtype_name``, then an object one, recorded: (the tensor
    collectives an outer record saw, what a record nested in it saw, the outer record's last,
    whether the bytes went through shared memory)."""
    rank, world = join_gloo(timeout=60)
    dtype = getattr(torch, dtype_name)
    with comm.record_wire() as outer:
        comm.all_gather_uneven(torch.ones(2, rank + 1, dtype=dtype), [r + 1 for r in range(world)], dim=1)
        with comm.record_wire() as inner:
            comm.reduce_scatter_uneven(torch.ones(3 * world, dtype=dtype), [3] * world, dim=0)
            comm.all_to_all_uneven(torch.ones(world, dtype=dtype), [[1] * world] * world)
        comm.all_reduce_sum_(torch.ones(5, dtype=dtype))
        comm.broadcast_([torch.ones(4, dtype=dtype)])
        comm.gather_objects(rank)
    tensors = [tuple(s) for s in outer if s.dtype is not None]  # shared memory's set-up sends objects
    through_shm = shm.slots_for(None) is not None
    return tensors, [tuple(s) for s in inner], tuple(outer[-1]), through_shm


@pytest.mark.parametrize("shared_memory", ["1", "0"])
def test_record_wire_sees_every_collective_with_its_dtype(shared_memory):
    """Each helper's (op, dtype, numel) on rank 1 of 2, through shared memory
    and through gloo: what this rank handed it, before padding."""
    bf16 = torch.bfloat16
    results = launch_local(_recorded, 2, args=("bfloat16",), timeout=120,
                           env={"CONVSHARD_SHM": shared_memory, "OMP_NUM_THREADS": "1"})
    outer, inner, last, through_shm = results[1]
    assert through_shm == (shared_memory == "1")
    assert outer == [("all_gather", bf16, 4), ("reduce_scatter", bf16, 6), ("all_to_all", bf16, 2),
                     ("all_reduce", bf16, 5), ("broadcast", bf16, 4)]
    assert inner == [("reduce_scatter", bf16, 6), ("all_to_all", bf16, 2)]
    assert last == ("all_gather_object", None, 0)


def _activation_dtypes(job: Job) -> list[str]:
    """Train ``job`` as one rank; the dtypes its all-gathers sent."""
    with comm.record_wire() as sent:
        train_worker(job)
    return sorted({str(s.dtype) for s in sent if s.op == "all_gather"})


@pytest.mark.parametrize("precision, expected", [("bf16", "torch.bfloat16"), ("32", "torch.float32")])
def test_a_kernel_split_gathers_its_activations_in_the_compute_dtype(tmp_path, precision, expected):
    """One training step of a kernel split: every activation gather carries
    the compute dtype (the float64 one is the first forward's batch check)."""
    config = TrainConfig(devices="cpu@0,cpu@1", model="vgg", kernels=(4, 6, 8), dataset="synthetic",
                         synthetic_shape=(3, 16, 16), synthetic_size=16, batch_size=8, max_steps=1, quiet=True,
                         threads=1, job=plan.single("cpu@0", {}, 8))
    groups = model_groups(config, load_data(config))
    job = dataclasses.replace(plan.kernel_split(("cpu@0", "cpu@1"), groups, 8), precision=precision)
    config = dataclasses.replace(config, job=job)
    ready = prepare(config, load_data(config))
    results = launch_local(_activation_dtypes, 2, args=(ready,), timeout=120, env={"OMP_NUM_THREADS": "1"})
    assert results == [sorted([expected, "torch.float64"])] * 2
