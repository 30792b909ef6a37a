"""Checkpoints of the unsharded model, written atomically.

A checkpoint is one file, ``<dir>/checkpoint.pt``, holding plain tensors and
Python literals only, so ``torch.load(path, weights_only=True)`` reads it and
nothing is unpickled beyond that:

    {"model": full state dict (same keys and shapes as the unsharded model),
     "optimizer": the unsharded optimizer's state dict,
     "progress": {"epoch": epochs done, "batch": batches done in the current epoch,
                  "step": optimizer steps done, "history": [...],
                  "best_accuracy": with --keep-best, the best test accuracy so far},
     "config": the run's settings,
     "job_plan": the plan it ran (``plan.Plan.to_json``),
     "inference": what a model needs at inference (``run.inference``): its
                  spec, input shape, class names, normalisation}

``--keep-last N`` keeps the files of the last N saves beside it
(``checkpoint-<step>.pt``), ``--keep-best`` the one of the best test
accuracy (``best.pt``).

The model and optimizer state are gathered from the shards, so a run can
resume on any device list: ``load_full_state_dict`` and
``load_full_optimizer_state_dict`` cut them again for the new split.
Writing is atomic (``convshard.atomic``): a crash mid-save leaves the previous
checkpoint intact.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import atomic_writer
from ..errors import ConfigError
from ..parallel.sharded import ShardSplit, sharded_parameters
from ..plan.splits import is_per_kernel

FILENAME = "checkpoint.pt"
KEPT_PREFIX = "checkpoint-"  # --keep-last: checkpoint-<step>.pt
BEST = "best.pt"  # --keep-best


def _shards_of(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[int, tuple[ShardSplit, torch.Size]]:
    """Optimizer parameter index -> (its split, its local shape), for sharded parameters."""
    by_name = sharded_parameters(model)
    by_param = {id(p): (by_name[n], p.shape) for n, p in model.named_parameters() if n in by_name}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {i: by_param[id(p)] for i, p in enumerate(params) if id(p) in by_param}


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state of the unsharded model: per-kernel tensors (momentum,
    Adam's moments; ``splits.is_per_kernel``) are gathered along dim 0. A
    collective on every rank."""
    state = optimizer.state_dict()  # its per-parameter dicts are the live ones: build new
    shards = _shards_of(model, optimizer)
    full = {}
    for index, per_param in state["state"].items():
        split, shape = shards.get(index, (None, None))
        full[index] = {k: _cpu(split.gather(v) if split and is_per_kernel(v, shape) else v)
                       for k, v in per_param.items()}
    return {"state": full, "param_groups": state["param_groups"]}


def load_full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, *,
                                   source: str = "checkpoint") -> None:
    """Load an unsharded optimizer state into the optimizer of a sharded model.
    The hyperparameters (lr, momentum, weight decay) stay this optimizer's:
    a resumed run follows its own flags. Groups of other sizes (another
    ``--weight-decay`` split) are a ConfigError naming ``source``."""
    shards = _shards_of(model, optimizer)
    mine = [len(g["params"]) for g in optimizer.param_groups]
    theirs = [len(g["params"]) for g in state["param_groups"]]
    if mine != theirs:
        raise ConfigError(f"{source}: its optimizer has parameter groups of {theirs} parameters, this run's "
                          f"{mine} (--weight-decay with or without --decay-all splits them)")

    def local(i: int, value: Any) -> Any:
        if i not in shards:
            return value
        split, shape = shards[i]
        return split.take(value) if is_per_kernel(value, (split.total, *shape[1:])) else value

    hyper = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    optimizer.load_state_dict({"state": {i: {k: local(i, v) for k, v in s.items()} for i, s in state["state"].items()},
                               "param_groups": state["param_groups"]})
    for group, own in zip(optimizer.param_groups, hyper):
        group.update(own)


def _cpu(value: Any) -> Any:
    return value.detach().to("cpu", copy=True) if torch.is_tensor(value) else value


