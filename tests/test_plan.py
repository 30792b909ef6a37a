"""The plan type: every strategy is a value of it; it saves, reads back (old files too) and re-splits."""

from __future__ import annotations

import json

import pytest

from convshard import plan
from convshard.errors import ConfigError

GROUPS = {"features.0": 10, "features.3": 14}


def test_strategies_are_values_of_one_type():
    single = plan.single("cpu@0", GROUPS, 16)
    kernel = plan.kernel_split(["cpu@0", "cpu@1"], GROUPS, 16, shares=[3, 1])
    batch = plan.kernel_split(["cpu@0", "cpu@1"], GROUPS, 16, modes=dict.fromkeys(GROUPS, "batch"), rows=(9, 7))
    mixed = plan.kernel_split(["cpu@0", "cpu@1"], GROUPS, 16, modes={"features.0": "batch"}, rows=(9, 7))
    ddp = plan.ddp(["cpu@0", "cpu@1"], GROUPS, 16, shares=[3, 1])
    assert [p.name for p in (single, kernel, batch, mixed, ddp)] == ["single", "kernel", "batch", "layers", "ddp"]
    assert kernel.kernel_counts() == {"features.0": (8, 2), "features.3": (11, 3)}  # largest remainders
    assert single.kernel_counts() == {"features.0": (10,), "features.3": (14,)} and single.rows == (16,)
    assert ddp.rows == (12, 4) and ddp.engine == plan.DDP and ddp.batch_groups() == tuple(GROUPS)
    assert mixed.batch_groups() == ("features.0",) and mixed.kernel_counts() == {"features.3": (7, 7)}
    assert ddp.rows_of(5) == (4, 1) and ddp.rows_of(16) == (12, 4)


@pytest.mark.parametrize("make", [
    lambda: plan.single("cpu@0-1", GROUPS, 16, threads=2),
    lambda: plan.kernel_split(["cpu@0", "cpu@1", "cpu@1"], GROUPS, 12, counts={"features.0": (6, 4, 0)}),
    lambda: plan.kernel_split(["cpu@0", "cuda:0"], GROUPS, 16, modes={"features.3": "batch"}, rows=(1, 15)),
    lambda: plan.ddp(["cpu@0", "cpu@1"], GROUPS, 16),
    lambda: plan.single("cpu@1", GROUPS, 16, rank=1),
])
def test_to_json_reads_back_the_same_plan(make):
    job = make()
    text = json.dumps(job.to_json())
    assert plan.from_json(json.loads(text), groups=GROUPS, batch_size=99) == job


def test_earlier_job_plans_still_read():
    """The job plans runs wrote before plans had a format: strategy, a --devices string, counts, modes, row weights."""
    def read(saved, batch=16):
        return plan.from_json(saved, groups=GROUPS, batch_size=batch)

    kernel = read({"strategy": "kernel", "devices": "cpu@0,cpu@1", "threads": 1,
                   "layer_counts": {"features.0": [6, 4], "features.3": [7, 7]}, "modes": None, "rows": None,
                   "shares": None})
    assert kernel == plan.kernel_split(["cpu@0", "cpu@1"], GROUPS, 16, counts={"features.0": (6, 4)}, threads=1)
    layers = read({"strategy": "layers", "devices": "cpu@0,cpu@1", "threads": None,
                   "layer_counts": {"features.3": [7, 7]}, "modes": {"features.0": "batch"}, "rows": [10.0, 6.0],
                   "shares": None})
    assert layers.batch_groups() == ("features.0",) and layers.rows == (10, 6)
    ddp = read({"strategy": "ddp", "devices": "cpu@0,cpu@1", "threads": None, "layer_counts": None,
                "modes": None, "rows": None, "shares": [0.75, 0.25]})
    assert ddp == plan.ddp(["cpu@0", "cpu@1"], GROUPS, 16, shares=[0.75, 0.25])
    single = read({"strategy": "single", "devices": "cpu@0-1", "threads": 2, "layer_counts": None}, batch=8)
    assert single == plan.single("cpu@0-1", GROUPS, 8, threads=2)


