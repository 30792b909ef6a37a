"""The training loop: one function that every worker runs, whatever the plan.

``train_worker(job)`` is SPMD: every process of a job calls it with the
same ``config.Job``, under ``launch_local`` or alone in the calling process;
under torchrun, where no launcher planned the job, ``torchrun_worker(config)``
first resolves the plan alike on every rank (``trials.resolve``). A worker
joins the job (``join.join``: the process group, its device, the data;
every rank sees the same batches: the order is a pure function of seed and
epoch, so no image crosses the network). Then it runs
the job's plan through the engine the plan asks for
(``convshard.run.engines``): the model from the seed, wrapped by the
engine, and one loop, the same for every plan, which reads the plan and the
run's settings and nothing else.

Rank 0 shows a progress bar, logs, writes checkpoints (``saving``: when,
and in the background) and the metrics JSON; the rank holding the newest
checkpoint reads it for every rank (``saving.resume_point``).
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import math
import statistics
import time
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .. import atomic, data, devices, loader, plan, precision
from ..errors import ConfigError, TrainingError
from ..parallel import comm
from ..parallel.sharded import full_state_dict, load_full_state_dict, sharded_parameters
from ..profile.nominal import nominal
from . import checkpoint, inference, launch, metrics, saving, trials
from .join import in_terminal, job_group, join, measure_job
from .optim import clip_gradients, learning_rate, make_optimizer
from .rebalance import Rebalancer
from .config import Job, RunSettings, TrainConfig, make_model
from .engines import Engine, engine_for
from .logbook import Logbook

log = logging.getLogger(__name__)

__all__ = ["torchrun_worker", "train_worker"]


@dataclass
class _Run:
    """One rank's view of a training run."""

    job: Job  # what runs: the plan as it started, the settings
    plan: plan.Plan  # the plan as it stands (rebalancing re-splits it)
    dataset: data.Dataset
    engine: Engine  # how the plan's model is built, fed and synchronised
    model: nn.Module  # as the engine wrapped it
    optimizer: torch.optim.Optimizer
    progress: dict  # epoch, batch (within the epoch), step, history: what a checkpoint restores
    device: torch.device
    clock: metrics.StepClock = field(default_factory=metrics.StepClock)
    rebalancer: Rebalancer | None = None
    scaler: precision.LossScaler = field(default_factory=lambda: precision.LossScaler(False))  # fp16's loss scale
    logbook: Logbook | None = None  # rank 0 with --log-dir
    losses: deque = field(default_factory=lambda: deque(maxlen=metrics.TIMELINE_STEPS))  # last steps' losses
    batches: loader.TrainBatches | None = None  # the training batches from here to the end, prepared ahead
    decoded: int = 0  # images this rank decoded for training, in the loaders it has closed
    test_batches: loader.TestBatches | None = None  # this rank's test images, its loader kept between evaluations
    saves: saving.Schedule | None = None  # when the run saves and stops (None: trials, which never save)
    writer: saving.Writer = field(default_factory=saving.Writer)  # rank 0 writes checkpoints in the background

    @property
    def settings(self) -> RunSettings:
        return self.job.settings

    @property
    def rank(self) -> int:
        return self.engine.rank

    @property
    def group(self) -> comm.Group:
        return self.engine.group

    @property
    def memory_format(self) -> torch.memory_format:
        return precision.memory_format(self.plan.memory_format)

    @property
    def workers(self) -> int:
        """Loader processes of this rank (``--workers``, or the device's default)."""
        given = self.settings.workers
        return given if given is not None else loader.default_workers(self.dataset, self.device)

    @property
    def net(self) -> nn.Module:
        """The model without an engine's wrapper."""
        return self.engine.net(self.model)


def train_worker(job: Job, dataset: data.Dataset | None = None) -> dict | None:
    """Run ``job`` as one of its started processes (``launch_local``, or
    alone in the calling process); rank 0 returns the metrics, others None.
    ``dataset`` is the run's data when the caller has loaded it already."""
    device_of = lambda local_rank: devices.parse_devices(job.plan.devices[local_rank])[0]  # noqa: E731
    rank, _, device_spec, dataset = join(job.settings, dataset, device_of, job.threads_for,
                                          devices.backend_for([device_of(r) for r in range(job.plan.world)]))
    return _run(job, dataset, device_spec, rank)


