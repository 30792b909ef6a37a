"""The planner: the exact search over modes, the candidates over device subsets, and auto's rules."""

from __future__ import annotations

import itertools
import random

import pytest
from helpers import make_profile, random_profile

from convshard import plan
from convshard.plan import cost, explain, search


def _chain(speeds=(1.0, 1.0)) -> dict:
    """Three groups in a chain: A's output is huge (1e8 bytes) and its weights
    tiny, B's output small, C's weights huge (1e8 bytes). Links: no latency, 1 GB/s."""
    def layer(name, out_bytes, readers, params):
        return {"name": name, "kernels": 64, "a": [0.0 for _ in speeds], "b": [1e-3 / s for s in speeds],
                "gather_bytes_per_kernel": 0, "input_grad_bytes": 0, "input_grad_scatter_bytes": 0, "batch_rows": 32,
                "batch_seconds": [0.032 / s for s in speeds], "param_bytes": params, "batchnorms": 0,
                "inputs": [], "outputs": [{"bytes": out_bytes, "elements": 1, "convs": readers, "whole": not readers}]}

    link = {"latency": 0.0, "bandwidth": 1e9}
    return {"version": 2, "batch_size": 64, "devices": [f"cpu@{r}" for r in range(len(speeds))],
            "layers": [layer("A", 1e8, ["B"], 1e3), layer("B", 1e4, ["C"], 1e3), layer("C", 1e3, [], 1e8)],
            "rest_seconds": [0.01 for _ in speeds], "param_bytes": 1e8 + 2e3, "replicated_param_bytes": 0,
            "links": {k: dict(link) for k in ("all_gather", "all_reduce", "reduce_scatter", "broadcast",
                                                 "all_to_all", "ddp_all_reduce")}}


def _layers(found):
    return next(c for c in found if c.name == "layers")


def test_activation_heavy_groups_split_the_batch_weight_heavy_ones_the_kernels():
    profile = _chain()
    best = _layers(search.candidates(profile))
    assert best.plan.batch_groups() == ("A", "B") and best.plan.kernel_counts() == {"C": (32, 32)}
    assert best.plan.rows == (32, 32)
    # compute 3 x 32 ms; B's output to C's kernels: gathered (1e4 B) and its gradient reduce-scattered (1e4 B);
    # C's output gathered whole (1e3 B, padded: 2 x 32 / 64); rest 10 ms; A's and B's weight gradients (2e3 B)
    assert best.prediction.step == pytest.approx(0.096 + 2e-5 + 1e-6 + 0.01 + 2e-6)
    groups = {layer["name"]: 64 for layer in profile["layers"]}
    batch = plan.kernel_split(profile["devices"], groups, 64, modes=dict.fromkeys(groups, "batch"))
    assert cost.predict(profile, batch).step == pytest.approx(0.096 + 1e-6 + 0.01 + (1e8 + 2e3) / 1e9)
    kernel = plan.kernel_split(profile["devices"], groups, 64)
    assert cost.predict(profile, kernel).step == pytest.approx(0.096 + 0.2 + 2e-5 + 1e-6 + 0.01)


def test_a_kernel_group_feeding_a_batch_group_pays_an_all_to_all_each_way():
    profile = _chain()
    groups = {layer["name"]: 64 for layer in profile["layers"]}
    job = plan.kernel_split(profile["devices"], groups, 64, modes={"B": "batch", "C": "batch"})
    assert cost.predict(profile, job).groups["A"] == pytest.approx(0.032 + 2 * (1e8 / 2) / 1e9)


def test_rows_follow_the_devices_speed():
    assert search.sized_rows(_chain(speeds=(3.0, 1.0))) == (48, 16)


@pytest.mark.parametrize("seed", range(16))
def test_the_programme_finds_the_plan_exhaustive_enumeration_finds(seed):
    rng = random.Random(seed)
    profile = random_profile(rng, groups=rng.randint(1, 7), world=rng.randint(2, 3))
    counts, rows = search.sized_counts(profile), search.sized_rows(profile)
    names = [layer["name"] for layer in profile["layers"]]
    groups = {layer["name"]: layer["kernels"] for layer in profile["layers"]}

    def step(modes):
        job = plan.kernel_split(profile["devices"], groups, 64, counts=counts, modes=modes, rows=rows)
        return cost.predict(profile, job).step

    every = [dict(zip(names, choice)) for choice in itertools.product(("kernel", "batch"), repeat=len(names))]
    best = min(step(modes) for modes in every)
    assert step(search.best_modes(profile, counts, rows)) == pytest.approx(best, rel=1e-12)


