"""Before a local job: profile it (or reuse the cached profile) and plan it.

``prepare`` turns ``--shares auto`` and ``--strategy auto`` into a concrete
job: the workers first run ``train.profile_worker`` (seconds), the launcher
plans from the profile (``plan.make_plan``), and the training job starts
with the chosen strategy, only the devices that pay their way, and the
planned kernels per rank of every layer. Under torchrun, where the job's
processes are fixed, the workers plan for themselves (``train.train_worker``).
"""

from __future__ import annotations

import logging
from dataclasses import replace

from . import data, devices, launch, plan, profile
from .train import TrainConfig, apply_plan, make_model, profile_worker

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


def prepare(config: TrainConfig, dataset: data.Dataset) -> TrainConfig:
    """The job to run: ``config`` with strategy, devices and kernel counts planned."""
    planning = replace(config, strategy="auto", shares=None)
    job_plan = plan.make_plan(profile_job(planning, dataset), strategy=config.strategy)
    for r in job_plan.dropped if job_plan.strategy == "kernel" else ():
        log.warning(job_plan.idle_note(r))
    prepared = apply_plan(config, job_plan, can_drop=True)
    log.info("plan: %s on %s, predicted %.1f ms/step", prepared.strategy, prepared.devices,
             1000 * job_plan.predicted[job_plan.strategy])
    return prepared
