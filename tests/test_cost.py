"""The one cost model: ``cost.predict`` on hand-made profiles, its formulas and its invariants."""

from __future__ import annotations

from dataclasses import replace

import pytest
from helpers import make_profile

from convshard import plan
from convshard.errors import ConfigError
from convshard.plan import cost, search


def _groups(profile) -> dict[str, int]:
    return {layer["name"]: layer["kernels"] for layer in profile["layers"]}


def test_kernel_mode_follows_the_formula():
    profile = make_profile((1.0, 0.5), kernels=(10,), a=0.1, per_kernel=0.01, gather_bytes=100, rest=0.2,
                           replicated_param_bytes=1000, bandwidth=1e4, latency=0.001)
    profile["layers"][0]["inputs"] = [{"bytes": 5000, "grad": True}]
    job = plan.kernel_split(profile["devices"], _groups(profile), 64, counts={"conv0": (6, 4)})
    p = cost.predict(profile, job)
    compute = (0.1 + 0.01 * 6, 0.2 + 0.02 * 4)  # rank 1 is half as fast
    gather = 0.001 + 2 * 6 * 100 * 10 / 10 / 1e4  # the output, padded to the largest share, read whole
    reduce = 0.001 + 5000 / 1e4 - max(compute) / 3  # beyond the weight gradient, a third of the slowest compute
    assert p.groups["conv0"] == pytest.approx(max(compute) + gather + reduce)
    assert p.collectives == pytest.approx({"all_gather": gather, "all_reduce": reduce})
    assert p.rest == pytest.approx(0.4)  # every rank runs the rest; the slower one sets the pace
    assert p.broadcast == pytest.approx(0.001 + 1000 / 1e4)
    assert p.step == pytest.approx(max(compute) + gather + reduce + 0.4 + p.broadcast)
    assert p.busy == pytest.approx((compute[0] + 0.2, compute[1] + 0.4))


def test_rank_with_no_kernels_still_pays_one():
    profile = make_profile((1.0, 1.0), kernels=(10,), a=0.0, per_kernel=0.5)
    job = plan.kernel_split(profile["devices"], _groups(profile), 64, counts={"conv0": (10, 0)})
    assert cost.predict(profile, job).busy[1] == pytest.approx(0.5 + profile["rest_seconds"][1])


def test_batch_mode_and_the_gradient_sum():
    profile = make_profile((1.0, 1.0), kernels=(8, 8), a=0.0, per_kernel=1e-3, update=1e-9, batchnorms=1,
                           latency=1e-3, bandwidth=1e9, param_bytes=2e6 + 10_000)
    modes = {"conv0": "batch", "conv1": "batch"}
    job = plan.kernel_split(profile["devices"], _groups(profile), 64, modes=modes, rows=(40, 24))
    p = cost.predict(profile, job)
    t = profile["layers"][0]["batch_seconds"][0]
    assert p.groups["conv0"] == pytest.approx(t * 40 / 32 + 2 * 1e-3)  # rows 40 of the timed 32, two BN meetings
    assert p.gradient_sum == pytest.approx(1e-3 + 2e6 / 1e9)  # both groups' weights, one all-reduce
    assert p.update == pytest.approx(2 * 1e-9 * 1e6)  # every rank updates every batch-mode weight


def test_one_device_is_the_same_formula_without_links():
    profile = make_profile((0.5,), kernels=(10, 20), a=0.1, per_kernel=0.01, rest=0.2, update=1e-9)
    p = cost.predict(profile, plan.single("cpu@0", _groups(profile), 64))
    groups = (0.2 + 0.02 * 10) + (0.2 + 0.02 * 20)
    assert p.step == pytest.approx(groups + 0.4 + 2e-9 * profile["layers"][0]["param_bytes"] * 2)
    assert p.collectives == {} and p.broadcast == 0.0


