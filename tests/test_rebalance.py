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
from convshard.parallel import rebalance
from convshard.parallel.batch import RowSplit
from convshard.parallel.sharded import ShardedConv2d, ShardSplit
from convshard.run import engines
from convshard.run.config import TrainConfig, load_data
from convshard.run.launch import init_from_env, launch_local
from convshard.run.local import launch_job
from convshard.run.train import train_worker

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
    rebalance.reshard(model, opt, new_counts)
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


def _split_model(counts: dict[str, tuple[int, ...]]) -> nn.Module:
    """Sharded layers as rank 0 of a job would hold them (no process group needed to plan)."""
    torch.manual_seed(0)
    layers = [ShardedConv2d(nn.Conv2d(3, sum(c), 3), ShardSplit(c, 0)) for c in counts.values()]
    return nn.Sequential(*layers)


def test_new_counts_follow_the_busy_times():
    """Rank 0 was busy twice as long for the same work: it gets about a third of each layer."""
    model = _split_model({"0": (6, 6), "1": (12, 12)})
    balancer = rebalance.Rebalancer(model, "auto")
    (new, rows), gain = balancer._new_counts([2.0, 1.0])
    assert new == {"0": (4, 8), "1": (8, 16)} and rows == ()
    assert gain == pytest.approx(0.5)  # the slowest busy time predicted to fall from 2 to 4/3
    assert balancer._new_counts([1.0, 1.0]) == (({"0": (6, 6), "1": (12, 12)}, ()), 0.0)


def test_batch_rows_move_with_the_kernels():
    """A model with a kernel group and a batch-mode conv: rank 0, busy twice as
    long, gives away kernels and rows, each in proportion to its speed."""
    model = _split_model({"0": (6, 6)})
    model.add_module("b", nn.Conv2d(3, 8, 3))
    model.batch_convs = ["b"]
    model.row_split = RowSplit((1.0, 1.0), 0, None)
    model.row_split.begin(16)
    balancer = rebalance.Rebalancer(model, "auto")
    (new, rows), gain = balancer._new_counts([2.0, 1.0])
    # work per rank: 16 rows x 27 per kernel x 6 kernels + 216 per row x 8 rows = 4320
    assert new == {"0": (4, 8)} and rows == (5, 11)
    assert gain == pytest.approx(2.0 / ((16 * 27 * 8 + 216 * 11) / 4320) - 1)
    decision = balancer.decide([2.0, 1.0])
    assert decision[0] == ({"0": (4, 8)}, (5, 11))


def test_auto_moves_kernels_only_for_a_real_gain():
    """Mode auto re-splits when the predicted slowest busy time falls by 3% or more;
    mode N re-splits whenever the counts change."""
    model = _split_model({"0": (50, 50), "1": (100, 100)})
    auto = rebalance.Rebalancer(model, "auto")
    assert auto.decide([1.0, 1.02]) is None  # the best split gains 1%: noise
    (new, _), reason = auto.decide([1.0, 1.2])
    assert new == {"0": (55, 45), "1": (109, 91)}
    assert reason == "imbalance 9%, predicted gain 10%"  # 1.2 / (164 / 150) - 1
    assert rebalance.Rebalancer(model, 5).decide([1.0, 1.02])[0][0] == {"0": (50, 50), "1": (101, 99)}


def test_moves_stay_within_each_ranks_memory():
    """With the plan's memory caps (share 0.6 of each layer, at most 9 rows), the
    fast rank takes kernels and rows only up to them; without them it would take more."""
    model = _split_model({"0": (6, 6), "1": (12, 12)})
    model.add_module("b", nn.Conv2d(3, 8, 3))
    model.batch_convs = ["b"]
    model.row_split = RowSplit((1.0, 1.0), 0, None)
    model.row_split.begin(16)
    (free, free_rows), _ = rebalance.Rebalancer(model, "auto")._new_counts([3.0, 1.0])
    assert free["1"][1] > 14 and free_rows[1] > 9  # what the speeds alone would give rank 1
    capped = rebalance.Rebalancer(model, "auto", caps={"shares": [1.0, 0.6], "rows": [16, 9]})
    (new, rows), gain = capped._new_counts([3.0, 1.0])
    assert new == {"0": (5, 7), "1": (10, 14)} and rows == (7, 9)
    assert gain > 0
    tight = rebalance.Rebalancer(model, "auto", caps={"shares": [0.4, 0.4], "rows": [7, 7]})
    assert tight._new_counts([3.0, 1.0])[0] == ({"0": (6, 6), "1": (12, 12)}, (8, 8))  # nothing fits: kept


