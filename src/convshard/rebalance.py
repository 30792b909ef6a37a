"""Online rebalancing: move kernels from ranks that have slowed to ranks that have not.

Every step each rank records its busy time: the step's wall time minus the
time it spent inside collectives (``comm.seconds_in_collectives``), which
includes waiting for slower peers. Over a window of steps rank r was busy
T_r seconds while holding work u_r = sum_l w_l c_{r,l} (c_{r,l} kernels of
layer l, w_l = C_in * kh * kw the layer's multiply-adds per kernel and
output pixel), so its cost per unit of work is s_r = T_r / u_r. The
imbalance, reported with each move, is max_r T_r / mean_r T_r - 1.

Mode ``auto`` checks every ``window`` steps: new counts per layer come from
``plan.choose_counts`` with b_r = s_r * w_l, and they are taken when they cut
the predicted slowest busy time max_r s_r u_r by at least ``min_gain`` (3%;
smaller predicted gains are within the noise of the timings). Mode N
re-splits every N steps. The first step of a run, which carries one-time
costs (allocations, lazy initialisation), is not counted.
``reshard`` moves the kernel slices with their optimizer state: the full
tensors are gathered and every rank takes its new slice, so the model and
optimizer are the same as before, only split differently. Training stays
exact up to the float rounding of the new split. A rank that holds no
kernels keeps none: the plan or the user left it out, possibly for a cost
(its link) that busy times do not show.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from . import comm
from .plan import choose_counts
from .sharded import ShardedConv2d, ShardSplit, channel_groups, layer_counts

log = logging.getLogger(__name__)


def parse_mode(text: str) -> str | int:
    """``off``, ``auto`` or a positive step count N."""
    if text in ("off", "auto"):
        return text
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise ValueError(f"--rebalance takes off, auto or a positive number of steps, got {text!r}")


def layer_weights(model: nn.Module) -> dict[str, float]:
    """Relative cost of one kernel of each channel group: sum over its convs
    of C_in * kh * kw, their multiply-adds per output pixel."""
    return {name: float(sum(m.in_channels * math.prod(m.kernel_size)
                            for _, m in members if isinstance(m, ShardedConv2d)))
            for name, members in channel_groups(model).items()}


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
                    if torch.is_tensor(value) and value.shape == param.shape:
                        state[key] = new.take(old.gather(value)).clone()
                param.data = new.take(old.gather(param.data)).clone()
                param.grad = None
            for key, buffer in module.named_buffers(recurse=False):
                if buffer is not None and buffer.dim() > 0:
                    setattr(module, key, new.take(old.gather(buffer)).clone())
        group.split = new


class Rebalancer:
    """Decides, identically on every rank, when and how to re-split the kernels."""

    def __init__(self, model: nn.Module, mode: str | int, *, group: comm.Group = None, min_gain: float = 0.03,
                 window: int = 5) -> None:
        self.model, self.mode, self.group, self.min_gain = model, mode, group, min_gain
        self.window = mode if isinstance(mode, int) else window
        self.weights = layer_weights(model)
        self.busy: list[float] = []
        self.events: list[dict] = []

    def observe(self, step: int, busy_seconds: float, optimizer: torch.optim.Optimizer) -> dict | None:
        """Record this rank's busy time of optimizer step ``step`` (1-based);
        every ``window`` steps compare the ranks (a collective) and rebalance
        if due. Returns the event when kernels moved."""
        if self.mode == "off" or comm.world_size(self.group) == 1:
            return None
        if step > 1:
            self.busy.append(busy_seconds)
        if step % self.window or not self.busy:
            return None
        busy = comm.gather_objects(sum(self.busy) / len(self.busy), group=self.group)
        self.busy.clear()
        decision = self.decide(busy)
        if decision is None:
            return None
        new, reason = decision
        old = layer_counts(self.model)
        reshard(self.model, optimizer, new)
        event = {"step": step, "reason": reason, "busy_seconds": busy,
                 "old": {k: list(v) for k, v in old.items()}, "new": {k: list(v) for k, v in new.items()}}
        self.events.append(event)
        log.info("step %d: rebalanced (%s): %s", step, reason, {k: list(v) for k, v in new.items()})
        return event

    def decide(self, busy: Sequence[float]) -> tuple[dict[str, tuple[int, ...]], str] | None:
        """New counts per layer and the reason to take them, given every rank's
        mean busy time; None to keep the split."""
        imbalance = max(busy) / (sum(busy) / len(busy)) - 1
        new, gain = self._new_counts(busy)
        if new == layer_counts(self.model) or (self.mode == "auto" and gain < self.min_gain):
            return None
        if self.mode == "auto":
            return new, f"imbalance {imbalance:.0%}, predicted gain {gain:.0%}"
        return new, f"imbalance {imbalance:.0%} (every {self.window} steps)"

    def _new_counts(self, busy: Sequence[float]) -> tuple[dict[str, tuple[int, ...]], float]:
        """New counts per layer, and the predicted gain: max_r u_r s_r before over after, minus 1."""
        counts = layer_counts(self.model)
        world = len(busy)

        def work(split: Mapping[str, Sequence[int]], r: int) -> float:
            return sum(self.weights[n] * c[r] for n, c in split.items())

        active = [r for r in range(world) if work(counts, r) > 0]
        cost = {r: busy[r] / work(counts, r) for r in active}
        new = {}
        for n, c in counts.items():
            mine = choose_counts(sum(c), [0.0] * len(active), [cost[r] * self.weights[n] for r in active])
            spread = dict(zip(active, mine))
            new[n] = tuple(spread.get(r, 0) for r in range(world))
        before, after = (max(cost[r] * work(split, r) for r in active) for split in (counts, new))
        return new, before / after - 1
