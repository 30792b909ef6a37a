"""Engines: how a plan's model is built, fed and synchronised; what the training loop asks.

``engine_for(plan, rank, group, timeout)`` reads the plan whole and returns
the engine this process runs it with. The loop never asks which plan it runs:

- ``trains``: whether this process trains (a plan with ``ranks`` leaves the
  others standing by), and ``session()``, the context the whole run is in
  (the one training rank of such a plan announces its run in it);
- ``rank``, ``group``: this process's place among the ranks that train;
- ``wrap(model)``: the model this rank trains (sharded, or DDP-wrapped);
- ``rows(n)``, ``eval_rows(n)``: which images of a global batch of n (of
  the n test images) this rank feeds;
- ``loss_scale(n)``: the factor on the summed loss of its rows, so that
  the gradients are those of the mean loss over the global batch;
- ``after_backward()``: what must happen between ``backward()`` and the
  optimizer step;
- ``reduce(values)``: per-rank sums (loss, correct answers) made the job's;
- ``apply(plan, optimizer)``: run a re-split plan from the next step on.

``ShardedEngine`` runs any sharded plan: every rank feeds the whole global
batch (kernel-mode groups split kernels, batch-mode groups take their rows
themselves), so each computes the whole loss: scale 1/n, nothing to reduce.
``DDPEngine`` is PyTorch's DDP: rank r feeds its b_r images; DDP averages
gradients over the W ranks, so the loss is scaled by W / n, which makes
the mean over the global batch however the rows are split.

A plan whose ``ranks`` name the processes that train (one device chosen
under torchrun, whose processes are fixed) runs on a process group of those
ranks; every other process gets ``StandBy``, which trains nothing and waits
until they are done (``convshard.run.alone``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from .. import precision
from ..parallel import comm, wire
from ..parallel.shard import Sharded, shard
from ..plan import DDP, Plan, splits
from . import alone


class ShardedEngine:
    """convshard's engine: ``shard`` with the plan's style for every group."""

    trains = True

    def __init__(self, plan: Plan, rank: int, group: comm.Group, *,
                 session: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> None:
        self.plan, self.rank, self.group, self.session = plan, rank, group, session
        self.sharded: Sharded | None = None

    def wrap(self, model: nn.Module) -> nn.Module:
        self.sharded = shard(model, self.plan.styles(), group=self.group,
                             gradient_dtype=precision.grad_dtype(self.plan.grad_precision))
        return self.sharded.model

    @staticmethod
    def net(model: nn.Module) -> nn.Module:
        return model

    def rows(self, n: int) -> slice:
        return slice(0, n)

    def eval_rows(self, n: int) -> slice:
        return slice(0, n)

    def loss_scale(self, n: int) -> float:
        return 1 / n

    def after_backward(self) -> None:
        self.sharded.sync()

    def reduce(self, values: torch.Tensor) -> torch.Tensor:
        return values

    def kernel_counts(self) -> dict[str, tuple[int, ...]]:
        """Kernels per rank of every kernel-mode group, as the model holds them now."""
        return self.sharded.counts()

    def apply(self, plan: Plan, optimizer: torch.optim.Optimizer) -> None:
        """Run ``plan``, the current one re-split (same modes), from the next step on (a collective)."""
        self.sharded.apply(plan.styles(), optimizer)
        self.plan = plan


class AllReduceClock:
    """DDP's communication hook, timed: each gradient bucket's all-reduce
    from its launch to its end. As DDP's own hooks do (``allreduce_hook``;
    ``bf16_compress_hook`` for ``grad_precision`` bf16), it sends the bucket
    divided by W, in bf16 for bf16 (cast back on arrival), so the sum is the
    mean; it goes through ``wire.issue``, checked and recorded like every
    collective. The reducer launches a bucket as soon as backward has
    computed its gradients and waits for all of them after the last; from
    the last launch to the last end backward has nothing left to compute, so
    that span is the all-reduce the step waits for, and ``settle`` adds it
    to ``comm.seconds_in_collectives``. Earlier buckets overlap compute."""

    def __init__(self, grad_precision: str = "32") -> None:
        self.dtype = precision.grad_dtype(grad_precision)  # None: the bucket's own
        self.starts: list[float] = []
        self.ends: list[float] = []

    def hook(self, group, bucket):  # unannotated: DDP checks annotations as objects, and these would be strings
        """DDP's all-reduce of ``bucket`` over ``group``, timed; a future of the averaged bucket."""
        self.starts.append(time.perf_counter())
        buffer = bucket.buffer()
        sent = buffer.to(self.dtype or buffer.dtype).div_(comm.world_size(group))  # in place when no cast
        work = wire.issue("all_reduce", group, [sent], lambda: dist.all_reduce(sent, group=group, async_op=True),
                          timed=False)

        def done(future: torch.futures.Future[list[torch.Tensor]]) -> torch.Tensor:
            self.ends.append(time.perf_counter())
            summed = future.value()[0]
            return summed if summed is buffer else buffer.copy_(summed)

        return work.get_future().then(done)

    def settle(self) -> None:
        """Count this step's exposed all-reduce time and start the next step's record."""
        if self.starts and self.ends:
            comm.count_collective_seconds(max(0.0, max(self.ends) - max(self.starts)))
        self.starts.clear()
        self.ends.clear()