def test_equal_plans_get_equal_predictions_however_written():
    profile = make_profile((1.0, 0.5, 0.25), kernels=(12, 24))
    groups, devices = _groups(profile), profile["devices"]
    by_shares = plan.kernel_split(devices, groups, 64, shares=[4, 2, 1])
    by_counts = plan.kernel_split(devices, groups, 64, counts=by_shares.kernel_counts())
    as_modes = plan.kernel_split(devices, groups, 64, shares=[4, 2, 1], modes={"conv0": "kernel"})
    from_file = plan.from_json({"strategy": "kernel", "devices": ",".join(devices), "shares": [4, 2, 1]},
                               groups=groups, batch_size=64)
    steps = {cost.predict(profile, p).step for p in (by_shares, by_counts, as_modes, from_file)}
    assert len(steps) == 1
    ddp = cost.predict(profile, plan.ddp(devices, groups, 64)).step
    assert ddp == cost.predict(profile, plan.from_json(plan.ddp(devices, groups, 64).to_json(), groups=groups,
                                                       batch_size=64)).step


def test_ddp_overlaps_its_all_reduce_with_backward():
    profile = make_profile((1.0, 0.5), kernels=(10,), a=0.1, per_kernel=0.01, rest=0.2, param_bytes=1e6,
                           bandwidth=1e7, latency=0.001)
    groups = _groups(profile)
    job = plan.ddp(profile["devices"], groups, 64)
    t = profile["layers"][0]["batch_seconds"]
    conv = [t[r] * 32 / 32 for r in range(2)]
    busy = [conv[r] + profile["rest_seconds"][r] * 32 / 64 for r in range(2)]
    all_reduce = 0.001 + 1e6 / 1e7
    steps = [busy[r] + all_reduce - cost.OVERLAP * min(all_reduce, 2 / 3 * conv[r]) for r in range(2)]
    p = cost.predict(profile, job)
    assert p.step == pytest.approx(max(steps))
    assert p.busy == pytest.approx(tuple(busy))
    assert p.gradient_sum < all_reduce  # the part of the all-reduce backward does not hide


def test_a_plan_that_does_not_fit_the_profile_is_refused():
    profile = make_profile((1.0, 1.0), kernels=(10,))
    with pytest.raises(ConfigError, match="measured 2 devices, the plan runs on 1"):
        cost.predict(profile, plan.single("cpu@0", _groups(profile), 64))
    with pytest.raises(ConfigError, match="groups"):
        cost.predict(profile, plan.kernel_split(profile["devices"], {"other": 10}, 64))
    no_links = {**profile, "links": {}}
    with pytest.raises(ConfigError, match="no 'all_gather' link"):
        cost.predict(no_links, plan.kernel_split(profile["devices"], _groups(profile), 64))


def test_single_step_is_the_one_device_plan_on_the_restricted_profile():
    profile = make_profile((1.0, 0.3, 2.0))
    for r in range(3):
        sub = search.restrict(profile, [r])
        assert search.single_step(profile, r) == cost.predict(sub, plan.single(f"cpu@{r}", _groups(profile),
                                                                              64)).step


def test_bytes_per_element_come_from_the_plan_precision():
    """A bf16 plan sends its activations in 2 bytes: every activation byte count of the
    profile halves, the weights' bytes do not, and only the collectives get cheaper."""
    profile = make_profile((1.0, 1.0))
    job = plan.kernel_split(("a", "b"), search.groups_of(profile), profile["batch_size"])
    half = cost.in_precision(profile, "bf16")
    for layer, measured in zip(half["layers"], profile["layers"]):
        for key in cost.ACTIVATION_BYTES:
            assert layer[key] == measured[key] / 2
        assert [o["bytes"] for o in layer["outputs"]] == [o["bytes"] / 2 for o in measured["outputs"]]
        assert layer["param_bytes"] == measured["param_bytes"]
    assert cost.in_precision(profile, "32") is profile
    full, bf16 = cost.predict(profile, job), cost.predict(profile, replace(job, precision="bf16"))
    assert bf16.busy == full.busy and bf16.update == full.update
    assert 0 < sum(bf16.collectives.values()) < sum(full.collectives.values())
    alone = plan.single("a", search.groups_of(profile), profile["batch_size"])
    one = search.restrict(profile, [0])
    assert cost.predict(one, replace(alone, precision="bf16")).step == cost.predict(one, alone).step


