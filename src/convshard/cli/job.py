"""From flags to a running job, for train, profile and plan: ``config_from_args()``
-> ``validate()`` -> ``run()``."""

from __future__ import annotations

import argparse
import logging
import os

import torch
from torch import nn

from .. import augment, data, devices, plan, precision, profile
from ..errors import ConfigError
from ..run import launch
from ..run.config import TrainConfig, cap_batch, load_data, make_model, workers
from ..run.local import launch_job, prepare
from ..run.train import torchrun_worker

log = logging.getLogger("convshard")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run's config; ``profile`` and ``plan`` take the training defaults
    and plan as ``--strategy auto`` would."""
    d = TrainConfig()
    train_only = {name: getattr(args, name) for name in (
        "shares", "rebalance", "trials", "epochs", "max_steps", "optimizer", "lr", "momentum", "schedule",
        "quiet", "metrics_out", "checkpoint_dir", "checkpoint_every", "checkpoint_every_seconds", "resume", "augment", "weight_decay",
        "decay_all", "clip_grad_norm", "label_smoothing", "keep_last", "keep_best", "log_every", "log_dir",
        "device_memory", "workers", "eval_every")
        if hasattr(args, name)}
    if hasattr(args, "warmup_epochs"):
        train_only["lr_warmup_epochs"] = args.warmup_epochs
    if hasattr(args, "augment"):  # --augment alone: the transforms that suit the dataset
        train_only["augment"] = augment.default_augment(args.dataset) if args.augment == "default" else args.augment or ()
    strategy = getattr(args, "strategy", None) or (d.strategy if args.command == "train" else "auto")
    return TrainConfig(
        devices=args.devices or d.devices, threads=args.threads, profile=args.profile, model=args.model,
        kernels=args.kernels, dataset=args.dataset, data_dir=args.data_dir, image_size=args.image_size,
        val_fraction=args.val_fraction,
        synthetic_shape=args.synthetic_shape, synthetic_size=args.synthetic_size,
        batch_size=args.batch_size or d.batch_size, seed=args.seed, timeout=args.timeout, strategy=strategy,
        precision=args.precision or d.precision, memory_format=args.memory_format or _memory_format(args, strategy),
        grad_precision=args.grad_precision or d.grad_precision,
        **train_only,
    )


def _memory_format(args: argparse.Namespace, strategy: str) -> str:
    """``--memory-format`` left out: auto where the job is planned on a profile
    anyway (``--strategy auto``, ``layers``, ``--shares auto``), else contiguous."""
    planned = strategy in ("auto", "layers") or getattr(args, "shares", None) == "auto"
    return "auto" if planned else TrainConfig.memory_format


def validate(config: TrainConfig, dataset: data.Dataset | None = None) -> data.Dataset:
    """Everything that can be checked before a worker starts; raises ConfigError.
    Returns the dataset, which it loads (unless given) to check the data and
    the model (one training image through it must give (1, classes) logits)."""
    job = workers(config)
    devices.check_available(job)
    precision.check(config.job.precision if config.job else config.precision, [d.kind for d in job])
    world = int(os.environ["WORLD_SIZE"]) if launch.in_torchrun() else len(job)
    _check_settings(config)
    if config.job is not None:
        _check_plan(config, config.job)
    else:
        _check_flags(config, world)
    if config.profile:
        profile.read(config.profile)  # a cache that is there must be a profile (ConfigError)
    dataset = dataset if dataset is not None else load_data(config)
    _check_model(config, make_model(config, dataset), dataset, world)
    return dataset


def _check_settings(config: TrainConfig) -> None:
    """The run's settings against each other, whatever builds its plan. Raises ConfigError."""
    if config.device_memory and not config.needs_search:
        raise ConfigError("--device-memory limits a planned split: use it with --strategy auto or layers, or "
                          "--shares auto")
    for flag, value in (("--resume", config.resume), ("--checkpoint-every", config.checkpoint_every),
                        ("--checkpoint-every-seconds", config.checkpoint_every_seconds),
                        ("--keep-last", config.keep_last), ("--keep-best", config.keep_best)):
        if value and config.checkpoint_dir is None:
            raise ConfigError(f"{flag} needs --checkpoint-dir")
    if config.lr_warmup_epochs >= config.epochs:
        raise ConfigError(f"--warmup-epochs {config.lr_warmup_epochs:g} leaves nothing of --epochs {config.epochs} "
                          f"to the schedule: warm up for fewer epochs")


