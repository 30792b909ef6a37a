"""Split arithmetic: how a count (kernels of a group, rows of a batch) is divided over ranks.

One tie rule everywhere: where two ranks have an equal claim to the last
unit, the lower rank takes it. 5 rows on 2 equal ranks are (3, 2); 10
kernels on 3 are (4, 3, 3).

- ``split_counts(total, shares)``: proportional to weights (largest remainder);
- ``choose_counts(total, a, b)``: minimising the slowest rank's a_r + b_r c_r;
- ``part(counts, rank)``: rank r's slice [o_r, o_r + c_r), o_r = c_0 + ... + c_{r-1};
- ``is_per_kernel(value, shape)``: the one rule for optimizer state that is
  split with its parameter's kernels.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence

import torch

from ..errors import ConfigError


def split_counts(total: int, shares: Sequence[float]) -> tuple[int, ...]:
    """Integer counts proportional to ``shares`` that sum to ``total``.

    Largest-remainder apportionment: c_r = floor(total * w_r / sum(w)), then
    the units left over go one each to the largest fractional parts (ties
    to the lower rank). A share of 0 gives 0.
    """
    weights = [float(w) for w in shares]
    if not weights:
        raise ConfigError("shares must name at least one rank")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"shares {list(shares)} must be finite, non-negative and not all zero")
    exact = [total * w / sum(weights) for w in weights]
    counts = [math.floor(e) for e in exact]
    by_remainder = sorted(range(len(exact)), key=lambda r: (counts[r] - exact[r], r))
    for r in by_remainder[: total - sum(counts)]:
        counts[r] += 1
    return tuple(counts)


def even(total: int, world: int) -> tuple[int, ...]:
    """``total`` split as evenly as possible over ``world`` ranks (the lower ranks take the remainder)."""
    return split_counts(total, [1.0] * world)


def choose_counts(total: int, a: Sequence[float], b: Sequence[float], *,
                  caps: Sequence[int] | None = None) -> tuple[int, ...]:
    """Counts per rank, summing to ``total``, that minimise max_r a_r + b_r * max(c_r, 1)
    subject to c_r <= caps[r] (a device's memory; None: no limit).

    Greedy: each unit goes to the rank whose cost after taking it is
    smallest (ties to the lower rank) among those below their cap. This is
    optimal for a min-max of non-decreasing costs: were a unit given at a
    cost above the optimum T, every rank would already hold as many units as
    it can within T and its cap, i.e. at least the total.
    """
    if not a or len(a) != len(b):
        raise ConfigError(f"a ({len(a)} entries) and b ({len(b)} entries) must give one cost per rank")
    if total < 0:
        raise ConfigError(f"total {total} must be non-negative")
    limit = [total] * len(a) if caps is None else list(caps)
    if sum(max(c, 0) for c in limit) < total:
        raise ConfigError(f"caps {limit} hold fewer than the {total} units to split")
    counts = [0] * len(a)
    heap = [(a[r] + b[r], r) for r in range(len(a)) if limit[r] > 0]
    heapq.heapify(heap)
    for _ in range(total):
        _, r = heapq.heappop(heap)
        counts[r] += 1
        if counts[r] < limit[r]:
            heapq.heappush(heap, (a[r] + b[r] * (counts[r] + 1), r))
    return tuple(counts)


def part(counts: Sequence[int], rank: int) -> slice:
    """Rank ``rank``'s slice of a split: [o_r, o_r + c_r)."""
    start = sum(counts[:rank])
    return slice(start, start + counts[rank])


def is_per_kernel(value: object, shape: Sequence[int]) -> bool:
    """Whether an optimizer state entry (momentum, Adam's moments) is split
    with the kernels of a parameter of ``shape`` (local or full): a tensor of
    that very shape. Scalars (Adam's step) are not."""
    return torch.is_tensor(value) and value.dim() > 0 and tuple(value.shape) == tuple(shape)
