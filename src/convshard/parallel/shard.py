"""``shard_model``: a model made ready for a plan, every conv group split by kernels or by batch rows.

The pass (``convshard.parallel.layouts``) traces the model and gives every
activation a layout: replicated, channel-split (a kernel-mode group,
``convshard.parallel.sharded``) or row-split (a batch-mode group,
``convshard.parallel.batch``), with the transitions between them. A model that
cannot be traced keeps its own class: each conv gathers its own output.
Before the first forward of a sharded model at world size > 1, the ranks
compare a fingerprint of the batch they feed: kernel-mode groups need the
same global batch on every rank.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import ConfigError
from ..plan.splits import split_counts
from . import batch, comm, layouts
from .sharded import ChannelGroup, ShardedConv2d, ShardSplit, is_channelwise, layer_counts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConvSite:
    """Where a conv layer sits in a model, and what ``shard_model`` fuses into it."""

    name: str  # the conv's module name ("" for a bare conv)
    parent: nn.Module | None  # the module holding it as ``attr`` (None for a bare conv)
    attr: str
    conv: nn.Conv2d
    fused: tuple[tuple[str, nn.Module], ...]  # channel-wise layers right after it: (attr in parent, layer)
    shardable: bool  # False for groups > 1 or a parametrized conv, which stay replicated


def conv_sites(model: nn.Module, *, fuse_channelwise: bool = True) -> list[ConvSite]:
    """Every ``nn.Conv2d`` of ``model`` (not yet sharded) in definition order.

    ``fused`` lists the stateless channel-wise layers (see ``CHANNELWISE``)
    that follow a shardable conv in an ``nn.Sequential``: they can run on the
    conv's shard before the gather.
    """
    def shardable(conv: nn.Conv2d) -> bool:
        return conv.groups == 1 and not parametrize.is_parametrized(conv)

    if isinstance(model, nn.Conv2d):
        return [ConvSite("", None, "", model, (), shardable(model))]
    sites = []
    for name, module in model.named_modules():
        children = list(module.named_children())
        for i, (child_name, child) in enumerate(children):
            if not isinstance(child, nn.Conv2d):
                continue
            fused = []
            if fuse_channelwise and shardable(child) and isinstance(module, nn.Sequential):
                for later in children[i + 1 :]:
                    if not is_channelwise(later[1]):
                        break
                    fused.append(later)
            full_name = f"{name}.{child_name}" if name else child_name
            sites.append(ConvSite(full_name, module, child_name, child, tuple(fused), shardable(child)))
    return sites


def _check_same_model(model: nn.Module, group: comm.Group) -> None:
    """Refuse to shard when ranks hold models of different structure."""
    signature = [(k, tuple(v.shape), str(v.dtype)) for k, v in model.state_dict().items()]
    for r, other in enumerate(comm.gather_objects(signature, group=group)):
        if other != signature:
            mismatch = next(
                (a, b) for a, b in zip(signature + [None], other + [None]) if a != b
            )
            raise ValueError(
                f"model differs between ranks {comm.rank(group)} and {r}: {mismatch[0]} vs {mismatch[1]}"
            )


def shard_model(
    model: nn.Module,
    shares: Sequence[float] | None = None,
    *,
    group: comm.Group = None,
    layer_shares: Mapping[str, Sequence[float]] | None = None,
    fuse_channelwise: bool = True,
    modes: Mapping[str, str] | None = None,
    rows: Sequence[float] | None = None,
    gradient_dtype: torch.dtype | None = None,
    check_batch: bool = True,
) -> nn.Module:
    """Shard every ``nn.Conv2d`` of ``model`` by its kernels; returns the sharded model.

    Call inside an initialised process group (or without one: world size 1).
    ``shares`` weights the ranks of ``group`` (None = equal); each layer's
    kernels are split by ``split_counts``. ``layer_shares`` overrides the
    shares of named layers (a group of tied convs goes by its first conv's
    name). Parameters and buffers are first broadcast from group rank 0, so
    all ranks start from its weights.

    The model is traced (``torch.fx``) and every op that acts on channels
    independently runs on each rank's shard of a conv's output: BatchNorm
    (its parameters and running statistics split with the kernels),
    activations, pooling, depthwise convs, residual adds and per-channel
    gates. An activation is gathered only where an op needs every channel
    (the next conv, flatten, a linear layer, a concatenation). Convs whose
    outputs meet in an add or a product are split alike. The result is a
    ``torch.fx.GraphModule`` with the original module names and state-dict
    keys. A model that cannot be traced keeps its own class: each conv
    gathers its output, with the stateless channel-wise layers that follow
    it in an ``nn.Sequential`` run on the shard first (``fuse_channelwise``).
    Convs with ``groups > 1`` (except depthwise convs on a split
    activation) or parametrizations stay replicated, with a warning.

    ``modes`` turns named groups to batch mode (``"batch"``): their weights
    stay whole, the global batch is split over the ranks by the weights
    ``rows`` (None = equal; ``convshard.parallel.batch``), BatchNorm normalises over
    the global batch, and the weights' gradients are summed over the ranks
    during backward (``sync_replicas`` waits for them), in ``gradient_dtype``
    when given (``torch.bfloat16`` halves the bytes; the sum is rounded to it).

    .. warning::
        Every rank must feed the model the same global batch, in the same
        order (seed the order; no ``DistributedSampler``): kernel-mode
        groups split kernels, not data, and batch-mode groups take their
        rows of the batch themselves. With ``check_batch`` (and unless the
        environment sets ``CONVSHARD_CHECK_BATCH=0``) the first forward at
        world size > 1 all-gathers a fingerprint of the input and raises
        ``ValueError`` when a rank's differs from rank 0's; later forwards
        are not checked.
    """
    world, me = comm.world_size(group), comm.rank(group)
    shares = [1.0] * world if shares is None else list(shares)
    rows = [1.0] * world if rows is None else list(rows)
    for name, weights in [("shares", shares), ("rows", rows), *(layer_shares or {}).items()]:
        if len(weights) != world:
            raise ConfigError(f"{name} {list(weights)} has {len(weights)} entries for {world} ranks")
    if world > 1:
        _check_same_model(model, group)
        comm.broadcast_([*model.parameters(), *model.buffers()], group=group)

    def split_for(name: str, kernels: int) -> ShardSplit:
        return ShardSplit(split_counts(kernels, (layer_shares or {}).get(name, shares)), me, group)



    graph = layouts.trace(model) if fuse_channelwise else None
    if graph is not None:
        sharded = layouts.shard_graph(graph, split_for, modes=modes, rows=batch.RowSplit(rows, me, group),
                                      gradient_dtype=gradient_dtype)
    else:
        if any(mode == "batch" for mode in (modes or {}).values()):
            log.warning("batch mode needs a traceable model: every group splits its kernels")
        sharded = _shard_in_place(model, split_for, fuse_channelwise)
    log.info("kernels per rank: %s", {n: list(c) for n, c in layer_counts(sharded).items()})
    if world > 1 and check_batch and os.environ.get("CONVSHARD_CHECK_BATCH", "1") != "0":
        _check_batch_on_first_forward(sharded, group)
    return sharded


_SHAPE_SLOTS = 6  # input dimensions the fingerprint records; more are folded into numel


def _batch_fingerprint(x: torch.Tensor) -> torch.Tensor:
    """A float64 vector that summarises a batch (B, ...) on its own device:
    ndim, numel, the first ``_SHAPE_SLOTS`` sizes (-1 pads), sum x,
    sum x^2, sum |x| and sum_i (i + 1) * sum(x[i]), the last so that
    reordered rows differ."""
    with torch.no_grad():
        n = x.size(0) if x.dim() else 1
        rows = x.detach().reshape(n, x.numel() // n if n else 0)  # (B, rest)
        shape = [*x.shape[:_SHAPE_SLOTS], *[-1] * (_SHAPE_SLOTS - min(x.dim(), _SHAPE_SLOTS))]
        head = torch.tensor([x.dim(), x.numel(), *shape], dtype=torch.float64, device=x.device)
        row_sums = rows.sum(1, dtype=torch.float64)  # (B,)
        position = torch.arange(1, rows.size(0) + 1, dtype=torch.float64, device=x.device)
        sums = torch.stack([row_sums.sum(), rows.double().square().sum(), rows.abs().sum(dtype=torch.float64),
                            (position * row_sums).sum()])
        return torch.cat([head, sums])


def _same_batch(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two fingerprints (``_batch_fingerprint``, on CPU) describe the
    same batch: equal shapes, and sums equal up to rounding (ranks on
    different devices add in different orders), NaN matching NaN."""
    head = 2 + _SHAPE_SLOTS
    if not torch.equal(a[:head], b[:head]):
        return False
    batch = max(a[2].item(), 1.0)  # B (-1 for a 0-dim input): weights the position-weighted sum
    a, b = a[head:], b[head:]  # sum, sum of squares, sum of |x|, position-weighted sum
    abs_sum = torch.maximum(a[2], b[2])
    scale = torch.stack([abs_sum, torch.maximum(a[1], b[1]), abs_sum, abs_sum * batch])
    close = (a == b) | ((a - b).abs() <= 1e-5 * scale + 1e-12) | (a.isnan() & b.isnan())
    return bool(close.all())


