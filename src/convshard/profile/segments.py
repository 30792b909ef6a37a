"""What a channel group runs on its shard, rebuilt at any kernel count, and the replicated rest.

The profile times a model in the pieces the planner splits:

- a **segment** is one sharded conv and the channel-wise ops that follow it
  on the shard (BatchNorm, activation, pooling, a depthwise conv), up to the
  first op that needs more (a gather, an add, a second user). ``build(k)``
  makes it again with k kernels: (B, C_in, H, W) -> (B, k, H', W');
- a **group** is the segments whose convs are split alike (tied by a
  residual add or a gate; ``convshard.parallel.layouts``), with the bytes per kernel
  and per sample that its gathers send, and the values that leave its
  layout with the groups that read them (what a per-layer plan's
  transitions move);
- the **rest** is the model with every segment replaced by a constant of
  its output's shape: what every rank runs besides its segments.

A model that cannot be traced is cut as ``shard_model`` cuts it then: each
conv with the stateless channel-wise layers after it in an ``nn.Sequential``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from ..parallel import layouts
from ..parallel.shard import conv_sites

Op = Callable[[int, torch.device], nn.Module]  # (k, device) -> the op at k channels


@dataclass(frozen=True)
class Segment:
    """One conv and the ops on its shard. Shapes are per sample, (C, H, W)."""

    conv: nn.Conv2d
    ops: tuple[Op, ...]
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]  # after the ops, with all kernels
    input_grad: bool  # whether the conv's input needs a gradient (not for the data)
    input_split: bool = False  # whether that input is gathered from a channel split (its gradient reduce-scattered)

    def build(self, k: int, device: torch.device) -> nn.Sequential:
        """The segment with k kernels, on ``device``."""
        c = self.conv
        conv = nn.Conv2d(c.in_channels, k, c.kernel_size, c.stride, c.padding, c.dilation,
                         bias=c.bias is not None, padding_mode=c.padding_mode, device=device)
        return nn.Sequential(conv, *(make(k, device) for make in self.ops))


class _Apply(nn.Module):
    """A function or tensor method of a traced graph as a layer: t -> fn(t, *args, **kwargs)."""

    def __init__(self, fn: Callable[..., torch.Tensor], args: tuple, kwargs: dict) -> None:
        super().__init__()
        self.fn, self.args, self.kwargs = fn, args, kwargs

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.fn(t, *self.args, **self.kwargs)


@dataclass(frozen=True)
class Group:
    """Segments split alike, under the group's name (its first conv's)."""

    name: str
    kernels: int
    segments: tuple[Segment, ...]
    gather_elements_per_kernel: int  # per sample, summed over the group's gathered values
    param_elements: int  # parameters split with the group: its convs', BatchNorms', depthwise convs'
    outputs: tuple[dict, ...] = ()  # values that leave the group's layout: elements per sample, reader groups
    batchnorms: int = 0  # BatchNorm members (each a collective each way in batch mode)


def layer_fields(group: Group, batch_size: int, elem: int, param_size: int, rows: int) -> dict:
    """The profile's record of ``group``'s shape (``schema.Layer`` less its
    timings) at ``batch_size`` rows: bytes of its gathers, input gradients,
    values and parameters, with activations at ``elem`` bytes per element
    and parameters at ``param_size``; ``rows`` its batch-mode rows per rank."""
    return {
        "name": group.name, "kernels": group.kernels,
        "gather_bytes_per_kernel": batch_size * group.gather_elements_per_kernel * elem,
        "input_grad_bytes": sum(batch_size * elem * math.prod(s.input_shape)
                                for s in group.segments if s.input_grad and not s.input_split),
        "input_grad_scatter_bytes": sum(batch_size * elem * math.prod(s.input_shape)
                                        for s in group.segments if s.input_split),
        "param_bytes": group.param_elements * param_size,
        "batchnorms": group.batchnorms,
        "outputs": [{**out, "bytes": batch_size * out["elements"] * elem} for out in group.outputs],
        "inputs": [{"bytes": batch_size * elem * math.prod(s.input_shape), "grad": s.input_grad}
                   for s in group.segments if not s.input_split],
        "batch_rows": rows,
    }


@dataclass
class Cut:
    """A model cut into groups, and a maker of its replicated rest."""

    groups: list[Group]
    rest: Callable[[int, torch.device], nn.Module]  # batch, device -> the model with constants for segments
    traced: bool = True  # False: fx could not trace the model, whose groups then run in kernel mode only


def cut(model: nn.Module, input_shape: Sequence[int]) -> Cut:
    """Cut an unsharded ``model`` (left unchanged) for inputs of ``input_shape`` (C, H, W)."""
    graph = layouts.trace(copy.deepcopy(model))
    return _cut_graph(graph, input_shape) if graph is not None else _cut_sequential(model, input_shape)


def _cut_graph(graph: fx.GraphModule, input_shape: Sequence[int]) -> Cut:
    analysis = layouts.analyse(graph)
    was_training = graph.training
    graph.eval()
    ShapeProp(graph).propagate(_probe(graph, input_shape))
    graph.train(was_training)
    layout = analysis.layout
    chains = {conv: _chain(conv, analysis) for conv in analysis.convs}
    groups = []
    for name, convs in analysis.group_convs().items():
        root = analysis.group_of(convs[0])
        gathered = [n for n, s in layout.items() if s is not None and analysis.groups.find(s.group) == root
                    and any(layout.get(u) is None or u in analysis.convs for u in n.users)]
        segments = tuple(_segment(graph, chains[conv], analysis) for conv in convs)
        members = [*convs, *(n for n in analysis.members if analysis.group_of(n) == root)]
        params = sum(p.numel() for n in members for p in graph.get_submodule(n.target).parameters())
        norms = sum(isinstance(graph.get_submodule(n.target), nn.BatchNorm2d) for n in members if n not in convs)
        groups.append(Group(name, segments[0].conv.out_channels, segments,
                            sum(math.prod(_shape(n)[2:]) for n in gathered), params,
                            tuple(_output(n, analysis) for n in gathered), norms))

    def rest(batch: int, device: torch.device) -> nn.Module:
        return _rest_graph(graph, list(chains.values()), batch, device)

    return Cut(groups, rest)


def _output(node: fx.Node, analysis: layouts.Analysis) -> dict:
    """A value that leaves its group's layout: its elements per sample, the
    groups of the convs that read it, and whether other ops need it whole."""
    names = analysis.group_names()
    convs = sorted({names[analysis.group_of(u)] for u in node.users if u in analysis.convs})
    whole = any(analysis.layout.get(u) is None and u not in analysis.convs for u in node.users)
    return {"elements": math.prod(_shape(node)[1:]), "convs": convs, "whole": whole}


def _chain(conv: fx.Node, analysis: layouts.Analysis) -> list[fx.Node]:
    """The conv node and the single-user channel-wise nodes after it."""
    chain = [conv]
    while len(chain[-1].users) == 1:
        user = next(iter(chain[-1].users))
        single = user.all_input_nodes == [chain[-1]]
        if analysis.layout.get(user) is None or user in analysis.convs or not single or _is_binary(user):
            break
        chain.append(user)
    return chain


def _is_binary(node: fx.Node) -> bool:
    return node.target in layouts.BINARY_FUNCTIONS or node.target in layouts.BINARY_METHODS


def _segment(graph: fx.GraphModule, chain: list[fx.Node], analysis: layouts.Analysis) -> Segment:
    conv = graph.get_submodule(chain[0].target)
    source = chain[0].args[0]
    return Segment(conv, tuple(_op(graph, node, analysis) for node in chain[1:]), _shape(source)[1:],
                   _shape(chain[-1])[1:], source.op != "placeholder", analysis.layout.get(source) is not None)


def _op(graph: fx.GraphModule, node: fx.Node, analysis: layouts.Analysis) -> Op:
    """The op of ``node`` at k channels: a BatchNorm or depthwise conv rebuilt
    with k channels, a stateless op as it is."""
    if node.op == "call_module":
        module = graph.get_submodule(node.target)
        if node in analysis.members and isinstance(module, nn.BatchNorm2d):
            return lambda k, device: nn.BatchNorm2d(k, module.eps, module.momentum, device=device)
        if node in analysis.members:
            return lambda k, device: nn.Conv2d(k, k, module.kernel_size, module.stride, module.padding,
                                               module.dilation, groups=k, bias=module.bias is not None,
                                               padding_mode=module.padding_mode, device=device)
        return lambda k, device: module
    fn = (lambda t, *a, **kw: getattr(t, node.target)(*a, **kw)) if node.op == "call_method" else node.target
    return lambda k, device: _Apply(fn, tuple(node.args[1:]), dict(node.kwargs))


def _shape(node: fx.Node) -> tuple[int, ...]:
    return tuple(node.meta["tensor_meta"].shape)


def _device(module: nn.Module) -> torch.device:
    return next(iter([*module.parameters(), *module.buffers()]), torch.zeros(())).device


def _probe(module: nn.Module, input_shape: Sequence[int]) -> torch.Tensor:
    """Two zero images of ``input_shape`` on the module's device, in its parameters' dtype."""
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.get_default_dtype())
    return torch.zeros(2, *input_shape, device=_device(module), dtype=dtype)


class _Constant(nn.Module):
    """Stands in for a segment: returns a fixed tensor of its output's shape."""

    def __init__(self, out: torch.Tensor) -> None:
        super().__init__()
        self.out = out

    def forward(self, *_: object) -> torch.Tensor:
        return self.out


