"""Checkpoints of the unsharded model, written atomically.

A checkpoint is one file, ``<dir>/checkpoint.pt``, holding plain tensors and
Python literals only, so ``torch.load(path, weights_only=True)`` reads it and
nothing is unpickled beyond that:

    {"model": full state dict (same keys and shapes as the unsharded model),
     "optimizer": the unsharded optimizer's state dict,
     "progress": {"epoch": epochs done, "batch": batches done in the current epoch,
                  "step": optimizer steps done, "history": [...]},
     "config": the run's settings,
     "job_plan": the plan it ran (``plan.Plan.to_json``)}

The model and optimizer state are gathered from the shards, so a run can
resume on any device list: ``load_full_state_dict`` and
``load_full_optimizer_state_dict`` cut them again for the new split.
Writing is atomic (``convshard.atomic``): a crash mid-save leaves the previous
checkpoint intact.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import atomic_writer
from ..errors import ConfigError
from ..parallel.sharded import ShardSplit, sharded_parameters
from ..plan.splits import is_per_kernel

FILENAME = "checkpoint.pt"


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


def load_full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load an unsharded optimizer state into the optimizer of a sharded model."""
    shards = _shards_of(model, optimizer)

    def local(i: int, value: Any) -> Any:
        if i not in shards:
            return value
        split, shape = shards[i]
        return split.take(value) if is_per_kernel(value, (split.total, *shape[1:])) else value

    optimizer.load_state_dict({"state": {i: {k: local(i, v) for k, v in s.items()} for i, s in state["state"].items()},
                               "param_groups": state["param_groups"]})


def _cpu(value: Any) -> Any:
    return value.detach().to("cpu", copy=True) if torch.is_tensor(value) else value


def save_checkpoint(directory: str | os.PathLike, payload: dict) -> Path:
    """Write ``payload`` to ``directory/checkpoint.pt`` atomically; returns the path."""
    path = Path(directory) / FILENAME
    with atomic_writer(path) as f:
        torch.save(payload, f)
    return path


def load_checkpoint(directory: str | os.PathLike) -> dict | None:
    """The checkpoint in ``directory``, or None when there is none.

    Loads with ``weights_only=True``; a truncated or foreign file is a
    ``ConfigError`` naming it.
    """
    path = Path(directory) / FILENAME
    if not path.exists():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"checkpoint {path} is unreadable ({type(exc).__name__}); delete it or choose another --checkpoint-dir") from None
    if not isinstance(payload, dict) or not {"model", "optimizer", "progress"} <= payload.keys():
        raise ConfigError(f"checkpoint {path} is not a convshard checkpoint")
    return payload