def test_bf16_gradient_sums_are_priced_at_half_their_bytes():
    """``grad_precision`` bf16 halves the gradient bytes a batch-mode group's sum and
    DDP's all-reduce send, and nothing else: kernel groups and compute are priced as before."""
    profile = make_profile((1.0, 1.0))
    groups = search.groups_of(profile)
    first = next(iter(groups))
    summed = next(layer["param_bytes"] for layer in profile["layers"] if layer["name"] == first)
    layers = plan.kernel_split(("a", "b"), groups, profile["batch_size"], modes={first: "batch"})
    full, half = cost.predict(profile, layers), cost.predict(profile, replace(layers, grad_precision="bf16"))
    link = profile["links"]["all_reduce"]  # t(n) = latency + n / bandwidth
    assert full.gradient_sum == pytest.approx(link["latency"] + summed / link["bandwidth"], rel=1e-12)
    assert half.gradient_sum == pytest.approx(link["latency"] + summed / 2 / link["bandwidth"], rel=1e-12)
    assert half.busy == full.busy and half.collectives == full.collectives
    assert half.step == pytest.approx(full.step - (full.gradient_sum - half.gradient_sum), rel=1e-12)
    kernel = plan.kernel_split(("a", "b"), groups, profile["batch_size"])
    assert cost.predict(profile, replace(kernel, grad_precision="bf16")) == cost.predict(profile, kernel)
    ddp = plan.ddp(("a", "b"), groups, profile["batch_size"])
    assert cost.predict(profile, replace(ddp, grad_precision="bf16")).step < cost.predict(profile, ddp).step
    found = search.candidates(profile, grad_precision="bf16")
    assert {c.plan.grad_precision for c in found} == {"bf16"}


def test_a_reduce_scatter_the_profile_did_not_measure_runs_at_the_stated_rate():
    """Without a measured reduce-scatter, the all-gather's link at REDUCE_SCATTER_RATE of
    its bandwidth, its latency kept: gloo's reduce-scatter on padded slices measured 0.50-0.66
    of the all-gather's rate (docs/cluster.md), so the rate lies in that range, not at 1."""
    assert 0.5 <= cost.REDUCE_SCATTER_RATE <= 0.66
    profile = make_profile((1.0, 1.0), bandwidth=1e9, latency=1e-5)
    del profile["links"]["reduce_scatter"]
    n = 6e6
    assert cost.transfer(profile, "reduce_scatter", n) == pytest.approx(1e-5 + n / (cost.REDUCE_SCATTER_RATE * 1e9))
    assert cost.transfer(profile, "all_gather", n) == pytest.approx(1e-5 + n / 1e9)
    profile["links"]["reduce_scatter"] = {"latency": 2e-5, "bandwidth": 5e8}  # measured: as measured
    assert cost.transfer(profile, "reduce_scatter", n) == pytest.approx(2e-5 + n / 5e8)
    del profile["links"]["reduce_scatter"], profile["links"]["all_gather"]
    with pytest.raises(ConfigError, match="no 'reduce_scatter' link"):
        cost.transfer(profile, "reduce_scatter", n)


def test_decoding_adds_to_a_cpu_step_once_per_host_and_hides_on_a_gpu():
    """d = 1 ms an image, batch 64: a host decodes each image its ranks feed once, split among them."""
    profile = {**make_profile((1.0, 1.0)), "decode_seconds": 1e-3, "key": {"hosts": ["a", "a"]}}
    devices, groups = profile["devices"], _groups(profile)
    kernel, ddp = plan.kernel_split(devices, groups, 64), plan.ddp(devices, groups, 64)
    without = {k: cost.predict({**profile, "decode_seconds": 0.0}, job) for k, job in (("k", kernel), ("d", ddp))}
    on_one_host = cost.predict(profile, kernel)
    assert on_one_host.data == pytest.approx(0.032) and on_one_host.step == pytest.approx(without["k"].step + 0.032)
    assert on_one_host.to_json()["data"] == on_one_host.data
    two_hosts = {**profile, "key": {"hosts": ["a", "b"]}}
    assert cost.predict(two_hosts, kernel).data == pytest.approx(0.064)  # every host decodes the whole batch
    assert cost.predict(two_hosts, ddp).data == pytest.approx(0.032)  # each host its rows only
    gpus = {**profile, "devices": ["cuda:0", "cuda:1"]}
    assert cost.predict(gpus, kernel).data == 0.0  # 8 ms of loader work per rank hides behind the step
    assert cost.predict({**gpus, "decode_seconds": 1.0}, kernel).step == pytest.approx(32 / cost.LOADER_WORKERS)