def test_equal_fast_devices_with_cheap_links_split():
    found = search.candidates(make_profile((1.0, 1.0, 1.0)))
    best = search.fastest(found)
    assert best.plan.world == 3 and best.name in ("kernel", "layers")
    single = next(c for c in found if c.name == "single")
    assert single.prediction.step / best.prediction.step > 2


def test_a_very_slow_link_runs_one_device():
    found = search.candidates(make_profile((1.0, 1.0, 1.0), bandwidth=1e5))
    assert search.fastest(found).name == "single"
    kept = search.candidates(make_profile((1.0, 1.0, 1.0), bandwidth=1e5), can_drop=False)
    alone = search.fastest(kept)
    assert alone.name == "single" and alone.plan.ranks == (0,)  # under torchrun: rank 0 trains, the rest stand by


def test_a_very_slow_device_is_left_out():
    found = search.candidates(make_profile((1.0, 1.0, 0.01)))
    best = search.fastest(found)
    assert best.plan.devices == ("cpu@0", "cpu@1")
    kept = search.fastest([c for c in search.candidates(make_profile((1.0, 1.0, 0.01)), can_drop=False)
                           if c.name != "single"])
    assert kept.plan.world == 3 and kept.prediction.step > best.prediction.step


def test_single_is_the_best_device_and_every_prediction_is_the_cost_models():
    """``single`` runs on the device whose step, worked out here from the profile
    by cost.py's formula for one device (sum over groups of a + b K, plus the
    rest and the update), is the least, and is predicted at that step. Every
    other candidate's prediction is a property, not a value: it is exactly
    ``cost.predict`` on the devices it runs on (one cost model, no second one
    in the search)."""
    rng = random.Random(7)
    for _ in range(20):
        world = rng.randint(1, 5)
        profile = make_profile([rng.uniform(0.05, 1.0) for _ in range(world)],
                               kernels=[rng.randint(5, 600) for _ in range(rng.randint(1, 4))],
                               a=rng.uniform(0, 0.01), per_kernel=rng.uniform(1e-6, 1e-3),
                               gather_bytes=rng.choice([100, 10_000, 1_000_000]),
                               param_bytes=rng.choice([1e6, 1e8]), bandwidth=10 ** rng.uniform(5, 10))
        for can_drop in (True, False):
            found = search.candidates(profile, can_drop=can_drop)
            single = next(c for c in found if c.name == "single")
            groups_bytes = sum(layer["param_bytes"] for layer in profile["layers"])
            alone = [sum(layer["a"][r] + layer["b"][r] * layer["kernels"] for layer in profile["layers"])
                     + profile["rest_seconds"][r] + profile["update_seconds_per_byte"][r] * groups_bytes
                     for r in range(world)]
            assert single.plan.devices == (profile["devices"][alone.index(min(alone))],)
            assert single.prediction.step == pytest.approx(min(alone), rel=1e-12)
            for c in found:  # each candidate priced by the one model on the devices it runs on
                ranks = [int(d.removeprefix("cpu@")) for d in c.plan.devices]
                assert c.prediction.step == cost.predict(search.restrict(profile, ranks), c.plan).step


def test_batchnorm_is_read_from_the_profile():
    assert not search.has_batchnorm(make_profile())
    assert search.has_batchnorm(make_profile(batchnorms=1))
    assert search.has_batchnorm({**make_profile(), "batchnorm": True})


def test_worth_trying_keeps_the_plans_within_the_margin():
    found = search.candidates(make_profile((1.0, 1.0)))
    best = search.fastest(found).prediction.step
    tried = search.worth_trying(found)
    assert search.fastest(found) in tried
    assert all(c.prediction.step <= best * (1 + search.TRIAL_MARGIN) for c in tried)
    assert all(c in tried for c in found if c.prediction.step <= best * (1 + search.TRIAL_MARGIN))


