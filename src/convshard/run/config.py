"""A training run's configuration: what the user asked for, and what runs.

- ``RunSettings``: what a run does besides its plan (data, model, optimizer,
  schedule, checkpoints, logs); identical on every rank.
- ``TrainConfig``: the request, before planning: the settings and the flags
  a plan answers (``strategy``, ``shares``, ``devices``, ``threads``,
  ``batch_size``, ``precision``, ``memory_format``, ``grad_precision``,
  ``device_memory``), or a plan given whole (``job``: ``--plan FILE``).
- ``Job``: what runs, after planning: the plan (``convshard.plan.Plan``),
  the settings, how the plan was chosen and the profile it was priced on.
  The training loop reads a ``Job`` only, so once the plan exists nothing
  reads the request's copies of its fields.

``plan_from_flags`` is where strategy flags become a plan (with
``convshard.run.trials``, which searches and tries); ``with_saved_plan``
reads one from a file.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
from torch import nn

from .. import data, devices, plan
from ..plan import search
from ..errors import ConfigError
from ..models import build_model
from ..parallel.shard import group_kernels
from . import launch
from .rebalance import parse_mode

log = logging.getLogger(__name__)

STRATEGIES: tuple[str, ...] = ("kernel", "single", "ddp", "layers", "auto")
PLANNED = ("strategy", "devices", "threads", "batch_size", "shares", "precision", "memory_format",
           "grad_precision")  # flags a --plan FILE answers
OPTIMIZERS: tuple[str, ...] = ("sgd", "adam", "adamw")
SCHEDULES: tuple[str, ...] = ("cosine", "constant")


@dataclass(frozen=True)
class RunSettings:
    """What a run does besides its plan; identical on every rank."""

    model: str = "paper"  # one of models.MODELS, or package.module:function
    kernels: tuple[int, ...] | None = None  # kernels per conv layer (ResNet, VGG: base width); None: the default
    dataset: str = "mnist"  # mnist | cifar10 | synthetic | folder | package.module:function
    data_dir: str = "data"  # where cifar10 and folder live
    image_size: int = 32  # side of the folder dataset's images
    val_fraction: float = 0.2  # folder dataset without train/ and val/: the share of each class held out for test
    augment: tuple[str, ...] = ()  # transforms of every training image (augment.AUGMENTS), drawn from seed, epoch, index
    workers: int | None = None  # loader processes per rank; None: loader.default_workers
    synthetic_shape: tuple[int, int, int] = (3, 32, 32)  # (C, H, W) of synthetic images
    synthetic_size: int = 1024  # synthetic training images (a quarter as many for test)
    epochs: int = 8
    max_steps: int | None = None  # stop after this many optimizer steps in total
    optimizer: str = "sgd"  # sgd (with momentum) | adam | adamw
    lr: float = 0.05
    momentum: float = 0.9  # SGD only
    weight_decay: float = 5e-4  # L2 (sgd, adam) or decoupled (adamw) decay of the weights of 2 or more dims
    decay_all: bool = False  # decay biases and BatchNorm's per-channel weights too
    clip_grad_norm: float | None = None  # scale the gradients to at most this global L2 norm
    label_smoothing: float = 0.1  # cross-entropy against (1 - s) one-hot + s / classes
    schedule: str = "cosine"  # cosine: lr decays to 0 over the run | constant
    lr_warmup_epochs: float = 0.0  # linear warm-up of the learning rate from lr / steps to lr over this many epochs
    seed: int = 0
    dtype: str = "float32"  # parameters and data; float64 serves exactness tests
    profile: str | None = None  # cache of the job's profile (JSON), reused while devices and model match
    warmup_steps: int = 3  # steps left out of mean_step_seconds
    timeout: float = 300.0  # seconds any collective may wait before the job fails
    quiet: bool = False  # no progress bar, warnings and the final summary only
    log_every: int = 50  # outside a terminal: one log line every this many steps
    log_dir: str | None = None  # per-step and per-epoch CSV (and TensorBoard events) here
    metrics_out: str | None = None  # write the metrics JSON here
    checkpoint_dir: str | None = None  # save <dir>/checkpoint.pt after every epoch
    checkpoint_every: int | None = None  # ... and also every this many optimizer steps
    checkpoint_every_seconds: float | None = None  # ... and also when this many seconds passed since the last save
    resume: bool = False  # continue from the checkpoint in checkpoint_dir
    keep_last: int | None = None  # also keep the last N checkpoints, one file per save
    keep_best: bool = False  # also keep the checkpoint of the best test accuracy at an evaluation
    eval_every: int | None = None  # also evaluate on the test split every this many optimizer steps


@dataclass(frozen=True)
class TrainConfig(RunSettings):
    """The request: the run's settings and the flags that build its plan."""

    devices: str = "cpu@0,cpu@1"  # this host's devices, one worker each; see convshard.devices for the grammar
    threads: int | None = None  # intra-op threads per worker; None: the cores its device names
    strategy: str = "kernel"  # how to build the plan: kernel | single | ddp | layers | auto
    shares: tuple[float, ...] | str | None = None  # per rank: kernel share (ddp: batch share), "auto", or None: equal
    batch_size: int = 64  # global batch, the same for every plan
    precision: str = "32"  # compute: 32 | bf16 | fp16 (autocast; weights stay in ``dtype``)
    memory_format: str = "contiguous"  # contiguous | channels_last | auto (the profile's faster one)
    grad_precision: str = "32"  # the gradient sums of batch-mode groups and DDP travel in: 32 | bf16
    device_memory: tuple[float, ...] | None = None  # bytes each worker may use (one for all, or per device)
    rebalance: str | None = None  # off | auto | N: re-split the kernels online; None: auto when planned, else off
    trials: int = search.TRIAL_STEPS  # steps of each of --strategy auto's trials; 0: the plan predicted fastest
    job: plan.Plan | None = None  # a plan given whole (--plan FILE); None: built from the flags
    device_list: tuple[devices.Device, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "device_list", devices.parse_devices(self.devices))

    @property
    def needs_search(self) -> bool:
        """Whether the plan is still to be searched for on a profile."""
        return self.job is None and (self.strategy in ("auto", "layers") or self.shares == "auto")

    def settings(self) -> RunSettings:
        """The run's settings, without the request's flags."""
        return RunSettings(**{f.name: getattr(self, f.name) for f in fields(RunSettings)})

    def to_json(self) -> dict:
        """The request as given: the record a run's metrics and checkpoints keep."""
        out = asdict(replace(self, job=None))
        for key in ("device_list", "job"):  # the plan is recorded on its own
            out.pop(key)
        return out


