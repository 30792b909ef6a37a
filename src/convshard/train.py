"""The training loop: one function that every worker runs, whatever the strategy.

``train_worker(config)`` is SPMD: every rank of a job calls it with the same
config, under ``launch_local``, under torchrun, or alone in the calling
process. It joins the job (``launch.init_from_env``), pins itself to its
device, loads the data (every rank sees the same batches: the order is a
pure function of seed and epoch, so no image crosses the network), builds
the model from the seed and trains it with one of three strategies:

- ``kernel``: the paper's method, every conv layer's kernels sharded across
  the ranks (``shard_model``), the rest replicated;
- ``single``: one process on the first device, the baseline;
- ``ddp``: PyTorch DistributedDataParallel, the global batch split evenly
  (or by ``--shares``);
- ``layers``: a per-layer plan (``convshard.perlayer``): each channel group
  splits its kernels or the batch, whichever the profile says costs less;
- ``auto``: the one ``plan.make_plan`` predicts fastest from a profile.

``kernel``, ``layers`` and ``single`` run the same path: a plan (modes,
kernels and rows per rank; ``TrainConfig.job_plan``) applied by
``shard_model``. A run's plan is saved in its metrics JSON and runs again
with ``--plan FILE``.

``--shares auto`` and ``--strategy auto`` are turned into a concrete job
(strategy, devices, kernels per layer per rank) before training: by the
local launcher (``tune.prepare``), or here, on every rank, under torchrun.

All three see the same global batches, so they train the same model up to
float rounding. Rank 0 shows a progress bar, logs, writes checkpoints and
the metrics JSON. It also answers every question about files for the job:
it reads the checkpoint and the profile cache and sends them to every rank,
so hosts need not share storage and never act on different answers.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import TypeVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from . import alone, atomic, checkpoint, comm, data, devices, launch, plan, profile
from .errors import ConfigError, TrainingError
from .models import build_model
from .rebalance import Rebalancer, parse_mode
from .sharded import layer_counts, load_full_state_dict, full_state_dict, shard_model, split_counts, sync_replicas

log = logging.getLogger(__name__)

STRATEGIES: tuple[str, ...] = ("kernel", "single", "ddp", "layers", "auto")
SHARDED = ("kernel", "layers")  # strategies that run through ``shard_model``'s layouts
SIZED_DDP_GAIN = 0.03  # auto gives ddp a batch split sized to the devices when predicted this much faster
OPTIMIZERS: tuple[str, ...] = ("sgd", "adam")
SCHEDULES: tuple[str, ...] = ("cosine", "constant")


@dataclass
class TrainConfig:
    """Everything one training run needs; identical on every rank."""

    devices: str = "cpu@0,cpu@1"  # one worker per device; see convshard.devices for the grammar
    threads: int | None = None  # intra-op threads per worker; None: the cores its device names
    strategy: str = "kernel"  # kernel | single | ddp | auto
    shares: tuple[float, ...] | str | None = None  # per rank: kernel share (ddp: batch share), "auto", or None: equal
    profile: str | None = None  # cache of the job's profile (JSON), reused while devices and model match
    rebalance: str | None = None  # off | auto | N: re-split the kernels online; None: auto when planned, else off
    layer_counts: dict[str, tuple[int, ...]] | None = None  # kernels per rank per layer, from a plan
    modes: dict[str, str] | None = None  # channel groups in "batch" mode (the rest split kernels), from a plan
    rows: tuple[float, ...] | None = None  # batch-mode row share per rank; None: equal
    plan: dict | None = None  # the plan that chose strategy, devices and layer_counts
    model: str = "paper"  # one of models.MODELS, or package.module:function
    kernels: tuple[int, ...] | None = None  # kernels per conv layer (ResNet, VGG: base width); None: the default
    dataset: str = "mnist"  # mnist | cifar10 | synthetic | folder
    data_dir: str = "data"  # where cifar10 and folder live
    image_size: int = 32  # side of the folder dataset's images
    augment: bool = False  # random crop and flip of every training batch, drawn from seed and step
    synthetic_shape: tuple[int, int, int] = (3, 32, 32)  # (C, H, W) of synthetic images
    synthetic_size: int = 1024  # synthetic training images (a quarter as many for test)
    epochs: int = 8
    max_steps: int | None = None  # stop after this many optimizer steps in total
    batch_size: int = 64  # global batch, the same for every strategy
    optimizer: str = "sgd"  # sgd (with momentum) | adam
    lr: float = 0.05
    momentum: float = 0.9  # SGD only
    schedule: str = "cosine"  # cosine: lr decays to 0 over the run | constant
    seed: int = 0
    warmup_steps: int = 3  # steps left out of mean_step_seconds
    timeout: float = 300.0  # seconds any collective may wait before the job fails
    quiet: bool = False  # no progress bar, warnings only
    metrics_out: str | None = None  # write the metrics JSON here
    checkpoint_dir: str | None = None  # save <dir>/checkpoint.pt after every epoch
    checkpoint_every: int | None = None  # ... and also every this many optimizer steps
    resume: bool = False  # continue from the checkpoint in checkpoint_dir
    device_list: tuple[devices.Device, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.device_list = devices.parse_devices(self.devices)

    @property
    def needs_plan(self) -> bool:
        """Whether strategy or shares are still to be chosen from a profile."""
        return self.plan is None and (self.strategy == "auto" or self.shares == "auto"
                                      or (self.strategy == "layers" and self.modes is None))

    @property
    def rebalance_mode(self) -> str | int:
        """The ``--rebalance`` mode in effect: a planned split (kernels, batch
        rows) is corrected online (``auto``) unless the user said otherwise."""
        if self.rebalance is not None:
            return parse_mode(self.rebalance)
        return "auto" if self.plan is not None and self.strategy in SHARDED else "off"

    def threads_for(self, device: devices.Device) -> int:
        """Intra-op threads of ``device``'s worker."""
        return self.threads or devices.default_threads(device, self.device_list[: self.world_size])

    @property
    def world_size(self) -> int:
        """Processes this config starts on one host: 1 for ``single``."""
        return 1 if self.strategy == "single" else len(self.device_list)

    def job_plan(self) -> dict:
        """What this job runs, as data: the strategy, its devices and threads, every
        split (kernels per rank per group, batch-mode groups and their rows,
        ddp's batch shares). ``--plan FILE`` runs it again."""
        return {"strategy": self.strategy, "devices": self.devices, "threads": self.threads,
                "layer_counts": {k: list(v) for k, v in (self.layer_counts or {}).items()} or None,
                "modes": self.modes, "rows": list(self.rows) if self.rows else None,
                "shares": list(self.shares) if isinstance(self.shares, tuple) else None}

    def with_job_plan(self, job: dict) -> TrainConfig:
        """This config running ``job`` (from ``job_plan``, e.g. a run's metrics)."""
        if not isinstance(job, dict) or job.get("strategy") not in STRATEGIES[:-1]:
            raise ConfigError(f"a plan names its strategy, one of {', '.join(STRATEGIES[:-1])}; got "
                              f"{job.get('strategy') if isinstance(job, dict) else job!r}")
        threads = job.get("threads")
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ConfigError(f"a plan's threads are a count of at least 1; got {threads!r}")
        counts = {k: tuple(int(c) for c in v) for k, v in (job.get("layer_counts") or {}).items()} or None
        return replace(self, strategy=job["strategy"], devices=job.get("devices") or self.devices,
                       threads=threads or self.threads, layer_counts=counts, modes=job.get("modes"),
                       rows=tuple(float(r) for r in job["rows"]) if job.get("rows") else None,
                       shares=tuple(float(w) for w in job["shares"]) if job.get("shares") else None,
                       plan=job)

    def to_json(self) -> dict:
        out = asdict(self)
        out.pop("device_list")
        out.pop("plan")  # the metrics JSON carries it on its own
        return out