class DDPEngine:
    """PyTorch's DistributedDataParallel over the plan's rows (one device: the plain model)."""

    trains = True

    def __init__(self, plan: Plan, rank: int, group: comm.Group, *,
                 session: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> None:
        self.plan, self.rank, self.group, self.session = plan, rank, group, session
        self.world = comm.world_size(group)
        self._clock = AllReduceClock(plan.grad_precision)

    def wrap(self, model: nn.Module) -> nn.Module:
        if self.world == 1:
            return model
        wrapped = nn.parallel.DistributedDataParallel(model, process_group=self.group)
        wrapped.register_comm_hook(self.group, self._clock.hook)
        return wrapped

    @staticmethod
    def net(model: nn.Module) -> nn.Module:
        return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model

    def rows(self, n: int) -> slice:
        return splits.part(self.plan.rows_of(n), self.rank)

    def eval_rows(self, n: int) -> slice:
        return splits.part(splits.even(n, self.world), self.rank)

    def loss_scale(self, n: int) -> float:
        return self.world / n

    def after_backward(self) -> None:
        self._clock.settle()  # DDP's reducer has averaged the gradients during backward

    def reduce(self, values: torch.Tensor) -> torch.Tensor:
        return comm.all_reduce_sum_(values, group=self.group)

    @staticmethod
    def kernel_counts() -> dict[str, tuple[int, ...]]:
        return {}

    def apply(self, plan: Plan, optimizer: torch.optim.Optimizer) -> None:
        raise ValueError("a ddp plan's rows stay as planned: nothing re-splits them")


class StandBy:
    """A process a plan leaves out (``Plan.ranks``): it trains nothing and
    waits, through the job's store, until the training ranks are done."""

    trains = False

    def __init__(self, lone: int, device: str, timeout: float) -> None:
        self.lone, self.device, self.timeout = lone, device, timeout

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        yield
        alone.stand_by(self.lone, self.device, self.timeout)


Engine = ShardedEngine | DDPEngine | StandBy


def engine_for(plan: Plan, rank: int, group: comm.Group, *, timeout: float = 300.0) -> Engine:
    """The engine that runs ``plan`` as ``rank`` of ``group`` (a collective
    for a plan with ``ranks``, which makes the group of those ranks)."""
    kind = DDPEngine if plan.engine == DDP else ShardedEngine
    if plan.ranks is None:
        return kind(plan, rank, group)
    lone = plan.ranks[0]
    own = alone.group_of(lone)
    if rank != lone:
        return StandBy(lone, plan.devices[0], timeout)
    return kind(plan, 0, own, session=lambda: alone.training_alone(timeout))  # rank 0 of its own group
