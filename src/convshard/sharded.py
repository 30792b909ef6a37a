"""Kernel-sharded convolution: ``ShardedConv2d``, ``shard_model``, ``full_state_dict``.

A conv layer Y = conv(X, W) + b with C kernels, W of shape (C, C_in, kh, kw),
is split along its output channels: W = [W_0; ...; W_{p-1}] with W_r of shape
(c_r, C_in, kh, kw) and sum_r c_r = C. Every rank holds the whole input X
(B, C_in, H, W); rank r computes Y_r = conv(X, W_r) + b_r of shape
(B, c_r, H', W'); the Y_r are all-gathered into Y. In backward rank r computes
dW_r and db_r locally and a partial dX_r; dX = sum_r dX_r. No arithmetic
changes, so the sharded model trains exactly like the unsharded one, up to
float rounding in the sum over ranks.

Channel-wise layers right after a conv (ReLU, pooling: any g that acts on
each channel alone, so g([Y_0, ..., Y_p]) = [g(Y_0), ..., g(Y_p)]) run on the
shard before the gather: a 2x2 pool cuts the gathered bytes 4x and no rank
repeats another's work. Everything else in the model stays replicated: it
sees the same gathered activations on every rank. ``sync_replicas`` keeps those replicas identical
(bitwise) even when ranks round differently, as CPUs and GPUs do.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from . import comm
from .errors import ConfigError
from .splits import split_counts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardSplit:
    """How one layer's kernels are split: rank r holds [offsets[r], offsets[r] + counts[r])."""

    counts: tuple[int, ...]  # kernels per rank of the group, in rank order
    rank: int  # this process's rank in the group
    group: comm.Group = field(default=None, compare=False)  # None = the default group

    @property
    def total(self) -> int:
        return sum(self.counts)

    @property
    def start(self) -> int:
        return sum(self.counts[: self.rank])

    @property
    def local(self) -> int:
        return self.counts[self.rank]

    def take(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a tensor whose dim 0 runs over all kernels."""
        return full.narrow(0, self.start, self.local)

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """The full tensor from every rank's dim-0 slice (a collective)."""
        return comm.all_gather_uneven(local, self.counts, dim=0, group=self.group)


class ChannelGroup:
    """The kernels of convs whose outputs meet (in a residual add, a gate),
    split alike: every member of a group holds the same channels.

    Mutable: re-splitting a group (``rebalance.reshard``) swaps ``split`` for
    all its members at once. A rank holds w_r = max(c_r, 1) channels of a
    split activation: with no kernels it carries one placeholder channel,
    so that every channel-wise op can still run there.
    """

    def __init__(self, name: str, split: ShardSplit) -> None:
        self.name, self.split = name, split

    def gather(self, y: torch.Tensor, *, partial: bool = False) -> torch.Tensor:
        """(B, w_r, ...) -> (B, C, ...) on every rank; backward: split (reduce-scatter with ``partial``)."""
        return comm.gather_from_shards(y, self.split.counts, group=self.split.group, partial=partial)

    def slice(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """A replicated tensor's slice for this rank along ``dim``; backward: all-gather."""
        return comm.slice_to_shard(x, self.split.counts, dim=dim, group=self.split.group)

    def __repr__(self) -> str:
        return f"ChannelGroup({self.name!r}, counts={self.split.counts})"


CHANNELWISE: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Tanh,
    nn.Sigmoid, nn.Mish, nn.Hardtanh, nn.Identity,
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool2d,
)


def is_channelwise(module: nn.Module) -> bool:
    """Whether ``module`` maps each channel on its own and holds no state,
    so it can run on a shard of the channels."""
    stateless = not any(True for _ in module.parameters()) and not any(True for _ in module.buffers())
    return isinstance(module, CHANNELWISE) and stateless and not getattr(module, "return_indices", False)


class ShardedConv2d(nn.Module):
    """``nn.Conv2d`` whose kernels are split across the ranks of a group.

    Y = conv(X, W) + b with W split along its output channels,
    W = [W_0; ...; W_{p-1}], W_r of shape (c_r, C_in, kh, kw). Holds
    ``weight`` W_r and ``bias`` b_r (c_r,) and maps the replicated input
    (B, C_in, H, W) to this rank's shard Y_r = conv(X, W_r) + b_r of shape
    (B, w_r, H', W') (a zero placeholder channel when c_r = 0). Backward: the
    partial input gradients dX_r are summed over the ranks (one all-reduce,
    travelling while dW_r is computed; none when X needs no gradient). With
    ``partial_input_grad`` the layer returns dX_r as it is: X was gathered
    from a channel split by a gather that reduce-scatters the partial sums.

    With ``gather`` the layer also leaves the split: ``local_ops`` (stateless
    channel-wise layers) run on the shard, then the shards are all-gathered
    into (B, C, H'', W'') on every rank. Without it the output stays split and
    the model's layout pass (``convshard.layouts``) decides where it is gathered.
    """

    def __init__(self, conv: nn.Conv2d, split: ShardSplit | ChannelGroup, *,
                 local_ops: Sequence[nn.Module] = (), gather: bool = True) -> None:
        super().__init__()
        if not all(is_channelwise(op) for op in local_ops):
            raise ConfigError(f"local_ops must be stateless channel-wise layers, got {list(local_ops)}")
        if conv.groups != 1:
            raise ConfigError(f"cannot shard a conv with groups={conv.groups}; only groups=1")
        self.group = split if isinstance(split, ChannelGroup) else ChannelGroup("", split)
        if self.split.total != conv.out_channels:
            raise ConfigError(
                f"split {self.split.counts} covers {self.split.total} kernels, layer has {conv.out_channels}"
            )
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride = conv.kernel_size, conv.stride
        self.padding, self.dilation = conv.padding, conv.dilation
        self.padding_mode = conv.padding_mode
        self._reversed_padding_repeated_twice = conv._reversed_padding_repeated_twice
        self.weight = nn.Parameter(self.split.take(conv.weight.detach()).clone())
        self.bias = (
            nn.Parameter(self.split.take(conv.bias.detach()).clone()) if conv.bias is not None else None
        )
        self.local_ops = nn.Sequential(*local_ops)
        self.gather = gather
        self.partial_input_grad = False

    @property
    def split(self) -> ShardSplit:
        return self.group.split

    def _local_conv(self, x: torch.Tensor) -> torch.Tensor:
        """Y_r = conv(X, W_r) + b_r, (B, C_in, H, W) -> (B, max(c_r, 1), H', W')."""
        # conv2d refuses an empty kernel bank: one zero kernel stands in. It
        # keeps X (and W_r) in the graph, so this rank still joins the backward
        # collectives; the gather leaves its output out.
        weight, bias = _kernels_or_placeholder(self.weight, self.bias)
        padding = self.padding
        if self.padding_mode != "zeros" or isinstance(padding, str):  # "same", "valid": explicit sizes
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=mode)
            padding = (0, 0)
        return comm.conv2d_on_shards(x, weight, bias, stride=self.stride, padding=padding, dilation=self.dilation,
                                     group=self.split.group, reduce=not self.partial_input_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._local_conv(x)  # (B, w_r, H', W')
        if not self.gather:
            return y
        return self.group.gather(self.local_ops(y))  # (B, C, H'', W'')

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"kernels={self.split.counts}, rank={self.split.rank}"
        )


class ShardedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d on a channel-split activation (B, w_r, H, W).

    Per channel j, y = (x - mean_j) / sqrt(var_j + eps) * gamma_j + beta_j
    with the statistics over (B, H, W): every rank holds the whole batch of
    its channels, so its statistics are exact. ``weight``, ``bias``,
    ``running_mean`` and ``running_var`` hold this rank's c_r channels;
    ``num_batches_tracked`` is the same on every rank. A rank with no
    channels passes its placeholder channel through.
    """

    def __init__(self, bn: nn.BatchNorm2d, group: ChannelGroup) -> None:
        split = group.split
        super().__init__(split.local, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                         device=_device_of(bn), dtype=_dtype_of(bn))
        self.group = group
        with torch.no_grad():
            for name, value in [*bn.named_parameters(recurse=False), *bn.named_buffers(recurse=False)]:
                mine = split.take(value) if value.dim() else value
                getattr(self, name).copy_(mine)
        self.train(bn.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.group.split.local == 0:
            if self.training and self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)  # as on the ranks that hold channels
            if self.affine:  # the empty weight and bias still get (empty) gradients, as elsewhere,
                x = x + 0 * (self.weight.sum() + self.bias.sum())  # so every rank keeps optimizer state alike
            return x
        return super().forward(x)


class ShardedChannelwiseConv2d(nn.Conv2d):
    """A depthwise conv (groups = in = out channels) on a channel-split
    activation: channel j is filtered by kernel j alone, so rank r holds
    kernels [o_r, o_r + c_r) and needs no communication.
    (B, w_r, H, W) -> (B, w_r, H', W')."""

    def __init__(self, conv: nn.Conv2d, group: ChannelGroup) -> None:
        split = group.split
        super().__init__(split.local, split.local, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                         groups=max(split.local, 1), bias=conv.bias is not None, padding_mode=conv.padding_mode,
                         device=_device_of(conv), dtype=_dtype_of(conv))
        self.group = group
        with torch.no_grad():
            for name, value in conv.named_parameters(recurse=False):
                getattr(self, name).copy_(split.take(value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = _kernels_or_placeholder(self.weight, self.bias)  # the placeholder channel's kernel
        self.groups = weight.size(0)  # the shard's size, which a re-split changes
        return self._conv_forward(x, weight, bias)


def _kernels_or_placeholder(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """This rank's kernels, or, when it holds none, one zero kernel (and zero
    bias) appended to the empty bank, so that its (empty) parameters stay in
    the autograd graph and its output is a placeholder channel."""
    if weight.size(0):
        return weight, bias
    weight = torch.cat([weight, weight.new_zeros(1, *weight.shape[1:])])
    return weight, None if bias is None else torch.cat([bias, bias.new_zeros(1)])


def _device_of(module: nn.Module) -> torch.device | None:
    tensor = next(iter([*module.parameters(), *module.buffers()]), None)
    return None if tensor is None else tensor.device


def _dtype_of(module: nn.Module) -> torch.dtype | None:
    tensor = next((t for t in [*module.parameters(), *module.buffers()] if t.is_floating_point()), None)
    return None if tensor is None else tensor.dtype


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
    ``rows`` (None = equal; ``convshard.batch``), BatchNorm normalises over
    the global batch, and the weights' gradients are summed over the ranks
    during backward (``sync_replicas`` waits for them).

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

    from . import batch, layouts  # both build on the sharded modules above

    graph = layouts.trace(model) if fuse_channelwise else None
    if graph is not None:
        sharded = layouts.shard_graph(graph, split_for, modes=modes, rows=batch.RowSplit(rows, me, group))
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


def channel_groups(model: nn.Module) -> dict[str, list[tuple[str, nn.Module]]]:
    """Every channel group of a sharded model, by name, with its member
    modules (name, module) in definition order."""
    groups: dict[int, tuple[ChannelGroup, list]] = {}
    for name, module in model.named_modules():
        group = getattr(module, "group", None)
        if isinstance(group, ChannelGroup):
            groups.setdefault(id(group), (group, []))[1].append((name, module))
    # a group built by hand (``ShardedConv2d(conv, split)``) has no name: it goes by its layer's
    return {group.name or members[0][0]: members for group, members in groups.values()}


def layer_counts(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Kernels per rank for each channel group (a sharded conv, or convs tied together), by name."""
    return {name: members[0][1].group.split.counts for name, members in channel_groups(model).items()}


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


