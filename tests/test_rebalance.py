"""Online rebalancing: moving kernels keeps training exact, and the decision follows the busy times."""

from __future__ import annotations

import copy
import os
from dataclasses import replace

import pytest
import torch
from torch import nn

import convshard
from convshard import plan
from convshard.models import build_model
from convshard.parallel.reshard import reshard
from convshard.plan import cost, memory
from convshard.run.config import Job, TrainConfig, job_of, load_data
from convshard.run.launch import init_from_env, launch_local
from convshard.run.local import launch_job
from convshard.run.rebalance import Rebalancer, parse_mode
from convshard.run.train import train_worker
from helpers import make_profile

SHAPE = (3, 16, 16)
KERNELS = (6, 10)


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: range, sharded: bool) -> None:
    for step in steps:
        gen = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, *SHAPE, generator=gen), torch.randint(0, 10, (8,), generator=gen)
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        if sharded:
            convshard.sync_replicas(model)
        optimizer.step()


def _reshard_worker(optimizer_name: str, new_counts: dict) -> dict:
    """Train 3 steps on an even split, re-split, train 3 more; compare with one device."""
    torch.set_num_threads(1)
    init_from_env("gloo", timeout=120)
    torch.manual_seed(0)
    reference = build_model("paper", SHAPE, 10, KERNELS)
    model = convshard.shard_model(copy.deepcopy(reference))
    make = ((lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)) if optimizer_name == "sgd"
            else (lambda p: torch.optim.Adam(p, lr=1e-3)))
    opt_ref, opt = make(reference.parameters()), make(model.parameters())
    _train(reference, opt_ref, range(6), sharded=False)
    _train(model, opt, range(3), sharded=True)
    reshard(model, opt, new_counts)
    counts = convshard.parallel.sharded.layer_counts(model)
    local = {n: tuple(p.shape) for n, p in model.named_parameters()}
    _train(model, opt, range(3, 6), sharded=True)
    full = convshard.full_state_dict(model)
    error = max((full[k] - v).abs().max().item() for k, v in reference.state_dict().items())
    return {"error": error, "counts": {n: list(c) for n, c in counts.items()}, "local": local}


@pytest.mark.parametrize("optimizer_name", ["sgd", "adam"])
def test_reshard_mid_training_matches_one_device(optimizer_name):
    """Kernels and their optimizer state move between ranks; the weights still equal one device's."""
    new_counts = {"features.0": (5, 1), "features.3": (2, 8)}
    reports = launch_local(_reshard_worker, 2, args=(optimizer_name, new_counts), timeout=180)
    for rank, report in enumerate(reports):
        assert report["error"] < 1e-5, (rank, report)
        assert report["counts"] == {"features.0": [5, 1], "features.3": [2, 8]}
        assert report["local"]["features.3.weight"][0] == new_counts["features.3"][rank]


def _profile(speeds=(1.0, 1.0), kernels=(12, 24)) -> dict:
    """Groups whose kernels cost 1 ms each at speed 1, nothing else costing
    time: no fixed cost, rest or optimizer, links that move bytes at once."""
    return make_profile(speeds, kernels=kernels, a=0.0, per_kernel=1e-3, rest=0.0, bandwidth=1e30, latency=0.0)


def _plan(counts: dict, *, modes=None, rows=None) -> plan.Plan:
    world = len(next(iter(counts.values())))
    groups = {name: sum(c) for name, c in counts.items()}
    return plan.kernel_split([f"cpu@{r}" for r in range(world)], groups, 64, counts=counts, modes=modes, rows=rows)


def test_new_counts_follow_the_busy_times():
    """Rank 0 was busy twice as long for the same work: it gets a third of each
    group, and the cost model predicts the step falls from 36 to 24 ms."""
    job = _plan({"conv0": (6, 6), "conv1": (12, 12)})
    balancer = Rebalancer(_profile(), "auto")
    predicted = cost.predict(_profile(), job).busy  # equal: same speeds, same counts
    new, reason = balancer.decide([2 * predicted[0], predicted[1]], job)
    assert new.kernel_counts() == {"conv0": (4, 8), "conv1": (8, 16)}
    # before: max(2 * 6, 6) + max(2 * 12, 12) = 36 ms; after: max(2 * 4, 8) + max(2 * 8, 16) = 24 ms
    assert reason.endswith("predicted gain 50%") and reason.startswith("imbalance 33%")
    assert balancer.decide(list(predicted), job) is None  # as predicted: nothing to move


