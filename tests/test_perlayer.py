"""The per-layer planner on hand-made profiles: each group's mode, the splits, the predicted step."""

from __future__ import annotations

import pytest

from convshard import perlayer
from convshard.plan import format_plan, make_plan


def _profile(speeds=(1.0, 1.0)) -> dict:
    """Three groups in a chain: A's output is huge (1e8 bytes) and its weights
    tiny, B's output small, C's weights huge (1e8 bytes). Links: no latency, 1 GB/s."""

    def layer(name, out_bytes, readers, params, in_bytes=0):
        return {"name": name, "kernels": 64, "a": [0.0 for _ in speeds], "b": [1e-3 / s for s in speeds],
                "gather_bytes_per_kernel": out_bytes / 64, "input_grad_bytes": 0,  # the kernel strategy's model
                "input_grad_scatter_bytes": in_bytes, "batch_rows": 32,
                "batch_seconds": [0.032 / s for s in speeds], "param_bytes": params, "batchnorms": 0,
                "inputs": [], "outputs": [{"bytes": out_bytes, "elements": 1, "convs": readers,
                                           "whole": not readers}]}

    link = {"latency": 0.0, "bandwidth": 1e9}
    return {"version": 2, "batch_size": 64, "devices": [f"cpu@{r}" for r in range(len(speeds))],
            "layers": [layer("A", 1e8, ["B"], 1e3), layer("B", 1e4, ["C"], 1e3, 1e8), layer("C", 1e3, [], 1e8, 1e4)],
            "rest_seconds": [0.01 for _ in speeds], "param_bytes": 1e8 + 2e3, "replicated_param_bytes": 0,
            "links": {k: dict(link) for k in ("all_gather", "all_reduce", "reduce_scatter", "broadcast",
                                                 "all_to_all")}}


def test_activation_heavy_groups_split_the_batch_weight_heavy_ones_the_kernels():
    profile = _profile()
    best = perlayer.search(profile)
    assert best.modes == {"A": "batch", "B": "batch", "C": "kernel"}
    assert best.rows == (32, 32) and best.kernel_counts() == {"C": (32, 32)}
    # compute 3 x 32 ms; B's output gathered (1e4 B) and its gradient reduce-scattered;
    # C's output gathered whole (1e3 B); rest 10 ms; A's and B's weight gradients summed (2e3 B)
    assert best.step == pytest.approx(0.096 + 2e-5 + 1e-6 + 0.01 + 2e-6)
    every_batch = perlayer.evaluate(profile, {"A": "batch", "B": "batch", "C": "batch"})
    every_kernel = perlayer.evaluate(profile, {})
    assert every_batch.step == pytest.approx(0.096 + 1e-6 + 0.01 + (1e8 + 2e3) / 1e9)  # C's gradients: 100 ms
    assert every_kernel.step == pytest.approx(0.096 + 0.2 + 2e-5 + 1e-6 + 0.01)  # A's output: 2 x 100 ms
    assert every_batch.describe() == "batch" and every_kernel.describe() == "kernel" and best.describe() == "mixed"


def test_a_kernel_group_feeding_a_batch_group_pays_an_all_to_all_each_way():
    profile = _profile()
    plan = perlayer.evaluate(profile, {"A": "kernel", "B": "batch", "C": "batch"})
    a = plan.groups[0]
    assert a.mode == "kernel" and a.comm == pytest.approx(2 * (1e8 / 2) / 1e9)


def test_rows_follow_the_devices_speed():
    profile = _profile(speeds=(3.0, 1.0))
    assert perlayer.sized_rows(profile, {"A": "batch"}) == (48, 16)
    plan = perlayer.evaluate(profile, {"A": "batch", "B": "batch", "C": "batch"})
    assert plan.rows == (48, 16)
    assert plan.groups[0].compute == pytest.approx((0.032 / 3 * 48 / 32, 0.032 * 16 / 32))


def test_make_plan_chooses_the_per_layer_plan_and_prints_it():
    job_plan = make_plan(_profile())
    assert job_plan.strategy == "layers"
    assert job_plan.predicted["layers"] < min(job_plan.predicted["kernel"], job_plan.predicted["ddp"])
    # on every rank, the kernel strategy's own model agrees with the per-layer model of an all-kernel plan
    every_rank = make_plan(_profile(), allow_drop=False)
    assert every_rank.predicted["kernel"] == pytest.approx(perlayer.evaluate(_profile(), {}).step)
    text = format_plan(job_plan)
    assert "per-layer plan (mixed), rows per rank of the batch: [32, 32]" in text
    assert [line.split()[:2] for line in text.splitlines() if line.strip().startswith(("A ", "B ", "C "))] == [
        ["A", "batch"], ["B", "batch"], ["C", "kernel"]]
    assert "strategy: layers" in text


def test_the_optimizer_step_counts_the_weights_each_rank_holds():
    """Batch-mode groups update their whole weights on every rank, kernel-mode
    groups only the rank's own kernels: at 1 ns per byte, A and B whole (2e3
    bytes) and half of C (5e7)."""
    profile = {**_profile(), "update_seconds_per_byte": [1e-9, 1e-9]}
    plan = perlayer.evaluate(profile, {"A": "batch", "B": "batch", "C": "kernel"})
    assert plan.update == pytest.approx((2e3 + 5e7) * 1e-9)
    assert plan.step == pytest.approx(perlayer.evaluate(_profile(), plan.modes).step + plan.update)
