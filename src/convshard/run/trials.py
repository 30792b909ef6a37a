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
from ..plan import explain, memory, search
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
    trial = replace(config, max_steps=config.trials, warmup_steps=config.trials // 2, quiet=True,
                    metrics_out=None, checkpoint_dir=None, checkpoint_every=None, resume=False, rebalance="off",
                    keep_last=None, keep_best=False, log_dir=None)
    return job_of(trial, job)


def resolve(config: TrainConfig, dataset: Dataset, *, job_devices: list[str], can_drop: bool,
            measure: Callable[[TrainConfig], dict], run_trial: Callable[[plan.Plan], float],
            startup: Callable[[], float] = lambda: 0.0) -> Job:
    """The job that runs ``config``: its plan given, built from the flags, or
    searched and tried. ``startup()`` is what a trial pays before its first
    step (starting its workers, as the profile's started), 0 where a trial
    runs in the processes already there."""
    if config.job is not None:
        return job_of(config, config.job)
    if not config.needs_search:
        fmt = measure(config)["memory_format"] if config.memory_format == "auto" else config.memory_format
        return job_of(config, plan_from_flags(config, model_groups(config, dataset), job_devices, fmt))
    steps = training_steps(config, dataset)
    short = config.strategy == "auto" and 0 < config.trials and steps <= config.trials
    if short:
        log.warning("--strategy auto: the %d training steps are fewer than one of its trials (%d steps per plan, "
                    "after a profile of every device); --trials 0 trains the predicted fastest plan, and "
                    "--strategy kernel, single or ddp starts at once", steps, config.trials)
    if config.device_memory and not (config.profile and Path(config.profile).exists()):
        log.warning("--device-memory: the job is profiled in its own workers first, each group whole on every "
                    "worker, which may pass the limit; profile beforehand (convshard profile --profile PATH) and "
                    "train with --profile PATH to keep within it")
    started = time.perf_counter()
    profile = memory.with_limits(measure(config), config.device_memory)
    profiled = time.perf_counter() - started
    groups = search.groups_of(profile)
    rejected: list[search.Candidate] = []
    found = search.candidates(profile, can_drop=can_drop, threads=config.threads,
                              grad_precision=config.grad_precision, rejected=rejected)
    by_name = {c.name: c for c in found}
    trials: dict[str, float] = {}
    if config.strategy == "auto":
        pool = search.auto_candidates(found, profile)
        merged = all_cores(config, groups, profile.get("memory_format", "contiguous")) if can_drop else None
        tried = {c.name: c for c in search.worth_trying(pool)} | ({ALL_CORES: merged} if merged else {})
        if config.trials == 0:
            chosen = search.fastest(pool)
            log.info("--trials 0: %s, the plan predicted fastest, trains untried", chosen.name)
        else:
            if not short and len(tried) > 1:
                _say_trials(config, steps, profiled, len(tried), search.fastest(pool), startup())
            chosen, trials = _try(tried, run_trial, config.trials)
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
                "text": explain.format_candidates(found, chosen if name != ALL_CORES else search.fastest(found),
                                                 trials=trials, left_out=explain.left_out_of_auto(found, profile)
                                                 if config.strategy == "auto" else None)}
    said = config.strategy == "layers" and name != "layers"  # ``_without_layers`` said why
    if job.ranks is None and name != ALL_CORES and not said:
        for line in explain.left_out(profile, chosen, found, rejected):
            log.warning("%s", line)
    if name == ALL_CORES:
        log.info("plan: one process on %s, measured %.1f ms/step", job.devices[0], 1000 * trials[ALL_CORES])
    else:
        log.info("plan: %s on %s, predicted %.1f ms/step", job.name, ", ".join(job.devices),  # its kind, as shown
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


def _say_trials(config: TrainConfig, steps: int, profiled: float, count: int, best: search.Candidate,
                startup: float) -> None:
    """One line, before the trials, of what they will cost: ``count``
    trials, each ``startup`` seconds to start plus ``config.trials`` steps at
    the fastest predicted step; a warning when the profile (``profiled``
    seconds) and the trials cost more than the ``steps`` training steps
    they choose a plan for. It names ``--trials 0``, the cheap way."""
    step = best.prediction.step
    trying = count * (startup + config.trials * step)
    costly = profiled + trying > steps * step
    more = f", more than the {steps} training steps they choose a plan for (about {steps * step:.1f} s)"
    (log.warning if costly else log.info)(
        "--strategy auto: %d trials take at least %.1f s: each starts its workers (%.1f s for the profile's, "
        "besides measuring; a trial also builds its model) and runs %d steps of about %.0f ms%s; --trials 0 "
        "trains the plan predicted fastest (%s) at once",
        count, trying, startup, config.trials, 1e3 * step, more if costly else "", best.name)


def _try(tried: Mapping[str, search.Candidate | plan.Plan], run_trial: Callable[[plan.Plan], float],
         steps: int) -> tuple[search.Candidate | plan.Plan, dict[str, float]]:
    """The fastest measured of ``tried`` (the candidates worth trying and
    one process on all cores), each run by ``run_trial`` for ``steps``
    steps; their seconds per step."""
    if len(tried) == 1:
        (name, only), = tried.items()
        log.info("--strategy auto: %s is the only plan predicted within %.0f%% of the fastest: no trials",
                 name, 100 * search.TRIAL_MARGIN)
        return only, {}
    started = time.perf_counter()
    trials = {name: run_trial(c if isinstance(c, plan.Plan) else c.plan) for name, c in tried.items()}
    best = min(trials, key=trials.get)
    log.info("%s", format_trials(tried, trials, steps, time.perf_counter() - started))
    return tried[best], trials


def format_trials(tried: Mapping[str, search.Candidate | plan.Plan], trials: Mapping[str, float],
                  steps: int = search.TRIAL_STEPS, seconds: float | None = None) -> str:
    """auto's trials (``steps`` each, ``seconds`` in all, start-up
    included) as a table, fastest measured first, each with its predicted
    step (one process on all cores has none), then the choice and one line
    why: how far ahead it ran, and whether the cost model agreed."""
    ranked = sorted(trials, key=trials.get)
    best = ranked[0]
    width = max(len("plan"), *(len(n) for n in ranked))
    took = f", {seconds:.1f} s in all" if seconds is not None else ""
    lines = [f"--strategy auto tried {len(ranked)} plans, {steps} steps each ({steps - steps // 2} timed){took}:",
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