def test_batch_rows_move_with_the_kernels():
    """A kernel group and a batch-mode group: rank 0, twice as slow, gives
    away kernels and rows. 64 rows split to minimise max(2 b_0, b_1): 21
    and 43 (max 43; 22 and 42 would give 44)."""
    job = _plan({"conv0": (6, 6), "conv1": (12, 12)}, modes={"conv1": "batch"}, rows=(32, 32))
    predicted = cost.predict(_profile(), job).busy
    new, _ = Rebalancer(_profile(), "auto").decide([2 * predicted[0], predicted[1]], job)
    assert new.kernel_counts() == {"conv0": (4, 8)} and new.rows == (21, 43) and new.batch_size == 64
    assert new.batch_groups() == ("conv1",)  # modes kept


def test_auto_moves_kernels_only_for_a_real_gain():
    """Mode auto re-splits when the cost model predicts the step falls by 3%
    or more; mode N re-splits whenever the split changes."""
    job = _plan({"conv0": (50, 50), "conv1": (100, 100)})
    profile = _profile(kernels=(100, 200))
    busy = cost.predict(profile, job).busy
    assert Rebalancer(profile, "auto").decide([busy[0], 1.02 * busy[1]], job) is None  # 1% to gain: noise
    every = Rebalancer(profile, 5).decide([busy[0], 1.02 * busy[1]], job)
    assert every is not None and every[0].kernel_counts()["conv1"][1] < 100 and "every 5 steps" in every[1]
    moved, reason = Rebalancer(profile, "auto").decide([busy[0], 1.2 * busy[1]], job)
    # b_1 = 1.2 b_0: c_1 / c_0 = 1 / 1.2, exactly (55, 45) and (109, 91); in blocks of kernels (splits.sized_kernels)
    assert moved.kernel_counts() == {"conv0": (56, 44), "conv1": (112, 88)}
    assert "predicted gain" in reason


def test_moves_stay_within_each_ranks_memory(monkeypatch):
    """Within the memory caps (share 0.6 of each group, at most 40 rows for
    rank 1), the fast rank takes kernels and rows only up to them; without
    them it would take more. A group the caps cannot hold keeps its split."""
    job = _plan({"conv0": (6, 6), "conv1": (12, 12)}, modes={"conv1": "batch"}, rows=(32, 32))
    busy = [3 * b for b in cost.predict(_profile(), job).busy]
    busy[1] /= 3  # rank 0 three times as slow
    free, _ = Rebalancer(_profile(), "auto").decide(busy, job)
    assert free.kernel_counts()["conv0"][1] > 7 and free.rows[1] > 40
    monkeypatch.setattr(memory, "caps", lambda profile: ([1.0, 0.6], [64, 40]))
    capped, _ = Rebalancer(_profile(), "auto").decide(busy, job)
    assert capped.kernel_counts() == {"conv0": (5, 7)} and capped.rows == (24, 40)  # floor(0.6 * 12) = 7
    monkeypatch.setattr(memory, "caps", lambda profile: ([0.4, 0.4], [30, 30]))
    assert Rebalancer(_profile(), "auto").decide(busy, job) is None  # nothing fits otherwise: kept


def test_rank_without_kernels_keeps_none():
    """A rank the plan left out (its link may be what makes it slow) gets no kernels back."""
    job = _plan({"conv0": (0, 4, 8), "conv1": (0, 12, 12)})
    profile = _profile(speeds=(1.0, 1.0, 1.0))
    busy = cost.predict(profile, job).busy
    new, _ = Rebalancer(profile, 4).decide([0.1, busy[1], 2 * busy[2]], job)
    assert new.kernel_counts()["conv0"][0] == 0 and new.kernel_counts()["conv1"][0] == 0
    assert new.kernel_counts()["conv1"] == (0, 16, 8)  # rank 2, half as fast: 1 / 3 of 24


