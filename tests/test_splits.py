"""Split arithmetic: one tie rule, and the per-kernel optimizer-state rule."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from convshard.errors import ConfigError
from convshard.plan.splits import BLOCK_SLACK, choose_counts, even, is_per_kernel, part, sized_kernels, split_counts


def _objective(counts, a, b) -> float:
    return max(ar + br * max(c, 1) for c, ar, br in zip(counts, a, b))


def test_one_tie_rule_the_lower_rank_takes_the_remainder():
    assert even(5, 2) == (3, 2)
    assert split_counts(5, [1, 1]) == (3, 2)
    assert choose_counts(5, [0.0, 0.0], [1.0, 1.0]) == (3, 2)
    assert choose_counts(10, [0.5] * 3, [1.0] * 3) == (4, 3, 3)
    assert split_counts(10, [0.4, 0.3, 0.2, 0.1]) == (4, 3, 2, 1)
    assert split_counts(7, [1, 0, 1]) == (4, 0, 3)


def test_part_is_the_rank_slice():
    assert [part((3, 0, 2), r) for r in range(3)] == [slice(0, 3), slice(3, 3), slice(3, 5)]


def test_half_speed_ranks_get_half_the_kernels():
    counts = choose_counts(1000, [0.0, 0.0, 0.0], [1.0, 2.0, 2.0])
    assert counts == (500, 250, 250)


def test_rank_with_huge_fixed_cost_gets_no_kernels():
    assert choose_counts(100, [1000.0, 0.0, 0.0], [1.0, 1.0, 1.0]) == (0, 50, 50)


def test_greedy_matches_brute_force():
    rng = random.Random(0)
    for _ in range(300):
        total = rng.randint(0, 8)
        a = [rng.uniform(0, 2) for _ in range(3)]
        b = [rng.uniform(0.01, 1) for _ in range(3)]
        best = min(_objective(c, a, b) for c in itertools.product(range(total + 1), repeat=3) if sum(c) == total)
        assert math.isclose(_objective(choose_counts(total, a, b), a, b), best, rel_tol=1e-12)


def test_sized_kernels_come_in_blocks_where_that_costs_little():
    # two cores measured 7% apart: 137 and 119 exactly, 136 and 120 in blocks of 8
    a, b = [0.0, 0.0], [1.0, 1.15]
    assert choose_counts(256, a, b) == (137, 119)
    assert sized_kernels(256, a, b) == (136, 120)
    # three equal ranks: blocks of 4 would make one rank 12% slower, so blocks of 2
    assert choose_counts(64, [0.0] * 3, [1.0] * 3) == (22, 21, 21)
    assert sized_kernels(64, [0.0] * 3, [1.0] * 3) == (22, 22, 20)
    # every split it takes is within the slack of the exact one, sums to the total and keeps the caps
    rng = random.Random(1)
    for _ in range(200):
        total = rng.randint(0, 300)
        a = [rng.uniform(0, 2) for _ in range(3)]
        b = [rng.uniform(0.01, 1) for _ in range(3)]
        caps = [rng.randint(total // 3 + 1, total + 1) for _ in range(3)]
        counts = sized_kernels(total, a, b, caps=caps)
        assert sum(counts) == total and all(c <= cap for c, cap in zip(counts, caps))
        exact = _objective(choose_counts(total, a, b, caps=caps), a, b)
        assert _objective(counts, a, b) <= exact * (1 + BLOCK_SLACK) + 1e-12


def test_bad_input_raises_config_error():
    with pytest.raises(ConfigError, match="one cost per rank"):
        choose_counts(10, [0.0, 0.0], [1.0])
    with pytest.raises(ConfigError, match="non-negative"):
        choose_counts(-1, [0.0], [1.0])
    with pytest.raises(ConfigError, match="not all zero"):
        split_counts(3, [0, 0])


def test_per_kernel_state_is_a_tensor_of_the_parameters_shape():
    weight = torch.zeros(4, 3, 5, 5)
    assert is_per_kernel(torch.zeros(4, 3, 5, 5), weight.shape)
    assert not is_per_kernel(torch.zeros(4), weight.shape)  # dim 0 alone is not enough
    assert not is_per_kernel(torch.tensor(3.0), weight.shape)  # Adam's step
    assert not is_per_kernel(0.9, weight.shape)
