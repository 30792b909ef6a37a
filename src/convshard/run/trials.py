"""From flags to the plan a run executes: built, searched, or tried for a few steps.

``resolve`` is the one implementation, whoever runs it: the local launcher
before it starts the job (``convshard.run.local``), or every rank of a torchrun
job (``convshard.run.train``), whose processes are fixed. The caller hands it
two runners: ``measure`` (the job's profile) and ``run_trial`` (a plan's
seconds per step over ``search.TRIAL_STEPS`` real steps).

- ``--strategy single|kernel|ddp`` with weights or equal shares: the plan
  those flags describe, nothing measured.
- ``--strategy layers``: the best per-layer plan; ``--shares auto`` with
  kernel: the best kernel split or one device; with ddp: rows sized to the
  devices.
- ``--strategy auto``: the candidates predicted within
  ``search.TRIAL_MARGIN`` of the fastest, and, on one host, one process on
  all the listed cores (``all_cores``), each run ``search.TRIAL_STEPS``
  steps; the fastest measured trains. For a model with BatchNorm, DDP is
  no candidate: its per-rank statistics are another model's maths (the
  all-batch plan is the same split, exact).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import replace

from .. import devices, plan
from ..data import Dataset
from ..errors import ConfigError
from ..plan import search
from .config import TrainConfig, model_groups, plan_from_flags

log = logging.getLogger(__name__)

ALL_CORES = "single, all cores"  # the trial of one process on every core the devices name


def all_cores(config: TrainConfig, groups: Mapping[str, int]) -> plan.Plan | None:
    """One process on every core ``config``'s devices name, one intra-op
    thread per core, where that is another job: two or more CPU devices
    pinned to disjoint cores. A core listed twice asks for workers that
    share it, so such a listing has none."""
    job = config.device_list
    cores = [c for d in job for c in d.cpus]
    if len(job) < 2 or any(d.kind != "cpu" or not d.cpus for d in job) or len(set(cores)) != len(cores):
        return None
    return plan.single(f"cpu@{devices.format_cores(cores)}", groups, config.batch_size, threads=len(cores))


def as_trial(config: TrainConfig) -> TrainConfig:
    """``config`` cut to one of auto's trials: ``search.TRIAL_STEPS`` quiet
    steps, half of them warm-up, with nothing written and nothing moved."""
    return replace(config, max_steps=search.TRIAL_STEPS, warmup_steps=search.TRIAL_STEPS // 2, quiet=True,
                   metrics_out=None, checkpoint_dir=None, checkpoint_every=None, resume=False, rebalance="off")


def resolve(config: TrainConfig, dataset: Dataset, *, job_devices: list[str], can_drop: bool,
            measure: Callable[[TrainConfig], dict], run_trial: Callable[[plan.Plan], float]) -> TrainConfig:
    """``config`` with its ``job`` (and, when searched, ``planning``) set."""
    if config.job is not None:
        return config
    if not config.needs_search:
        return replace(config, job=plan_from_flags(config, model_groups(config, dataset), job_devices))
    profile = measure(config)
    groups = search.groups_of(profile)
    found = search.candidates(profile, can_drop=can_drop, threads=config.threads)
    by_name = {c.name: c for c in found}
    trials: dict[str, float] = {}
    if config.strategy == "auto":
        chosen, trials = _try(search.auto_candidates(found, profile), all_cores(config, groups) if can_drop else None,
                              run_trial)
    elif config.strategy == "layers":
        if "layers" not in by_name:
            raise ConfigError("--strategy layers needs more than one device")
        chosen = by_name["layers"]
    elif config.strategy == "ddp":
        chosen = by_name["ddp sized"]
    else:  # kernel with --shares auto: the best split, which may be one device
        chosen = search.fastest([c for c in found if c.name in ("single", "kernel")])
    job = chosen if isinstance(chosen, plan.Plan) else chosen.plan
    name = ALL_CORES if isinstance(chosen, plan.Plan) else chosen.name
    planning = {"chosen": name, "predicted": {c.name: c.prediction.step for c in found},
                "trials": trials or None, "breakdown": None if name == ALL_CORES else chosen.prediction.to_json(),
                "text": search.format_candidates(found, chosen if name != ALL_CORES else search.fastest(found),
                                                 trials=trials)}
    left_out = Counter(job_devices) - Counter(job.devices) if job.ranks is None and name != ALL_CORES else Counter()
    for device in left_out.elements():
        log.warning("%s gets no work: the plan predicts it would slow the step", device)
    if name == ALL_CORES:
        log.info("plan: one process on %s, measured %.1f ms/step", job.devices[0], 1000 * trials[ALL_CORES])
    else:
        log.info("plan: %s on %s, predicted %.1f ms/step", name, ", ".join(job.devices),
                 1000 * chosen.prediction.step)
    return replace(config, job=job, planning=planning)


def _try(found: list[search.Candidate], merged: plan.Plan | None,
         run_trial: Callable[[plan.Plan], float]) -> tuple[search.Candidate | plan.Plan, dict[str, float]]:
    """The fastest measured of the candidates worth trying and ``merged``
    (one process on all cores), each run by ``run_trial``; their seconds per step."""
    tried: dict[str, search.Candidate | plan.Plan] = {c.name: c for c in search.worth_trying(found)}
    if merged is not None:
        tried[ALL_CORES] = merged
    if len(tried) == 1:
        return next(iter(tried.values())), {}
    trials = {name: run_trial(c if isinstance(c, plan.Plan) else c.plan) for name, c in tried.items()}
    best = min(trials, key=trials.get)
    log.info("trials (ms/step): %s: %s", ", ".join(f"{s} {1000 * t:.1f}" for s, t in trials.items()), best)
    return tried[best], trials
