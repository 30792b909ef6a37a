"""Online rebalancing: move kernels and batch rows from ranks that have slowed to ranks that have not.

Every step each rank records its busy time: the step's wall time minus the
time it spent inside collectives (``comm.seconds_in_collectives``), which
includes waiting for slower peers. Over a window of steps rank r was busy
T_r seconds while holding work u_r = n sum_l w_l c_{r,l} + w_rows b_r
(c_{r,l} kernels of layer l, w_l = sum over its convs of C_in * kh * kw * P
the multiply-adds per kernel and sample, P a conv's output pixels; b_r rows
of the batch of n in batch-mode groups, w_rows their convs' multiply-adds
per row), so its cost per unit of work is s_r = T_r / u_r. The imbalance,
reported with each move, is max_r T_r / mean_r T_r - 1.

Mode ``auto`` checks every ``window`` steps: new counts per layer come from
``splits.choose_counts`` with b_r = s_r * w_l, new rows with b_r = s_r * w_rows
(batch rows hold no state: the row split just changes), within each
rank's memory when the plan was made within it (``caps``: at most
floor(f_r K_l) kernels of a layer and b_r rows; ``convshard.plan.memory.caps``),
and they are taken when they cut the predicted slowest busy time
max_r s_r u_r by at least ``min_gain`` (3%;
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

from ..errors import ConfigError
from ..plan.splits import choose_counts, is_per_kernel
from . import comm
from .sharded import ShardedConv2d, ShardSplit, channel_groups, layer_counts

log = logging.getLogger(__name__)


def parse_mode(text: str) -> str | int:
    """``off``, ``auto`` or a positive step count N."""
    if text in ("off", "auto"):
        return text
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise ValueError(f"--rebalance takes off, auto or a positive number of steps, got {text!r}")


def layer_weights(model: nn.Module, pixels: Mapping[str, int] | None = None) -> dict[str, float]:
    """Relative cost of one kernel of each channel group: sum over its convs
    of C_in * kh * kw * P, their multiply-adds per sample, with P a conv's
    output pixels (from ``pixels`` by module name; 1 where unknown)."""
    pixels = pixels or {}
    return {name: float(sum(m.in_channels * math.prod(m.kernel_size) * pixels.get(n, 1)
                            for n, m in members if isinstance(m, ShardedConv2d)))
            for name, members in channel_groups(model).items()}


def row_weight(model: nn.Module, pixels: Mapping[str, int] | None = None) -> float:
    """Relative cost of one row of the batch in the model's batch-mode
    groups: their convs' C_out * C_in * kh * kw * P (0 without batch mode)."""
    pixels, modules = pixels or {}, dict(model.named_modules())
    return float(sum(modules[n].out_channels * modules[n].in_channels * math.prod(modules[n].kernel_size)
                     * pixels.get(n, 1) for n in getattr(model, "batch_convs", ())))


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


