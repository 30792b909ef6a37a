"""Gathers that overlap compute: a channel split gathered into the sharded convs that read it, in chunks of rows.

A kernel-mode group's output Y is split by channels (rank r holds
(B, w_r, H, W), channels [o_r, o_r + c_r) of C). The sharded convs of the
next groups each need the whole X = gather(Y), (B, C, H, W), and compute
Z_j = conv(X, W_j^r) on their own kernels. ``GatheredConvs`` runs that edge
in k chunks of rows, X = [X_1; ...; X_k]:

- forward: chunk 1's all-gather starts; once chunk i's rows have arrived,
  chunk i+1's all-gather starts and chunk i's convs run while it travels
  (one chunk on the link at a time: chunks sent together would share it
  and arrive together);
- backward: chunk by chunk, the partial input gradient
  dX_i^r = sum_j conv_transpose(dZ_j[i], W_j^r) (this rank's kernels only)
  is computed and its reduce-scatter started (rank r receives its channels
  of sum_r dX_i^r); the weight gradients dW_j^r = sum_i conv(X_i, dZ_j[i])
  compute while the sums travel; the slices are joined along rows.

A convolution acts on each image alone, so chunks of rows give the same
Z_j, dX and dW as the whole batch, dW up to the order of its sum over rows
(kept in float32 under bf16 and fp16). BatchNorm is untouched: its
statistics over the whole batch are taken on the shard before the gather
or on Z_j after the convs. With k = 1 the forward is the plain gather and
the backward still hides the reduce-scatter behind the weight gradients.
The gloo and NCCL transfers run on their backends' own threads and
streams; the shared-memory path (``convshard.parallel.shm``) completes each
transfer when it starts, so there the chunks only add meetings and the
plan keeps k = 1 (``convshard.plan.cost.chunk_seconds``).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ..precision import for_compute
from . import comm, formats
from .sharded import ChannelGroup, ShardedConv2d, kernels_or_placeholder


@dataclass(frozen=True)
class _Edge:
    """What the autograd Function needs besides tensors: the split, the chunks, each conv's geometry."""

    counts: tuple[int, ...]
    rank: int
    group: comm.Group
    chunks: int
    convs: tuple[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], bool], ...]  # stride, padding, dilation, bias