def load_data(config: TrainConfig) -> data.Dataset:
    """The run's dataset, the same on every rank."""
    return data.load_dataset(
        config.dataset, data_dir=config.data_dir, seed=config.seed,
        synthetic_shape=config.synthetic_shape,
        synthetic_sizes=(config.synthetic_size, max(1, config.synthetic_size // 4)),
        image_size=config.image_size,
    )


def make_model(config: TrainConfig, dataset: data.Dataset) -> nn.Module:
    """The unsharded model, initialised from the seed: identical on every rank."""
    torch.manual_seed(config.seed)
    return build_model(config.model, dataset.input_shape, dataset.classes, config.kernels)


def _make_optimizer(config: TrainConfig, params) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum)


def learning_rate(config: TrainConfig, step: int, total_steps: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based) of ``total_steps``.

    cosine: lr * (1 + cos(pi * step / total_steps)) / 2. A pure function of
    the step, so a resumed run follows the same schedule.
    """
    if config.schedule == "constant":
        return config.lr
    return config.lr * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))


def _setup_logging(rank: int, quiet: bool) -> None:
    level = logging.INFO if rank == 0 and not quiet else logging.WARNING
    fmt = "%(message)s" if rank == 0 else f"rank {rank}: %(message)s"
    logging.basicConfig(level=level, format=fmt, force=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batch_part(config: TrainConfig, n: int, rank: int, world: int) -> slice:
    """This rank's part of a global batch of n under ``ddp``: split by
    ``--shares`` when given (largest remainders), else as evenly as possible."""
    if isinstance(config.shares, tuple):
        counts = split_counts(n, config.shares)
        return slice(sum(counts[:rank]), sum(counts[: rank + 1]))
    return _rank_slice(n, rank, world)


def _rank_slice(n: int, rank: int, world: int) -> slice:
    """Rank's part of n items split as evenly as possible (DDP's batch split)."""
    return slice(rank * n // world, (rank + 1) * n // world)


TIMELINE_STEPS = 2000  # the metrics keep every rank's timings of the last this many steps


@dataclass
class _StepClock:
    """This process's step timings: running sums for the mean, the last
    TIMELINE_STEPS steps in full, so memory stays flat over a long run."""

    warmup: int = 3
    count: int = 0
    total: float = 0.0  # seconds of all steps
    timed: float = 0.0  # seconds of the steps after the warm-up
    seconds: deque = field(default_factory=lambda: deque(maxlen=TIMELINE_STEPS))  # each step's wall time
    ends: deque = field(default_factory=lambda: deque(maxlen=TIMELINE_STEPS))  # unix time at each step's end
    collective: deque = field(default_factory=lambda: deque(maxlen=TIMELINE_STEPS))  # its seconds in collectives

    def add(self, seconds: float, in_collectives: float) -> None:
        self.count += 1
        self.total += seconds
        self.timed += seconds if self.count > self.warmup else 0.0
        self.seconds.append(seconds)
        self.ends.append(time.time())
        self.collective.append(in_collectives)

    def mean(self) -> float | None:
        """Mean step seconds after the warm-up (of every step when there were no more)."""
        if self.count > self.warmup:
            return self.timed / (self.count - self.warmup)
        return self.total / self.count if self.count else None


@dataclass
class _Run:
    """One rank's view of a training run."""

    config: TrainConfig
    dataset: data.Dataset
    model: nn.Module  # sharded (kernel), DDP-wrapped (ddp) or plain (single)
    optimizer: torch.optim.Optimizer
    progress: dict  # epoch, batch (within the epoch), step, history: what a checkpoint restores
    device: torch.device
    rank: int
    world: int
    group: comm.Group  # the job's process group (None without one)
    clock: _StepClock = field(default_factory=_StepClock)
    rebalancer: Rebalancer | None = None

    @property
    def net(self) -> nn.Module:
        """The model without its DDP wrapper."""
        return self.model.module if isinstance(self.model, nn.parallel.DistributedDataParallel) else self.model