@dataclass(frozen=True)
class Job:
    """What runs: the plan and the run's settings, identical on every rank."""

    plan: plan.Plan
    settings: RunSettings
    record: dict  # the request as given (``TrainConfig.to_json``), for the metrics and checkpoints
    planning: dict | None = None  # how ``plan`` was chosen: every candidate's predicted step, the trials
    profile: Mapping | None = field(default=None, repr=False)  # the profile of the plan's devices it was priced on
    rebalance: str | int = "off"  # off | auto | N steps (``convshard.run.rebalance``)

    def threads_for(self, device: devices.Device) -> int:
        """Intra-op threads of ``device``'s worker: the plan's, else the cores its device names."""
        listed = [devices.parse_devices(d)[0] for d in self.plan.devices]
        return self.plan.threads or devices.default_threads(device, listed)


def job_of(config: TrainConfig, job: plan.Plan, *, planning: dict | None = None,
           profile: Mapping | None = None) -> Job:
    """The job that runs plan ``job`` for request ``config``: rebalanced online
    when ``--rebalance`` says so, or by default when the plan was searched.
    A plan that leaves threads open takes ``--threads``."""
    mode = parse_mode(config.rebalance) if config.rebalance is not None else "auto" if planning else "off"
    if job.threads is None and config.threads is not None:
        job = replace(job, threads=config.threads)
    return Job(job, config.settings(), config.to_json(), planning, profile, mode)