def torchrun_worker(config: TrainConfig, dataset: data.Dataset | None = None) -> dict | None:
    """Train as one rank of a torchrun job: every rank plans alike from the
    same profile and trials (``_resolve_here``), then runs the plan."""
    listed = config.device_list
    rank, world, device_spec, dataset = join(
        config, dataset, lambda local_rank: listed[local_rank],
        lambda device: config.threads or devices.default_threads(device, listed), devices.backend_for(listed))
    job = _resolve_here(config, dataset, device_spec)
    if job.plan.ranks is None and job.plan.world != world:
        raise ConfigError(f"the plan runs {job.plan.world} workers ({', '.join(job.plan.devices)}); "
                          f"this job has {world}")
    return _run(job, dataset, device_spec, rank)


def _run(job: Job, dataset: data.Dataset, device_spec: devices.Device, rank: int) -> dict | None:
    """Run ``job`` as ``rank`` of the job every process joined, through its
    engine; leave the job; rank 0 writes and returns the metrics."""
    log.info("data: %s, %d train / %d test images of %s, %d classes", dataset.name, len(dataset.train_y),
             len(dataset.test_y), "x".join(map(str, dataset.input_shape)), dataset.classes)
    engine = engine_for(job.plan, rank, job_group(), timeout=job.settings.timeout)
    with engine.session():
        result = _train(job, dataset, device_spec, engine) if engine.trains else None
    launch.shutdown()
    if result is None:
        return None
    if job.settings.metrics_out:
        atomic.write_text(job.settings.metrics_out, json.dumps(result, indent=2) + "\n")
        log.info("metrics written to %s", job.settings.metrics_out)
    return result


def _train(job: Job, dataset: data.Dataset, device_spec: devices.Device, engine: Engine) -> dict | None:
    """Run ``job``'s plan through ``engine`` to the end; rank 0's metrics, None elsewhere."""
    run = _setup(job, dataset, device_spec.torch_device, engine)
    all_devices = comm.gather_objects(str(device_spec), group=run.group)  # every rank's device, in rank order
    numerics = "".join([f", precision {run.plan.precision}" if run.plan.precision != "32" else "",
                        ", channels_last" if run.plan.memory_format == "channels_last" else ""])
    log.info("%s: %d worker(s) on %s (rank 0: %d thread(s)%s)", run.plan.name, run.plan.world,
             ", ".join(all_devices), torch.get_num_threads(), numerics)
    started = time.perf_counter()
    if run.rank == 0 and run.settings.log_dir:
        run.logbook = Logbook(run.settings.log_dir, resumed=run.progress if run.progress["step"] else None)
    metrics.record_plan(run.progress, run.plan, all_devices)
    try:
        with saving.StopSignal(armed=run.settings.checkpoint_dir is not None) as stop:
            run.saves = saving.Schedule(run.settings, stop, rank=run.rank, group=run.group)
            _epochs(run)
        _close_batches(run)
    finally:
        if run.logbook is not None:
            run.logbook.close()
        run.writer.wait()
    result = metrics.summary(
        config_json=job.record, job=job.plan.to_json(), final_job=run.plan.to_json(),
        planning=job.planning, strategy=job.plan.name, progress=run.progress, clock=run.clock,
        world=run.plan.world, all_devices=all_devices, rebalances=run.rebalancer.events if run.rebalancer else [],
        shares={k: list(v) for k, v in run.engine.kernel_counts().items()}, seconds=time.perf_counter() - started)
    result["step_loss"] = list(run.losses)  # rank 0's loss of each step of ``step_seconds``
    result["timeline"] = metrics.timeline(run.clock, group=run.group, decoded=run.decoded)
    result["data"] = metrics.data_summary(run.clock, result["timeline"], images=run.clock.all_images)
    return result if run.rank == 0 else None


def _epochs(run: _Run) -> None:
    """Train and test epoch by epoch to the end of the run, saving after each."""
    while not _finished(run):
        epoch_start = time.perf_counter()
        train_loss = _train_epoch(run)
        accuracy = _evaluate(run)
        seconds = time.perf_counter() - epoch_start
        progress = run.progress
        epoch = progress["epoch"] if progress["batch"] else progress["epoch"] - 1
        if progress["history"] and progress["history"][-1]["epoch"] == epoch + 1:  # resumed mid-epoch: it ends now
            progress["history"].pop()
        progress["history"].append({"epoch": epoch + 1, "steps": progress["step"], "train_loss": train_loss,
                                    "test_accuracy": accuracy, "seconds": seconds})
        log.info("epoch %d: train loss %.4f, test accuracy %.4f, %.1f s", epoch + 1, train_loss, accuracy, seconds)
        if run.logbook is not None:
            run.logbook.epoch(epoch=epoch + 1, step=progress["step"], train_loss=train_loss, test_accuracy=accuracy,
                              seconds=seconds)
        _save(run, accuracy)
        if run.saves.stopping and not _finished(run):
            raise saving.stopped(run.progress["step"], run.settings.checkpoint_dir)


