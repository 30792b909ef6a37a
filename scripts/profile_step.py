"""Where one rank's training step goes: torch.profiler on rank 0 of two single-thread workers.

    python scripts/profile_step.py --model resnet18 --batch-size 64 --strategy kernel
    python scripts/profile_step.py --model resnet18 --batch-size 64 --strategy ddp
    python scripts/profile_step.py --model resnet18 --batch-size 64 --strategy kernel --precision bf16
    python scripts/profile_step.py --model resnet18 --batch-size 64 --strategy kernel --chunks 4

Two workers on cores 0 and 1 (gloo, one thread each) train the model on
CIFAR-shaped random input: ``kernel`` shards it (``shard_model``, the full
batch on every rank), ``ddp`` wraps it in DistributedDataParallel (half the
batch each); ``--precision bf16`` runs the forward under autocast, as
``convshard train --precision bf16`` does; ``--chunks`` gathers each split
activation into the next convs in that many chunks of rows
(``convshard.parallel.pipeline``). After two warm-up steps two steps run
under the profiler; rank 0 prints the mean step seconds, per step its
collectives' time in flight and the part of it the rank was blocked in
them (the exposed communication; DDP's buckets run inside its reducer,
outside this count), and the ops by self CPU time (the totals cover both
profiled steps). Set ``CONVSHARD_SHM=0`` to send through gloo as between
hosts. Not part of the tests: it measures this machine.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import convshard
from convshard import precision
from convshard.models import build_model
from convshard.parallel import comm
from convshard.run.launch import init_from_env, launch_local
from convshard.tools import report


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
          compute: str) -> None:
    optimizer.zero_grad(set_to_none=True)
    with precision.autocast(x.device, compute):
        out = model(x)
    nn.functional.cross_entropy(out.float(), y).backward()
    convshard.sync_replicas(model)
    optimizer.step()


def _worker(model_name: str, batch: int, strategy: str, rows: int, compute: str, chunks: int,
            fmt: str) -> str | None:
    rank, _, _ = init_from_env("gloo", timeout=300)
    os.sched_setaffinity(0, {rank})
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model(model_name, (3, 32, 32), 10).to(memory_format=precision.memory_format(fmt))
    if strategy == "kernel":
        model, part = convshard.shard_model(model, chunks=chunks), slice(0, batch)
    else:
        model, part = nn.parallel.DistributedDataParallel(model), slice(rank * batch // 2, (rank + 1) * batch // 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(batch, 3, 32, 32)[part], torch.randint(0, 10, (batch,))[part]
    x = x.contiguous(memory_format=precision.memory_format(fmt))
    for _ in range(2):
        _step(model, optimizer, x, y, compute)
    lines = []
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for i in range(2):
            t0, blocked = time.perf_counter(), comm.seconds_in_collectives()
            _step(model, optimizer, x, y, compute)
            (mine,) = report.hidden({"timeline": {"transfers": [comm.transfers_since(t0)]}})
            lines.append(f"step {i + 1}: {1000 * (time.perf_counter() - t0):.1f} ms, {mine['transfers']} collectives "
                         f"in flight {mine['in_flight_ms']:.1f} ms, exposed "
                         f"{1000 * (comm.seconds_in_collectives() - blocked):.1f} ms ({mine['hidden']:.0%} hidden)")
        seconds = (time.perf_counter() - start) / 2
    if rank:
        return None
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
    return "\n".join([f"{strategy}, {model_name}, batch {batch}, precision {compute}, {fmt}, chunks {chunks}: "
                      f"{seconds:.3f} s/step (profiled)", *lines, table])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--strategy", choices=("kernel", "ddp"), default="kernel")
    parser.add_argument("--rows", type=int, default=12, help="ops to list")
    parser.add_argument("--precision", choices=precision.PRECISIONS, default="32")
    parser.add_argument("--chunks", type=int, default=1, help="chunks of rows per gather into convs (kernel)")
    parser.add_argument("--memory-format", choices=precision.MEMORY_FORMATS, default="contiguous")
    args = parser.parse_args()
    print(launch_local(_worker, 2, args=(args.model, args.batch_size, args.strategy, args.rows, args.precision,
                                         args.chunks, args.memory_format), env={"OMP_NUM_THREADS": "1"})[0])


if __name__ == "__main__":
    main()