def load_data(config: RunSettings) -> data.Dataset:
    """The run's dataset, the same on every rank."""
    return data.load_dataset(
        config.dataset, data_dir=config.data_dir, seed=config.seed,
        synthetic_shape=config.synthetic_shape,
        synthetic_sizes=(config.synthetic_size, max(1, config.synthetic_size // 4)),
        image_size=config.image_size, val_fraction=config.val_fraction,
    )


def make_model(config: RunSettings, dataset: data.Dataset) -> nn.Module:
    """The unsharded model, initialised from the seed: identical on every rank."""
    torch.manual_seed(config.seed)
    model = build_model(config.model, dataset.input_shape, dataset.classes, config.kernels)
    return model.to(getattr(torch, config.dtype))


def model_groups(config: RunSettings, dataset: data.Dataset) -> dict[str, int]:
    """The model's channel groups, name -> kernels: what a plan splits."""
    return group_kernels(make_model(config, dataset))


def plan_from_flags(config: TrainConfig, groups: dict[str, int], job_devices: list[str],
                    memory_format: str) -> plan.Plan:
    """The plan ``--strategy single|kernel|ddp`` with ``--shares`` weights
    (or equal) describes on ``job_devices`` (every rank's device), computing
    in ``--precision`` and ``memory_format`` (``--memory-format``, resolved),
    summing gradients in ``--grad-precision``."""
    shares = config.shares if isinstance(config.shares, tuple) else None
    if config.strategy == "single":
        job = plan.single(job_devices[0], groups, config.batch_size, threads=config.threads)
    elif config.strategy == "ddp":
        job = plan.ddp(job_devices, groups, config.batch_size, shares=shares, threads=config.threads)
    elif config.strategy == "kernel":
        job = plan.kernel_split(job_devices, groups, config.batch_size, shares=shares, threads=config.threads)
    else:
        raise ConfigError(f"--strategy {config.strategy} is planned from a profile")
    return replace(job, precision=config.precision, memory_format=memory_format,
                   grad_precision=config.grad_precision)


def with_saved_plan(config: TrainConfig, path: str, given: Mapping[str, object],
                    dataset: data.Dataset) -> TrainConfig:
    """``config`` running the plan saved in ``path`` (``--plan``). ``given``
    holds the flags of PLANNED the user set (None: not given); one with
    another value than the plan's is an error naming both. ``--devices``
    of as many devices as the plan's runs its split on them, in order (a
    plan for a cluster tried here, say so in one line); under torchrun it
    lists this host's devices. ``dataset`` is the run's data, which gives
    the model's groups."""
    try:
        saved = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--plan {path}: {exc}") from None
    saved = saved.get("job_plan", saved) if isinstance(saved, dict) else saved
    job = plan.from_json(saved, groups=model_groups(config, dataset), source=f"--plan {path}",
                         batch_size=given.get("batch_size") or config.batch_size)
    held = {"strategy": job.name, "threads": job.threads, "batch_size": job.batch_size, "shares": None,
            "precision": job.precision, "memory_format": job.memory_format, "grad_precision": job.grad_precision}
    for name in held:
        mine = given.get(name)
        if name == "threads" and held[name] is None:
            continue  # the plan leaves threads to the flag
        if mine is not None and mine != held[name]:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{flag} {_shown(mine)} conflicts with --plan {path}, which "
                              f"{'holds the split' if name == 'shares' else f'runs {flag} {_shown(held[name])}'}; "
                              f"leave {flag} out or write a new plan")
    if not launch.in_torchrun():
        job = _on_local_devices(job, given.get("devices"), path)
    return replace(config, job=job)


def _on_local_devices(job: plan.Plan, listed: object, path: str) -> plan.Plan:
    """``job`` on this machine: on its own devices, or on ``listed`` (a
    ``--devices`` string of as many devices), which take its split in order."""
    if listed is None:
        try:
            for device in job.devices:
                devices.parse_devices(device)
        except ConfigError:
            raise ConfigError(f"--plan {path} runs on a cluster's devices ({', '.join(job.devices)}): start it "
                              f"under torchrun on those hosts (docs/cluster.md, section 4), or try its split here "
                              f"with --devices naming {job.world} devices of this machine") from None
        return job
    here = tuple(str(d) for d in devices.parse_devices(str(listed)))
    if len(here) != job.world:
        raise ConfigError(f"--devices {listed} lists {len(here)} devices; --plan {path} runs on {job.world} "
                          f"({', '.join(job.devices)}): list {job.world} to run its split on them in order")
    if here != job.devices:
        log.warning("--plan %s: its devices %s run as %s, in order", path, ", ".join(job.devices), ", ".join(here))
    return replace(job, devices=here)


def workers(config: TrainConfig) -> tuple[devices.Device, ...]:
    """The devices this host starts a worker on: a given plan's (all of
    this host's under torchrun), the first listed for ``--strategy single``,
    else every listed one."""
    if config.job is not None and not launch.in_torchrun():
        return tuple(devices.parse_devices(d)[0] for d in config.job.devices)
    return config.device_list[:1] if config.strategy == "single" and config.job is None else config.device_list


def _shown(value: object) -> str:
    return ",".join(f"{v:g}" for v in value) if isinstance(value, tuple) else str(value)


def cap_batch(config: TrainConfig, dataset: data.Dataset) -> TrainConfig:
    """``config`` with a global batch of at most the training set, and a warning when that cut it."""
    n = len(dataset.train)
    if config.batch_size <= n:
        return config
    log.warning("--batch-size %d is more than the %d training images: training at batch %d",
                config.batch_size, n, n)
    return replace(config, batch_size=n)
