"""Layouts through a model's dataflow: which activations stay split by channels, and where they are gathered.

``shard_model`` traces the model with ``torch.fx`` and gives every value of
the graph a layout:

- ``R`` replicated: every rank holds all of it (the input, and whatever a
  layer computes from replicated values);
- ``C(g)`` channel-split: rank r holds channels [o_r, o_r + c_r) of channel
  group g, for the whole batch: (B, w_r, ...) with w_r = max(c_r, 1).

The rules, applied in graph order:

- a conv (groups = 1) takes ``R`` and gives ``C`` of a new group: its
  kernels are split (``ShardedConv2d``);
- ops that act on each channel alone keep ``C``: BatchNorm2d (its
  parameters and running statistics split with the group), a depthwise
  conv, stateless activations and pooling, means over the spatial dims;
- an elementwise add, subtract, multiply or divide of ``C`` operands ties
  their groups (their convs are then split alike) and stays ``C``; a
  replicated operand is sliced to the shard along its channel axis, or used
  whole when that axis has size 1 (a broadcast) — a squeeze-excite gate,
  a residual from a replicated stem;
- every other op (flatten, linear, concatenation, dropout, an in-place op
  on a replicated target...) needs all channels: its split operands are
  gathered first, and it gives ``R``. So is the model's output.

Each transition is one module here, holding its group: ``GatherChannels``
(C -> R: all-gather along channels; backward: split) and ``SliceChannels``
(R -> C: split; backward: all-gather). A value is gathered right before
the first op that needs it whole, once for the sharded convs that read it
and once for any other op. Each sharded conv's backward gives a partial
input gradient dX_r; the convs' gather sums them and hands each rank its
channels in one reduce-scatter (half the bytes of an all-reduce), and a
conv whose input was not gathered (the replicated input) all-reduces its
own (``comm.conv2d_on_shards``). Last, a channel split's gather and the
sharded convs reading it become one ``pipeline.GatheredConvs``, which
moves the value in chunks of rows while the convs compute.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ..errors import ConfigError
from ..plan import BatchSplit, KernelSplit
from .batch import ChannelsToRows, GatherRows, RowSplit, SliceRows, SyncBatchNorm2d
from .pipeline import overlap_gathers
from .sharded import (
    ChannelGroup,
    ShardedBatchNorm2d,
    ShardedChannelwiseConv2d,
    ShardedConv2d,
    ShardSplit,
    is_channelwise,
)

log = logging.getLogger(__name__)

UNARY_FUNCTIONS = {
    F.relu, torch.relu, F.relu_, torch.relu_, F.relu6, F.hardtanh, F.leaky_relu, F.elu, F.selu, F.celu,
    F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, torch.sigmoid, torch.tanh, F.sigmoid, F.tanh,
    torch.neg, operator.neg, torch.clone, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
}
UNARY_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "neg", "clone", "contiguous"}
BINARY_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv,
    operator.iadd, operator.isub, operator.imul, operator.itruediv,
    torch.add, torch.sub, torch.mul, torch.div,
}
BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
IN_PLACE = {operator.iadd, operator.isub, operator.imul, operator.itruediv, "add_", "sub_", "mul_", "div_"}
REDUCTIONS = {torch.mean, torch.amax, torch.sum, "mean", "amax", "sum"}


@dataclass(frozen=True)
class Split:
    """Layout ``C``: split by channels in (the union-find id of) a group, on a tensor of ``ndim`` dims."""

    group: int
    ndim: int


class GatherChannels(nn.Module):
    """C -> R: (B, w_r, ...) on each rank -> (B, C, ...) on every rank.
    Forward: all-gather along channels; backward: split, or with
    ``partial`` (only sharded convs read the result, and each returns its
    partial input gradient) reduce-scatter."""

    def __init__(self, channels: ChannelGroup, *, partial: bool = False) -> None:
        super().__init__()
        self.channels, self.partial = channels, partial

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.channels.gather(y, partial=self.partial)


class SliceChannels(nn.Module):
    """R -> C for an operand that meets a split tensor of ``ndim`` dims: its
    channel axis is aligned from the right (broadcasting). A size-1 axis (or
    none) broadcasts as it is. Forward: split; backward: all-gather."""

    def __init__(self, channels: ChannelGroup, ndim: int) -> None:
        super().__init__()
        self.channels, self.ndim = channels, ndim

    def forward(self, x):
        if not torch.is_tensor(x):
            return x
        axis = x.dim() - self.ndim + 1
        if axis < 0 or x.size(axis) == 1:
            return x
        return self.channels.slice(x, dim=axis)


def trace(model: nn.Module) -> fx.GraphModule | None:
    """``model`` as an fx graph, or None (with one log line) when it cannot be
    traced or its forward depends on ``self.training`` beyond its layers."""
    if isinstance(model, nn.Conv2d):
        return None
    name = type(model).__name__
    try:
        graph = fx.symbolic_trace(model)
        was_training = model.training
        model.train(not was_training)
        try:
            other = fx.symbolic_trace(model).code
        finally:
            model.train(was_training)
    except Exception as exc:  # fx raises many types for untraceable code
        log.warning("cannot trace %s (%s): channel-wise layers run on the shard only right after a conv "
                    "inside an nn.Sequential", name, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None
    if other != graph.code:
        log.warning("%s's forward branches on self.training: channel-wise layers run on the shard only right "
                    "after a conv inside an nn.Sequential", name)
        return None
    _adopt(graph, model)
    return graph


def _adopt(graph: fx.GraphModule, model: nn.Module) -> None:
    """Give the traced graph ``model``'s own children, parameters and buffers,
    in ``model``'s order: fx copies only what the forward uses, into plain
    containers, in order of first use. The sharded model then has the
    original's containers (``model.features[0]`` still works), state-dict
    keys and parameter order, so optimizer state lines up with the
    unsharded model's; sharding replaces layers inside them in place."""
    for attr in ("_modules", "_parameters", "_buffers"):
        getattr(graph, attr).clear()
        getattr(graph, attr).update(getattr(model, attr))
    graph._non_persistent_buffers_set = set(model._non_persistent_buffers_set)