def _evaluate(run: _Run) -> float:
    """Test accuracy in [0, 1]. With ``ddp`` each rank scores its part of the test set."""
    dataset, config = run.dataset, run.config
    run.model.eval()
    n = len(dataset.test_y)
    part = _rank_slice(n, run.rank, run.world) if config.strategy == "ddp" else slice(0, n)
    correct = torch.zeros((), dtype=torch.long, device=run.device)
    with torch.no_grad():
        for i in range(part.start, part.stop, config.batch_size):
            j = min(i + config.batch_size, part.stop)
            x, y = dataset.test_x[i:j].to(run.device), dataset.test_y[i:j].to(run.device)
            correct += (run.net(x).argmax(1) == y).sum()
    if config.strategy == "ddp" and run.world > 1:
        dist.all_reduce(correct, group=run.group)
    run.model.train()
    return correct.item() / n


def train_worker(config: TrainConfig, dataset: data.Dataset | None = None) -> dict | None:
    """Train as one rank of the job; rank 0 returns the metrics, others None.
    ``dataset`` is the run's data when the caller has loaded it already."""
    rank, world, device_spec, dataset = _join(config, dataset)
    threads = config.threads_for(device_spec)
    log.info("data: %s, %d train / %d test images of %s, %d classes", dataset.name, len(dataset.train_y),
             len(dataset.test_y), "x".join(map(str, dataset.input_shape)), dataset.classes)
    group = job_group()
    if config.needs_plan:  # under torchrun: every rank plans from the same profile
        config = _plan_in_worker(config, dataset, device_spec)
    if config.strategy == "single" and world > 1:  # torchrun, and the plan's one device trains alone
        lone = config.plan["best_single"]
        group = alone.group_of(lone)
        if rank != lone:
            alone.stand_by(lone, config.plan["devices"][lone], config.timeout)
            launch.shutdown()
            return None
        rank, world = 0, 1  # its own group's
        with alone.training_alone(config.timeout):
            metrics = _train(config, dataset, device_spec, threads, group, rank, world)
    else:
        metrics = _train(config, dataset, device_spec, threads, group, rank, world)
    launch.shutdown()
    if rank != 0:
        return None
    if metrics["mean_step_seconds"] is not None:
        log.info("test accuracy %.4f | train loss %.4f | %.1f ms/step | %.1f images/s",
                 metrics["test_accuracy"], metrics["train_loss"], 1000 * metrics["mean_step_seconds"],
                 metrics["images_per_second"])
    if config.metrics_out:
        atomic.write_text(config.metrics_out, json.dumps(metrics, indent=2) + "\n")
        log.info("metrics written to %s", config.metrics_out)
    return metrics


