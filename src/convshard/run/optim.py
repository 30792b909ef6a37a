"""The optimizer a run trains with: its parameter groups, its learning-rate schedule, the global gradient clip.

Every function is pure in the run's settings and the step, or, for the
clip, one all-reduce: every rank and every plan computes the same values,
so a resumed or re-split run follows the same schedule.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable

import torch
from torch import nn

from ..parallel import comm
from .config import RunSettings


def param_groups(params: Iterable[nn.Parameter], *, weight_decay: float, decay_all: bool = False) -> list[dict]:
    """The optimizer's parameter groups: weight decay ``weight_decay`` on the
    parameters of two or more dimensions (conv kernels, linear matrices) and
    none on those of one (biases, BatchNorm's per-channel weight and bias)
    unless ``decay_all``. A parameter's dimensions are the same sharded or
    whole, so every rank and one device group alike; empty groups are left out."""
    params = list(params)
    if weight_decay == 0 or decay_all:
        return [{"params": params, "weight_decay": weight_decay}]
    decayed = [p for p in params if p.dim() > 1]
    kept = [p for p in params if p.dim() <= 1]
    return [g for g in ({"params": decayed, "weight_decay": weight_decay}, {"params": kept, "weight_decay": 0.0})
            if g["params"]]


def make_optimizer(config: RunSettings, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    groups = param_groups(params, weight_decay=config.weight_decay, decay_all=config.decay_all)
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=config.lr)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr)
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)


def warmup_steps(config: RunSettings, total_steps: int) -> int:
    """The optimizer steps of the learning-rate warm-up: ``lr_warmup_epochs`` in steps, rounded."""
    return round(config.lr_warmup_epochs * total_steps / config.epochs)


def learning_rate(config: RunSettings, step: int, total_steps: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based) of ``total_steps``.

    With a warm-up of w steps (``warmup_steps``), step s < w takes
    lr * (s + 1) / w. After it, cosine: lr * (1 + cos(pi * (s - w) / (T - w))) / 2
    with T = total_steps; constant: lr. A pure function of the step, so a
    resumed run follows the same schedule.
    """
    warm = warmup_steps(config, total_steps)
    if step < warm:
        return config.lr * (step + 1) / warm
    if config.schedule == "constant":
        return config.lr
    done = (min(step, total_steps) - warm) / max(1, total_steps - warm)
    return config.lr * 0.5 * (1 + math.cos(math.pi * done))


def clip_gradients(model: nn.Module, max_norm: float, *, sharded: Collection[str], group: comm.Group) -> float:
    """Scale every gradient of ``model`` by min(1, max_norm / (|g| + 1e-6));
    returns |g|, the L2 norm of the whole model's gradient.

    |g|^2 = sum over ranks of the sum of squares of this rank's shards of the
    ``sharded`` parameters (by name), summed over ``group`` in one all-reduce
    (None: nothing to sum, as for DDP, whose gradients are whole), plus the sum of squares of the replicated ones, identical on every rank
    and counted once. Every rank thus scales by the same factor, whatever the
    split, and one device (no group) scales as torch's ``clip_grad_norm_``.
    """
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    device = next(model.parameters()).device
    zero = torch.zeros((), dtype=torch.float64, device=device)
    own = sum((g.double().pow(2).sum() for n, g in grads.items() if n in sharded), zero)
    if group is not None and comm.world_size(group) > 1:
        comm.all_reduce_sum_(own, group=group)
    rest = sum((g.double().pow(2).sum() for n, g in grads.items() if n not in sharded), zero)
    norm = (own + rest).sqrt().item()
    scale = max_norm / (norm + 1e-6)
    if scale < 1:
        for g in grads.values():
            g.mul_(scale)
    return norm
