"""Moving kernel slices, with their optimizer state, between the ranks of a sharded model.

``reshard`` applies a re-planned split of a model's kernel-mode groups
(``convshard.run.rebalance`` decides it; ``shard.Sharded.apply`` calls
this): the full tensors are gathered and every rank takes its new slice,
so the model and optimizer are the same as before, only split
differently. Training stays exact up to the float rounding of the new split.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..plan.splits import is_per_kernel
from .sharded import ShardSplit, channel_groups


def reshard(model: nn.Module, optimizer: torch.optim.Optimizer, counts: Mapping[str, Sequence[int]]) -> None:
    """Split the named channel groups of ``model`` anew (a collective).

    Every member of a group (its convs, BatchNorms, depthwise convs) is
    re-split: each parameter keeps its identity (the optimizer still holds
    it); its data, its per-channel buffers (running statistics) and every
    optimizer state tensor of its shape (momentum, Adam's moments) become
    this rank's slice of the gathered full tensor.
    """
    for name, members in channel_groups(model).items():
        group = members[0][1].group
        old = group.split
        if name not in counts or tuple(counts[name]) == old.counts:
            continue
        new = ShardSplit(tuple(counts[name]), old.rank, old.group)
        if new.total != old.total:
            raise ValueError(f"{name}: new counts {new.counts} do not sum to {old.total}")
        for _, module in members:
            for param in module.parameters(recurse=False):
                state = optimizer.state.get(param, {})
                for key, value in state.items():
                    if is_per_kernel(value, param.shape):
                        state[key] = new.take(old.gather(value)).clone()
                param.data = new.take(old.gather(param.data)).clone()
                param.grad = None
            for key, buffer in module.named_buffers(recurse=False):
                if buffer is not None and buffer.dim() > 0:
                    setattr(module, key, new.take(old.gather(buffer)).clone())
        group.split = new