def _check_plan(config: TrainConfig, job: plan.Plan) -> None:
    """A plan given whole (``--plan``): what the flags and torchrun ask of it
    that its own constructor cannot check. Raises ConfigError."""
    if config.rebalance not in (None, "off") and job.engine == plan.DDP:
        raise ConfigError(f"--rebalance {config.rebalance} moves kernels: the plan runs ddp, whose rows stay")
    if launch.in_torchrun():
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
        if local != len(config.device_list):
            raise ConfigError(f"torchrun started {local} processes on this host but --devices "
                              f"{config.devices!r} lists {len(config.device_list)}")
        if job.ranks is None and int(os.environ["WORLD_SIZE"]) != job.world:
            raise ConfigError(f"the plan runs {job.world} workers ({', '.join(job.devices)}); torchrun started "
                              f"{os.environ['WORLD_SIZE']}")


def _check_flags(config: TrainConfig, world: int) -> None:
    """The strategy flags against each other and against torchrun's
    processes; ``world`` is the job's worker count. Raises ConfigError."""
    if launch.in_torchrun():
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
        if config.strategy == "single" and int(os.environ["WORLD_SIZE"]) != 1:
            raise ConfigError("--strategy single runs one process; start torchrun with one")
        if config.strategy != "single" and local != len(config.device_list):
            raise ConfigError(f"torchrun started {local} processes on this host but --devices "
                              f"{config.devices!r} lists {len(config.device_list)}")
    if config.shares == "auto" and config.strategy == "single":
        raise ConfigError("--shares auto plans kernel or batch shares: it needs --strategy kernel, ddp or auto, "
                          "not single")
    if isinstance(config.shares, tuple) and config.strategy in ("auto", "layers") and config.job is None:
        raise ConfigError(f"--strategy {config.strategy} plans the shares itself: give --shares auto or leave it out")
    if config.trials != TrainConfig.trials and config.strategy != "auto":
        raise ConfigError(f"--trials {config.trials} sets the trials of --strategy auto, not {config.strategy}")
    if config.rebalance not in (None, "off") and config.strategy not in ("kernel", "layers", "auto"):
        raise ConfigError(f"--rebalance {config.rebalance} moves kernels: it needs --strategy kernel or auto, "
                          f"not {config.strategy}")
    # plan.ddp and plan.kernel_split refuse these shares too, but only once the model's groups are known
    # (after a profile under --memory-format auto, in every rank under torchrun), and not in the flag's words
    if isinstance(config.shares, tuple) and config.strategy == "ddp" and not all(config.shares):
        raise ConfigError(f"--shares {','.join(f'{s:g}' for s in config.shares)}: every ddp worker needs a "
                          f"share of the batch above 0")
    if isinstance(config.shares, tuple) and config.strategy in ("kernel", "ddp") and len(config.shares) != world:
        raise ConfigError(f"--shares {','.join(f'{s:g}' for s in config.shares)} has "
                          f"{len(config.shares)} weights for {world} workers")


def _check_model(config: TrainConfig, model: nn.Module, dataset: data.Dataset, world: int) -> None:
    """The model against the data and the split: one image of shape (1, C, H, W)
    must give (1, classes) logits, and a kernel-split conv needs at least one
    kernel per worker. Raises ConfigError; warns once for a conv-less model."""
    # One image through the model, so that a model that does not fit the data
    # (input channels, class count) fails here, in one line, not in every worker.
    sample = dataset.images(dataset.train, [0])  # (1, C, H, W), on CPU
    model.eval()
    try:
        with torch.no_grad():
            out = model(sample)
    except Exception as exc:  # the user's model: any exception is its error
        first = next(iter(str(exc).strip().splitlines()), "").strip()
        detail = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
        raise ConfigError(f"model {config.model!r} fails on an input of shape {tuple(sample.shape)}: "
                          f"{detail}") from exc
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, dataset.classes):
        got = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else f"a {type(out).__name__}"
        raise ConfigError(f"model {config.model!r} outputs {got} for one image, not (1, {dataset.classes}): "
                          f"the dataset has {dataset.classes} classes")
    convs = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if config.job is not None:  # the plan's own counts say what each worker holds
        return
    if config.strategy in ("kernel", "layers", "auto"):
        for name, module in convs:
            if module.out_channels < world:
                raise ConfigError(f"layer {name} has {module.out_channels} kernels for {world} workers; "
                                  f"use more --kernels or fewer --devices")
    if not convs and config.strategy in ("kernel", "layers") and world > 1 and os.environ.get("RANK", "0") == "0":
        log.warning("model %r has no conv layers: nothing is sharded and every worker runs the whole model on "
                    "the whole batch; use --strategy single or ddp", config.model)


def run(config: TrainConfig, dataset: data.Dataset | None = None) -> dict | None:
    """Train locally (spawning one worker per planned device) or as this torchrun rank."""
    dataset = validate(config, dataset)
    config = cap_batch(config, dataset) if config.job is None else config
    if launch.in_torchrun():
        return torchrun_worker(config, dataset)
    return launch_job(prepare(config, dataset), dataset)
