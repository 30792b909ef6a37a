"""``--shares auto`` and ``--strategy auto``: the job trains as the plan says.

The measured profile of the tiny job is edited to make one device slow or
the links slow, so the plan's choice is known; the key stays that of the
job, so the edited profile is what the run plans from.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from convshard import tune
from convshard.cli import main

JOB = ["--dataset", "synthetic", "--synthetic-shape", "1,16,16", "--synthetic-size", "64", "--kernels", "4,8",
       "--batch-size", "16", "--threads", "1", "--devices", "cpu@0,cpu@1"]


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> dict:
    path = tmp_path_factory.mktemp("profile") / "profile.json"
    assert main(["profile", *JOB, "--profile", str(path)]) == 0
    return json.loads(path.read_text())


def _train(tmp: Path, profile: dict, *extra: str) -> dict:
    (tmp / "profile.json").write_text(json.dumps(profile))
    out = tmp / "metrics.json"
    assert main(["train", *JOB, "--max-steps", "2", "--quiet", "--profile", str(tmp / "profile.json"),
                 "--metrics-out", str(out), *extra]) == 0
    return json.loads(out.read_text())


def test_shares_auto_trains_the_planned_split(tmp_path, measured):
    metrics = _train(tmp_path, measured, "--shares", "auto")
    assert metrics["strategy"] == "kernel" and metrics["plan"]["strategy"] == "kernel"
    planned = {layer["name"]: layer["counts"] for layer in metrics["plan"]["layers"]}
    kept = metrics["plan"]["ranks"]
    assert metrics["shares"] == {name: [counts[r] for r in kept] for name, counts in planned.items()}
    assert {name: sum(c) for name, c in metrics["shares"].items()} == {"features.0": 4, "features.3": 8}


def test_a_device_that_would_slow_the_step_is_dropped(tmp_path, measured, caplog):
    slow = json.loads(json.dumps(measured))
    for layer in slow["layers"]:
        layer["a"][1] *= 1000
        layer["b"][1] *= 1000
    with caplog.at_level(logging.WARNING):
        metrics = _train(tmp_path, slow, "--shares", "auto")
    assert "cpu@1 (rank 1) gets no kernels: it would slow the step" in caplog.text
    assert metrics["devices"] == ["cpu@0"] and metrics["world_size"] == 1
    assert metrics["plan"]["dropped"] == [1]
    assert metrics["shares"] == {"features.0": [4], "features.3": [8]}


def test_strategy_auto_falls_back_to_one_device_on_slow_links(tmp_path, measured):
    slow_links = json.loads(json.dumps(measured))
    for link in slow_links["links"].values():
        link["bandwidth"], link["latency"] = 1e3, 1.0
    metrics = _train(tmp_path, slow_links, "--strategy", "auto")
    assert metrics["strategy"] == "single" and metrics["world_size"] == 1
    # single, the only strategy predicted near the fastest, against one process on both cores
    trials = metrics["plan"]["trials"]
    assert set(trials) == {"single", tune.ALL_CORES}
    best = measured["devices"][metrics["plan"]["best_single"]]
    assert metrics["devices"] == ([best] if trials["single"] < trials[tune.ALL_CORES] else ["cpu@0-1"])
    predicted = metrics["plan"]["predicted"]
    assert predicted["single"] <= predicted["kernel"] and predicted["single"] < predicted["ddp"]


def test_workers_plan_for_themselves_under_torchrun(tmp_path):
    """torchrun fixes the processes: every rank profiles, plans alike and trains the plan."""
    out = tmp_path / "metrics.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "convshard", "train", *JOB, "--shares", "auto", "--max-steps", "2", "--quiet",
           "--metrics-out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads(out.read_text())
    assert metrics["world_size"] == 2 and metrics["strategy"] == "kernel"
    planned = {layer["name"]: layer["counts"] for layer in metrics["plan"]["layers"]}
    assert metrics["shares"] == planned
    assert {name: sum(c) for name, c in metrics["shares"].items()} == {"features.0": 4, "features.3": 8}


def test_under_torchrun_one_device_trains_alone_when_the_plan_prefers_it(tmp_path, measured):
    """Links too slow for any split: torchrun's processes are fixed, so the
    plan's best device trains in a group of its own and the other rank stands
    by; the job ends when it is done, with its metrics."""
    slow_links = json.loads(json.dumps(measured))
    for link in slow_links["links"].values():
        link["bandwidth"], link["latency"] = 1e3, 1.0
    (tmp_path / "profile.json").write_text(json.dumps(slow_links))
    out = tmp_path / "metrics.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "convshard", "train", *JOB, "--strategy", "auto", "--max-steps", "3", "--quiet",
           "--profile", str(tmp_path / "profile.json"), "--metrics-out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads(out.read_text())
    best = metrics["plan"]["best_single"]
    assert (metrics["strategy"], metrics["world_size"], metrics["steps"]) == ("single", 1, 3)
    assert metrics["devices"] == [measured["devices"][best]]
    assert f"{measured['devices'][best]} (rank {best}) trains alone" in proc.stderr


def test_auto_tries_the_strategies_predicted_near_the_fastest(monkeypatch, measured):
    """Strategies predicted within 15% of the fastest run a few real steps each,
    and so does one process on every listed core; the fastest measured is
    chosen, whatever the prediction said."""
    from dataclasses import replace

    from convshard import plan
    from convshard.train import TrainConfig

    job_plan = replace(plan.make_plan(measured), predicted={"kernel": 1.0, "single": 2.0, "layers": 1.1, "ddp": 1.14},
                       ranks=(0, 1), dropped=())
    measured_ms = {("kernel", "cpu@0,cpu@1"): 0.9, ("layers", "cpu@0,cpu@1"): 0.8, ("ddp", "cpu@0,cpu@1"): 1.2,
                   ("single", "cpu@0-1"): 0.85, ("ddp", "cpu@0,cpu@1,cpu@1"): 1.0}
    ran = []

    def trial(config, dataset):
        ran.append((config.strategy, config.devices, config.max_steps, config.metrics_out, config.rebalance))
        return {"mean_step_seconds": measured_ms[config.strategy, config.devices]}

    monkeypatch.setattr(tune, "launch_job", trial)
    config = TrainConfig(devices="cpu@0,cpu@1", dataset="synthetic", synthetic_shape=(1, 16, 16), kernels=(4, 8),
                         strategy="auto", metrics_out="m.json", threads=1)
    chosen = tune._trials(config, None, job_plan)
    both = "cpu@0,cpu@1"
    assert ran == [("kernel", both, 6, None, "off"), ("layers", both, 6, None, "off"), ("ddp", both, 6, None, "off"),
                   ("single", "cpu@0-1", 6, None, "off")]
    assert chosen.strategy == "layers"
    assert chosen.trials == {"kernel": 0.9, "layers": 0.8, "ddp": 1.2, tune.ALL_CORES: 0.85}
    alone = replace(job_plan, predicted={"kernel": 1.0, "single": 2.0, "layers": 1.3, "ddp": 1.6})
    ran.clear()
    assert tune._trials(replace(config, devices="cpu@0,cpu@1,cpu@1"), None, alone) is alone  # nothing to try
    assert ran == []
    ddp_near = replace(alone, predicted={**alone.predicted, "ddp": 1.45})  # ddp is tried within 50%
    assert tune._trials(replace(config, devices="cpu@0,cpu@1,cpu@1"), None, ddp_near).strategy == "kernel"
    assert [(s, d) for s, d, *_ in ran] == [("kernel", "cpu@0,cpu@1"), ("ddp", "cpu@0,cpu@1,cpu@1")]  # its ranks
    ran.clear()
    one_rank = replace(job_plan, ranks=(1,), dropped=(0,))  # a kernel plan on one rank is that device alone
    assert tune._trials(config, None, one_rank).strategy == "layers"
    assert [strategy for strategy, *_ in ran] == ["layers", "ddp", "single"]


def test_auto_runs_one_process_on_all_cores_when_that_measures_fastest(monkeypatch, measured):
    """Two pinned CPU workers that lose to one process on both cores: auto runs
    that process, one thread per core, and saves it as a plan to run again."""
    from dataclasses import replace

    from convshard import plan
    from convshard.train import TrainConfig

    job_plan = replace(plan.make_plan(measured), predicted={"kernel": 1.0, "single": 2.0, "layers": 1.3, "ddp": 1.6},
                       ranks=(0, 1), dropped=())
    monkeypatch.setattr(tune, "profile_job", lambda config, dataset: measured)
    monkeypatch.setattr(tune.plan, "make_plan", lambda profile, strategy: job_plan)
    monkeypatch.setattr(tune, "launch_job", lambda config, dataset: {"mean_step_seconds": {
        "kernel": 0.9, "single": 0.6}[config.strategy]})
    config = TrainConfig(devices="cpu@0,cpu@1", dataset="synthetic", synthetic_shape=(1, 16, 16), kernels=(4, 8),
                         strategy="auto", threads=1)
    prepared = tune.prepare(config, None)
    assert (prepared.strategy, prepared.devices, prepared.threads, prepared.world_size) == ("single", "cpu@0-1", 2, 1)
    assert prepared.plan["trials"] == {"kernel": 0.9, tune.ALL_CORES: 0.6}
    again = replace(config, strategy="kernel", threads=None).with_job_plan(prepared.job_plan())
    assert (again.strategy, again.devices, again.threads) == ("single", "cpu@0-1", 2)
    assert tune.all_cores(replace(config, devices="cpu@0,cpu@1,cpu@1")) is None  # core 1 listed twice: shared
    assert tune.all_cores(replace(config, devices="cpu,cpu")) is None  # unpinned
    assert tune.all_cores(replace(config, devices="cpu@0")) is None


def test_auto_sizes_ddp_to_the_devices_only_for_a_predicted_gain(measured):
    from dataclasses import replace

    from convshard import plan
    from convshard.train import TrainConfig, apply_plan

    config = TrainConfig(devices="cpu@0,cpu@1", dataset="synthetic", synthetic_shape=(1, 16, 16), kernels=(4, 8),
                         strategy="auto")
    base = replace(plan.make_plan(measured), strategy="ddp", ddp_shares=(0.6, 0.4))
    sized = apply_plan(config, replace(base, predicted={**base.predicted, "ddp": 1.0}, ddp_sized=0.9), can_drop=True)
    assert sized.strategy == "ddp" and sized.shares == (0.6, 0.4)
    even = apply_plan(config, replace(base, predicted={**base.predicted, "ddp": 1.0}, ddp_sized=0.99), can_drop=True)
    assert even.strategy == "ddp" and even.shares is None  # PyTorch's even split: sizing would gain 1%


def _trial_worker(profile: dict) -> tuple[str, dict]:
    """One rank of a two-rank job trying four strategies in-process, as a torchrun worker does."""
    from dataclasses import replace

    import torch

    from convshard import devices, plan, train
    from convshard.launch import init_from_env

    init_from_env("gloo", timeout=120)
    torch.set_num_threads(1)
    config = train.TrainConfig(devices="cpu@0,cpu@1", dataset="synthetic", synthetic_shape=(1, 16, 16),
                               synthetic_size=64, kernels=(4, 8), batch_size=16, strategy="auto")
    job_plan = plan.make_plan(profile, allow_drop=False)
    job_plan = replace(job_plan, predicted={"kernel": 1.0, "layers": 1.05, "ddp": 1.1, "single": 1.12})
    chosen = train._trials_in_worker(config, train.load_data(config), devices.Device("cpu"), job_plan)
    return chosen.strategy, chosen.trials


def test_torchrun_workers_try_the_near_strategies_and_choose_alike(measured):
    """Under torchrun auto's trials run inside the workers: every strategy
    predicted near the fastest trains 6 steps (single on its device alone),
    and every rank, from the slowest rank's times, chooses the same one."""
    from convshard.launch import launch_local

    results = launch_local(_trial_worker, 2, args=(measured,), timeout=240)
    assert results[0] == results[1]  # one choice, one set of times, on every rank
    chosen, trials = results[0]
    assert set(trials) == {"kernel", "layers", "ddp", "single"}
    assert all(0 < t < float("inf") for t in trials.values())  # each measured on the rank(s) that ran it
    assert chosen == min(trials, key=trials.get)
