"""Collectives for kernel sharding, and the autograd Functions built on them.

Three layers, read top to bottom:

1. raw helpers on tensors: an uneven all-gather along one dimension, an
   uneven reduce-scatter, an uneven all-to-all, an in-place sum all-reduce,
   a coalesced broadcast. They stage CUDA tensors through host memory when the group's
   backend is gloo, move the bytes through shared memory when its ranks
   share a host (``convshard.parallel.shm``), and do nothing when it has one rank.
   Each transfer goes through ``wire.issue`` (checked, recorded, timed); the
   door's own names (``record_wire``, ``gather_objects``, ``reduce_scalar``,
   ``barrier``, ``set_rank_device``, ...) are re-exported here.
2. one ``torch.autograd.Function`` per communication pattern, named for its
   forward; the backward is the dual of the forward.
3. the public wrappers ``conv2d_on_shards``, ``gather_from_shards`` and
   ``slice_to_shard`` (batch mode's all-to-all from channels to rows is
   ``convshard.parallel.batch``'s).

Shapes for a conv layer with C kernels split as ``counts = (c_0, ..., c_{p-1})``
over p ranks: rank r holds the feature maps ``Y_r`` of shape (B, c_r, H, W);
the gathered ``Y = [Y_0, ..., Y_{p-1}]`` along channels has shape (B, C, H, W).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ..precision import for_compute
from . import shm, wire
from .formats import format_of, from_wire, in_format_of, to_wire
from .wire import (barrier, broadcast_object, count_collective_seconds, gather_objects, rank, rank_device,
                   record_wire, reduce_scalar, seconds_in_collectives, set_rank_device, switch, transfers_since,
                   world_size)

Group = wire.Group

__all__ = ["Group", "Pending", "all_gather_uneven", "all_reduce_sum_", "all_to_all_uneven", "barrier", "broadcast_",
           "broadcast_object", "conv2d_on_shards", "count_collective_seconds",
           "gather_from_shards", "gather_objects", "rank", "rank_device", "record_wire",
           "reduce_scalar", "reduce_scatter_uneven", "seconds_in_collectives", "set_rank_device", "slice_to_shard",
           "start_all_gather_uneven", "start_all_reduce_sum", "start_reduce_scatter_uneven", "switch",
           "transfers_since", "world_size"]


def _reduce_scatter(output: torch.Tensor, input: torch.Tensor, **kwargs) -> dist.Work | None:
    # newer torch names it reduce_scatter_single and deprecates reduce_scatter_tensor
    return getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)(output, input, **kwargs)


def _needs_host_staging(tensor: torch.Tensor, group: Group) -> bool:
    # gloo implements few collectives on CUDA tensors: stage them through host memory.
    return tensor.is_cuda and dist.get_backend(group) == dist.Backend.GLOO


def _shared(nbytes: int, group: Group) -> shm.SharedSlots | None:
    """The shared-memory slots for a (host-staged) gloo collective of
    ``nbytes`` per rank, when the group's ranks share a host; None for gloo's
    own path. Every rank decides alike: same backend, same sizes."""
    if dist.get_backend(group) != dist.Backend.GLOO:
        return None
    slots = shm.slots_for(group)
    return slots if slots is not None and slots.fits(nbytes) else None


class Pending:
    """A collective in flight: ``wait`` waits for its transfer (the wait
    counts as time in collectives; on CUDA, until the transfer has completed
    on the device) and returns its result, ``finish()``."""

    def __init__(self, finish: Callable[[], torch.Tensor], work: dist.Work | None = None,
                 tensors: Sequence[torch.Tensor] = ()) -> None:
        self._finish, self._work, self._tensors = finish, work, tensors
        self._entry = wire.last_transfer() if work is not None else None

    def wait(self) -> torch.Tensor:
        if self._work is not None:
            t0 = time.perf_counter()
            with wire.clocked(self._tensors):
                self._work.wait()
            wire.waited(self._entry, time.perf_counter() - t0)
            self._work = None
        return self._finish()

    def then(self, after: Callable[[torch.Tensor], torch.Tensor]) -> Pending:
        """This transfer, its result passed through ``after`` when waited on."""
        finish = self._finish
        self._finish = lambda: after(finish())
        return self


# --- 1. raw helpers -------------------------------------------------------


def all_gather_uneven(
    tensor: torch.Tensor, counts: Sequence[int], *, dim: int, group: Group = None
) -> torch.Tensor:
    """All-gather slices of uneven size along ``dim``, concatenated in rank order.

    Rank r passes a tensor whose size along ``dim`` is ``counts[r]`` (possibly
    0); every rank receives the concatenation, of size ``sum(counts)``.
    Collectives want equal sizes, so each slice is zero-padded to
    ``max(counts)`` for the transfer and the padding dropped afterwards.
    """
    return start_all_gather_uneven(tensor, counts, dim=dim, group=group).wait()


def start_all_gather_uneven(
    tensor: torch.Tensor, counts: Sequence[int], *, dim: int, group: Group = None
) -> Pending:
    """``all_gather_uneven``, started: the transfer runs (on gloo's and
    NCCL's own threads and streams) until ``wait`` returns the gathered
    tensor. The shared-memory path is done when this returns."""
    if len(counts) == 1:
        return Pending(lambda: tensor)
    tensor, dim, permuted = to_wire(tensor, dim, group)
    pending = _start_all_gather(tensor, counts, dim, group)
    return pending.then(from_wire) if permuted else pending


def _start_all_gather(tensor: torch.Tensor, counts: Sequence[int], dim: int, group: Group) -> Pending:
    given, device = tensor, tensor.device
    if _needs_host_staging(tensor, group):
        tensor = tensor.cpu()
    padded = [*tensor.shape[:dim], max(counts), *tensor.shape[dim + 1 :]]  # the same on every rank
    slots = _shared(math.prod(padded) * tensor.element_size(), group)
    if slots is not None:
        out = wire.issue("all_gather", group, [given],
                         lambda: slots.all_gather_uneven(tensor, list(counts), dim))
        return Pending(lambda: out.to(device, non_blocking=True))
    width = max(counts)
    own = tensor.size(dim)
    if own == width:
        send = tensor.contiguous()
    else:
        shape = list(tensor.shape)
        shape[dim] = width
        send = tensor.new_zeros(shape)
        send.narrow(dim, 0, own).copy_(tensor)
    received = [torch.empty_like(send) for _ in counts]
    work = wire.issue("all_gather", group, [given],
                      lambda: dist.all_gather(received, send, group=group, async_op=True))
    return Pending(lambda: torch.cat([r.narrow(dim, 0, c) for r, c in zip(received, counts)], dim=dim)
                   .to(device, non_blocking=True), work, [given])


def reduce_scatter_uneven(
    tensor: torch.Tensor, counts: Sequence[int], *, dim: int, group: Group = None
) -> torch.Tensor:
    """Sum ``tensor`` over the ranks and give rank r its slice along ``dim``.

    Every rank passes a tensor whose size along ``dim`` is ``sum(counts)``
    (its partial sum); rank r receives the slice [o_r, o_r + counts[r]) of
    the sum. Each slice is zero-padded to ``max(counts)`` for the transfer.
    """
    return start_reduce_scatter_uneven(tensor, counts, dim=dim, group=group).wait()


def start_reduce_scatter_uneven(
    tensor: torch.Tensor, counts: Sequence[int], *, dim: int, group: Group = None
) -> Pending:
    """``reduce_scatter_uneven``, started: ``wait`` returns this rank's slice of the sum."""
    if len(counts) == 1:
        return Pending(lambda: tensor)
    tensor, dim, permuted = to_wire(tensor, dim, group)
    pending = _start_reduce_scatter(tensor, counts, dim, group)
    return pending.then(from_wire) if permuted else pending


def _start_reduce_scatter(tensor: torch.Tensor, counts: Sequence[int], dim: int, group: Group) -> Pending:
    given, device = tensor, tensor.device
    if _needs_host_staging(tensor, group):
        tensor = tensor.cpu()
    slots = _shared(tensor.numel() * tensor.element_size(), group)
    if slots is not None:
        out = wire.issue("reduce_scatter", group, [given],
                         lambda: slots.reduce_scatter_uneven(tensor, list(counts), dim))
        return Pending(lambda: out.to(device, non_blocking=True))
    width, me = max(counts), rank(group)
    shape = list(tensor.shape)
    shape[dim] = width
    send = tensor.new_zeros([len(counts), *shape])  # slot s holds rank s's slice
    offset = 0
    for s, c in enumerate(counts):
        send[s].narrow(dim, 0, c).copy_(tensor.narrow(dim, offset, c))
        offset += c
    out = tensor.new_empty(shape)
    work = wire.issue("reduce_scatter", group, [given],
                      lambda: _reduce_scatter(out, send.view(-1, *shape[1:]), op=dist.ReduceOp.SUM, group=group,
                                              async_op=True))
    return Pending(lambda: out.narrow(dim, 0, counts[me]).to(device, non_blocking=True), work, [given])


def all_to_all_uneven(send: torch.Tensor, sizes: Sequence[Sequence[int]], *, group: Group = None) -> list[torch.Tensor]:
    """Every rank sends a piece to every rank: ``send`` (1-D) is this rank's
    pieces for ranks 0..p-1 in order, ``sizes[s][t]`` the elements rank s
    sends rank t (every rank knows them all). Returns the pieces this rank
    receives, from ranks 0..p-1, each 1-D."""
    me, p = rank(group), len(sizes)
    if p == 1:
        return [send]
    given, device = send, send.device
    if _needs_host_staging(send, group):
        send = send.cpu()
    slots = _shared(max(sum(row) for row in sizes) * send.element_size(), group)

    def exchange() -> list[torch.Tensor]:
        if slots is not None:
            return slots.all_to_all(send.contiguous(), [list(row) for row in sizes])
        out = send.new_empty(sum(sizes[s][me] for s in range(p)))
        dist.all_to_all_single(out, send.contiguous(), [sizes[s][me] for s in range(p)], list(sizes[me]),
                               group=group)
        return list(out.split([sizes[s][me] for s in range(p)]))

    pieces = wire.issue("all_to_all", group, [given], exchange)
    return [piece.to(device, non_blocking=True) for piece in pieces]


def all_reduce_sum_(tensor: torch.Tensor, *, group: Group = None, shared: bool = True) -> torch.Tensor:
    """Sum ``tensor`` over the ranks of ``group``, in place; returns it
    (``shared`` False: through the backend even on one host, as DDP's reducer sums)."""
    return start_all_reduce_sum(tensor, group=group, shared=shared).wait()


def start_all_reduce_sum(tensor: torch.Tensor, *, group: Group = None, shared: bool = True) -> Pending:
    """Start summing ``tensor`` over the ranks of ``group``, in place, and
    return at once: the caller computes while the transfer runs, then calls
    ``wait``, which returns ``tensor``. Only the wait counts as time in
    collectives (the shared-memory path, done when it returns, counts in
    full; with ``shared`` False the sum goes through the backend even on one host)."""
    if world_size(group) == 1:
        return Pending(lambda: tensor)
    staged = tensor.cpu() if _needs_host_staging(tensor, group) else None
    target = tensor if staged is None else staged

    def finish() -> torch.Tensor:
        return tensor if staged is None else tensor.copy_(staged)

    slots = _shared(target.numel() * target.element_size(), group) if shared else None
    if slots is not None:
        wire.issue("all_reduce", group, [tensor], lambda: slots.all_reduce_(target))
        return Pending(finish)
    work = wire.issue("all_reduce", group, [tensor],
                      lambda: dist.all_reduce(target, op=dist.ReduceOp.SUM, group=group, async_op=True))
    return Pending(finish, work, [tensor])


def broadcast_(tensors: Sequence[torch.Tensor], *, group: Group = None) -> None:
    """Overwrite ``tensors`` on every rank with group rank 0's values, in place.

    Tensors of one dtype and device travel flattened in a single broadcast.
    """
    if world_size(group) == 1 or not tensors:
        return
    buckets: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        buckets.setdefault((t.dtype, t.device), []).append(t)
    for bucket in buckets.values():
        flat = torch.cat([t.detach().reshape(-1) for t in bucket])
        staged = flat.cpu() if _needs_host_staging(flat, group) else flat
        slots = _shared(staged.numel() * staged.element_size(), group)
        if slots is not None:
            wire.issue("broadcast", group, [flat], lambda: slots.broadcast_(staged))
        else:
            wire.issue("broadcast", group, [flat], lambda: dist.broadcast(staged, group=group, group_src=0))
        if staged is not flat:
            flat.copy_(staged)
        offset = 0
        for t in bucket:
            n = t.numel()
            t.detach().copy_(flat[offset : offset + n].view_as(t))
            offset += n


# --- 2. one autograd Function per pattern --------------------------------


class _ConvOnShards(torch.autograd.Function):
    """Forward: rank r's conv, Y_r = conv(X, W_r) + b_r (every rank holds the whole X).

    Backward: rank r's kernels give a partial input gradient
    dX_r = conv_transpose(dY_r, W_r), and the full dX is sum_r dX_r. dX_r is
    computed first and its all-reduce started; dW_r = conv(X, dY_r) and
    db_r = sum(dY_r) are computed while the sum travels, then it is awaited.
    With ``reduce`` False dX_r is returned as it is: X was gathered from a
    channel split whose gather sums the partial gradients itself (a
    reduce-scatter, half the bytes of an all-reduce).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, group: Group, reduce: bool):
        ctx.save_for_backward(x, weight)
        ctx.conv, ctx.has_bias, ctx.group, ctx.reduce = (stride, padding, dilation), bias is not None, group, reduce
        return F.conv2d(x, weight, bias, stride, padding, dilation)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        stride, padding, dilation = ctx.conv
        bias_sizes = [weight.size(0)] if ctx.has_bias else None

        def conv_grads(mask: list[bool]) -> tuple:
            return torch.ops.aten.convolution_backward(grad, x, weight, bias_sizes, stride, padding, dilation,
                                                       False, [0] * len(stride), 1, mask)

        weight_mask = [ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
        if not (ctx.reduce and ctx.needs_input_grad[0]):  # nothing to overlap: one call computes all
            grad_x, grad_w, grad_b = conv_grads([ctx.needs_input_grad[0], *weight_mask])
            return grad_x, grad_w, grad_b, None, None, None, None, None
        pending = start_all_reduce_sum(conv_grads([True, False, False])[0], group=ctx.group)
        _, grad_w, grad_b = conv_grads([False, *weight_mask])
        return pending.wait(), grad_w, grad_b, None, None, None, None, None


class _GatherFromShards(torch.autograd.Function):
    """Forward: all-gather along ``dim``: channels, (B, w_r, H, W) -> (B, C, H, W),
    or batch rows, (b_r, C, H, W) -> (B, C, H, W).

    A channel shard holds w_r = max(c_r, 1) channels: a rank with no kernels
    carries one placeholder channel (so that every channel-wise op can run
    on it), which the gather leaves out. Backward: split. When dY is
    identical on every rank (the layers after the gather are replicated),
    rank r keeps its part [o_r, o_r + c_r) of it; when each rank holds a
    partial sum of dY (``partial``: only sharded convs use the gathered
    tensor), rank r receives its part of the sum (a reduce-scatter). A
    placeholder channel gets zeros.
    """

    @staticmethod
    def forward(ctx, y: torch.Tensor, counts: tuple[int, ...], rank_: int, group: Group, partial: bool, dim: int):
        ctx.start, ctx.count, ctx.width = sum(counts[:rank_]), counts[rank_], y.size(dim)
        ctx.counts, ctx.group, ctx.partial, ctx.dim, ctx.format = counts, group, partial, dim, format_of(y)
        return in_format_of(y, all_gather_uneven(y.narrow(dim, 0, ctx.count), counts, dim=dim, group=group))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.partial:
            mine = reduce_scatter_uneven(grad, ctx.counts, dim=ctx.dim, group=ctx.group)
        else:
            mine = grad.narrow(ctx.dim, ctx.start, ctx.count)
        if ctx.width > ctx.count:
            shape = list(mine.shape)
            shape[ctx.dim] = ctx.width - ctx.count
            mine = torch.cat([mine, mine.new_zeros(shape)], dim=ctx.dim)
        return in_format_of(ctx.format, mine), None, None, None, None, None


class _SliceToShard(torch.autograd.Function):
    """Forward: rank r keeps its slice [o_r, o_r + c_r) of a replicated
    tensor along ``dim`` (one zero placeholder when c_r = 0), to meet a
    channel-split operand.

    Backward: all-gather along ``dim``. Every rank's slice gradient is a
    piece of the replicated tensor's gradient; the gather makes it whole,
    and identical on every rank.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, counts: tuple[int, ...], rank_: int, dim: int, group: Group,
                placeholder: bool):
        ctx.counts, ctx.rank, ctx.dim, ctx.group, ctx.format = counts, rank_, dim, group, format_of(x)
        count = counts[rank_]
        if count == 0 and placeholder:
            shape = list(x.shape)
            shape[dim] = 1
            return x.new_zeros(shape)
        return x.narrow(dim, sum(counts[:rank_]), count)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        mine = grad.narrow(ctx.dim, 0, ctx.counts[ctx.rank])
        whole = all_gather_uneven(mine, ctx.counts, dim=ctx.dim, group=ctx.group)
        return in_format_of(ctx.format, whole), None, None, None, None, None


