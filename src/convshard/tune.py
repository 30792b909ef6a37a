"""Before a local job: profile it (or reuse the cached profile) and plan it.

``prepare`` turns ``--shares auto`` and ``--strategy auto`` into a concrete
job: the workers first run ``train.profile_worker`` (seconds), the launcher
plans from the profile (``plan.make_plan``), ``auto`` tries the strategies
predicted near the fastest for a few steps, and the training job starts
with the chosen strategy, only the devices that pay their way, and the
planned kernels per rank of every layer. Under torchrun, where the job's
processes are fixed, the workers plan for themselves (``train.train_worker``).
"""

from __future__ import annotations

import logging
from dataclasses import replace

from . import data, devices, launch, plan, profile
from .train import TrainConfig, apply_plan, as_trial, make_model, profile_worker, train_worker

log = logging.getLogger(__name__)


def profile_job(config: TrainConfig, dataset: data.Dataset) -> dict:
    """The profile of ``config``'s devices and model at its batch size:
    the cached one at ``config.profile`` when its key matches, else measured
    by one worker per device."""
    job = config.device_list
    if config.profile:
        key = profile.profile_key(
            devices=[str(d) for d in job], threads=[config.threads_for(d) for d in job],
            hosts=[profile.hostname()] * len(job), model=make_model(config, dataset),
            input_shape=dataset.input_shape, batch_size=config.batch_size)
        cached = profile.load(config.profile, key)
        if cached is not None:
            return cached
    if len(job) == 1:
        with devices.pinning_restored():
            return profile_worker(config, dataset)
    return launch.launch_local(profile_worker, len(job), args=(config,), labels=[str(d) for d in job])[0]


ALL_CORES = "single, all cores"  # the trial of one process on every core the devices name


def all_cores(config: TrainConfig) -> TrainConfig | None:
    """``config`` as one process on every core its devices name, one intra-op
    thread per core, where that is another job: two or more CPU devices
    pinned to disjoint cores. On one host such a process can beat workers
    that meet at every layer (the "all cores" column of docs/benchmarks.md);
    a core listed twice asks for workers that share it, so such a listing has
    no all-cores trial."""
    job = config.device_list
    cores = [c for d in job for c in d.cpus]
    if len(job) < 2 or any(d.kind != "cpu" or not d.cpus for d in job) or len(set(cores)) != len(cores):
        return None
    return replace(config, strategy="single", devices=f"cpu@{devices.format_cores(cores)}", threads=len(cores),
                   layer_counts=None, modes=None, rows=None, shares=None)


def prepare(config: TrainConfig, dataset: data.Dataset) -> TrainConfig:
    """The job to run: ``config`` with strategy, devices and kernel counts planned.

    With ``--strategy auto`` the strategies worth trying
    (``plan.Plan.worth_trying``) and one process on all cores (``all_cores``)
    run ``plan.TRIAL_STEPS`` real steps first, and the fastest measured wins:
    the cost model can be off the measured step by as much as strategies
    often differ (docs/benchmarks.md gives the figures)."""
    planning = replace(config, strategy="auto", shares=None)
    job_plan = plan.make_plan(profile_job(planning, dataset), strategy=config.strategy)
    if config.strategy == "auto":
        job_plan = _trials(config, dataset, job_plan)
    for r in job_plan.dropped if job_plan.strategy == "kernel" else ():
        log.warning(job_plan.idle_note(r))
    prepared = apply_plan(config, job_plan, can_drop=True)
    if job_plan.trials and min(job_plan.trials, key=job_plan.trials.get) == ALL_CORES:
        prepared = replace(all_cores(config), plan=prepared.plan)
        log.info("plan: one process on %s, measured %.1f ms/step", prepared.devices,
                 1000 * job_plan.trials[ALL_CORES])
        return prepared
    log.info("plan: %s on %s, predicted %.1f ms/step", prepared.strategy, prepared.devices,
             1000 * job_plan.predicted[job_plan.strategy])
    return prepared


def _trials(config: TrainConfig, dataset: data.Dataset, job_plan: plan.Plan) -> plan.Plan:
    """``job_plan`` choosing the fastest measured of the strategies predicted
    near the fastest and of one process on all cores (ALL_CORES, see
    ``all_cores``), each run for ``plan.TRIAL_STEPS`` steps; the trials' seconds per
    step in ``trials``. ALL_CORES chosen makes the plan ``single``."""
    jobs = {s: apply_plan(config, replace(job_plan, strategy=s), can_drop=True) for s in job_plan.worth_trying()}
    if (merged := all_cores(config)) is not None:
        jobs[ALL_CORES] = merged
    if len(jobs) == 1:
        return job_plan
    trials = {}
    for name, job in jobs.items():
        trials[name] = launch_job(as_trial(job), dataset)["mean_step_seconds"]
    chosen = min(trials, key=trials.get)
    log.info("trials (ms/step): %s: %s", ", ".join(f"{s} {1000 * t:.1f}" for s, t in trials.items()), chosen)
    return replace(job_plan, strategy="single" if chosen == ALL_CORES else chosen, trials=trials)


def launch_job(config: TrainConfig, dataset: data.Dataset) -> dict | None:
    """Run ``config`` on this host: one worker in this process, or one
    process per device; returns rank 0's metrics."""
    if config.world_size == 1:
        with devices.pinning_restored():
            return train_worker(config, dataset)
    labels = [str(dev) for dev in config.device_list]
    return launch.launch_local(train_worker, config.world_size, args=(config,), labels=labels)[0]