def _describe_batch(fingerprint: torch.Tensor) -> str:
    ndim = int(fingerprint[0])
    shape = tuple(int(s) for s in fingerprint[2 : 2 + min(ndim, _SHAPE_SLOTS)])
    return f"shape {shape}, sum {fingerprint[2 + _SHAPE_SLOTS].item():.6g}"


def _check_batch_on_first_forward(model: nn.Module, group: comm.Group) -> None:
    """Register a forward pre-hook on ``model`` that, once, all-gathers a
    fingerprint of the input (its first tensor argument) over ``group`` and
    raises ``ValueError`` on every rank when a rank's batch differs from
    rank 0's. One small all-gather on the first forward; the hook then
    removes itself (a copy made before that checks its own first forward)."""
    def check(module: nn.Module, args: tuple, kwargs: dict) -> None:
        handle.remove()
        if getattr(module, "_convshard_batch_checked", False):
            return
        module._convshard_batch_checked = True
        x = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if x is None:  # still join the collective, so that no rank waits alone
            device = next((t.device for t in [*module.parameters(), *module.buffers()]), torch.device("cpu"))
            x = torch.zeros(1, device=device)
        mine = _batch_fingerprint(x).unsqueeze(0)  # (1, n), on the input's device
        world = comm.world_size(group)
        everyone = comm.all_gather_uneven(mine, [1] * world, dim=0, group=group).cpu()  # (world, n)
        for r in range(1, world):
            if not _same_batch(everyone[r], everyone[0]):
                raise ValueError(
                    "every rank must feed the same global batch to a sharded model (convshard splits kernels, "
                    f"not data); rank {r}'s batch differs from rank 0's ({_describe_batch(everyone[r])} vs "
                    f"{_describe_batch(everyone[0])}); shard_model(..., check_batch=False) or "
                    "CONVSHARD_CHECK_BATCH=0 turns this check off"
                )

    handle = model.register_forward_pre_hook(check, with_kwargs=True)