# --- 3. public wrappers ---------------------------------------------------


def conv2d_on_shards(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *,
                     stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
                     group: Group = None, reduce: bool = True) -> torch.Tensor:
    """This rank's part of a sharded conv, (B, C_in, H, W) -> (B, c_r, H', W').
    Forward: ``F.conv2d``; backward: the input gradient summed over the ranks,
    its transfer overlapping the weight-gradient compute (with ``reduce``
    False: this rank's partial input gradient, for a gather that sums it)."""
    if world_size(group) == 1:
        return F.conv2d(x, weight, bias, stride, padding, dilation)
    x, weight, bias = for_compute(x, weight, bias)  # under autocast: one dtype forward and backward
    return _ConvOnShards.apply(x, weight, bias, stride, padding, dilation, group, reduce)


def gather_from_shards(
    y: torch.Tensor, counts: tuple[int, ...], *, group: Group = None, partial: bool = False, dim: int = 1
) -> torch.Tensor:
    """Leave a split along ``dim`` (1: channels, 0: batch rows):
    (B, w_r, ...) on rank r -> (B, C, ...) on every rank. Forward: all-gather;
    backward: split, or with ``partial`` (the gradient arrives as per-rank
    partial sums) reduce-scatter."""
    if len(counts) == 1:
        return y
    return _GatherFromShards.apply(y, counts, rank(group), group, partial, dim)


def slice_to_shard(x: torch.Tensor, counts: tuple[int, ...], *, dim: int = 1, group: Group = None,
                   placeholder: bool = True) -> torch.Tensor:
    """Enter a split from a replicated tensor: rank r's slice along ``dim``
    (with ``placeholder``, one zero slice where it has none, as a channel
    split carries). Forward: split (no communication); backward: all-gather."""
    if len(counts) == 1:
        return x
    return _SliceToShard.apply(x, counts, rank(group), dim, group, placeholder)