def _train(config: TrainConfig, dataset: data.Dataset, device_spec: devices.Device, threads: int,
           group: comm.Group, rank: int, world: int) -> dict:
    """``train_worker`` once the job is planned: train as ``rank`` of
    ``world`` in ``group`` to the end; the run's metrics."""
    run = _setup(config, dataset, device_spec.torch_device, rank, world, group)
    all_devices = comm.gather_objects(str(device_spec), group=run.group)  # every rank's device, in rank order
    log.info("strategy %s: %d worker(s) on %s (rank 0: %d thread(s))", config.strategy, world,
             ", ".join(all_devices), threads)

    started = time.perf_counter()
    while not _finished(run):
        epoch_start = time.perf_counter()
        train_loss = _train_epoch(run)
        accuracy = _evaluate(run)
        seconds = time.perf_counter() - epoch_start
        progress = run.progress
        epoch = progress["epoch"] if progress["batch"] else progress["epoch"] - 1
        progress["history"].append({"epoch": epoch + 1, "steps": progress["step"], "train_loss": train_loss,
                                    "test_accuracy": accuracy, "seconds": seconds})
        log.info("epoch %d: train loss %.4f, test accuracy %.4f, %.1f s", epoch + 1, train_loss, accuracy, seconds)
        _save(run)

    metrics = _metrics(run, all_devices, time.perf_counter() - started)
    metrics["timeline"] = _timeline(run)
    return metrics


def _join(config: TrainConfig, dataset: data.Dataset | None) -> tuple[int, int, devices.Device, data.Dataset]:
    """Join the job, pin to this rank's device, load the data:
    (rank, world size, device, dataset)."""
    rank, world, local_rank = launch.init_from_env(devices.backend_for(config.device_list), timeout=config.timeout)
    _setup_logging(rank, config.quiet)
    tqdm.set_lock(threading.RLock())  # only rank 0 draws: no cross-process lock needed
    device_spec = config.device_list[local_rank]
    devices.pin(device_spec, config.threads_for(device_spec))
    return rank, world, device_spec, dataset if dataset is not None else load_data(config)