def _setup(job: Job, dataset: data.Dataset, device: torch.device, engine: Engine) -> _Run:
    """The plan's model as its engine wraps it, its optimizer and the progress
    so far (from the checkpoint with ``--resume``, or after a torchrun restart)."""
    settings, group = job.settings, engine.group
    model = make_model(settings, dataset)
    saved = saving.resume_point(settings, group)
    if saved is not None:
        where = checkpoint.path_in(settings.checkpoint_dir)
        try:
            load_full_state_dict(model, saved["model"])  # before sharding: each rank then takes its slice
        except ConfigError as exc:
            raise ConfigError(f"checkpoint {where} does not fit this model: it was written by "
                              f"{checkpoint.written_by(saved.get('config', {}))}, this run is "
                              f"{checkpoint.written_by(job.record)}; {exc}") from None
        log.info("resuming from %s at step %d", settings.checkpoint_dir, saved["progress"]["step"])
        if engine.rank == 0 and (changed := checkpoint.changes(saved.get("config", {}), job.record)):
            log.warning("%s was written with %s: continuing with this run's", where, changed)
    model = engine.wrap(model.to(device, memory_format=precision.memory_format(job.plan.memory_format)))
    optimizer = make_optimizer(settings, model.parameters())
    run = _Run(job, job.plan, dataset, engine, model, optimizer, {"epoch": 0, "batch": 0, "step": 0,
               "history": []}, device, metrics.StepClock(settings.warmup_steps))
    run.rebalancer = _rebalancer(job, engine, dataset)
    run.scaler = precision.LossScaler(job.plan.precision == "fp16")
    if saved is not None:
        checkpoint.load_full_optimizer_state_dict(run.net, optimizer, saved["optimizer"],
                                                  source=f"checkpoint {where}")
        run.progress = saved["progress"]
        run.scaler.load_state_dict(saved.get("loss_scale", {}))
    return run


def _rebalancer(job: Job, engine: Engine, dataset: data.Dataset) -> Rebalancer | None:
    """The run's rebalancer (None when it moves nothing: mode off, one rank,
    no kernel split), pricing splits on the job's profile, or on a nominal
    one for a plan that was given (``profile.nominal``)."""
    if job.rebalance == "off" or job.plan.world == 1 or job.plan.engine == plan.DDP or job.plan.ranks is not None:
        return None
    priced = job.profile
    if priced is None:
        priced = nominal(make_model(job.settings, dataset), devices=job.plan.devices,
                         input_shape=dataset.input_shape, batch_size=job.plan.batch_size,
                         precision=job.plan.precision)
    return Rebalancer(priced, job.rebalance, group=engine.group)


def _finished(run: _Run) -> bool:
    config, progress = run.settings, run.progress
    out_of_steps = config.max_steps is not None and progress["step"] >= config.max_steps
    return out_of_steps or progress["epoch"] >= config.epochs


