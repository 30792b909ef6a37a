"""Kernel-sharded layers: ``ShardedConv2d`` and the channel-wise layers on its shard; the unsharded state.

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
sees the same gathered activations on every rank. ``shard.sync_replicas`` keeps those replicas identical
(bitwise) even when ranks round differently, as CPUs and GPUs do.
``convshard.parallel.shard`` builds a sharded model from these layers (``shard_model``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from . import comm

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

    Mutable: re-splitting a group (``reshard.reshard``) swaps ``split`` for
    all its members at once. ``chunks``: the chunks of rows its output
    travels in to the sharded convs that read it
    (``convshard.parallel.pipeline``). A rank holds w_r = max(c_r, 1)
    channels of a split activation: with no kernels it carries one
    placeholder channel, so that every channel-wise op can still run there.
    """

    def __init__(self, name: str, split: ShardSplit, chunks: int = 1) -> None:
        self.name, self.split, self.chunks = name, split, chunks

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
    the model's layout pass (``convshard.parallel.layouts``) decides where it is gathered.
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
        weight, bias = kernels_or_placeholder(self.weight, self.bias)
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
                         device=device_of(bn), dtype=dtype_of(bn))
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
                         device=device_of(conv), dtype=dtype_of(conv))
        self.group = group
        with torch.no_grad():
            for name, value in conv.named_parameters(recurse=False):
                getattr(self, name).copy_(split.take(value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = kernels_or_placeholder(self.weight, self.bias)  # the placeholder channel's kernel
        self.groups = weight.size(0)  # the shard's size, which a re-split changes
        return self._conv_forward(x, weight, bias)


def kernels_or_placeholder(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """This rank's kernels, or, when it holds none, one zero kernel (and zero
    bias) appended to the empty bank, so that its (empty) parameters stay in
    the autograd graph and its output is a placeholder channel."""
    if weight.size(0):
        return weight, bias
    weight = torch.cat([weight, weight.new_zeros(1, *weight.shape[1:])])
    return weight, None if bias is None else torch.cat([bias, bias.new_zeros(1)])


def device_of(module: nn.Module) -> torch.device | None:
    tensor = next(iter([*module.parameters(), *module.buffers()]), None)
    return None if tensor is None else tensor.device


def dtype_of(module: nn.Module) -> torch.dtype | None:
    tensor = next((t for t in [*module.parameters(), *module.buffers()] if t.is_floating_point()), None)
    return None if tensor is None else tensor.dtype


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