def _constant(shape: Sequence[int], batch: int, device: torch.device) -> _Constant:
    return _Constant(torch.randn(batch, *shape, device=device, requires_grad=True))


def _rest_graph(graph: fx.GraphModule, chains: list[list[fx.Node]], batch: int, device: torch.device) -> nn.Module:
    rest = copy.deepcopy(graph)
    nodes = {n.name: n for n in rest.graph.nodes}
    for i, chain in enumerate(chains):
        first, last = nodes[chain[0].name], nodes[chain[-1].name]
        rest.add_submodule(f"_segment{i}", _constant(_shape(chain[-1])[1:], batch, device))
        with rest.graph.inserting_before(first):
            constant = rest.graph.call_module(f"_segment{i}", ())
        last.replace_all_uses_with(constant)
        for node in reversed(chain):
            rest.graph.erase_node(nodes[node.name])
    rest.recompile()
    return rest


def _cut_sequential(model: nn.Module, input_shape: Sequence[int]) -> Cut:
    """The cut of an untraceable model: each conv and its fused layers."""
    sites = [s for s in conv_sites(model) if s.shardable]
    shapes: dict[str, dict] = {}
    handles = []
    for site in sites:
        last = site.fused[-1][1] if site.fused else site.conv

        def on_input(module, args, name=site.name):
            shapes[name] = {"input": tuple(args[0].shape[1:]), "grad": bool(args[0].requires_grad)}

        def on_output(module, args, out, name=site.name):
            shapes[name]["output"] = tuple(out.shape[1:])

        handles += [site.conv.register_forward_pre_hook(on_input), last.register_forward_hook(on_output)]
    was_training = model.training
    try:
        model.eval()
        with torch.enable_grad():
            model(_probe(model, input_shape))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    groups = [Group(s.name, s.conv.out_channels,
                    (Segment(s.conv, tuple((lambda k, d, op=op: op) for _, op in s.fused), shapes[s.name]["input"],
                             shapes[s.name]["output"], shapes[s.name]["grad"]),),
                    math.prod(shapes[s.name]["output"][1:]), sum(p.numel() for p in s.conv.parameters()))
              for s in sites if s.name in shapes]

    def rest(batch: int, device: torch.device) -> nn.Module:
        copied = copy.deepcopy(model)
        for site in conv_sites(copied):
            if site.name not in shapes or site.parent is None:
                continue
            for later_name, _ in site.fused:
                setattr(site.parent, later_name, nn.Identity())
            setattr(site.parent, site.attr, _constant(shapes[site.name]["output"], batch, device))
        return copied

    return Cut(groups, rest, traced=False)
