"""``--shares auto`` and ``--strategy auto``: the job trains as the plan says.

The measured profile of the tiny job is edited to make one device slow or
the links slow, so the plan's choice is known; the key stays that of the
job, so the edited profile is what the run plans from.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from convshard import plan
from convshard.cli import main
from convshard.plan import search
from convshard.run import trials
from convshard.run.config import TrainConfig, load_data

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
    """What ran is what was planned: the metrics' shares are read from the
    sharded model the workers trained, the plan's counts from the planner, so
    a run that split otherwise fails. The choice itself depends on measured
    times and is not fixed here; the next tests edit the profile to fix it."""
    metrics = _train(tmp_path, measured, "--shares", "auto")
    assert metrics["plan"]["chosen"] in ("kernel", "single") and metrics["strategy"] == metrics["plan"]["chosen"]
    job = plan.from_json(metrics["job_plan"], groups={"features.0": 4, "features.3": 8}, batch_size=16)
    assert metrics["shares"] == {name: list(counts) for name, counts in job.kernel_counts().items()}
    assert metrics["predicted_seconds"] == metrics["plan"]["predicted"][metrics["plan"]["chosen"]]


def test_a_device_that_would_slow_the_step_is_left_out(tmp_path, measured):
    slow = json.loads(json.dumps(measured))
    for layer in slow["layers"]:
        for key in ("a", "b", "batch_seconds"):
            layer[key][1] *= 1000
    slow["rest_seconds"][1] *= 1000
    metrics = _train(tmp_path, slow, "--shares", "auto")
    assert metrics["devices"] == ["cpu@0"] and metrics["world_size"] == 1 and metrics["strategy"] == "single"
    assert metrics["shares"] == {"features.0": [4], "features.3": [8]}


def test_strategy_auto_falls_back_to_one_device_on_slow_links(tmp_path, measured):
    """Links of 1 s latency make every split slower than one device, so the
    choice is known: single. The trials are measured: the test checks that
    the faster of the two it names is the one that ran."""
    slow_links = json.loads(json.dumps(measured))
    for link in slow_links["links"].values():
        link["bandwidth"], link["latency"] = 1e3, 1.0
    metrics = _train(tmp_path, slow_links, "--strategy", "auto")
    assert metrics["strategy"] == "single" and metrics["world_size"] == 1
    tried = metrics["plan"]["trials"]  # single, the only plan predicted near the fastest, and both cores
    assert set(tried) == {"single", trials.ALL_CORES}
    assert metrics["devices"] == (["cpu@0-1"] if tried[trials.ALL_CORES] < tried["single"] else
                                  [metrics["job_plan"]["devices"][0]])
    predicted = metrics["plan"]["predicted"]
    assert predicted["single"] == min(predicted.values())


def test_workers_plan_for_themselves_under_torchrun(tmp_path):
    """torchrun fixes the processes: every rank profiles, plans alike and trains the plan;
    what the planning warns of (here: profiling under --device-memory) is said once, by rank 0."""
    out = tmp_path / "metrics.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "convshard", "train", *JOB, "--shares", "auto", "--max-steps", "2", "--quiet",
           "--device-memory", "64GiB", "--metrics-out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("--device-memory: the job is profiled") == 1, proc.stderr[-3000:]
    metrics = json.loads(out.read_text())
    job = plan.from_json(metrics["job_plan"], groups={"features.0": 4, "features.3": 8}, batch_size=16)
    assert metrics["strategy"] == job.name  # the plan is measured: the property is that the run is the plan
    if job.ranks is None:  # the split on both ranks
        assert metrics["world_size"] == 2 and metrics["shares"] == {k: list(v) for k, v in job.kernel_counts().items()}
    else:  # one device alone, the other rank standing by
        assert metrics["world_size"] == 1 and job.name == "single"


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
    lone = metrics["job_plan"]["ranks"][0]
    assert (metrics["strategy"], metrics["world_size"], metrics["steps"]) == ("single", 1, 3)
    assert metrics["devices"] == [measured["devices"][lone]] == metrics["job_plan"]["devices"]


def _config(**changes) -> TrainConfig:
    return TrainConfig(**{"devices": "cpu@0,cpu@1", "dataset": "synthetic", "synthetic_shape": (1, 16, 16),
                          "synthetic_size": 64, "kernels": (4, 8), "batch_size": 16, "strategy": "auto",
                          "threads": 1, **changes})


def _resolve(config: TrainConfig, profile: dict, seconds: dict, startup: float = 0.0) -> tuple:
    """``trials.resolve`` on ``profile`` with trials that take ``seconds[plan]``, or else
    ``seconds[plan name]`` (ALL_CORES: one process on more than one core), after ``startup``
    seconds to start, recording what ran."""
    ran = []

    def run_trial(job: plan.Plan) -> float:
        name = trials.ALL_CORES if job.threads and job.threads > 1 else job.name
        ran.append(name)
        return seconds[job] if job in seconds else seconds[name]

    listed = [str(d) for d in config.device_list]
    resolved = trials.resolve(config, load_data(config), job_devices=listed, can_drop=True,
                              measure=lambda c: profile, run_trial=run_trial, startup=lambda: startup)
    return resolved, ran


def test_auto_trains_the_fastest_measured_of_the_plans_worth_trying(monkeypatch, measured):
    """Plans predicted within the margin of the fastest run a few real steps each,
    and so does one process on every listed core; the fastest measured trains,
    whatever the prediction said."""
    monkeypatch.setattr(search, "TRIAL_MARGIN", 100.0)  # every candidate is worth a trial
    flat = {**json.loads(json.dumps(measured)), "batchnorm": False}
    resolved, ran = _resolve(_config(), flat, {"single": 0.9, "kernel": 0.8, "layers": 0.7, "batch": 0.7,
                                                "ddp": 0.6, trials.ALL_CORES: 0.95})
    found = search.candidates(flat, threads=1)
    assert {"single", "kernel", "layers", "ddp", "ddp sized"} == {c.name for c in found}
    assert len(ran) == len(found) + 1 and trials.ALL_CORES in ran  # every candidate, and both cores
    assert resolved.plan.engine == plan.DDP and resolved.planning["chosen"] in ("ddp", "ddp sized")
    assert resolved.planning["trials"][resolved.planning["chosen"]] == 0.6
    assert resolved.rebalance == "auto"


def test_auto_never_chooses_ddp_for_a_batchnorm_model(monkeypatch, measured):
    """DDP normalises each rank's rows alone: another model's maths. For a
    BatchNorm model it is no candidate, however fast it would measure; the
    all-batch plan is the same split with BatchNorm over the global batch."""
    monkeypatch.setattr(search, "TRIAL_MARGIN", 100.0)
    with_bn = {**json.loads(json.dumps(measured)), "batchnorm": True}
    resolved, ran = _resolve(_config(), with_bn, {"single": 0.9, "kernel": 0.8, "layers": 0.7, "batch": 0.7,
                                                   "ddp": 0.01, trials.ALL_CORES: 0.95})
    assert "ddp" not in ran and resolved.plan.engine == plan.SHARDED
    assert all(not name.startswith("ddp") for name in resolved.planning["trials"])
    explicit, _ = _resolve(_config(strategy="ddp", shares="auto"), with_bn, {})  # asked for: PyTorch's DDP
    assert explicit.plan.engine == plan.DDP and explicit.planning["chosen"] == "ddp sized"


def test_auto_runs_one_process_on_all_cores_when_that_measures_fastest(monkeypatch, measured):
    """Two pinned CPU workers that lose to one process on both cores: auto runs
    that process, one thread per core, and saves it as a plan to run again."""
    monkeypatch.setattr(search, "TRIAL_MARGIN", 100.0)
    resolved, _ = _resolve(_config(), measured, {"single": 0.9, "kernel": 0.9, "layers": 0.9, "ddp": 0.9,
                                                  "batch": 0.9, trials.ALL_CORES: 0.6})
    job = resolved.plan
    assert (job.name, job.devices, job.threads, job.world) == ("single", ("cpu@0-1",), 2, 1)
    assert resolved.planning["chosen"] == trials.ALL_CORES and resolved.planning["breakdown"] is None
    assert plan.from_json(job.to_json(), groups={"features.0": 4, "features.3": 8}, batch_size=16) == job
    groups = {"features.0": 4}
    assert trials.all_cores(_config(devices="cpu@0,cpu@1,cpu@1"), groups, "contiguous") is None  # core 1 listed twice: shared
    assert trials.all_cores(_config(devices="cpu,cpu"), groups, "contiguous") is None  # unpinned
    assert trials.all_cores(_config(devices="cpu@0"), groups, "contiguous") is None


def test_auto_prints_its_trials_and_why_it_chose(monkeypatch, measured, caplog):
    """A table of every trial, fastest first, with its predicted and measured ms/step; then the choice
    and why: where the cost model disagreed, it says so."""
    monkeypatch.setattr(search, "TRIAL_MARGIN", 100.0)
    caplog.set_level("INFO", logger="convshard.run.trials")
    with_bn = {**json.loads(json.dumps(measured)), "batchnorm": True}
    found = {c.name: c for c in search.candidates(with_bn, threads=1)}
    by_prediction = sorted(("single", "kernel", "layers"), key=lambda n: found[n].prediction.step)
    seconds = {by_prediction[2]: 0.5, trials.ALL_CORES: 0.6, by_prediction[0]: 0.7, by_prediction[1]: 0.8}
    # by plan: a per-layer plan whose groups all split kernels is named kernel too
    _resolve(_config(epochs=50), with_bn, {(found[n].plan if n in found else n): t for n, t in seconds.items()})
    (table,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("--strategy auto tried")]
    lines = table.splitlines()
    assert re.fullmatch(r"--strategy auto tried 4 plans, 6 steps each \(3 timed\), \d+\.\d s in all:", lines[0])
    for line, name in zip(lines[2:-1], sorted(seconds, key=seconds.get), strict=True):
        predicted = "-" if name == trials.ALL_CORES else f"{1e3 * found[name].prediction.step:.1f}"
        assert re.fullmatch(rf"  {re.escape(name)} +{re.escape(predicted)} +{1e3 * seconds[name]:.1f}  \S.*", line), line
    assert lines[-1] == (f"chosen: {by_prediction[2]}, the fastest measured, {1 - 0.5 / 0.6:.1%} less per step "
                         f"than {trials.ALL_CORES}; the cost model predicted {by_prediction[0]} fastest")


def test_auto_says_when_planning_costs_more_than_the_training(monkeypatch, measured, caplog):
    monkeypatch.setattr(search, "TRIAL_MARGIN", 100.0)
    caplog.set_level("INFO", logger="convshard.run.trials")
    seconds = {"single": 0.9, "kernel": 0.8, "layers": 0.7, "batch": 0.7, "ddp": 0.6, "ddp sized": 0.6,
               trials.ALL_CORES: 0.95}
    _resolve(_config(max_steps=5), measured, seconds)  # fewer steps than one trial: said before profiling
    _resolve(_config(max_steps=20), measured, seconds, startup=4.0)  # six trials of 6 steps: more than the 20
    _resolve(_config(max_steps=None, epochs=500), measured, seconds, startup=0.1)  # 2,000 steps: worth it
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(said) == 2, said
    assert said[0].startswith("--strategy auto: the 5 training steps are fewer than one of its trials")
    assert "--trials 0 trains the predicted fastest plan" in said[0]
    # each trial: 4 s to start its workers and 6 steps at the fastest predicted step
    pool = search.auto_candidates(search.candidates(measured, threads=1), measured)
    step, count = search.fastest(pool).prediction.step, len(search.worth_trying(pool)) + 1  # + all cores
    cost = f"{count} trials take at least {count * (4.0 + 6 * step):.1f} s: each starts its workers (4.0 s"
    assert cost in said[1] and "more than the 20 training steps" in said[1]
    assert f"--trials 0 trains the plan predicted fastest ({search.fastest(pool).name}) at once" in said[1]
    worth = f"{count} trials take at least {count * (0.1 + 6 * step):.1f} s: each starts its workers (0.1 s"
    told = [r.getMessage() for r in caplog.records if r.levelname == "INFO" and worth in r.getMessage()]
    assert len(told) == 1 and "more than" not in told[0]  # worth it: said, not warned


def test_trials_0_trains_the_plan_predicted_fastest_untried(monkeypatch, measured):
    monkeypatch.setattr(search, "TRIAL_MARGIN", 100.0)  # every candidate would be worth a trial
    resolved, ran = _resolve(_config(trials=0), measured, {})
    pool = search.auto_candidates(search.candidates(measured, threads=1), measured)
    assert ran == [] and resolved.planning["chosen"] == search.fastest(pool).name
    assert resolved.planning["trials"] is None


def test_nothing_is_tried_when_one_plan_stands_out(measured):
    slow_links = json.loads(json.dumps(measured))
    for link in slow_links["links"].values():
        link["bandwidth"], link["latency"] = 1e3, 1.0
    resolved, ran = _resolve(_config(devices="cpu@0,cpu@1,cpu@1"), slow_links, {})  # no all-cores trial either
    assert ran == [] and resolved.plan.name == "single" and resolved.planning["trials"] is None


def test_strategy_layers_trains_one_device_when_no_split_fits_and_says_why(measured, caplog):
    """``--strategy layers`` where no split over two or more devices fits their
    memory (cpu@1 may hold one byte) trains the plan the planner found, cpu@0
    alone, and says why in one line (not that cpu@1 would slow the step); with
    one device listed it trains that device. Neither is an error."""
    caplog.set_level("INFO", logger="convshard.run.trials")
    resolved, ran = _resolve(_config(strategy="layers", device_memory=(2.0 ** 40, 1.0)), measured, {})
    assert ran == [] and (resolved.plan.name, resolved.plan.devices) == ("single", ("cpu@0",))
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("--strategy layers")]
    assert said == ["--strategy layers: no per-layer split of two or more of the devices fits their memory; "
                    "running single on cpu@0 instead, cpu@1 without work"]
    assert not any("gets no work" in r.getMessage() for r in caplog.records)
    caplog.clear()
    alone, _ = _resolve(_config(strategy="layers", devices="cpu@0"), search.restrict(measured, [0]), {})
    assert (alone.plan.name, alone.plan.devices) == ("single", ("cpu@0",))
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("--strategy layers")] == [
        "--strategy layers: one device is listed; running single on cpu@0 instead"]
    caplog.clear()
    untraced, _ = _resolve(_config(strategy="layers"), {**measured, "traced": False}, {})
    assert untraced.plan.name in ("single", "kernel") and not untraced.plan.batch_groups()
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("--strategy layers")]
    assert line.startswith("--strategy layers: the model cannot be traced, so no group runs in batch mode; running ")


def _trial_worker(profile_path: str) -> tuple[dict, dict]:
    """One rank of a two-rank job resolving auto's plan in-process, as a torchrun worker does."""
    import torch

    from convshard.plan import search
    from convshard.run import train
    from convshard.run.launch import init_from_env

    init_from_env("gloo", timeout=120)
    torch.set_num_threads(1)
    search.TRIAL_MARGIN = 100.0  # every candidate is worth a trial
    config = _config(profile=profile_path)
    resolved = train._resolve_here(config, load_data(config), config.device_list[int(os.environ["RANK"])])
    return resolved.plan.to_json(), resolved.planning["trials"]


def test_torchrun_workers_try_the_near_plans_and_choose_alike(tmp_path, measured):
    """Under torchrun auto's trials run inside the workers: every plan worth a
    trial trains 6 steps (single on its device alone), and every rank, from the
    slowest rank's times, chooses the same one."""
    from convshard.run.launch import launch_local

    path = tmp_path / "profile.json"
    path.write_text(json.dumps(measured))
    results = launch_local(_trial_worker, 2, args=(str(path),), timeout=240, env={"OMP_NUM_THREADS": "1"})
    assert results[0] == results[1]  # one choice, one set of times, on every rank
    job, tried = results[0]
    assert {"single", "kernel", "layers", "ddp"} <= set(tried)
    assert all(0 < t < float("inf") for t in tried.values())  # each measured on the rank(s) that ran it
    fastest = min(tried, key=tried.get)  # times are measured: the property is that the fastest trial is chosen
    assert job["engine"] == ("ddp" if fastest.startswith("ddp") else "sharded")