def measure_job(config: TrainConfig, dataset: data.Dataset, device_spec: devices.Device) -> dict:
    """This job's profile: from the cache at ``config.profile`` when it was
    measured on the same devices and model, else measured now (a collective)."""
    model = make_model(config, dataset).to(device_spec.torch_device)
    group = job_group()
    key = profile.job_key(model, device_spec=str(device_spec), input_shape=dataset.input_shape,
                          batch_size=config.batch_size, group=group)
    cached = _read_on_rank0(lambda: profile.load(config.profile, key), group=group) if config.profile else None
    if cached is not None:
        return cached
    log.info("profiling %d device(s) at batch %d ...", len(key["devices"]), config.batch_size)
    result = profile.measure(model, key=key, input_shape=dataset.input_shape, classes=dataset.classes,
                             batch_size=config.batch_size, group=group)
    if config.profile and comm.rank(group) == 0:
        profile.save(config.profile, result)
    return result


def profile_worker(config: TrainConfig, dataset: data.Dataset | None = None) -> dict | None:
    """Profile the job as one rank of it; rank 0 returns the profile, others None."""
    rank, _, device_spec, dataset = _join(config, dataset)
    result = measure_job(config, dataset, device_spec)
    launch.shutdown()
    return result if rank == 0 else None


def apply_plan(config: TrainConfig, job_plan: plan.Plan, *, can_drop: bool) -> TrainConfig:
    """The concrete job ``job_plan`` describes: its strategy, the kernels per
    rank of every layer (or, for ``layers``, each group's mode and the rows
    per rank; for ``ddp`` under ``--shares auto``, or under ``--strategy
    auto`` where sizing is predicted SIZED_DDP_GAIN faster, the batch shares)
    and, when ``can_drop`` (a local job, whose ranks are
    the listed devices), only the devices it keeps. Otherwise (torchrun) every
    rank stays and the plan's dropped ranks hold no kernels."""
    counts = job_plan.counts() if job_plan.strategy == "kernel" else None
    sized_gain = job_plan.predicted.get("ddp", 0.0) / max(job_plan.ddp_sized, 1e-12) - 1
    if job_plan.strategy == "ddp" and (config.shares == "auto" or (config.strategy == "auto"
                                                                   and sized_gain >= SIZED_DDP_GAIN)):
        config = replace(config, shares=job_plan.ddp_shares)  # DDP's batch split sized to the devices
    if job_plan.strategy == "layers":  # every rank stays: its rows or kernels are planned
        layers = job_plan.per_layer
        return replace(config, strategy="layers", layer_counts=layers.kernel_counts(), modes=layers.modes,
                       rows=tuple(float(r) for r in layers.rows), shares=None, plan=job_plan.to_json())
    if not can_drop:
        return replace(config, strategy=job_plan.strategy, layer_counts=counts, plan=job_plan.to_json())
    ranks = {"single": (job_plan.best_single,), "kernel": job_plan.ranks}.get(
        job_plan.strategy, tuple(range(len(config.device_list))))
    kept = [config.device_list[r] for r in ranks]
    counts = {name: tuple(c[r] for r in ranks) for name, c in counts.items()} if counts else None
    return replace(config, strategy=job_plan.strategy, devices=devices.format_devices(kept),
                   layer_counts=counts, plan=job_plan.to_json())


def _plan_in_worker(config: TrainConfig, dataset: data.Dataset, device_spec: devices.Device) -> TrainConfig:
    """Plan under torchrun, where the job's processes are already fixed: no
    rank leaves, and where the plan prefers one device (``single``) that
    device trains alone while the other ranks stand by (``convshard.alone``)."""
    job_profile = measure_job(config, dataset, device_spec)
    job_plan = plan.make_plan(job_profile, strategy=config.strategy, allow_drop=False)
    if config.strategy == "auto":
        job_plan = _trials_in_worker(config, dataset, device_spec, job_plan)
    if job_plan.strategy == "single":
        best = job_plan.best_single
        log.warning("the plan prefers one device: %s (rank %d) trains alone, predicted %.1fx the fastest split",
                    job_plan.devices[best], best, min(t for s, t in job_plan.predicted.items() if s != "single")
                    / job_plan.predicted["single"])
    for r in job_plan.idle() if job_plan.strategy == "kernel" else ():
        log.warning(job_plan.idle_note(r))
    log.info("plan: %s, predicted %.1f ms/step", job_plan.strategy, 1000 * job_plan.predicted[job_plan.strategy])
    return apply_plan(config, job_plan, can_drop=False)