def test_parse_mode():
    assert parse_mode("off") == "off" and parse_mode("auto") == "auto"
    assert parse_mode("7") == 7
    for bad in ("0", "-3", "often", ""):
        with pytest.raises(ValueError, match="--rebalance"):
            parse_mode(bad)


def _train_with_uneven_busy(job: Job) -> dict | None:
    """``train_worker`` with rank r reporting r + 1 busy seconds every step:
    an imbalance that does not depend on the machine's speed, so every check
    of mode N moves kernels. Patches this spawned worker only."""
    rank = int(os.environ["RANK"])
    observe = Rebalancer.observe
    Rebalancer.observe = lambda self, step, busy, plan: observe(self, step, rank + 1.0, plan)
    return train_worker(job)


@pytest.mark.parametrize("strategy, modes", [("kernel", None), ("layers", {"features.0": "batch"})])
def test_train_with_periodic_rebalancing_is_exact(tmp_path, strategy, modes):
    """Three workers re-split every 2 steps (forced by uneven busy times) and
    train, in float64, the model one device trains: rebalancing changes
    nothing but the split. With a batch-mode group the rows move too, also
    at the step of an epoch's short last batch (128 images in batches of 24:
    step 6 has 8), whose split the plan's rows are not."""
    devices, groups = ["cpu@0", "cpu@0", "cpu@1"], {"features.0": 12, "features.3": 24}
    job_plan = plan.kernel_split(devices, groups, 24, modes=modes, threads=1)
    assert job_plan.name == strategy
    config = TrainConfig(devices=",".join(devices), dataset="synthetic", synthetic_shape=(3, 16, 16),
                         synthetic_size=128, kernels=(12, 24), batch_size=24, threads=1, max_steps=8, quiet=True,
                         dtype="float64", job=job_plan, rebalance="2", checkpoint_dir=str(tmp_path / "moved"))
    moved = launch_local(_train_with_uneven_busy, 3, args=(job_of(config, job_plan),), timeout=180,
                         env={"OMP_NUM_THREADS": "1"})[0]
    alone = replace(config, devices="cpu@0", job=plan.single("cpu@0", groups, 24, threads=1), rebalance="off",
                    checkpoint_dir=str(tmp_path / "alone"))
    single = launch_job(job_of(alone, alone.job), load_data(alone))
    assert [e["step"] for e in moved["rebalances"]] == [2, 4, 6, 8]  # step 6: the short batch
    for event in moved["rebalances"]:
        if modes:  # rank 2, busy 3x rank 0's, ends with the fewest rows
            assert sum(event["new_rows"]) == 24 and event["new_rows"][2] < event["new_rows"][0]
        assert event["busy_seconds"] == [1.0, 2.0, 3.0]
        assert all(sum(event["new"][k]) == sum(event["old"][k]) for k in event["old"])
    last = {k: tuple(v) for k, v in moved["rebalances"][-1]["new"].items()}
    assert last != job_plan.kernel_counts() and moved["shares"] == moved["rebalances"][-1]["new"]
    rebalanced = plan.from_json(moved["rebalanced_plan"], groups=groups, batch_size=24)
    assert rebalanced.kernel_counts() == last and moved["job_plan"] == job_plan.to_json()
    assert moved["train_loss"] == pytest.approx(single["train_loss"], rel=1e-9)
    a, b = (torch.load(tmp_path / n / "checkpoint.pt", weights_only=True)["model"] for n in ("moved", "alone"))
    assert max(((a[k] - b[k]).abs().max() / (b[k].abs().max() + 1e-3)).item() for k in b) < 1e-9


def test_planned_split_is_corrected_online_by_default():
    """A searched plan (with its planning record) rebalances unless told
    otherwise; a plan built from equal or given shares stays."""
    config, job = TrainConfig(devices="cpu@0,cpu@0"), plan.kernel_split(["cpu@0", "cpu@0"], {"c": 4}, 8)
    planned = {"chosen": "kernel"}
    assert job_of(config, job, planning=planned).rebalance == "auto"
    assert job_of(replace(config, rebalance="off"), job, planning=planned).rebalance == "off"
    assert job_of(replace(config, rebalance="7"), job, planning=planned).rebalance == 7
    assert job_of(config, job).rebalance == "off"
