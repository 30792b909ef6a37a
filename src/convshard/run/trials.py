"""From flags to the plan a run executes: built, searched, or tried for a few steps.

``resolve`` is the one implementation, whoever runs it: the local launcher
before it starts the job (``convshard.run.local``), or every rank of a torchrun
job (``convshard.run.train``), whose processes are fixed. The caller hands it
two runners: ``measure`` (the job's profile) and ``run_trial`` (a plan's
seconds per step over ``search.TRIAL_STEPS`` real steps).

- ``--strategy single|kernel|ddp`` with weights or equal shares: the plan
  those flags describe, nothing measured.
- ``--strategy layers``: the best per-layer plan, or, where no split of
  two or more devices fits their memory (or one device is listed), the
  faster of one device alone and the all-kernel split, said in one line;
  ``--shares auto`` with kernel: the best kernel split or one device; with
  ddp: rows sized to the devices.
- ``--strategy auto``: the candidates predicted within
  ``search.TRIAL_MARGIN`` of the fastest, and, on one host, one process on
  all the listed cores (``all_cores``), each run ``search.TRIAL_STEPS``
  steps; the fastest measured trains. For a model with BatchNorm, DDP is
  no candidate: its per-rank statistics are another model's maths (the
  all-batch plan is the same split, exact).
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path

from .. import devices, plan
from ..data import Dataset
from ..errors import ConfigError
from ..plan import memory, search
from .config import Job, TrainConfig, job_of, model_groups, plan_from_flags

log = logging.getLogger(__name__)

ALL_CORES = "single, all cores"  # the trial of one process on every core the devices name


def all_cores(config: TrainConfig, groups: Mapping[str, int], memory_format: str) -> plan.Plan | None:
    """One process on every core ``config``'s devices name, one intra-op
    thread per core, where that is another job: two or more CPU devices
    pinned to disjoint cores. A core listed twice asks for workers that
    share it, so such a listing has none."""
    job = config.device_list
    cores = [c for d in job for c in d.cpus]
    if len(job) < 2 or any(d.kind != "cpu" or not d.cpus for d in job) or len(set(cores)) != len(cores):
        return None
    job = plan.single(f"cpu@{devices.format_cores(cores)}", groups, config.batch_size, threads=len(cores))
    return replace(job, precision=config.precision, memory_format=memory_format,
                   grad_precision=config.grad_precision)


def as_trial(config: TrainConfig, job: plan.Plan) -> Job:
    """Plan ``job`` run as one of auto's trials for ``config``:
    ``search.TRIAL_STEPS`` quiet steps, half of them warm-up, with nothing
    written and nothing moved."""
    trial = replace(config, max_steps=search.TRIAL_STEPS, warmup_steps=search.TRIAL_STEPS // 2, quiet=True,
                    metrics_out=None, checkpoint_dir=None, checkpoint_every=None, resume=False, rebalance="off",
                    keep_last=None, keep_best=False, log_dir=None)
    return job_of(trial, job)


def resolve(config: TrainConfig, dataset: Dataset, *, job_devices: list[str], can_drop: bool,
            measure: Callable[[TrainConfig], dict], run_trial: Callable[[plan.Plan], float]) -> Job:
    """The job that runs ``config``: its plan given, built from the flags, or searched and tried."""
    if config.job is not None:
        return job_of(config, config.job)
    if not config.needs_search:
        fmt = measure(config)["memory_format"] if config.memory_format == "auto" else config.memory_format
        return job_of(config, plan_from_flags(config, model_groups(config, dataset), job_devices, fmt))
    steps = training_steps(config, dataset)
    short = config.strategy == "auto" and steps <= search.TRIAL_STEPS
    if short:
        log.warning("--strategy auto: the %d training steps are fewer than one of its trials (%d steps per plan, "
                    "after a profile of every device); --strategy kernel, single or ddp starts at once",
                    steps, search.TRIAL_STEPS)
    if config.device_memory and not (config.profile and Path(config.profile).exists()):
        log.warning("--device-memory: the job is profiled in its own workers first, each group whole on every "
                    "worker, which may pass the limit; profile beforehand (convshard profile --profile PATH) and "
                    "train with --profile PATH to keep within it")
    started = time.perf_counter()
    profile = memory.with_limits(measure(config), config.device_memory)
    profiled = time.perf_counter() - started
    groups = search.groups_of(profile)
    found = search.candidates(profile, can_drop=can_drop, threads=config.threads,
                              grad_precision=config.grad_precision)
    by_name = {c.name: c for c in found}
    trials: dict[str, float] = {}
    if config.strategy == "auto":
        pool = search.auto_candidates(found, profile)
        merged = all_cores(config, groups, profile.get("memory_format", "contiguous")) if can_drop else None
        tried = {c.name: c for c in search.worth_trying(pool)} | ({ALL_CORES: merged} if merged else {})
        if not short:
            _say_if_costly(config, steps, profiled, len(tried) if len(tried) > 1 else 0, search.fastest(pool))
        chosen, trials = _try(tried, run_trial)
    elif config.strategy == "layers":
        chosen = by_name.get("layers") or _without_layers(found, profile, job_devices)
    elif config.strategy == "ddp":
        chosen = by_name["ddp sized"]
    else:  # kernel with --shares auto: the best split, which may be one device
        chosen = search.fastest([c for c in found if c.name in ("single", "kernel")])
    job = chosen if isinstance(chosen, plan.Plan) else chosen.plan
    name = ALL_CORES if isinstance(chosen, plan.Plan) else chosen.name
    planning = {"chosen": name, "predicted": {c.name: c.prediction.step for c in found},
                "caps": None if name == ALL_CORES else chosen.caps,
                "trials": trials or None, "breakdown": None if name == ALL_CORES else chosen.prediction.to_json(),
                "text": search.format_candidates(found, chosen if name != ALL_CORES else search.fastest(found),
                                                 trials=trials)}
    slower = name != ALL_CORES and job.ranks is None and (config.strategy != "layers" or name == "layers")
    left_out = Counter(job_devices) - Counter(job.devices) if slower else Counter()  # else ``_without_layers`` said
    for device in left_out.elements():
        log.warning("%s gets no work: the plan predicts it would slow the step", device)
    if name == ALL_CORES:
        log.info("plan: one process on %s, measured %.1f ms/step", job.devices[0], 1000 * trials[ALL_CORES])
    else:
        log.info("plan: %s on %s, predicted %.1f ms/step", name, ", ".join(job.devices),
                 1000 * chosen.prediction.step)
    return job_of(config, job, planning=planning, profile=None if name == ALL_CORES else chosen.profile)


def _without_layers(found: list[search.Candidate], profile: Mapping, job_devices: list[str]) -> search.Candidate:
    """What ``--strategy layers`` runs where the planner found no per-layer
    split (one device listed, a model that cannot be traced, or no split of
    two or more devices within their memory): the faster of one device alone
    and the all-kernel split, said in one line with why; else a one-line refusal."""
    if len(job_devices) < 2:
        why = "one device is listed"
    elif not search.batch_mode(profile):
        why = "the model cannot be traced, so no group runs in batch mode"
    else:
        why = "no per-layer split of two or more of the devices fits their memory"
    instead = {c.name: c for c in found if c.name in ("single", "kernel")}
    if not instead:
        raise ConfigError(f"--strategy layers: {why}, nor does one device alone or the all-kernel split; only "
                          f"DDP does (--strategy ddp)")
    chosen = search.fastest(list(instead.values()))
    idle = list((Counter(job_devices) - Counter(chosen.plan.devices)).elements()) if chosen.plan.ranks is None else []
    dropped = ("" if not idle else f", {', '.join(idle)} without work" + (
        ": the kernel split is predicted slower" if "kernel" in instead else
        "" if why.startswith("no per-layer") else ": no kernel split fits their memory"))
    log.warning("--strategy layers: %s; running %s on %s instead%s", why, chosen.name, ", ".join(chosen.plan.devices),
                dropped)
    return chosen


def training_steps(config: TrainConfig, dataset: Dataset) -> int:
    """The optimizer steps the run will take: its epochs, or fewer with --max-steps."""
    steps = config.epochs * math.ceil(len(dataset.train_y) / config.batch_size)
    return min(steps, config.max_steps) if config.max_steps else steps


def _say_if_costly(config: TrainConfig, steps: int, profiled: float, trials: int, best: search.Candidate) -> None:
    """One line when the profile (``profiled`` seconds) and ``trials`` trials,
    priced at the fastest predicted step, cost more than the ``steps``
    training steps they choose a plan for."""
    step = best.prediction.step
    trying = trials * search.TRIAL_STEPS * step
    if profiled + trying > steps * step:
        log.warning("--strategy auto: profiling took %.1f s and %d trial(s) of %d steps take about %.1f s, more than "
                    "the %d training steps they choose a plan for (about %.1f s); --strategy kernel, single or "
                    "ddp starts at once", profiled, trials, search.TRIAL_STEPS, trying, steps, steps * step)


def _try(tried: Mapping[str, search.Candidate | plan.Plan],
         run_trial: Callable[[plan.Plan], float]) -> tuple[search.Candidate | plan.Plan, dict[str, float]]:
    """The fastest measured of ``tried`` (the candidates worth trying and
    one process on all cores), each run by ``run_trial``; their seconds per step."""
    if len(tried) == 1:
        (name, only), = tried.items()
        log.info("--strategy auto: %s is the only plan predicted within %.0f%% of the fastest: no trials",
                 name, 100 * search.TRIAL_MARGIN)
        return only, {}
    trials = {name: run_trial(c if isinstance(c, plan.Plan) else c.plan) for name, c in tried.items()}
    best = min(trials, key=trials.get)
    log.info("%s", format_trials(tried, trials))
    return tried[best], trials


def format_trials(tried: Mapping[str, search.Candidate | plan.Plan], trials: Mapping[str, float]) -> str:
    """auto's trials as a table, fastest measured first, each with its
    predicted step (one process on all cores has none), then the choice and
    one line why: how far ahead it ran, and whether the cost model agreed."""
    ranked = sorted(trials, key=trials.get)
    best = ranked[0]
    width = max(len("plan"), *(len(n) for n in ranked))
    timed = search.TRIAL_STEPS - search.TRIAL_STEPS // 2
    lines = [f"--strategy auto tried {len(ranked)} plans, {search.TRIAL_STEPS} steps each ({timed} timed):",
             f"  {'plan':<{width}}  {'predicted ms':>12}  {'measured ms':>11}  devices"]
    for name in ranked:
        c = tried[name]
        job = c if isinstance(c, plan.Plan) else c.plan
        predicted = "-" if isinstance(c, plan.Plan) else f"{1e3 * c.prediction.step:.1f}"
        lines.append(f"  {name:<{width}}  {predicted:>12}  {1e3 * trials[name]:>11.1f}  {', '.join(job.devices)}")
    why = f"chosen: {best}, the fastest measured"
    if len(ranked) > 1:
        runner = ranked[1]
        why += f", {1 - trials[best] / trials[runner]:.1%} less per step than {runner}"
    predicted = [n for n in ranked if isinstance(tried[n], search.Candidate)]
    if predicted:
        first = min(predicted, key=lambda n: tried[n].prediction.step)
        why += ("; the cost model predicted it fastest too" if first == best else
                f"; the cost model predicted {first} fastest" if best in predicted else
                f"; the cost model prices no one-process job on all cores (it predicted {first} fastest)")
    return "\n".join([*lines, why])