def as_trial(config: TrainConfig) -> TrainConfig:
    """``config`` cut to one of auto's trials: ``plan.TRIAL_STEPS`` quiet
    steps, half of them warm-up, with nothing written and nothing moved."""
    return replace(config, max_steps=plan.TRIAL_STEPS, warmup_steps=plan.TRIAL_STEPS // 2, quiet=True,
                   metrics_out=None, checkpoint_dir=None, checkpoint_every=None, resume=False, rebalance="off")


def _trials_in_worker(config: TrainConfig, dataset: data.Dataset, device_spec: devices.Device,
                      job_plan: plan.Plan) -> plan.Plan:
    """Under torchrun: ``job_plan`` choosing the fastest measured of the
    strategies worth trying, each run here for ``plan.TRIAL_STEPS`` steps
    (``single`` on its device alone, the others standing by). A strategy's
    time is the slowest rank's mean step, all-reduced, so every rank chooses alike."""
    tried = job_plan.worth_trying()
    if len(tried) == 1:
        return job_plan
    rank, world = comm.rank(), comm.world_size()
    seconds = torch.zeros(len(tried), dtype=torch.float64)
    for i, strategy in enumerate(tried):
        trial = as_trial(apply_plan(config, replace(job_plan, strategy=strategy), can_drop=False))
        group, trial_rank, trial_world = job_group(), rank, world
        if strategy == "single":
            group, trial_rank, trial_world = alone.group_of(job_plan.best_single), 0, 1
            if rank != job_plan.best_single:
                continue
        run = _setup(trial, dataset, device_spec.torch_device, trial_rank, trial_world, group)
        while not _finished(run):
            _train_epoch(run)
        seconds[i] = run.clock.mean() or math.inf
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    trials = dict(zip(tried, seconds.tolist()))
    chosen = min(trials, key=trials.get)
    log.info("trials (ms/step): %s: %s", ", ".join(f"{s} {1000 * t:.1f}" for s, t in trials.items()), chosen)
    return replace(job_plan, strategy=chosen, trials=trials)


T = TypeVar("T")


def job_group() -> comm.Group:
    """The process group of the job every rank joined (None without one)."""
    return dist.group.WORLD if dist.is_initialized() else None


def _read_on_rank0(read: Callable[[], T], *, group: comm.Group) -> T:
    """``read()`` as rank 0 answers it, on every rank (a collective).

    Files differ between hosts (no shared storage, a stale copy): a rank
    that read its own could skip collectives the others enter, or resume at
    another step. So rank 0 reads and broadcasts the result; a ``ConfigError``
    there is raised on every rank.
    """
    if comm.world_size(group) == 1:
        return read()
    answer: list = [None]
    if comm.rank(group) == 0:
        try:
            answer = [(read(), None)]
        except ConfigError as exc:
            answer = [(None, str(exc))]
    dist.broadcast_object_list(answer, group=group, group_src=0)
    value, error = answer[0]
    if error is not None:
        raise ConfigError(error)
    return value


def _resume_point(config: TrainConfig) -> dict | None:
    """The checkpoint to resume from: with ``--resume``, or after torchrun
    restarted the job (it resumes by itself); None to start from scratch."""
    if not (config.resume or launch.restart_count() > 0):
        return None
    saved = checkpoint.load_checkpoint(config.checkpoint_dir)
    if saved is None:
        log.warning("no checkpoint in %s: starting from scratch", config.checkpoint_dir)
    return saved


