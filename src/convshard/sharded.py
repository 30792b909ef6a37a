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

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from . import comm
from .errors import ConfigError

log = logging.getLogger(__name__)


def split_counts(total: int, shares: Sequence[float]) -> tuple[int, ...]:
    """Integer kernel counts proportional to ``shares`` that sum to ``total``.

    Largest-remainder apportionment: c_r = floor(total * w_r / sum(w)), then
    the kernels left over go one each to the largest fractional parts (ties
    to the lower rank). A share of 0 gives 0 kernels.
    """
    weights = [float(w) for w in shares]
    if not weights:
        raise ConfigError("shares must name at least one rank")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"shares {list(shares)} must be finite, non-negative and not all zero")
    exact = [total * w / sum(weights) for w in weights]
    counts = [math.floor(e) for e in exact]
    by_remainder = sorted(range(len(exact)), key=lambda r: (counts[r] - exact[r], r))
    for r in by_remainder[: total - sum(counts)]:
        counts[r] += 1
    return tuple(counts)


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


CHANNELWISE: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Tanh, nn.Sigmoid,
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool2d,
)


def is_channelwise(module: nn.Module) -> bool:
    """Whether ``module`` maps each channel on its own and holds no state,
    so it can run on a shard of the channels."""
    stateless = not any(True for _ in module.parameters()) and not any(True for _ in module.buffers())
    return isinstance(module, CHANNELWISE) and stateless and not getattr(module, "return_indices", False)


class ShardedConv2d(nn.Module):
    """``nn.Conv2d`` whose kernels are split across the ranks of a group.

    Holds ``weight`` (c_r, C_in, kh, kw) and ``bias`` (c_r,) for this rank's
    kernels, and ``local_ops``: channel-wise layers applied to the shard
    before the gather. Forward maps (B, C_in, H, W) -> (B, C, H'', W'') on
    every rank, where H'', W'' are the sizes after ``local_ops``.
    Communication per call: one all-gather of the outputs in forward, one
    all-reduce of the input gradient in backward, which travels while the
    weight gradient is computed (skipped when the input needs no gradient,
    as for the first layer).
    """

    def __init__(self, conv: nn.Conv2d, split: ShardSplit, *, local_ops: Sequence[nn.Module] = ()) -> None:
        super().__init__()
        if not all(is_channelwise(op) for op in local_ops):
            raise ConfigError(f"local_ops must be stateless channel-wise layers, got {list(local_ops)}")
        if conv.groups != 1:
            raise ConfigError(f"cannot shard a conv with groups={conv.groups}; only groups=1")
        if split.total != conv.out_channels:
            raise ConfigError(
                f"split {split.counts} covers {split.total} kernels, layer has {conv.out_channels}"
            )
        self.split = split
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride = conv.kernel_size, conv.stride
        self.padding, self.dilation = conv.padding, conv.dilation
        self.padding_mode = conv.padding_mode
        self._reversed_padding_repeated_twice = conv._reversed_padding_repeated_twice
        self.weight = nn.Parameter(split.take(conv.weight.detach()).clone())
        self.bias = (
            nn.Parameter(split.take(conv.bias.detach()).clone()) if conv.bias is not None else None
        )
        self.local_ops = nn.Sequential(*local_ops)

    def _local_conv(self, x: torch.Tensor) -> torch.Tensor:
        """Y_r = conv(X, W_r) + b_r, (B, C_in, H, W) -> (B, max(c_r, 1), H', W')."""
        weight, bias = self.weight, self.bias
        if self.split.local == 0:
            # conv2d refuses an empty kernel bank: pad it with one zero kernel
            # whose output forward() drops, which keeps X (and W_r) in the
            # graph so this rank still joins the backward all-reduce.
            weight = torch.cat([weight, weight.new_zeros(1, *weight.shape[1:])])
            bias = None if bias is None else torch.cat([bias, bias.new_zeros(1)])
        padding = self.padding
        if self.padding_mode != "zeros" or isinstance(padding, str):  # "same", "valid": explicit sizes
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=mode)
            padding = (0, 0)
        return comm.conv2d_on_shards(x, weight, bias, stride=self.stride, padding=padding, dilation=self.dilation,
                                     group=self.split.group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.local_ops(self._local_conv(x))  # (B, c_r, H'', W''), or (B, 1, ...) for c_r = 0
        if self.split.local == 0:
            y = y[:, :0]
        return comm.gather_from_shards(y, self.split.counts, group=self.split.group)  # (B, C, H'', W'')

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"kernels={self.split.counts}, rank={self.split.rank}"
        )


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
    group: comm.Group = None,
    *,
    layer_shares: Mapping[str, Sequence[float]] | None = None,
    fuse_channelwise: bool = True,
) -> nn.Module:
    """Replace every ``nn.Conv2d`` in ``model`` by a ``ShardedConv2d``; returns the model.

    Call inside an initialised process group (or without one: world size 1).
    ``shares`` weights the ranks of ``group`` (None = equal); each layer's
    kernels are split by ``split_counts``. ``layer_shares`` overrides the
    shares of named layers. Parameters and buffers are first broadcast from
    group rank 0, so all ranks start from its weights. Convs with
    ``groups > 1`` or parametrizations are left replicated, with a warning.

    With ``fuse_channelwise`` (the default), stateless channel-wise layers
    that follow a sharded conv in an ``nn.Sequential`` (ReLU, pooling; see
    ``CHANNELWISE``) move into its ``local_ops`` and their places hold
    ``nn.Identity``: the same function, a smaller gather, the same state
    dict keys.
    """
    world, me = comm.world_size(group), comm.rank(group)
    shares = [1.0] * world if shares is None else list(shares)
    for name, weights in [("shares", shares), *(layer_shares or {}).items()]:
        if len(weights) != world:
            raise ConfigError(f"{name} {list(weights)} has {len(weights)} entries for {world} ranks")
    if world > 1:
        _check_same_model(model, group)
        comm.broadcast_([*model.parameters(), *model.buffers()], group=group)

    def shard(site: ConvSite) -> ShardedConv2d:
        weights = (layer_shares or {}).get(site.name, shares)
        split = ShardSplit(split_counts(site.conv.out_channels, weights), me, group)
        return ShardedConv2d(site.conv, split, local_ops=[op for _, op in site.fused])

    for site in conv_sites(model, fuse_channelwise=fuse_channelwise):
        if not site.shardable:
            log.warning("left replicated (groups=%d or parametrized): %s", site.conv.groups, site.name or "model")
            continue
        if site.parent is None:
            return shard(site)
        for later_name, _ in site.fused:
            setattr(site.parent, later_name, nn.Identity())
        setattr(site.parent, site.attr, shard(site))
    log.info("kernels per rank: %s", {n: list(c) for n, c in layer_counts(model).items()})
    return model