def test_format_names_every_candidate_and_the_choice():
    found = search.candidates(_chain())
    chosen = search.fastest(found)
    text = explain.format_candidates(found, chosen, trials={"layers": 0.1})
    for c in found:
        assert f"{c.name:<10} {1e3 * c.prediction.step:9.2f} ms" in text
    assert f"chosen: {chosen.name}" in text and "measured 100.0 ms in its trial" in text
    assert "over ddp" not in text and "busy" in text


def test_format_puts_the_choice_first_and_its_detail_after():
    found = search.candidates(_chain())
    text = explain.format_candidates(found, search.fastest(found))
    lines = text.splitlines()
    assert lines[0].startswith(f"chosen: {search.fastest(found).name}, predicted ") and "x over the best single" in lines[0]
    assert lines[1] == "predicted step per plan:" and text.index("\nplan: ") > text.index(found[-1].name)
    ddp = next(c for c in found if c.plan.engine == plan.DDP)
    assert "over ddp" not in explain.format_candidates(found, ddp)  # a ddp plan is not compared with itself
    alone = next(c for c in found if c.name == "single")
    assert explain.format_candidates(found, alone).splitlines()[0] == \
        f"chosen: single, predicted {1e3 * alone.prediction.step:.2f} ms"


def test_the_chosen_plan_has_one_name_in_the_header_and_the_table():
    """The layers search can find every group in batch mode: the header names the
    plan as its table does (batch), and the candidate's line says what it found."""
    profile = make_profile(speeds=(1.0, 1.0), kernels=(8, 16))
    groups = {"conv0": 8, "conv1": 16}
    batch = plan.kernel_split(profile["devices"], groups, 64, modes=dict.fromkeys(groups, "batch"))
    found = [search.Candidate("layers", batch, cost.predict(profile, batch))]
    text = explain.format_candidates(found, found[0])
    assert text.startswith("chosen: batch, predicted ") and "\nplan: batch (sharded engine)" in text
    assert "chosen: layers" not in text and "on cpu@0, cpu@1 (a batch plan)" in text


def test_ddp_left_out_for_batchnorm_says_why_on_its_own_line():
    """For a model with BatchNorm auto leaves ddp out, however fast it is predicted:
    each ddp line says so; no other candidate's does, and without BatchNorm none does."""
    with_bn = make_profile(speeds=(1.0, 1.0), kernels=(8, 16), batchnorms=1)
    found = search.candidates(with_bn)
    left_out = explain.left_out_of_auto(found, with_bn)
    assert set(left_out) == {c.name for c in found if c.plan.engine == plan.DDP} == {"ddp", "ddp sized"}
    text = explain.format_candidates(found, search.fastest(search.auto_candidates(found, with_bn)), left_out=left_out)
    lines = text.splitlines()
    why = "not chosen: BatchNorm over each rank's rows is another model's maths"
    assert [line.split()[0] for line in lines if why in line] == ["ddp", "ddp"]
    assert explain.left_out_of_auto(search.candidates(make_profile(speeds=(1.0, 1.0))), make_profile()) == {}


def test_a_device_given_no_work_is_shown_as_not_used():
    profile = make_profile(speeds=(1.0, 1.0), kernels=(8, 16))
    job = plan.kernel_split(profile["devices"], {"conv0": 8, "conv1": 16}, 64, counts={"conv0": (8, 0),
                                                                                      "conv1": (16, 0)})
    assert plan.idle_ranks(job) == (1,)
    assert "not used: cpu@1 (rank 1: no kernels, no rows)" in plan.describe(job)
    text = explain.format_candidates([search.Candidate("kernel", job, cost.predict(profile, job))],
                                    search.Candidate("kernel", job, cost.predict(profile, job)))
    assert "cpu@1 not used" in text and "cpu@0 busy" in text and "cpu@1 busy" not in text
    mixed = plan.kernel_split(profile["devices"], {"conv0": 8, "conv1": 16}, 64, counts={"conv1": (16, 0)},
                              modes={"conv0": "batch"}, rows=(64, 0))
    assert plan.idle_ranks(mixed) == (1,)
    working = plan.kernel_split(profile["devices"], {"conv0": 8, "conv1": 16}, 64, counts={"conv1": (16, 0)},
                                modes={"conv0": "batch"}, rows=(60, 4))
    assert plan.idle_ranks(working) == ()
