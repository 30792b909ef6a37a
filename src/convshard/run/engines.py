"""Engines: how a plan's model is built, fed and synchronised; what the training loop asks.

An engine answers these questions for the loop, which never asks which plan
it runs:

- ``wrap(model)``: the model this rank trains (sharded, or DDP-wrapped);
- ``rows(n)``, ``eval_rows(n)``: which images of a global batch of n (of
  the n test images) this rank feeds;
- ``loss_scale(n)``: the factor on the summed loss of its rows, so that
  the gradients are those of the mean loss over the global batch;
- ``after_backward(model)``: what must happen between ``backward()`` and
  the optimizer step;
- ``reduce(values)``: per-rank sums (loss, correct answers) made the job's.

``ShardedEngine`` runs any sharded plan: every rank feeds the whole global
batch (kernel-mode groups split kernels, batch-mode groups take their rows
themselves), so each computes the whole loss: scale 1/n, nothing to reduce.
``DDPEngine`` is PyTorch's DDP: rank r feeds its b_r images; DDP averages
gradients over the W ranks, so the loss is scaled by W / n, which makes
the mean over the global batch however the rows are split.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from .. import precision
from ..parallel import comm
from ..parallel.rebalance import Rebalancer
from ..parallel.shard import shard_model
from ..parallel.sharded import sync_replicas
from ..plan import DDP, Plan, splits


class ShardedEngine:
    """convshard's engine: ``shard_model`` with the plan's modes, counts and rows."""

    def __init__(self, plan: Plan, rank: int, group: comm.Group) -> None:
        self.plan, self.rank, self.group = plan, rank, group

    def wrap(self, model: nn.Module) -> nn.Module:
        return shard_model(model, group=self.group, layer_shares=self.plan.kernel_counts(),
                           modes={name: "batch" for name in self.plan.batch_groups()}, rows=self.plan.rows,
                           gradient_dtype=precision.grad_dtype(self.plan.grad_precision))

    @staticmethod
    def net(model: nn.Module) -> nn.Module:
        return model

    def rows(self, n: int) -> slice:
        return slice(0, n)

    def eval_rows(self, n: int) -> slice:
        return slice(0, n)

    def loss_scale(self, n: int) -> float:
        return 1 / n

    def after_backward(self, model: nn.Module) -> None:
        sync_replicas(model, group=self.group)

    def reduce(self, values: torch.Tensor) -> torch.Tensor:
        return values

    def rebalancer(self, model: nn.Module, mode: str | int, caps: dict | None = None) -> Rebalancer | None:
        return None if mode == "off" else Rebalancer(model, mode, group=self.group, caps=caps)


class AllReduceClock:
    """DDP's communication hook, timed: each gradient bucket's all-reduce
    (DDP's own hooks: ``allreduce_hook`` divides by W and sums;
    ``bf16_compress_hook``, for ``grad_precision`` bf16, does so in bf16
    and casts the result back) from its launch to its end. The reducer
    launches a bucket as soon as backward has computed its gradients and
    waits for all of them after the last; from the
    last launch to the last end backward has nothing left to compute, so
    that span is the all-reduce the step waits for, and ``settle`` adds it
    to ``comm.seconds_in_collectives``. Earlier buckets overlap compute."""

    def __init__(self, grad_precision: str = "32") -> None:
        self.reduce = default_hooks.bf16_compress_hook if grad_precision == "bf16" else default_hooks.allreduce_hook
        self.starts: list[float] = []
        self.ends: list[float] = []

    def hook(self, group, bucket):  # unannotated: DDP checks annotations as objects, and these would be strings
        """DDP's all-reduce of ``bucket`` over ``group``, timed; a future of the averaged bucket."""
        self.starts.append(time.perf_counter())

        def done(future: torch.futures.Future[torch.Tensor]) -> torch.Tensor:
            self.ends.append(time.perf_counter())
            return future.value()

        return self.reduce(group, bucket).then(done)

    def settle(self) -> None:
        """Count this step's exposed all-reduce time and start the next step's record."""
        if self.starts and self.ends:
            comm.count_collective_seconds(max(0.0, max(self.ends) - max(self.starts)))
        self.starts.clear()
        self.ends.clear()


class DDPEngine:
    """PyTorch's DistributedDataParallel over the plan's rows (one device: the plain model)."""

    def __init__(self, plan: Plan, rank: int, group: comm.Group) -> None:
        self.plan, self.rank, self.group = plan, rank, group
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

    def after_backward(self, model: nn.Module) -> None:
        self._clock.settle()  # DDP's reducer has averaged the gradients during backward

    def reduce(self, values: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(values, group=self.group)
        return values

    def rebalancer(self, model: nn.Module, mode: str | int, caps: dict | None = None) -> None:
        return None  # DDP's rows stay as planned


Engine = ShardedEngine | DDPEngine


def engine_for(plan: Plan, rank: int, group: comm.Group) -> Engine:
    """The engine that runs ``plan`` as ``rank`` of ``group``."""
    return (DDPEngine if plan.engine == DDP else ShardedEngine)(plan, rank, group)