class _GatherConvs(torch.autograd.Function):
    """Forward: Z_j = conv(gather(Y), W_j) for every reader j, in chunks of rows
    (module docstring). Inputs: Y (B, w_r, H, W), then per reader its weight
    and bias (None without one). Outputs: one Z_j (B, w_j, H', W') per reader."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, edge: _Edge, *params):
        ctx.edge, ctx.width, ctx.format = edge, y.size(1), formats.format_of(y)
        mine = y.narrow(1, 0, edge.counts[edge.rank])
        chunks = mine.tensor_split(min(edge.chunks, max(y.size(0), 1)), dim=0)
        transfer = comm.start_all_gather_uneven(chunks[0], edge.counts, dim=1, group=edge.group)
        xs, outs = [], [[] for _ in edge.convs]
        for i in range(len(chunks)):
            x = formats.in_format_of(y, transfer.wait())  # (B_i, C, H, W)
            if i + 1 < len(chunks):  # one chunk on the link at a time, travelling while this one computes
                transfer = comm.start_all_gather_uneven(chunks[i + 1], edge.counts, dim=1, group=edge.group)
            xs.append(x)
            for j, (stride, padding, dilation, _) in enumerate(edge.convs):
                outs[j].append(F.conv2d(x, params[2 * j], params[2 * j + 1], stride, padding, dilation))
        ctx.chunks = len(xs)
        ctx.save_for_backward(*xs, *params[0::2])
        return tuple(out[0] if len(out) == 1 else torch.cat(out) for out in outs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: torch.Tensor):
        edge, k = ctx.edge, ctx.chunks
        xs, weights = ctx.saved_tensors[:k], ctx.saved_tensors[k:]
        pieces = [g.tensor_split(k, dim=0) for g in grads]  # the forward's rows, chunk by chunk

        def conv_grads(j: int, i: int, mask: list[bool]) -> tuple:
            stride, padding, dilation, bias = edge.convs[j]
            return torch.ops.aten.convolution_backward(
                pieces[j][i], xs[i], weights[j], [weights[j].size(0)] if bias else None, stride, padding,
                dilation, False, [0] * len(stride), 1, mask)

        pending = []
        for i in range(k):
            partial = sum(conv_grads(j, i, [True, False, False])[0] for j in range(len(edge.convs)))
            pending.append(comm.start_reduce_scatter_uneven(partial, edge.counts, dim=1, group=edge.group))
        params = []
        for j, (*_, bias) in enumerate(edge.convs):
            mask = [False, ctx.needs_input_grad[2 + 2 * j], bias and ctx.needs_input_grad[3 + 2 * j]]
            sums = [None, None]
            for i in range(k):
                _, dw, db = conv_grads(j, i, mask)
                sums = [s if g is None else _wide(g) if s is None else s + g for s, g in zip(sums, (dw, db))]
            params += [None if s is None else s.to(weights[j].dtype) for s in sums]
        mine = torch.cat([transfer.wait() for transfer in pending])  # (B, c_r, H, W)
        if ctx.width > mine.size(1):  # a placeholder channel gets zeros
            mine = torch.cat([mine, mine.new_zeros(mine.size(0), ctx.width - mine.size(1), *mine.shape[2:])], dim=1)
        return formats.in_format_of(ctx.format, mine), None, *params


class GatheredConvs(nn.Module):
    """The gather of ``channels``' split output into the sharded convs that
    read it, in ``channels.chunks`` chunks of rows (module docstring):
    (B, w_r, H, W) -> one (B, w_j, H', W') per conv. The convs stay where the
    model holds them (their weights, their state-dict keys); this module
    only calls them."""

    def __init__(self, channels: ChannelGroup, convs: Sequence[ShardedConv2d]) -> None:
        super().__init__()
        self.channels = channels
        self.convs = list(convs)  # a plain list: not registered a second time

    def forward(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        split = self.channels.split
        params = [t for conv in self.convs for t in kernels_or_placeholder(conv.weight, conv.bias)]
        y, *params = for_compute(y, *params)  # under autocast: one dtype forward and backward
        edge = _Edge(split.counts, split.rank, split.group, self.channels.chunks,
                     tuple((conv.stride, conv.padding, conv.dilation, conv.bias is not None) for conv in self.convs))
        return _GatherConvs.apply(y, edge, *params)

    def extra_repr(self) -> str:
        return f"{self.channels.name!r}, chunks={self.channels.chunks}, convs={len(self.convs)}"


def overlap_gathers(graph: fx.GraphModule, gathers: Sequence[type[nn.Module]]) -> int:
    """Replace every gather of a channel split (a module of a type in
    ``gathers`` with ``partial`` set: its readers are sharded convs only)
    and the convs reading it by one ``GatheredConvs``; returns how many.
    A conv with another padding mode than zeros, or padding given as a
    string, keeps the plain gather. ``graph`` is changed, not recompiled."""
    modules = dict(graph.named_modules())
    made = 0
    for node in list(graph.graph.nodes):
        gather = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(gather, tuple(gathers)) or not gather.partial or len(gather.channels.split.counts) == 1:
            continue
        users = list(node.users)
        convs = [modules.get(user.target) if user.op == "call_module" else None for user in users]
        if not all(isinstance(c, ShardedConv2d) and _plain(c) for c in convs) or \
                any(user.args != (node,) or user.kwargs for user in users):
            continue
        target = f"_convshard.overlap{made}"
        graph.add_submodule(target, GatheredConvs(gather.channels, convs))
        with graph.graph.inserting_before(node):
            joint = graph.graph.call_module(target, (node.args[0],))
            for i, user in enumerate(users):
                user.replace_all_uses_with(graph.graph.call_function(operator.getitem, (joint, i)))
        for user in users:
            graph.graph.erase_node(user)
        graph.graph.erase_node(node)
        graph.delete_submodule(node.target)
        made += 1
    return made


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 at least: a sum over chunks of bf16 or fp16 terms rounds once, at the end."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _plain(conv: ShardedConv2d) -> bool:
    """Whether ``conv`` pads with zeros by explicit sizes and leaves its output split."""
    return conv.padding_mode == "zeros" and not isinstance(conv.padding, str) and not conv.gather