class Rebalancer:
    """Decides, identically on every rank, when and how to re-split the kernels."""

    def __init__(self, model: nn.Module, mode: str | int, *, group: comm.Group = None, min_gain: float = 0.03,
                 window: int = 5, caps: Mapping[str, Sequence] | None = None) -> None:
        self.model, self.mode, self.group, self.min_gain = model, mode, group, min_gain
        self.caps = caps  # {"shares": f_r, "rows": b_r} per rank, or None: no memory limit
        self.window = mode if isinstance(mode, int) else window
        self.rows = getattr(model, "row_split", None)  # the batch split of batch-mode groups, if any
        self.pixels: dict[str, int] = {}  # each conv's output pixels, seen in the first forward
        self._hooks = {name: module.register_forward_hook(self._seen(name))
                       for name, module in model.named_modules() if isinstance(module, nn.Conv2d | ShardedConv2d)}
        self.busy: list[float] = []
        self.events: list[dict] = []

    def _seen(self, name: str):
        """A forward hook that records the output pixels of conv ``name`` once,
        then removes itself (it returns None: the output stands)."""
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            self.pixels[name] = out.size(-2) * out.size(-1)
            self._hooks.pop(name).remove()
        return hook

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
        (new, rows), reason = decision
        old = layer_counts(self.model)
        event = {"step": step, "reason": reason, "busy_seconds": busy,
                 "old": {k: list(v) for k, v in old.items()}, "new": {k: list(v) for k, v in new.items()}}
        reshard(self.model, optimizer, new)
        if self.rows is not None:
            event["old_rows"], event["new_rows"] = list(self.rows.counts), list(rows)
            self.rows.shares = rows
        self.events.append(event)
        log.info("step %d: rebalanced (%s): %s%s", step, reason, {k: list(v) for k, v in new.items()},
                 f", rows {list(rows)}" if self.rows is not None else "")
        return event

    def decide(self, busy: Sequence[float]) -> tuple[tuple[dict[str, tuple[int, ...]], tuple[int, ...]], str] | None:
        """New counts per layer and rows per rank (of the last batch; empty
        without batch mode), and the reason to take them, given every rank's
        mean busy time; None to keep the split."""
        imbalance = max(busy) / (sum(busy) / len(busy)) - 1
        new, gain = self._new_counts(busy)
        rows = self.rows.counts if self.rows is not None else ()
        if new == (layer_counts(self.model), rows) or (self.mode == "auto" and gain < self.min_gain):
            return None
        if self.mode == "auto":
            return new, f"imbalance {imbalance:.0%}, predicted gain {gain:.0%}"
        return new, f"imbalance {imbalance:.0%} (every {self.window} steps)"

    def _new_counts(self, busy: Sequence[float]) -> tuple[tuple[dict[str, tuple[int, ...]], tuple[int, ...]], float]:
        """New counts per layer and rows per rank, and the predicted gain:
        max_r u_r s_r before over after, minus 1. A rank's work u_r is its
        kernels' and its rows' multiply-adds over the batch of n rows:
        n sum_l w_l c_{r,l} + w_rows b_r."""
        counts = layer_counts(self.model)
        rows = self.rows.counts if self.rows is not None else ()
        weights, per_row = layer_weights(self.model, self.pixels), row_weight(self.model, self.pixels)
        world, n = len(busy), sum(rows) or 1

        def work(split: Mapping[str, Sequence[int]], b: Sequence[int], r: int) -> float:
            return n * sum(weights[name] * c[r] for name, c in split.items()) + (per_row * b[r] if b else 0.0)

        active = [r for r in range(world) if work(counts, rows, r) > 0]
        cost = {r: busy[r] / work(counts, rows, r) for r in active}

        def spread(now: Sequence[int], weight: float, caps: Sequence[int] | None) -> tuple[int, ...]:
            limit = None if caps is None else [caps[r] for r in active]
            try:
                counts_now = choose_counts(sum(now), [0.0] * len(active), [cost[r] * weight for r in active],
                                           caps=limit)
            except ConfigError:  # the active ranks' memory cannot hold it otherwise: keep the split
                return tuple(now)
            mine = dict(zip(active, counts_now))
            return tuple(mine.get(r, 0) for r in range(world))

        shares, most_rows = (self.caps["shares"], self.caps["rows"]) if self.caps else (None, None)
        new = {name: spread(c, weights[name], shares and [math.floor(f * sum(c)) for f in shares])
               for name, c in counts.items()}
        new_rows = _at_least_one(spread(rows, per_row, most_rows), active) if rows and per_row else rows
        before, after = (max(cost[r] * work(split, b, r) for r in active)
                         for split, b in ((counts, rows), (new, new_rows)))
        return (new, new_rows), before / after - 1


def _at_least_one(rows: tuple[int, ...], active: Sequence[int]) -> tuple[int, ...]:
    """``rows`` with every active rank holding at least one row (taken from the largest)."""
    rows = list(rows)
    for r in active:
        if rows[r] == 0 and max(rows) > 1:
            rows[rows.index(max(rows))] -= 1
            rows[r] = 1
    return tuple(rows)