def path_in(directory: str | os.PathLike) -> Path:
    """The checkpoint a run resumes from: ``directory/checkpoint.pt``."""
    return Path(directory) / FILENAME


def save_checkpoint(directory: str | os.PathLike, payload: dict, *, keep_last: int | None = None,
                    best: bool = False) -> Path:
    """Write ``payload`` to ``directory/checkpoint.pt`` atomically; returns the path.

    With ``keep_last`` N it is written as ``checkpoint-<step>.pt`` and
    ``checkpoint.pt`` becomes a second name of that file; of those files the
    N of the latest steps stay. With ``best`` it also becomes ``best.pt``.
    Each name is replaced atomically, so a crash leaves every name whole.
    """
    directory = Path(directory)
    path = path_in(directory)
    if keep_last:
        kept = directory / f"{KEPT_PREFIX}{payload['progress']['step']:09d}.pt"
        _write(kept, payload)
        _alias(kept, path)
        for old in sorted(directory.glob(f"{KEPT_PREFIX}*.pt"))[:-keep_last]:
            old.unlink()
    else:
        _write(path, payload)
    if best:
        _alias(path, directory / BEST)
    return path


def _write(path: Path, payload: dict) -> None:
    with atomic_writer(path) as f:
        torch.save(payload, f)


def _alias(source: Path, name: Path) -> None:
    """Make ``name`` another name of ``source``'s file (a copy where hard links fail), atomically."""
    temporary = name.with_name(f".{name.name}.link")
    temporary.unlink(missing_ok=True)
    try:
        os.link(source, temporary)
    except OSError:
        shutil.copyfile(source, temporary)
    os.replace(temporary, name)


def written_by(config: dict) -> str:
    """The flags that shape a model, as a run's config (``TrainConfig.to_json``) holds them."""
    kernels = config.get("kernels")
    shown = f" --kernels {','.join(map(str, kernels))}" if kernels else ""
    return f"--model {config.get('model')}{shown} --dataset {config.get('dataset')}"


RESUMED_FLAGS = ("batch_size", "epochs", "max_steps", "schedule", "lr", "lr_warmup_epochs", "optimizer",
                 "weight_decay")  # flags whose change a resumed run reports


def changes(saved: dict, now: dict) -> str:
    """The flags of RESUMED_FLAGS that differ between a checkpoint's config and
    this run's, as one phrase (``--batch-size 64 (now 32), ...``); '' when none."""
    def shown(value: object) -> str:
        return "unset" if value is None else f"{value:g}" if isinstance(value, float) else str(value)

    return ", ".join(f"--{key.replace('_', '-')} {shown(saved[key])} (now {shown(now.get(key))})"
                     for key in RESUMED_FLAGS if key in saved and saved[key] != now.get(key))


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The checkpoint at ``path``: a checkpoint file, or a directory holding
    ``checkpoint.pt`` (as ``--checkpoint`` names it). A missing or unreadable
    one is a ConfigError naming it."""
    path = Path(path)
    file = path_in(path) if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"no checkpoint at {path}")
    return _load(file, "--checkpoint")


def load_checkpoint(directory: str | os.PathLike) -> dict | None:
    """The checkpoint in ``directory``, or None when there is none.

    Loads with ``weights_only=True``; a truncated or foreign file is a
    ``ConfigError`` naming it.
    """
    path = path_in(directory)
    return _load(path, "--checkpoint-dir") if path.exists() else None


def _load(path: Path, flag: str) -> dict:
    """The payload at ``path``; an unreadable file's error points to ``flag``, the option that named it."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"checkpoint {path} is unreadable ({type(exc).__name__}); "
                          f"delete it or choose another {flag}") from None
    if not isinstance(payload, dict) or not {"model", "optimizer", "progress"} <= payload.keys():
        raise ConfigError(f"checkpoint {path} is not a convshard checkpoint")
    return payload