def test_chunked_gathers_expose_what_the_schedule_leaves_uncovered():
    """``exposed`` by hand, links of 1 byte/s and no latency: a gather and a
    reduce-scatter of 4 bytes beside readers computing 6 s (F = D = V = 2 s).
    One chunk: the forward waits 4 s, the backward 4 - V = 2 s. Two chunks
    (2 s each): the second arrives at 4 s and its convs end at 5 s, 3 s after
    F; the backward's sums start at 1 s and 2 s and end at 5 s, 1 s after D + V."""
    profile = {"devices": ["a", "b"], "links": {kind: {"latency": 0.0, "bandwidth": 1.0}
                                                for kind in ("all_gather", "reduce_scatter")}}
    assert cost.exposed(profile, 4.0, 4.0, 6.0, 1) == pytest.approx((4.0, 2.0))
    assert cost.exposed(profile, 4.0, 4.0, 6.0, 2) == pytest.approx((3.0, 1.0))
    # a latency per chunk: many chunks of a cheap transfer cost more than one
    profile["links"]["all_gather"]["latency"] = 1.0
    assert cost.exposed(profile, 0.0, 0.0, 6.0, 8)[0] > cost.exposed(profile, 0.0, 0.0, 6.0, 1)[0]


def test_plans_chunk_their_gathers_only_where_transfers_run_beside_compute():
    """Two hosts on a slow link: the planner chunks the gathers into convs,
    and predicts less than for one chunk; the same profile on one host
    (shared memory moves a transfer as it starts) keeps one chunk, priced as before."""
    profile = make_profile((1.0, 1.0), kernels=(64, 128, 64), a=0.02, per_kernel=2e-4, gather_bytes=100_000,
                           bandwidth=1e8)
    job = plan.kernel_split(profile["devices"], search.groups_of(profile), 64)
    one_host = cost.with_chunks(profile, job)
    assert {g.chunks for g in one_host.groups} == {1}
    two_hosts = {**profile, "key": {"hosts": ["h0", "h1"]}}
    chunked = cost.with_chunks(two_hosts, job)
    assert max(g.chunks for g in chunked.groups) > 1
    assert cost.predict(two_hosts, chunked).step < cost.predict(two_hosts, job).step
    assert cost.predict(two_hosts, job).step <= cost.predict(profile, job).step  # one chunk hides the backward's sums
    assert plan.from_json(chunked.to_json(), groups=search.groups_of(profile), batch_size=64) == chunked


def test_each_extra_chunk_costs_its_readers_one_more_call():
    """A group measured at 64 rows in 32.8 ms and at 32 rows in 29.52 ms
    (0.9 of it, not half) has a fixed cost of 26.24 ms per call
    (t(n) = alpha + beta n); a rank with half its kernels pays half. Where
    calls cost more than their transfers (6.4 ms a value, or less), the
    planner keeps one chunk; calls free, it takes more."""
    profile = make_profile((1.0, 1.0), kernels=(64, 128, 64), a=0.02, per_kernel=2e-4, gather_bytes=10_000,
                           bandwidth=1e8)
    job = plan.kernel_split(profile["devices"], search.groups_of(profile), 64)
    profile["key"] = {"hosts": ["h0", "h1"]}
    assert max(g.chunks for g in cost.with_chunks(profile, job).groups) > 1  # make_profile: t(n) = beta n
    for layer in profile["layers"]:
        whole = 0.02 + 2e-4 * layer["kernels"]
        layer["batch_rows"], layer["batch_seconds"] = 32, [0.9 * whole, 0.9 * whole]
    first = profile["layers"][0]
    assert cost.call_seconds(profile, first, (32, 32)) == pytest.approx(0.02624 / 2)
    assert cost.call_seconds(profile, first, (64, 0)) == pytest.approx(0.02624)
    assert {g.chunks for g in cost.with_chunks(profile, job).groups} == {1}