class _Groups:
    """Union-find over channel groups; a group starts at one conv."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.total: list[int] = []

    def new(self, total: int) -> int:
        self.parent.append(len(self.parent))
        self.total.append(total)
        return len(self.parent) - 1

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a != b:
            self.parent[max(a, b)] = min(a, b)


@dataclass
class Analysis:
    """The layout of every node of a traced model."""

    graph: fx.GraphModule
    layout: dict[fx.Node, Split | None]  # None: replicated
    convs: dict[fx.Node, int]  # sharded conv node -> its group (before union)
    members: dict[fx.Node, int]  # BatchNorm / depthwise conv node on a split input -> group
    groups: _Groups

    def group_of(self, node: fx.Node) -> int:
        return self.groups.find(self.convs.get(node, self.members.get(node, -1)))

    def group_names(self) -> dict[int, str]:
        """Root group id -> its name: the first conv of the group, in graph order."""
        names: dict[int, str] = {}
        for node in self.convs:
            names.setdefault(self.group_of(node), str(node.target))
        return names

    def group_convs(self) -> dict[str, list[fx.Node]]:
        """Group name -> its conv nodes, in graph order."""
        names, out = self.group_names(), {}
        for node in self.convs:
            out.setdefault(names[self.group_of(node)], []).append(node)
        return out


def analyse(graph: fx.GraphModule) -> Analysis:
    """Propagate layouts through ``graph`` (see the module docstring)."""
    modules = dict(graph.named_modules())
    calls: dict[str, int] = {}
    for node in graph.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    result = Analysis(graph, {}, {}, {}, _Groups())
    groups, layout = result.groups, result.layout

    def split_of(arg) -> Split | None:
        return layout.get(arg) if isinstance(arg, fx.Node) else None

    def total(split: Split) -> int:
        return groups.total[groups.find(split.group)]

    for node in graph.graph.nodes:
        layout[node] = None
        tensor_args = [a for a in node.all_input_nodes]
        first = split_of(node.args[0]) if node.args else None
        if node.op == "call_module":
            module = modules[node.target]
            once = calls[node.target] == 1
            if once and _shardable_conv(module):
                result.convs[node] = groups.new(module.out_channels)
                layout[node] = Split(result.convs[node], 4)
            elif first is None or len(tensor_args) != 1:
                continue
            elif once and type(module) is nn.BatchNorm2d and module.num_features == total(first):
                result.members[node] = first.group
                layout[node] = first
            elif once and _depthwise(module) and module.in_channels == total(first) and first.ndim == 4:
                result.members[node] = first.group
                layout[node] = first
            elif is_channelwise(module) and first.ndim == 4:
                layout[node] = first
        elif node.op in ("call_function", "call_method"):
            target = node.target
            if first is not None and len(tensor_args) == 1 and (
                    target in UNARY_FUNCTIONS or target in UNARY_METHODS) and not node.kwargs.get("return_indices"):
                layout[node] = first
            elif first is not None and len(tensor_args) == 1 and target in REDUCTIONS:
                layout[node] = _reduced(node, first)
            elif target in BINARY_FUNCTIONS or target in BINARY_METHODS:
                layout[node] = _binary(node, split_of, total, groups)
    return result


def _shardable_conv(module: nn.Module) -> bool:
    return type(module) is nn.Conv2d and module.groups == 1 and not parametrize.is_parametrized(module)


def _depthwise(module: nn.Module) -> bool:
    return (type(module) is nn.Conv2d and module.groups > 1 and module.groups == module.in_channels
            == module.out_channels and not parametrize.is_parametrized(module))


def _reduced(node: fx.Node, split: Split) -> Split | None:
    """A sum, mean or max over spatial dims keeps the channel split."""
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    dims = (dims,) if isinstance(dims, int) else dims
    if not isinstance(dims, (tuple, list)) or not dims or not all(isinstance(d, int) for d in dims):
        return None
    if any(d % split.ndim < 2 for d in dims):
        return None
    return Split(split.group, split.ndim if keepdim else split.ndim - len(set(d % split.ndim for d in dims)))


def _binary(node: fx.Node, split_of, total, groups: _Groups) -> Split | None:
    """An elementwise op of two operands: split when at least one is split and
    the split ones agree in channel count and rank (their groups are tied)."""
    if len(node.args) < 2 or len(node.all_input_nodes) > 2:
        return None
    splits = [s for s in (split_of(a) for a in node.args[:2]) if s is not None]
    if not splits:
        return None
    if node.target in IN_PLACE and split_of(node.args[0]) is None:
        return None  # the target is replicated: it must stay whole
    head = splits[0]
    if any(s.ndim != head.ndim or total(s) != total(head) for s in splits):
        return None
    for s in splits[1:]:
        groups.union(head.group, s.group)
    return head


@dataclass(frozen=True)
class ShardedGraph:
    """What ``shard_graph`` made of a traced model, for the handle ``shard`` returns."""

    graph: fx.GraphModule  # the sharded model
    groups: dict[str, ChannelGroup]  # every kernel-mode channel group, by name
    summed: tuple[nn.Parameter, ...]  # the batch-mode groups' weights, whose gradients are summed
    batch_convs: tuple[str, ...]  # the batch-mode groups' convs, by module name


def shard_graph(graph: fx.GraphModule, style_of: Callable[[str, int], KernelSplit | BatchSplit], *,
                rank: int, group, rows: RowSplit | None) -> ShardedGraph:
    """Shard a traced model: split convs, split members, transitions where
    the layouts change. ``style_of(name, kernels)`` gives a group's style
    from its name (its first conv's): ``KernelSplit`` (its kernels per rank
    of ``group``, this process being ``rank``) or ``BatchSplit`` (the group
    whole, over the batch split ``rows``, shared by every batch-mode group).
    ``graph`` is recompiled in place."""
    result = analyse(graph)
    names = result.group_names()
    convs = result.group_convs()
    batch, channel_groups = set(), {}
    for root, name in names.items():
        kernels = graph.get_submodule(str(convs[name][0].target)).out_channels
        style = style_of(name, kernels)
        if isinstance(style, BatchSplit):
            batch.add(root)
        else:
            channel_groups[root] = ChannelGroup(name, ShardSplit(tuple(style.counts), rank, group), style.chunks)
    if batch and rows is None:
        raise ConfigError("batch-mode groups need a row split")

    def group_of(node: fx.Node) -> ChannelGroup:
        return channel_groups[result.group_of(node)]

    summed = []
    for node in result.convs:
        if result.group_of(node) in batch:
            summed += graph.get_submodule(node.target).parameters()
        else:
            _replace(graph, node.target, ShardedConv2d(graph.get_submodule(node.target), group_of(node), gather=False))
    for node in result.members:
        module = graph.get_submodule(node.target)
        if result.group_of(node) in batch:
            if isinstance(module, nn.BatchNorm2d):
                module = SyncBatchNorm2d(module, rows)
                _replace(graph, node.target, module)
            summed += module.parameters()
            continue
        member = ShardedBatchNorm2d if isinstance(module, nn.BatchNorm2d) else ShardedChannelwiseConv2d
        _replace(graph, node.target, member(module, group_of(node)))
    _insert_transitions(graph, result, lambda split: channel_groups[result.groups.find(split.group)], batch, rows)
    overlap_gathers(graph, (GatherChannels,))
    if batch:
        graph.register_forward_pre_hook(lambda _, args: rows.begin(args[0].size(0)))
    for node in graph.graph.nodes:
        if node.op == "call_module" and isinstance(graph.get_submodule(node.target), nn.Conv2d) \
                and node not in result.members and not (node in result.convs and result.group_of(node) in batch):
            log.warning("left replicated (groups=%d, parametrized or reused): %s",
                        graph.get_submodule(node.target).groups, node.target)
    graph.graph.lint()
    graph.recompile()
    return ShardedGraph(graph, {g.name: g for g in channel_groups.values()}, tuple(summed),
                        tuple(str(node.target) for node in result.convs if result.group_of(node) in batch))


def _insert_transitions(graph: fx.GraphModule, result: Analysis, group_of: Callable[[Split], ChannelGroup],
                        batch: set[int], rows: RowSplit | None) -> None:
    """Insert a transition module wherever an op needs its operand in
    another layout than the operand's: R (replicated), C (a kernel-mode
    group's channel split) or B (a batch split). Once per value and
    transition; a gather for sharded convs is its own (it sums their
    partial input gradients in backward)."""
    layout = result.layout
    made: dict[tuple, fx.Node] = {}

    def kind(split: Split | None) -> str:
        if split is None:
            return "R"
        return "B" if result.groups.find(split.group) in batch else "C"

    def add(key: tuple, name: str, module: nn.Module, arg: fx.Node, before: fx.Node) -> fx.Node:
        if key not in made:
            target = f"_convshard.{name}{len(made)}"
            graph.add_submodule(target, module)
            with graph.graph.inserting_before(before):
                made[key] = graph.graph.call_module(target, (arg,))
        return made[key]

    for node in list(graph.graph.nodes):  # the nodes before any insertion
        mine = layout.get(node)
        sharded_conv = node in result.convs and kind(mine) == "C"
        need = "R" if mine is None or sharded_conv else kind(mine)

        def convert(arg: fx.Node) -> fx.Node:
            split = layout.get(arg)
            have = kind(split)
            if have == need:
                return arg
            if need == "R":
                if sharded_conv:
                    graph.get_submodule(node.target).partial_input_grad = True
                module = (GatherChannels(group_of(split), partial=sharded_conv) if have == "C"
                          else GatherRows(rows, partial=sharded_conv))
                return add((arg, "R", sharded_conv), "gather", module, arg, node)
            if need == "C" and have == "R":
                root = result.groups.find(mine.group)
                return add((arg, "C", root, mine.ndim), "slice", SliceChannels(group_of(mine), mine.ndim), arg, node)
            if need == "B" and have == "R":
                return add((arg, "B", mine.ndim), "rows", SliceRows(rows, mine.ndim), arg, node)
            if need == "B" and have == "C":
                return add((arg, "B"), "to_rows", ChannelsToRows(group_of(split), rows), arg, node)
            raise AssertionError(f"no transition {have} -> {need} at {node}: tied groups share a mode")

        node.args = fx.node.map_arg(node.args, convert)
        node.kwargs = fx.node.map_arg(node.kwargs, convert)


def _replace(graph: fx.GraphModule, target: str, module: nn.Module) -> None:
    parent, _, attr = target.rpartition(".")
    setattr(graph.get_submodule(parent) if parent else graph, attr, module)