def test_rank_without_kernels_keeps_none():
    """A rank the plan left out (its link may be what makes it slow) gets no kernels back."""
    model = _split_model({"0": (0, 4, 8), "1": (0, 6, 6)})
    (new, _), gain = rebalance.Rebalancer(model, 4)._new_counts([0.1, 1.0, 2.0])
    assert new == {"0": (0, 7, 5), "1": (0, 7, 5)}
    assert gain == pytest.approx(2.0 / (10 * 2.0 / 14) - 1)  # rank 2's busy time falls from 2.0 to 10/14 of it


def test_parse_mode():
    assert rebalance.parse_mode("off") == "off" and rebalance.parse_mode("auto") == "auto"
    assert rebalance.parse_mode("7") == 7
    for bad in ("0", "-3", "often", ""):
        with pytest.raises(ValueError, match="--rebalance"):
            rebalance.parse_mode(bad)


def _train_with_uneven_busy(config: TrainConfig) -> dict | None:
    """``train_worker`` with rank r reporting r + 1 busy seconds every step:
    an imbalance that does not depend on the machine's speed, so every check
    of mode N moves kernels. Patches this spawned worker only."""
    rank = int(os.environ["RANK"])
    observe = rebalance.Rebalancer.observe
    rebalance.Rebalancer.observe = lambda self, step, busy, optimizer: observe(self, step, rank + 1.0, optimizer)
    return train_worker(config)


@pytest.mark.parametrize("strategy, modes", [("kernel", None), ("layers", {"features.0": "batch"})])
def test_train_with_periodic_rebalancing_is_exact(tmp_path, strategy, modes):
    """Three workers re-split every 2 steps (forced by uneven busy times) and
    train, in float64, the model one device trains: rebalancing changes
    nothing but the split. With a batch-mode group the rows move too."""
    devices, groups = ["cpu@0", "cpu@0", "cpu@1"], {"features.0": 12, "features.3": 24}
    job_plan = plan.kernel_split(devices, groups, 32, modes=modes, threads=1)
    assert job_plan.name == strategy
    job = TrainConfig(devices=",".join(devices), dataset="synthetic", synthetic_shape=(3, 16, 16),
                      synthetic_size=128, kernels=(12, 24), batch_size=32, threads=1, max_steps=8, quiet=True,
                      dtype="float64", job=job_plan, rebalance="2", checkpoint_dir=str(tmp_path / "moved"))
    moved = launch_local(_train_with_uneven_busy, 3, args=(job,), timeout=180, env={"OMP_NUM_THREADS": "1"})[0]
    alone = replace(job, devices="cpu@0", job=plan.single("cpu@0", groups, 32, threads=1), rebalance="off",
                    checkpoint_dir=str(tmp_path / "alone"))
    single = launch_job(alone, load_data(alone))
    assert moved["rebalances"], "no rebalance happened"
    for event in moved["rebalances"]:
        assert event["step"] % 2 == 0 and event["old"] != event["new"]
        if modes:  # rank 2, busy 3x rank 0's, ends with the fewest rows
            assert sum(event["new_rows"]) == 32 and event["new_rows"][2] < event["new_rows"][0]
        assert event["busy_seconds"] == [1.0, 2.0, 3.0]
        assert all(sum(event["new"][k]) == sum(event["old"][k]) for k in event["old"])
    last = {k: tuple(v) for k, v in moved["rebalances"][-1]["new"].items()}
    assert last != job_plan.kernel_counts() and moved["shares"] == moved["rebalances"][-1]["new"]
    rebalanced = plan.from_json(moved["rebalanced_plan"], groups=groups, batch_size=32)
    assert rebalanced.kernel_counts() == last and moved["job_plan"] == job_plan.to_json()
    assert moved["train_loss"] == pytest.approx(single["train_loss"], rel=1e-9)
    a, b = (torch.load(tmp_path / n / "checkpoint.pt", weights_only=True)["model"] for n in ("moved", "alone"))
    assert max(((a[k] - b[k]).abs().max() / (b[k].abs().max() + 1e-3)).item() for k in b) < 1e-9


def test_planned_split_is_corrected_online_by_default():
    planned = {"chosen": "kernel"}
    assert TrainConfig(devices="cpu@0,cpu@0", planning=planned).rebalance_mode == "auto"
    assert TrainConfig(devices="cpu@0,cpu@0", planning=planned, rebalance="off").rebalance_mode == "off"
    assert TrainConfig(devices="cpu@0,cpu@0", planning=planned, rebalance="7").rebalance_mode == 7
    assert TrainConfig(devices="cpu@0,cpu@0").rebalance_mode == "off"  # equal or user-given shares stay
    ddp = plan.ddp(["cpu@0", "cpu@0"], {"features.0": 4}, 8)
    assert engines.engine_for(ddp, 0, None).rebalancer(torch.nn.Linear(1, 1), "auto") is None  # DDP's rows stay