def _train_epoch(run: _Run) -> float:
    """Train from ``run.progress`` to the end of its epoch (or to --max-steps),
    advancing the progress and timing each step; returns the mean training loss."""
    config, progress, batch_size = run.settings, run.progress, run.plan.batch_size
    n_train = len(run.dataset.train_y)
    steps_per_epoch = math.ceil(n_train / batch_size)
    total_steps = config.epochs * steps_per_epoch  # --max-steps stops a run early, it does not shorten the schedule
    epoch = progress["epoch"]
    loss_sum, seen = 0.0, 0
    speaks = run.rank == 0 and not config.quiet
    bar = tqdm(total=steps_per_epoch, initial=progress["batch"], desc=f"epoch {epoch + 1}/{config.epochs}",
               unit="step", disable=not (speaks and in_terminal()), leave=False, dynamic_ncols=True)
    while progress["batch"] < steps_per_epoch and not _finished(run):
        b = progress["batch"]
        n = min(batch_size, n_train - b * batch_size)  # the global batch's images
        lr = learning_rate(config, progress["step"], total_steps)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        if run.batches is None:
            run.batches = _batches(run)
        t0, in_collectives = time.perf_counter(), comm.seconds_in_collectives()
        x, y, waited = run.batches.next()
        loss, mine = _step(run, x, y, n)
        if run.device.type == "cuda":
            torch.cuda.synchronize(run.device)
        run.clock.add(time.perf_counter() - t0, comm.seconds_in_collectives() - in_collectives, n, waited, t0)
        loss_sum, seen = loss_sum + loss * mine, seen + mine
        progress["batch"], progress["step"] = b + 1, progress["step"] + 1
        if run.rebalancer is not None:
            moved = run.rebalancer.observe(progress["step"], run.clock.seconds[-1] - run.clock.collective[-1],
                                           run.plan)
            if moved is not None:
                rows = _rows(run)
                run.engine.apply(moved, run.optimizer)
                run.plan = moved
                if _rows(run) != rows:  # a batch-mode group's rows moved: read the new ones from here
                    _close_batches(run)
        run.losses.append(loss)
        if run.logbook is not None:
            run.logbook.step(step=progress["step"], epoch=epoch + 1, loss=loss, lr=lr,
                             seconds=run.clock.seconds[-1], images=n)
        bar.update()
        bar.set_postfix(loss=f"{loss:.4f}", ms=f"{1000 * run.clock.seconds[-1]:.0f}")
        if speaks and bar.disable and progress["step"] % config.log_every == 0:
            recent = list(itertools.islice(reversed(run.clock.seconds), config.log_every))
            log.info("step %d/%d (epoch %d/%d): loss %.4f, lr %.3g, %.1f ms/step, %.1f images/s", progress["step"],
                     min(config.max_steps or total_steps, total_steps), epoch + 1, config.epochs, loss, lr,
                     1000 * statistics.fmean(recent), batch_size / statistics.fmean(recent))
        verdict = run.saves.after_step(progress["step"]) if run.saves else saving.GO_ON
        if b + 1 < steps_per_epoch:  # the end of an epoch evaluates and saves anyway
            if config.eval_every and progress["step"] % config.eval_every == 0:
                _evaluate_now(run)
            elif verdict != saving.GO_ON:
                _save(run)
            if verdict == saving.STOP and not _finished(run):  # the writer is waited for on the way out
                raise saving.stopped(progress["step"], config.checkpoint_dir)
    bar.close()
    if progress["batch"] == steps_per_epoch:
        progress["epoch"], progress["batch"] = epoch + 1, 0
    totals = run.engine.reduce(torch.tensor([loss_sum, float(seen)], dtype=torch.float64, device=run.device))
    return (totals[0] / totals[1].clamp(min=1)).item()


def _step(run: _Run, x: torch.Tensor, y: torch.Tensor, n: int) -> tuple[float, int]:
    """One optimizer step on a global batch of ``n`` images, of which this
    rank feeds the rows its engine names: ``x`` (b, C, H, W) and labels
    ``y`` (b,), b = n or this rank's share. Returns this rank's mean loss
    and b."""
    config = run.settings
    x = x.to(run.device, getattr(torch, config.dtype), memory_format=run.memory_format, non_blocking=True)
    y = y.to(run.device, non_blocking=True)
    run.optimizer.zero_grad(set_to_none=True)
    with precision.autocast(run.device, run.plan.precision):
        out = run.model(x)  # (b, classes), in the compute dtype
    loss_sum = F.cross_entropy(out.to(x.dtype), y, reduction="sum",  # the loss in the model's dtype
                               label_smoothing=config.label_smoothing)
    mean_loss = loss_sum.item() / max(1, len(y))
    if not math.isfinite(mean_loss):
        kept = f"; the last good checkpoint is in {config.checkpoint_dir}" if config.checkpoint_dir else ""
        raise TrainingError(f"training loss became {mean_loss} at step {run.progress['step'] + 1}{kept}; "
                            f"try a lower --lr than {config.lr:g}")
    # the gradient of the mean loss over the global batch (fp16: times the loss scale)
    (loss_sum * (run.engine.loss_scale(n) * run.scaler.scale)).backward()
    run.engine.after_backward()
    if run.scaler.unscale(run.model.parameters(), run.group):  # fp16: every rank skips an overflowed step alike
        if config.clip_grad_norm is not None:  # kernel-mode shards are summed over the job's group
            clip_gradients(run.net, config.clip_grad_norm, sharded=sharded_parameters(run.net),
                           group=run.group if run.plan.kernel_counts() else None)
        run.optimizer.step()
    return mean_loss, len(y)


