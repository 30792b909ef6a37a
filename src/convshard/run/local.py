"""A local job: resolve its plan on this host, then start one process per planned device.

``prepare`` runs ``trials.resolve`` with the local runners: the profile
measured by one worker per listed device (``join.profile_worker``, the
cache at ``--profile`` reused while it fits), and each trial started as a
job of its own (``launch_job``). A local job's processes are the plan's
devices, so a plan may leave listed devices out. Under torchrun the
workers resolve the plan themselves (``train.train_worker``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

from .. import data, devices, plan
from . import launch, trials
from .config import Job, TrainConfig
from .join import profile_worker
from .train import train_worker


@contextmanager
def _logging_restored() -> Iterator[None]:
    """Around a worker run in this process: it sets up the logging of a rank
    (level, format); the caller's own comes back after it."""
    root = logging.getLogger()
    level, handlers = root.level, root.handlers[:]
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def profile_job(config: TrainConfig, dataset: data.Dataset, timing: dict[str, float] | None = None) -> dict:
    """The profile of ``config``'s listed devices and model at its batch size,
    measured (or read from the cache) by one worker per device. ``timing``
    receives ``startup``: what the job cost besides measuring (starting its
    workers, joining, loading the data, leaving), which a trial pays too."""
    job, started = config.device_list, time.perf_counter()
    if len(job) == 1:
        with devices.pinning_restored(), _logging_restored():
            measured, measuring = profile_worker(config, dataset)
    else:
        measured, measuring = launch.launch_local(profile_worker, len(job), args=(config,),
                                                  labels=[str(d) for d in job])[0]
    if timing is not None:
        timing["startup"] = max(0.0, time.perf_counter() - started - measuring)
    return measured


def prepare(config: TrainConfig, dataset: data.Dataset) -> Job:
    """The job that runs ``config`` on this host (``trials.resolve``)."""
    def run_trial(job: plan.Plan) -> float:
        return launch_job(trials.as_trial(config, job), dataset)["mean_step_seconds"]

    listed = [str(d) for d in config.device_list]
    timing: dict[str, float] = {}  # a trial starts its workers as the profile did
    return trials.resolve(config, dataset, job_devices=listed, can_drop=True,
                          measure=lambda c: profile_job(c, dataset, timing), run_trial=run_trial,
                          startup=lambda: timing.get("startup", 0.0))


def launch_job(job: Job, dataset: data.Dataset) -> dict | None:
    """Run ``job`` on this host: one worker in this process, or one process
    per planned device; returns rank 0's metrics."""
    if job.plan.world == 1:
        with devices.pinning_restored(), _logging_restored():
            return train_worker(job, dataset)
    return launch.launch_local(train_worker, job.plan.world, args=(job,), labels=list(job.plan.devices))[0]