def _shard_in_place(model: nn.Module, split_for, fuse_channelwise: bool) -> nn.Module:
    """Each shardable conv becomes a ``ShardedConv2d`` that gathers its own
    output; the stateless channel-wise layers after it in an ``nn.Sequential``
    move onto its shard (their places hold ``nn.Identity``)."""
    for site in conv_sites(model, fuse_channelwise=fuse_channelwise):
        if not site.shardable:
            log.warning("left replicated (groups=%d or parametrized): %s", site.conv.groups, site.name or "model")
            continue
        layer = ShardedConv2d(site.conv, ChannelGroup(site.name, split_for(site.name, site.conv.out_channels)),
                              local_ops=[op for _, op in site.fused])
        if site.parent is None:
            return layer
        for later_name, _ in site.fused:
            setattr(site.parent, later_name, nn.Identity())
        setattr(site.parent, site.attr, layer)
    return model


def group_kernels(model: nn.Module) -> dict[str, int]:
    """The channel groups ``shard_model`` makes of an unsharded ``model``:
    name -> kernels, in graph order (a plan names these)."""
    quiet = log.level
    log.setLevel(logging.WARNING)  # the one-rank split's "kernels per rank" line says nothing here
    try:
        one_rank = shard_model(copy.deepcopy(model).cpu())
    finally:
        log.setLevel(quiet)
    return {name: sum(counts) for name, counts in layer_counts(one_rank).items()}