def _evaluate(run: _Run) -> float:
    """Test accuracy in [0, 1], over the test images each rank's engine names."""
    dataset, config = run.dataset, run.settings
    n = len(dataset.test)
    if run.test_batches is None:
        run.test_batches = loader.TestBatches(dataset, range(n)[run.engine.eval_rows(n)], run.plan.batch_size,
                                              run.workers)
    run.model.eval()
    correct = torch.zeros((), dtype=torch.long, device=run.device)
    with torch.no_grad():
        for x, y in run.test_batches:
            x = x.to(run.device, getattr(torch, config.dtype), memory_format=run.memory_format)
            with precision.autocast(run.device, run.plan.precision):
                correct += (run.net(x).argmax(1) == y.to(run.device)).sum()
    run.model.train()
    return run.engine.reduce(correct).item() / n


def _evaluate_now(run: _Run) -> None:
    """``--eval-every``: the test accuracy at this step, logged, kept in the
    progress (``evals``) and, with a checkpoint directory, saved with the
    checkpoint (the best one by it with ``--keep-best``)."""
    accuracy = _evaluate(run)
    step = run.progress["step"]
    run.progress.setdefault("evals", []).append({"step": step, "test_accuracy": accuracy})
    log.info("step %d: test accuracy %.4f", step, accuracy)
    _save(run, accuracy)


def _batches(run: _Run) -> loader.TrainBatches:
    """The training batches from the run's position to its end (``loader.for_run``)."""
    return loader.for_run(run.dataset, run.settings, run.progress, run.plan.batch_size, run.engine.rows,
                          group=run.group, workers=run.workers, pin=run.device.type == "cuda")


def _rows(run: _Run) -> list[slice]:
    """This rank's rows of each batch size the run uses."""
    return [run.engine.rows(n) for n in loader.batch_sizes(len(run.dataset.train), run.plan.batch_size)]


def _close_batches(run: _Run) -> None:
    """Stop the run's loader (every rank at the same step), counting what it decoded."""
    if run.batches is not None:
        run.batches.close()
        run.decoded += run.batches.decoded
        run.batches = None


def _save(run: _Run, accuracy: float | None = None) -> None:
    """Gather the unsharded state (a collective) and let rank 0 write it in
    the background (``saving.Writer``). ``accuracy``: the test accuracy at an
    evaluation, which ``--keep-best`` ranks."""
    config = run.settings
    if config.checkpoint_dir is None:
        return
    best = config.keep_best and accuracy is not None and accuracy > run.progress.get("best_accuracy", -1.0)
    if best:
        run.progress["best_accuracy"] = accuracy  # restored on resume with the rest of the progress
    payload = {
        "model": full_state_dict(run.net),
        "optimizer": checkpoint.full_optimizer_state_dict(run.net, run.optimizer),
        "progress": copy.deepcopy(run.progress),  # the write may finish steps later
        "config": run.job.record,
        "run_id": launch.run_id(),  # torchrun's rendezvous: a job it re-forms resumes from here
        "job_plan": run.plan.to_json(),
        "loss_scale": run.scaler.state_dict(),
        "inference": inference.spec(config, run.dataset),
    }
    if run.rank == 0:
        def write() -> None:
            path = checkpoint.save_checkpoint(config.checkpoint_dir, payload, keep_last=config.keep_last, best=best)
            log.info("checkpoint saved to %s at step %d%s", path, payload["progress"]["step"],
                     f", and as {checkpoint.BEST}: the best test accuracy so far" if best else "")
        run.writer.submit(write)
    if run.saves is not None:
        run.saves.saved()


def _resolve_here(config: TrainConfig, dataset: data.Dataset, device_spec: devices.Device) -> Job:
    """The job's plan, resolved alike on every rank of a torchrun job: its
    processes are fixed, so no device is dropped; a trial of one device
    runs on that rank while the others wait, and a trial's time is the
    slowest rank's mean step (one MAX all-reduce), so every rank chooses alike."""
    group = job_group()

    def run_trial(job: plan.Plan) -> float:
        trial = trials.as_trial(config, job)
        engine = engine_for(job, comm.rank(group), group, timeout=config.timeout)
        seconds = 0.0
        if engine.trains:  # the others wait in the MAX below
            run = _setup(trial, dataset, device_spec.torch_device, engine)
            while not _finished(run):
                _train_epoch(run)
            _close_batches(run)
            seconds = run.clock.mean() or math.inf
        return comm.reduce_scalar(seconds, op="max", group=group)

    job_devices = comm.gather_objects(str(device_spec), group=group)
    said = logging.getLogger(trials.__name__)  # every rank decides alike: rank 0 alone says why
    level = said.level
    if comm.rank(group) != 0:
        said.setLevel(logging.ERROR)
    try:
        return trials.resolve(config, dataset, job_devices=job_devices, can_drop=False, run_trial=run_trial,
                              measure=lambda c: measure_job(c, dataset, device_spec))
    finally:
        said.setLevel(level)
