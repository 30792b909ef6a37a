"""The cost model and planner on synthetic profiles: no processes, no torch.

``make_profile`` builds a profile from per-rank speeds: rank r's costs are the
base costs divided by speeds[r]. Expected step times in the hand-checked tests
are worked out from the formulas in ``convshard.plan``'s docstring.
"""

from __future__ import annotations

import itertools
import json
import math
import random

import pytest

from convshard.errors import ConfigError
from convshard.plan import (
    STRATEGIES,
    choose_counts,
    ddp_step,
    format_plan,
    kernel_step,
    make_plan,
    single_step,
)


def make_profile(
    speeds=(1.0, 1.0, 1.0),
    *,
    kernels=(512, 1024),
    a=1e-3,
    per_kernel=1e-4,
    gather_bytes=1000,
    input_grad_bytes=10_000,
    rest=1e-3,
    param_bytes=100_000_000,
    replicated_param_bytes=10_000,
    bandwidth=1e9,
    latency=1e-5,
) -> dict:
    """A profile of len(speeds) ranks; the first layer's input needs no gradient."""
    layers = [
        {
            "name": f"conv{i}",
            "kernels": k,
            "gather_bytes_per_kernel": gather_bytes,
            "input_grad_bytes": input_grad_bytes if i else 0,
            "a": [a / s for s in speeds],
            "b": [per_kernel / s for s in speeds],
            # batch mode: the layer's whole work on ceil(64 / W) rows, its weights, its values
            "batch_rows": -(-64 // len(speeds)),
            "batch_seconds": [(a + per_kernel * k) / s * -(-64 // len(speeds)) / 64 for s in speeds],
            "param_bytes": (param_bytes - replicated_param_bytes) // len(kernels),
            "batchnorms": 0,
            "inputs": [{"bytes": input_grad_bytes, "grad": bool(i)}],
            "outputs": [{"bytes": gather_bytes * k, "elements": 1, "convs": [], "whole": True}],
        }
        for i, k in enumerate(kernels)
    ]
    link = {"latency": latency, "bandwidth": bandwidth}
    return {
        "version": 2,
        "batch_size": 64,
        "devices": [f"cpu@{r}" for r in range(len(speeds))],
        "layers": layers,
        "rest_seconds": [rest / s for s in speeds],
        "param_bytes": param_bytes,
        "replicated_param_bytes": replicated_param_bytes,
        "links": {kind: dict(link) for kind in ("all_gather", "all_reduce", "reduce_scatter", "broadcast", "all_to_all")}
        if len(speeds) > 1 else {},
    }


def _objective(counts, a, b) -> float:
    return max(ar + br * max(c, 1) for c, ar, br in zip(counts, a, b))


# choose_counts


def test_equal_speeds_split_equally():
    assert choose_counts(9, [0.5] * 3, [1.0] * 3) == (3, 3, 3)
    assert choose_counts(10, [0.5] * 3, [1.0] * 3) == (4, 3, 3)  # the remainder goes to the lower rank
    counts = choose_counts(1001, [0.0] * 4, [2.0] * 4)
    assert sum(counts) == 1001 and max(counts) - min(counts) <= 1


def test_half_speed_ranks_get_half_the_kernels():
    counts = choose_counts(1000, [0.0, 0.0, 0.0], [1.0, 2.0, 2.0])
    assert sum(counts) == 1000
    assert abs(counts[0] - 500) <= 1 and abs(counts[1] - 250) <= 1 and abs(counts[2] - 250) <= 1


def test_rank_with_huge_fixed_cost_gets_no_kernels():
    counts = choose_counts(100, [1000.0, 0.0, 0.0], [1.0, 1.0, 1.0])
    assert counts == (0, 50, 50)


def test_counts_always_sum_to_total():
    rng = random.Random(1)
    for _ in range(200):
        ranks = rng.randint(1, 8)
        total = rng.randint(0, 300)
        a = [rng.uniform(0, 1) for _ in range(ranks)]
        b = [rng.uniform(1e-3, 1) for _ in range(ranks)]
        counts = choose_counts(total, a, b)
        assert len(counts) == ranks and sum(counts) == total and min(counts) >= 0


def test_greedy_matches_brute_force():
    rng = random.Random(0)
    for _ in range(300):
        total = rng.randint(0, 8)
        a = [rng.uniform(0, 2) for _ in range(3)]
        b = [rng.uniform(0.01, 1) for _ in range(3)]
        best = min(
            _objective(c, a, b) for c in itertools.product(range(total + 1), repeat=3) if sum(c) == total
        )
        assert math.isclose(_objective(choose_counts(total, a, b), a, b), best, rel_tol=1e-12)


def test_choose_counts_rejects_mismatched_costs():
    with pytest.raises(ConfigError, match="one cost per rank"):
        choose_counts(10, [0.0, 0.0], [1.0])
    with pytest.raises(ConfigError, match="non-negative"):
        choose_counts(-1, [0.0], [1.0])


# the cost model


def test_kernel_step_follows_the_formula():
    profile = make_profile((1.0, 0.5), kernels=(10,), a=0.1, per_kernel=0.01, gather_bytes=100, rest=0.2,
                           replicated_param_bytes=1000, bandwidth=1e4, latency=0.001)
    profile["layers"][0]["input_grad_bytes"] = 5000
    step, (layer,) = kernel_step(profile, {"conv0": (6, 4)})
    # rank 1 is half as fast; the last layer also carries its replicated part's excess (0.4 - 0.2 s)
    compute = (0.1 + 0.01 * 6, 0.2 + 0.02 * 4 + 0.2)
    # the all-reduce (0.501 s) overlaps the slowest rank's weight gradient, a third of its conv (0.28 s)
    gather, reduce = 0.001 + 2 * 6 * 100 / 1e4, 0.001 + 5000 / 1e4
    comm = gather + reduce - 0.28 / 3
    assert layer.counts == (6, 4)
    assert layer.compute == pytest.approx(compute)
    assert layer.wait == pytest.approx((0.32, 0.0))
    assert layer.comm == pytest.approx(comm)
    assert layer.seconds == pytest.approx(0.48 + comm)
    assert step == pytest.approx(0.48 + comm + 0.2 + 0.001 + 1000 / 1e4)


def test_input_gradient_all_reduce_hides_behind_the_weight_gradient():
    """An all-reduce shorter than a third of the slowest rank's conv compute costs nothing."""
    profile = make_profile((1.0, 0.5), kernels=(10,), a=0.1, per_kernel=0.01, gather_bytes=100,
                           bandwidth=1e4, latency=0.001)
    profile["layers"][0]["input_grad_bytes"] = 500  # 0.051 s, under 0.28 / 3 s
    _, (layer,) = kernel_step(profile, {"conv0": (6, 4)})
    assert layer.comm == pytest.approx(0.001 + 2 * 6 * 100 / 1e4)


def test_slow_replicated_part_is_balanced_in_the_last_layer():
    """A rank whose replicated part is slower takes fewer kernels of the last layer only."""
    profile = make_profile((1.0, 1.0), kernels=(20, 20), a=0.0, per_kernel=0.01, rest=0.01)
    profile["rest_seconds"] = [0.01, 0.05]
    counts = make_plan(profile, strategy="kernel").counts()
    assert counts["conv0"] == (10, 10)
    assert counts["conv1"] == (12, 8)  # 0.12 s = 0.08 s + 0.04 s of extra replicated work


def test_rank_with_no_kernels_still_pays_one():
    profile = make_profile((1.0, 1.0), kernels=(10,), a=0.0, per_kernel=0.5)
    _, (layer,) = kernel_step(profile, {"conv0": (10, 0)})
    assert layer.compute == pytest.approx((5.0, 0.5))


def test_one_rank_kernel_step_is_single_step():
    profile = make_profile((1.0, 0.3, 2.0))
    for r in range(3):
        counts = {layer["name"]: tuple(layer["kernels"] if q == r else 0 for q in range(3)) for layer in profile["layers"]}
        step, layers = kernel_step(profile, counts, [r])
        assert step == single_step(profile, r)
        assert all(layer.comm == 0.0 for layer in layers)


def test_ddp_step_follows_the_formula():
    profile = make_profile((1.0, 0.5), kernels=(10,), a=0.1, per_kernel=0.01, rest=0.2, param_bytes=1e6,
                           bandwidth=1e8, latency=0.001)
    slowest = 0.2 + 0.02 * 10 + 0.4
    assert single_step(profile, 1) == pytest.approx(slowest)
    assert ddp_step(profile) == pytest.approx(slowest / 2 + 0.001 + 1e6 / 1e8)
    # sized to the devices: rank 0 is twice as fast, so it takes 2/3 of the batch and both finish together
    fast = single_step(profile, 0)
    assert make_plan(profile).ddp_shares == pytest.approx((slowest / (fast + slowest), fast / (fast + slowest)))
    assert ddp_step(profile, (2, 1)) == pytest.approx(max(fast * 2 / 3, slowest / 3) + 0.001 + 1e6 / 1e8)
    assert make_plan(profile).ddp_sized == pytest.approx(fast * slowest / (fast + slowest) + 0.001 + 1e6 / 1e8)


# the planner


def test_equal_fast_ranks_with_cheap_links_shard_kernels():
    plan = make_plan(make_profile((1.0, 1.0, 1.0)))
    assert plan.strategy == "kernel"
    assert plan.ranks == (0, 1, 2) and plan.dropped == ()
    assert plan.speedup("single") > 2
    assert plan.speedup("ddp") > 1
    assert set(plan.predicted) == set(STRATEGIES)


def test_very_slow_link_runs_on_one_device():
    plan = make_plan(make_profile((1.0, 1.0, 1.0), bandwidth=1e5))
    assert plan.strategy == "single"
    assert plan.ranks == (0,) and plan.dropped == (1, 2)  # the kernel plan keeps one rank
    assert plan.predicted["kernel"] == plan.predicted["single"] < plan.predicted["ddp"]
    kept = make_plan(make_profile((1.0, 1.0, 1.0), bandwidth=1e5), allow_drop=False)
    assert kept.strategy == "single" and kept.predicted["kernel"] > kept.predicted["single"]
    assert plan.speedup("single") == 1.0


def test_huge_activations_and_small_model_choose_ddp():
    plan = make_plan(make_profile((1.0, 1.0, 1.0), gather_bytes=10_000_000, param_bytes=1000))
    assert plan.strategy == "ddp"
    assert plan.predicted["ddp"] < plan.predicted["kernel"]
    assert plan.predicted["ddp"] < plan.predicted["single"]


def test_very_slow_device_is_dropped():
    profile = make_profile((1.0, 1.0, 0.01))
    plan = make_plan(profile)
    assert plan.strategy == "kernel"
    assert plan.ranks == (0, 1) and plan.dropped == (2,)
    assert all(layer.counts[2] == 0 and layer.compute[2] == 0.0 for layer in plan.layers)
    text = format_plan(plan)
    assert "cpu@2 (rank 2) gets no kernels: it would slow the step" in text
    assert "strategy: kernel" in text
    kept = make_plan(profile, allow_drop=False)
    assert kept.ranks == (0, 1, 2) and kept.dropped == ()
    assert kept.predicted["kernel"] > plan.predicted["kernel"]
    assert "gets no kernels" not in format_plan(kept)


def test_auto_is_never_slower_than_the_best_single_device():
    rng = random.Random(7)
    for _ in range(30):
        world = rng.randint(1, 6)
        profile = make_profile(
            [rng.uniform(0.05, 1.0) for _ in range(world)],
            kernels=[rng.randint(1, 600) for _ in range(rng.randint(1, 5))],
            a=rng.uniform(0, 0.01),
            per_kernel=rng.uniform(1e-6, 1e-3),
            gather_bytes=rng.choice([100, 10_000, 1_000_000]),
            param_bytes=rng.choice([1e3, 1e6, 1e8]),
            bandwidth=10 ** rng.uniform(5, 10),
        )
        for allow_drop in (True, False):
            plan = make_plan(profile, allow_drop=allow_drop)
            best = min(single_step(profile, r) for r in range(world))
            assert plan.predicted["single"] == best == single_step(profile, plan.best_single)
            assert plan.predicted[plan.strategy] == min(plan.predicted.values()) <= best
        assert make_plan(profile).predicted["kernel"] <= best


def test_planned_counts_beat_equal_shares_on_uneven_devices():
    profile = make_profile((1.0, 0.5, 0.25))
    plan = make_plan(profile, allow_drop=False)
    equal = {
        layer["name"]: tuple(layer["kernels"] // 3 + (r < layer["kernels"] % 3) for r in range(3))
        for layer in profile["layers"]
    }
    assert kernel_step(profile, equal)[0] > plan.predicted["kernel"]
    assert kernel_step(profile, plan.counts(), plan.ranks)[0] == plan.predicted["kernel"]


def test_named_strategy_is_chosen_and_all_predictions_filled():
    plan = make_plan(make_profile((1.0, 1.0, 1.0)), strategy="single")
    assert plan.strategy == "single"
    assert set(plan.predicted) == set(STRATEGIES)
    assert plan.speedup("kernel") < 1
    assert "strategy: single" in format_plan(plan)


def test_one_device_profile_has_no_ddp():
    plan = make_plan(make_profile((1.0,)))
    assert plan.strategy == "single"  # a kernel plan on one rank is that device alone
    assert plan.predicted["kernel"] == plan.predicted["single"]
    assert "ddp" not in plan.predicted
    assert plan.sync == 0.0 and all(layer.comm == 0.0 for layer in plan.layers)
    assert "over ddp" not in format_plan(plan)
    with pytest.raises(ConfigError, match="ddp"):
        make_plan(make_profile((1.0,)), strategy="ddp")


def test_format_plan_lists_every_layer_and_device():
    plan = make_plan(make_profile((1.0, 0.5, 0.5)))
    text = format_plan(plan)
    for layer in plan.layers:
        assert f"{layer.name}: {sum(layer.counts)} kernels" in text
        for r in range(3):
            assert any(line.split()[:3] == [str(r), f"cpu@{r}", str(layer.counts[r])] for line in text.splitlines())
    for strategy, seconds in plan.predicted.items():
        assert f"{strategy} {seconds * 1e3:.2f} ms" in text
    assert f"{plan.speedup('single'):.2f}x over the best single device" in text


def test_to_json_round_trips():
    plan = make_plan(make_profile((1.0, 1.0, 0.01)))
    data = plan.to_json()
    assert json.loads(json.dumps(data)) == data
    assert data["strategy"] == plan.strategy and data["dropped"] == [2]
    assert data["layers"][1]["counts"] == list(plan.layers[1].counts)
    assert data["predicted"] == plan.predicted


# bad input


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda p: p.update(version=3), "version 3"),
        (lambda p: p["layers"][0]["a"].pop(), "'conv0': a has 2 entries"),
        (lambda p: p["layers"][1]["b"].append(1.0), "'conv1': b has 4 entries"),
        (lambda p: p["rest_seconds"].pop(), "rest_seconds has 2 entries"),
        (lambda p: p.pop("param_bytes"), "lacks param_bytes"),
        (lambda p: p.update(links={}), "no 'all_gather' link"),
    ],
)
def test_bad_profiles_raise_config_error(breakage, message):
    profile = make_profile((1.0, 1.0, 1.0))
    breakage(profile)
    with pytest.raises(ConfigError, match=message):
        make_plan(profile)


def test_bad_counts_and_strategy_raise_config_error():
    profile = make_profile((1.0, 1.0), kernels=(10,))
    with pytest.raises(ConfigError, match="summing to 10"):
        kernel_step(profile, {"conv0": (5, 4)})
    with pytest.raises(ConfigError, match="outside"):
        kernel_step(profile, {"conv0": (5, 5)}, [0])
    with pytest.raises(ConfigError, match="no kernel counts"):
        kernel_step(profile, {})
    with pytest.raises(ConfigError, match="subset"):
        kernel_step(profile, {"conv0": (5, 5)}, [0, 2])
    with pytest.raises(ConfigError, match="strategy"):
        make_plan(profile, strategy="fastest")