def sharded_state(model: nn.Module) -> dict[str, ShardSplit]:
    """The split along dim 0 of every sharded parameter and buffer, by state-dict key."""
    out = {}
    for members in channel_groups(model).values():
        for name, module in members:
            for key, value in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                if value is not None and value.dim() > 0:
                    out[f"{name}.{key}" if name else key] = module.group.split
    return out


def sharded_parameters(model: nn.Module) -> dict[str, ShardSplit]:
    """The split along dim 0 of every sharded parameter, by parameter name."""
    params = dict(model.named_parameters())
    return {k: split for k, split in sharded_state(model).items() if k in params}


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict, on CPU: same keys and shapes as the original
    model's, identical on every rank. A collective: every rank must call it."""
    splits = sharded_state(model)
    return {
        key: (splits[key].gather(t) if key in splits else t).detach().to("cpu", copy=True)
        for key, t in model.state_dict().items()
    }


def load_full_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load an unsharded state dict into a sharded model: each rank takes its slice."""
    splits = sharded_state(model)
    # the unsharded shape of every entry: sharded ones span all kernels along dim 0
    full_shapes = {k: (splits[k].total, *v.shape[1:]) if k in splits else tuple(v.shape)
                   for k, v in model.state_dict().items()}
    missing = sorted(set(full_shapes) - set(state))
    unexpected = sorted(set(state) - set(full_shapes))
    wrong = sorted(k for k in set(full_shapes) & set(state) if tuple(state[k].shape) != full_shapes[k])
    if missing or unexpected or wrong:
        raise ConfigError(
            f"state dict does not fit the model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shape {wrong[:5]}"
        )
    model.load_state_dict({k: splits[k].take(v) if k in splits else v for k, v in state.items()})


def sync_replicas(model: nn.Module, *, group: comm.Group = None) -> None:
    """Make the replicated part identical on every rank: finish the sum of
    the batch-mode weights' gradients, broadcast the gradients of the other
    replicated parameters and the floating-point buffers of replicated
    modules (e.g. BatchNorm running statistics) from group rank 0.

    Call after ``backward()`` and before ``optimizer.step()``. Ranks that
    round alike (same hardware, same thread count) already agree; ranks that
    do not (a CPU beside a GPU) would otherwise drift apart.
    """
    if comm.world_size(group) == 1:
        return
    summed = getattr(model, "gradient_sum", None)  # batch-mode weights (``convshard.batch``)
    if summed is not None:
        summed.wait()
    sharded = set(sharded_state(model))
    skip = {id(p) for p in summed.parameters()} if summed is not None else set()
    grads = [p.grad for n, p in model.named_parameters()
             if n not in sharded and id(p) not in skip and p.grad is not None]
    buffers = [b for n, b in model.named_buffers() if n not in sharded and b.is_floating_point()]
    comm.broadcast_(grads + buffers, group=group)