def _setup(config: TrainConfig, dataset: data.Dataset, device: torch.device, rank: int, world: int,
           group: comm.Group) -> _Run:
    """The model for the strategy, its optimizer and the progress so far
    (from the checkpoint with ``--resume``, or after a torchrun restart)."""
    model = make_model(config, dataset)
    saved = _read_on_rank0(lambda: _resume_point(config), group=group) if config.checkpoint_dir is not None else None
    if saved is not None:
        load_full_state_dict(model, saved["model"])  # before sharding: each rank then takes its slice
        log.info("resuming from %s at step %d", config.checkpoint_dir, saved["progress"]["step"])
    model.to(device)
    if config.strategy in SHARDED:
        shares = config.shares if isinstance(config.shares, tuple) else None
        model = shard_model(model, shares, group=group, layer_shares=config.layer_counts, modes=config.modes,
                            rows=config.rows)
    elif config.strategy == "ddp" and world > 1:
        model = nn.parallel.DistributedDataParallel(model, process_group=group)
    optimizer = _make_optimizer(config, model.parameters())
    progress = {"epoch": 0, "batch": 0, "step": 0, "history": []}
    run = _Run(config, dataset, model, optimizer, progress, device, rank, world, group,
               _StepClock(config.warmup_steps))
    if config.strategy in SHARDED and config.rebalance_mode != "off":
        run.rebalancer = Rebalancer(model, config.rebalance_mode, group=group)
    if saved is not None:
        checkpoint.load_full_optimizer_state_dict(run.net, optimizer, saved["optimizer"])
        run.progress = saved["progress"]
    return run


def _finished(run: _Run) -> bool:
    config, progress = run.config, run.progress
    out_of_steps = config.max_steps is not None and progress["step"] >= config.max_steps
    return out_of_steps or progress["epoch"] >= config.epochs


def _train_epoch(run: _Run) -> float:
    """Train from ``run.progress`` to the end of its epoch (or to --max-steps),
    advancing the progress and timing each step; returns the mean training loss."""
    config, progress = run.config, run.progress
    n_train = len(run.dataset.train_y)
    steps_per_epoch = math.ceil(n_train / config.batch_size)
    total_steps = config.epochs * steps_per_epoch  # --max-steps stops a run early, it does not shorten the schedule
    epoch = progress["epoch"]
    order = data.epoch_permutation(n_train, seed=config.seed, epoch=epoch)
    loss_sum, seen = 0.0, 0
    bar = tqdm(total=steps_per_epoch, initial=progress["batch"], desc=f"epoch {epoch + 1}/{config.epochs}",
               unit="step", disable=run.rank != 0 or config.quiet, leave=False, dynamic_ncols=True)
    while progress["batch"] < steps_per_epoch and not _finished(run):
        b = progress["batch"]
        batch = order[b * config.batch_size : (b + 1) * config.batch_size]  # the global batch
        part = _batch_part(config, len(batch), run.rank, run.world) if config.strategy == "ddp" else slice(None)
        for group in run.optimizer.param_groups:
            group["lr"] = learning_rate(config, progress["step"], total_steps)
        t0, in_collectives = time.perf_counter(), comm.seconds_in_collectives()
        loss = _step(run, batch, part)
        _sync(run.device)
        run.clock.add(time.perf_counter() - t0, comm.seconds_in_collectives() - in_collectives)
        mine = len(batch[part])
        loss_sum, seen = loss_sum + loss * mine, seen + mine
        progress["batch"], progress["step"] = b + 1, progress["step"] + 1
        if run.rebalancer is not None:
            run.rebalancer.observe(progress["step"], run.clock.seconds[-1] - run.clock.collective[-1], run.optimizer)
        bar.update()
        bar.set_postfix(loss=f"{loss:.4f}", ms=f"{1000 * run.clock.seconds[-1]:.0f}")
        if config.checkpoint_every and progress["step"] % config.checkpoint_every == 0 and b + 1 < steps_per_epoch:
            _save(run)  # the end of an epoch saves anyway
    bar.close()
    if progress["batch"] == steps_per_epoch:
        progress["epoch"], progress["batch"] = epoch + 1, 0
    return _mean_over_ranks(run, loss_sum, seen)


