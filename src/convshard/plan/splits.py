"""Split arithmetic: how a count (kernels of a group, rows of a batch) is divided over ranks.

One tie rule everywhere: where two ranks have an equal claim to the last
unit, the lower rank takes it. 5 rows on 2 equal ranks are (3, 2); 10
kernels on 3 are (4, 3, 3).

- ``split_counts(total, shares)``: proportional to weights (largest remainder);
- ``choose_counts(total, a, b)``: minimising the slowest rank's a_r + b_r c_r;
  ``sized_kernels``, the same in blocks of kernels where that costs little;
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


KERNEL_BLOCKS = (8, 4, 2)  # kernels a sized split hands out at a time, largest first (``sized_kernels``)
BLOCK_SLACK = 0.05  # how much slower (predicted) a split in blocks may be than the exact one


def sized_kernels(total: int, a: Sequence[float], b: Sequence[float], *,
                  caps: Sequence[int] | None = None) -> tuple[int, ...]:
    """A group's kernels per rank, sized by ``choose_counts`` in the largest
    block of KERNEL_BLOCKS (of which the group holds 4 per rank at least)
    whose slowest rank is predicted within BLOCK_SLACK of the exact split's
    (else the exact split). Convolutions with channel counts that are
    multiples of the vector width run faster (oneDNN's blocked layouts,
    tensor cores); docs/heterogeneous.md has the measured case."""
    exact = choose_counts(total, a, b, caps=caps)
    worst = _slowest(exact, a, b)
    for unit in (u for u in KERNEL_BLOCKS if total >= 4 * u * len(a)):  # a few blocks per rank at least
        counts = choose_counts(total, a, b, caps=caps, unit=unit)
        if _slowest(counts, a, b) <= worst * (1 + BLOCK_SLACK):
            return counts
    return exact


def _slowest(counts: Sequence[int], a: Sequence[float], b: Sequence[float]) -> float:
    return max(a[r] + b[r] * max(c, 1) for r, c in enumerate(counts))


def choose_counts(total: int, a: Sequence[float], b: Sequence[float], *,
                  caps: Sequence[int] | None = None, unit: int = 1) -> tuple[int, ...]:
    """Counts per rank, summing to ``total``, that minimise max_r a_r + b_r * max(c_r, 1)
    subject to c_r <= caps[r] (a device's memory; None: no limit), handed
    out in blocks of ``unit`` (the last block, and one that fills a cap, smaller).

    Greedy: each block goes to the rank whose cost after taking it is
    smallest (ties to the lower rank) among those below their cap. With
    ``unit`` 1 this is optimal for a min-max of non-decreasing costs: were a
    unit given at a cost above the optimum T, every rank would already hold
    as many units as it can within T and its cap, i.e. at least the total.
    """
    if not a or len(a) != len(b):
        raise ConfigError(f"a ({len(a)} entries) and b ({len(b)} entries) must give one cost per rank")
    if total < 0:
        raise ConfigError(f"total {total} must be non-negative")
    limit = [total] * len(a) if caps is None else list(caps)
    if sum(max(c, 0) for c in limit) < total:
        raise ConfigError(f"caps {limit} hold fewer than the {total} units to split")
    counts, left = [0] * len(a), total
    heap = [(a[r] + b[r] * min(unit, limit[r], total), r) for r in range(len(a)) if limit[r] > 0]
    heapq.heapify(heap)
    while left:
        _, r = heapq.heappop(heap)
        taken = min(unit, limit[r] - counts[r], left)  # a block, or less at the cap or the end
        counts[r] += taken
        left -= taken
        if counts[r] < limit[r]:
            heapq.heappush(heap, (a[r] + b[r] * (counts[r] + min(unit, limit[r] - counts[r], left)), r))
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
