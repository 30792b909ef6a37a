"""Batch-split segments: layout ``B``, its transitions, SyncBatchNorm and the gradient sum.

A channel group in batch mode keeps its weights whole on every rank and
splits the global batch of n images instead: rank r holds rows
[p_r, p_r + b_r) of every activation in the group, (b_r, C, H, W), with
(b_0, ..., b_{p-1}) = split_counts(n, shares) (``RowSplit``). Convs,
activations, pooling and adds then run unchanged on the rows; what needs
the whole batch is handled here:

- ``SyncBatchNorm2d``: BatchNorm's statistics over the global batch, so
  every rank normalises as one device would;
- ``GradientSum``: the weights' gradients are partial sums over each rank's
  rows; their sum travels, bucketed, while backward goes on;
- the transitions into and out of ``B`` (``SliceRows``, ``GatherRows``,
  ``ChannelsToRows``), one autograd Function each (``convshard.parallel.comm``;
  the all-to-all from channels to rows, ``channels_to_rows``, is here).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ..plan.splits import split_counts
from . import comm
from .formats import format_of, from_wire, in_format_of, to_wire
from .sharded import ChannelGroup, device_of, dtype_of

BUCKET_BYTES = 4 << 20  # a gradient all-reduce starts once this many bytes of gradients are in


class RowSplit:
    """How the global batch is split over the ranks of ``group``: rank r holds
    ``counts[r]`` rows, by ``split_counts(n, shares)`` for a batch of n.

    Shared by every batch-mode layer of a model: ``begin(n)`` (a forward
    pre-hook of the model) sets the counts of the batch entering the model,
    and ``resplit`` takes a re-planned split (``shard.Sharded.apply``).
    """

    def __init__(self, shares: Sequence[float], rank: int, group: comm.Group) -> None:
        self.shares, self.rank, self.group = tuple(shares), rank, group
        self.counts: tuple[int, ...] = ()

    def begin(self, n: int) -> None:
        self.counts = split_counts(n, self.shares)

    def resplit(self, shares: Sequence[float]) -> None:
        """Split the batches from the next forward on by ``shares``."""
        self.shares = tuple(shares)

    def __repr__(self) -> str:
        return f"RowSplit(shares={self.shares}, counts={self.counts})"


class SliceRows(nn.Module):
    """R -> B: rank r keeps rows [p_r, p_r + b_r) of a replicated tensor that
    meets batch-split values of ``ndim`` dims (its batch axis aligned from
    the right; a size-1 axis broadcasts as it is). Backward: all-gather rows."""

    def __init__(self, rows: RowSplit, ndim: int) -> None:
        super().__init__()
        self.rows, self.ndim = rows, ndim

    def forward(self, x):
        if not torch.is_tensor(x):
            return x
        axis = x.dim() - self.ndim
        if axis < 0 or x.size(axis) == 1:
            return x
        return comm.slice_to_shard(x, self.rows.counts, dim=axis, group=self.rows.group, placeholder=False)


class GatherRows(nn.Module):
    """B -> R: (b_r, ...) on each rank -> (n, ...) on every rank. Forward:
    all-gather rows; backward: keep this rank's rows, or with ``partial``
    (only sharded convs read the result, each returning its partial input
    gradient) reduce-scatter them."""

    def __init__(self, rows: RowSplit, *, partial: bool = False) -> None:
        super().__init__()
        self.rows, self.partial = rows, partial

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return comm.gather_from_shards(y, self.rows.counts, group=self.rows.group, partial=self.partial, dim=0)


class ChannelsToRows(nn.Module):
    """C -> B: (n, w_r, ...) split by the channels of ``channels`` ->
    (b_r, C, ...) split by rows. Forward and backward: one all-to-all."""

    def __init__(self, channels: ChannelGroup, rows: RowSplit) -> None:
        super().__init__()
        self.channels, self.rows = channels, rows

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return channels_to_rows(y, self.channels.split.counts, self.rows.counts, group=self.rows.group)


class _SyncBatchNorm(torch.autograd.Function):
    """BatchNorm over the global batch of a batch split, forward and backward
    on native kernels, one collective each way.

    Forward: rank r has m_r = b_r H W values per channel, their mean mu_r
    and variance v_r (``torch.batch_norm_update_stats``). One all-gather
    gives every rank all of them, and the global statistics follow without
    cancellation: mu = sum_r m_r mu_r / m, var = sum_r m_r (v_r + (mu_r - mu)^2) / m
    with m = sum_r m_r; then y = (x - mu) / sqrt(var + eps) * gamma + beta
    (``F.batch_norm`` with these statistics).

    Backward: with xhat = (x - mu) / sqrt(var + eps), every rank sums its
    S1_r = sum dy and S2_r = sum dy * xhat per channel (one native pass), one
    all-reduce gives S1 and S2 over the global batch (k dy, which needs
    neither, is computed while they travel), and
    dx = k dy + c x + d with k = gamma / sqrt(var + eps),
    c = -k S2 / (m sqrt(var + eps)), d = -k S1 / m - c mu: BatchNorm's own
    kernels compute k dy (its eval-mode backward) and c x + d (its eval-mode
    forward with mean 0, variance 1). The weight and bias get this rank's
    S2_r and S1_r: their sum over the ranks (``GradientSum``) is the global
    gradient.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, rows: RowSplit):
        per_row = x.size(2) * x.size(3)
        if x.size(0):
            mean_r, var_r = torch.batch_norm_update_stats(x, None, None, 0.0)
        else:
            mean_r = var_r = x.new_zeros(x.size(1))
        stats = comm.all_gather_uneven(torch.stack([mean_r, var_r])[None], (1,) * len(rows.counts), dim=0,
                                       group=rows.group)  # (p, 2, C)
        m_r = torch.tensor([b * per_row for b in rows.counts], dtype=x.dtype, device=x.device)[:, None]
        total = sum(rows.counts) * per_row
        mean = (m_r * stats[:, 0]).sum(0) / total
        var = (m_r * (stats[:, 1] + (stats[:, 0] - mean) ** 2)).sum(0) / total
        ctx.save_for_backward(x, weight, mean, var)
        ctx.total, ctx.eps, ctx.group, ctx.affine = total, eps, rows.group, weight is not None
        ctx.mark_non_differentiable(mean, var)
        return F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps), mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, _mean, _var):
        x, weight, mean, var = ctx.saved_tensors
        gamma = weight if ctx.affine else torch.ones_like(mean)
        invstd = torch.rsqrt(var + ctx.eps)
        backward = torch.ops.aten.native_batch_norm_backward
        _, s2, s1 = backward(dy, x, gamma, None, None, mean, invstd, True, ctx.eps, [False, True, True])
        sums = comm.start_all_reduce_sum(torch.stack([s1, s2]), group=ctx.group)  # (2, C): S1, S2
        dx = backward(dy, x, gamma, mean, var, None, None, False, ctx.eps, [True, False, False])[0]  # k dy
        total = sums.wait() / ctx.total  # S1 / m, S2 / m: k dy was computed while they travelled
        k = gamma * invstd
        c = -k * invstd * total[1]
        d = -k * total[0] - c * mean
        dx += F.batch_norm(x, torch.zeros_like(mean), torch.ones_like(var) - ctx.eps, c, d, False, 0.0, ctx.eps)
        return dx, (s2 if ctx.affine else None), (s1 if ctx.affine else None), None, None


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d on a batch split (b_r, C, H, W), normalising with the
    statistics of the whole global batch, on any backend (``_SyncBatchNorm``).
    The running variance takes the unbiased var * m / (m - 1), as
    ``nn.BatchNorm2d`` does. Parameters and buffers are whole on every rank,
    with the original keys; in eval mode it is plain BatchNorm. A bf16 or
    fp16 input (mixed precision) is normalised in float32, statistics and
    all, and the result returned in the input's dtype.
    """

    def __init__(self, bn: nn.BatchNorm2d, rows: RowSplit) -> None:
        super().__init__(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                         device=device_of(bn), dtype=dtype_of(bn))
        self.rows = rows
        self.load_state_dict(bn.state_dict())
        self.train(bn.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training and self.track_running_stats:
            return super().forward(x)
        low = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else None
        if low is not None:
            x = x.float()
        y, mean, var = _SyncBatchNorm.apply(x, self.weight, self.bias, self.eps, self.rows)
        if self.training and self.track_running_stats:
            total = sum(self.rows.counts) * x.size(2) * x.size(3)
            self._update_running(mean, var * total / max(total - 1, 1))
        return y if low is None else y.to(low)

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        """As ``nn.BatchNorm2d``: an exponential average with ``momentum``,
        or the cumulative average when ``momentum`` is None."""
        self.num_batches_tracked.add_(1)
        factor = 1.0 / self.num_batches_tracked.item() if self.momentum is None else self.momentum
        self.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
        self.running_var.mul_(1 - factor).add_(unbiased_var, alpha=factor)


class GradientSum:
    """Sums the gradients of ``params`` over the ranks of ``group`` while
    backward runs, as DDP's reducer does.

    The parameters are bucketed, about ``BUCKET_BYTES`` each, in reverse
    order (backward produces the last layers' gradients first). A
    post-accumulate-grad hook marks each gradient in; once a bucket is
    complete, and every bucket before it has started, its gradients are
    flattened and their sum all-reduce starts (``comm.start_all_reduce_sum``),
    so every rank starts the same collectives in the same order. ``wait``
    (before the optimizer step) starts what is left, waits for every sum
    and writes it back. A parameter without a gradient on this step (on
    every rank alike: the graph is the same) adds zeros and keeps none.

    With ``dtype`` (bf16: ``--grad-precision``) a bucket travels in that
    dtype, half the bytes: sum_r round(g_r), rounded once more by the sum,
    cast back to each gradient's dtype when written back.
    """

    def __init__(self, params: Sequence[nn.Parameter], group: comm.Group,
                 bucket_bytes: int = BUCKET_BYTES, dtype: torch.dtype | None = None) -> None:
        self.group, self.dtype = group, dtype
        self.buckets: list[list[nn.Parameter]] = []
        size = bucket_bytes
        for p in reversed([p for p in params if p.requires_grad]):
            if size >= bucket_bytes or p.dtype != self.buckets[-1][0].dtype or p.device != self.buckets[-1][0].device:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(p)
            size += p.numel() * p.element_size()
        self.index = {id(p): i for i, bucket in enumerate(self.buckets) for p in bucket}
        self._reset()
        if comm.world_size(group) > 1:
            for bucket in self.buckets:
                for p in bucket:
                    p.register_post_accumulate_grad_hook(self._ready)

    def _reset(self) -> None:
        self.missing = [len(bucket) for bucket in self.buckets]
        self.pending: list[tuple[torch.Tensor, comm.Pending]] = []

    def _ready(self, p: nn.Parameter) -> None:
        self.missing[self.index[id(p)]] -= 1
        while len(self.pending) < len(self.buckets) and self.missing[len(self.pending)] == 0:
            self._start(len(self.pending))

    def _start(self, i: int) -> None:
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                          for p in self.buckets[i]])
        if self.dtype is not None:
            flat = flat.to(self.dtype)
        self.pending.append((flat, comm.start_all_reduce_sum(flat, group=self.group)))

    def wait(self) -> None:
        """Finish every sum of this step and set the gradients to them."""
        if comm.world_size(self.group) == 1:
            return
        while len(self.pending) < len(self.buckets):
            self._start(len(self.pending))
        for bucket, (flat, pending) in zip(self.buckets, self.pending):
            pending.wait()
            offset = 0
            for p in bucket:
                n = p.numel()
                if p.grad is not None:
                    p.grad = flat[offset : offset + n].view_as(p).to(p.dtype)
                offset += n
        self._reset()

    def parameters(self) -> list[nn.Parameter]:
        return [p for bucket in self.buckets for p in bucket]


def channels_to_rows(y: torch.Tensor, channels: tuple[int, ...], rows: tuple[int, ...], *,
                     group: comm.Group = None) -> torch.Tensor:
    """From a channel split (B, w_r, ...) to a batch split (b_r, C, ...).
    Forward and backward: one all-to-all each."""
    if len(channels) == 1:
        return y
    return _ChannelsToRows.apply(y, channels, rows, comm.rank(group), group)


class _ChannelsToRows(torch.autograd.Function):
    """Forward: from a channel split to a batch split, one all-to-all:
    rank r holds channels [o_r, o_r + c_r) of every row, (B, w_r, H, W), and
    receives rows [p_r, p_r + b_r) of every channel, (b_r, C, H, W); rank s
    sends rank t its (b_t, c_s) block. Backward: the all-to-all back, from
    rows to channels (a placeholder channel gets zeros)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, channels: tuple[int, ...], rows: tuple[int, ...], rank_: int, group: comm.Group):
        ctx.channels, ctx.rows, ctx.rank, ctx.group, ctx.width = channels, rows, rank_, group, y.size(1)
        ctx.format = format_of(y)
        x, dim, permuted = to_wire(y, 1, group)  # the channels' dimension as the group lays it out
        blocks = x.narrow(dim, 0, channels[rank_]).split(list(rows), dim=0)
        out = _exchange_blocks(blocks, [[(b, c) for b in rows] for c in channels], dim, x.shape, group)
        out = torch.cat(out, dim=dim)
        return in_format_of(y, from_wire(out) if permuted else out)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        channels, rows, me = ctx.channels, ctx.rows, ctx.rank
        g, dim, permuted = to_wire(grad, 1, ctx.group)
        blocks = g.split(list(channels), dim=dim)
        mine = torch.cat(_exchange_blocks(blocks, [[(b, c) for c in channels] for b in rows], dim, g.shape,
                                          ctx.group), dim=0)
        mine = from_wire(mine) if permuted else mine
        if ctx.width > channels[me]:
            mine = torch.cat([mine, mine.new_zeros(mine.size(0), ctx.width - channels[me], *mine.shape[2:])], dim=1)
        return in_format_of(ctx.format, mine), None, None, None, None


def _exchange_blocks(blocks: Sequence[torch.Tensor], sizes: Sequence[Sequence[tuple[int, int]]], dim: int,
                     shape: Sequence[int], group: comm.Group) -> list[torch.Tensor]:
    """One all-to-all of 4-d blocks: this rank sends ``blocks[t]`` to rank
    t; ``sizes[s][t]`` = (rows, channels) of rank s's block for rank t, the
    channels along ``dim`` of ``shape``'s layout. Returns the blocks this
    rank receives, from ranks 0..p-1."""
    me = comm.rank(group)
    send = torch.cat([block.reshape(-1) for block in blocks])
    inner = math.prod(n for i, n in enumerate(shape) if i not in (0, dim))
    pieces = comm.all_to_all_uneven(send, [[b * c * inner for b, c in row] for row in sizes], group=group)
    received = []
    for piece, row in zip(pieces, sizes):
        block = list(shape)
        block[0], block[dim] = row[me]
        received.append(piece.view(block))
    return received