def test_plans_saved_with_comma_core_sets_read_in_todays_spelling():
    """Before ``+`` joined a worker's cores, plans wrote ``cpu@0,2`` for one
    worker on cores 0 and 2; such files still read, as that one worker."""
    earlier = plan.from_json({"strategy": "kernel", "devices": "cpu@0,2,cpu@1", "threads": None,
                              "layer_counts": None, "modes": None, "rows": None, "shares": None},
                             groups=GROUPS, batch_size=16)
    assert earlier.devices == ("cpu@0+2", "cpu@1")
    saved = plan.kernel_split(["cpu@0+2", "cpu@1", "gpubox/gpu.0"], GROUPS, 15).to_json()
    saved["devices"] = ["cpu@0,2", "cpu@1", "gpubox/gpu.0"]
    assert plan.from_json(saved, groups=GROUPS, batch_size=15).devices == ("cpu@0+2", "cpu@1", "gpubox/gpu.0")


@pytest.mark.parametrize("saved, needle", [
    (None, "not a plan"),
    ([1, 2], "got list"),
    ({"strategy": "fastest", "devices": "cpu"}, "names no strategy"),
    ({"format": 3, "engine": "sharded"}, "KeyError"),
    ({**plan.ddp(["cpu@0", "cpu@1"], GROUPS, 16).to_json(), "engine": "fsdp"}, "engine is one of"),
    ({**plan.single("cpu@0", {"x": 3}, 16).to_json()}, "are not the model's"),
    ({**plan.single("cpu@0", GROUPS, 16).to_json(), "rows": [15]}, "summing to its batch size 16"),
    ({**plan.single("cpu@0", GROUPS, 16).to_json(), "threads": 0}, "threads are a count"),
])
def test_what_is_no_plan_is_named_in_one_line(saved, needle):
    with pytest.raises(ConfigError, match=needle) as info:
        plan.from_json(saved, groups=GROUPS, batch_size=16, source="--plan p.json")
    assert str(info.value).startswith("--plan p.json: ") and "\n" not in str(info.value)


def test_bad_values_are_refused():
    with pytest.raises(ConfigError, match="sum to its 10 kernels"):
        plan.kernel_split(["cpu@0", "cpu@1"], GROUPS, 16, counts={"features.0": (5, 4)})
    with pytest.raises(ConfigError, match="3 weights for 2 devices"):
        plan.kernel_split(["cpu@0", "cpu@1"], GROUPS, 16, shares=[1, 1, 1])
    with pytest.raises(ConfigError, match="no image"):
        plan.ddp(["cpu@0", "cpu@1"], GROUPS, 4, shares=[1, 0])
    with pytest.raises(ConfigError, match="every group in batch mode"):
        plan.Plan(plan.DDP, ("cpu@0",), (plan.GroupSplit("a", 2, plan.KERNEL, (2,)),), (4,), 4)


def test_rebalancing_gives_a_new_value():
    job = plan.kernel_split(["cpu@0", "cpu@1"], GROUPS, 16, modes={"features.0": "batch"}, rows=(8, 8))
    moved = job.resplit({"features.3": (10, 4)}, (11, 5))
    assert moved.kernel_counts() == {"features.3": (10, 4)} and moved.rows == (11, 5)
    assert job.kernel_counts() == {"features.3": (7, 7)} and job.rows == (8, 8)  # the old value stands


def test_describe_shows_every_group():
    text = plan.describe(plan.kernel_split(["cpu@0", "cpu@1"], GROUPS, 16, modes={"features.0": "batch"}))
    assert "plan: layers (sharded engine) on cpu@0, cpu@1" in text
    assert "features.0  batch   all 10 on every rank" in text and "features.3  kernel  [7, 7]" in text


def test_a_plan_file_with_bad_chunks_is_refused_in_one_line():
    """A group's chunks must be a positive integer; a plan file written before chunks existed has one."""
    saved = plan.kernel_split(["cpu@0", "cpu@1"], {"conv": 8}, 4).to_json()
    assert "chunks" not in saved["groups"][0]
    assert plan.from_json(saved, groups={"conv": 8}, batch_size=4).groups[0].chunks == 1
    for bad in (0, "2", 1.5):
        saved["groups"][0]["chunks"] = bad
        with pytest.raises(ConfigError, match=f"group 'conv': chunks {bad!r} is not a positive integer"):
            plan.from_json(saved, groups={"conv": 8}, batch_size=4)