def _step(run: _Run, batch: torch.Tensor, part: slice) -> float:
    """One optimizer step on this rank's ``part`` of the global ``batch`` (its
    image indices). Returns this rank's mean loss."""
    config = run.config
    mine = batch[part]
    if config.augment:  # the whole global batch, so that every rank and strategy augments each image alike
        x = data.augment(run.dataset.train_x[batch], seed=config.seed, step=run.progress["step"])[part]
    else:
        x = run.dataset.train_x[mine]
    x, y = x.to(run.device), run.dataset.train_y[mine].to(run.device)  # (B, C, H, W), (B,)
    run.optimizer.zero_grad(set_to_none=True)
    out = run.model(x)  # (B, classes)
    loss_sum = F.cross_entropy(out, y, reduction="sum")
    mean_loss = loss_sum.item() / max(1, len(mine))
    if not math.isfinite(mean_loss):
        kept = f"; the last good checkpoint is in {config.checkpoint_dir}" if config.checkpoint_dir else ""
        raise TrainingError(f"training loss became {mean_loss} at step {run.progress['step'] + 1}{kept}; "
                            f"try a lower --lr than {config.lr:g}")
    # Divide by the global batch: DDP then averages over ranks, so scale by
    # world to get the mean over the global batch even when parts differ in size.
    scale = run.world / len(batch) if config.strategy == "ddp" else 1 / len(mine)
    (loss_sum * scale).backward()
    if config.strategy in SHARDED:
        sync_replicas(run.model, group=run.group)
    run.optimizer.step()
    return mean_loss


def _mean_over_ranks(run: _Run, loss_sum: float, seen: int) -> float:
    """Mean training loss of the epoch over the images every rank saw."""
    if run.config.strategy != "ddp" or run.world == 1:
        return loss_sum / max(1, seen)
    totals = torch.tensor([loss_sum, float(seen)], dtype=torch.float64)
    dist.all_reduce(totals, group=run.group)
    return (totals[0] / totals[1]).item()


def _save(run: _Run) -> None:
    """Gather the unsharded state (a collective) and let rank 0 write it."""
    if run.config.checkpoint_dir is None:
        return
    payload = {
        "model": full_state_dict(run.net),
        "optimizer": checkpoint.full_optimizer_state_dict(run.net, run.optimizer),
        "progress": run.progress,
        "config": run.config.to_json(),
    }
    if run.rank == 0:
        path = checkpoint.save_checkpoint(run.config.checkpoint_dir, payload)
        log.info("checkpoint saved to %s at step %d", path, run.progress["step"])


def _timeline(run: _Run) -> dict:
    """Every rank's step and in-collective seconds of its last steps and its
    peak resident memory (a collective)."""
    mine = {"step_seconds": list(run.clock.seconds),
            "collective_seconds": list(run.clock.collective),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux: KiB
    everyone = comm.gather_objects(mine, group=run.group)
    first = run.clock.count - len(mine["step_seconds"]) + 1
    return {"first_step": first, **{key: [e[key] for e in everyone] for key in mine}}


def _metrics(run: _Run, all_devices: list[str], seconds: float) -> dict:
    """The run's metrics JSON; timings are None when this run took no step."""
    config, progress = run.config, run.progress
    mean_step = run.clock.mean()
    last = progress["history"][-1] if progress["history"] else {}
    return {
        "test_accuracy": last.get("test_accuracy"),
        "train_loss": last.get("train_loss"),
        "epochs": progress["epoch"],
        "steps": progress["step"],
        "mean_step_seconds": mean_step,
        "images_per_second": config.batch_size / mean_step if mean_step else None,
        "world_size": run.world,
        "devices": all_devices,
        "strategy": config.strategy,
        "shares": {k: list(v) for k, v in layer_counts(run.net).items()},
        "plan": config.plan,
        "job_plan": config.job_plan(),
        "rebalances": run.rebalancer.events if run.rebalancer else [],
        "step_seconds": list(run.clock.seconds),  # the last TIMELINE_STEPS steps
        "step_ends": list(run.clock.ends),
        "wall_seconds": seconds,
        "history": progress["history"],
        "config": config.to_json(),
    }