def layer_counts(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Kernels per rank for each sharded layer, by module name."""
    return {n: m.split.counts for n, m in model.named_modules() if isinstance(m, ShardedConv2d)}


def sharded_parameters(model: nn.Module) -> dict[str, ShardSplit]:
    """The split along dim 0 of every sharded parameter, by parameter name."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, ShardedConv2d):
            for pname, _ in module.named_parameters(recurse=False):
                out[f"{name}.{pname}" if name else pname] = module.split
    return out


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict, on CPU: same keys and shapes as the original
    model's, identical on every rank. A collective: every rank must call it."""
    splits = sharded_parameters(model)
    return {
        key: (splits[key].gather(t) if key in splits else t).detach().to("cpu", copy=True)
        for key, t in model.state_dict().items()
    }


def load_full_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load an unsharded state dict into a sharded model: each rank takes its slice."""
    splits = sharded_parameters(model)
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


def sync_replicas(model: nn.Module, group: comm.Group = None) -> None:
    """Make the replicated part identical on every rank: broadcast the
    gradients of replicated parameters and the floating-point buffers of
    replicated modules (e.g. BatchNorm running statistics) from group rank 0.

    Call after ``backward()`` and before ``optimizer.step()``. Ranks that
    round alike (same hardware, same thread count) already agree; ranks that
    do not (a CPU beside a GPU) would otherwise drift apart.
    """
    if comm.world_size(group) == 1:
        return
    sharded = set(sharded_parameters(model))
    grads = [p.grad for n, p in model.named_parameters() if n not in sharded and p.grad is not None]
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    comm.broadcast_(grads + buffers, group=group)
