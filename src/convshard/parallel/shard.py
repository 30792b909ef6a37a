"""``shard``: a model made ready for a plan, every conv group split by kernels or by batch rows.

``shard(model, styles)`` takes each channel group's typed style
(``plan.KernelSplit(counts)`` or ``plan.BatchSplit(rows)``) and returns a
``Sharded`` handle: the model that trains, its channel groups, the row
split and the batch-mode gradient sum, with ``sync`` (between backward and
the optimizer step) and ``apply`` (a re-split plan). ``shard_model`` is the
library's form: shares as weights, the model itself returned.

The pass (``convshard.parallel.layouts``) traces the model and gives every
activation a layout: replicated, channel-split (a kernel-mode group,
``convshard.parallel.sharded``) or row-split (a batch-mode group,
``convshard.parallel.batch``), with the transitions between them. A model that
cannot be traced keeps its own class: each conv gathers its own output, and
batch mode is refused. Before the first forward of a sharded model at world
size > 1, the ranks compare a fingerprint of the batch they feed:
kernel-mode groups need the same global batch on every rank.
"""

from __future__ import annotations

import copy
import logging
import weakref
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import ConfigError
from ..plan import BatchSplit, KernelSplit, Style
from ..plan.splits import split_counts
from . import batch, comm, formats, layouts
from .reshard import reshard
from .sharded import ChannelGroup, ShardedConv2d, ShardSplit, is_channelwise, sharded_state

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


def _check_same_model(model: nn.Module, fmt: torch.memory_format, group: comm.Group) -> None:
    """Refuse to shard when ranks hold models of different structure or
    memory format ``fmt`` (which lays out their transfers, ``formats``)."""
    signature = [(k, tuple(v.shape), str(v.dtype)) for k, v in model.state_dict().items()]
    signature.append(("memory format", str(fmt)))
    for r, other in enumerate(comm.gather_objects(signature, group=group)):
        if other != signature:
            mismatch = next(
                (a, b) for a, b in zip(signature + [None], other + [None]) if a != b
            )
            raise ValueError(
                f"model differs between ranks {comm.rank(group)} and {r}: {mismatch[0]} vs {mismatch[1]}"
            )


@dataclass
class Sharded:
    """A model made ready for a plan (``shard``), with what its engine needs of it.

    ``model`` is what trains: the traced model with its convs split (or the
    original with ``ShardedConv2d`` in place of its convs). ``groups`` are
    its kernel-mode channel groups, ``rows`` the batch split every
    batch-mode group shares (None without batch mode) and ``gradient_sum``
    the sum of the batch-mode weights' gradients, started while backward runs.
    """

    model: nn.Module
    group: comm.Group
    groups: dict[str, ChannelGroup] = field(default_factory=dict)
    rows: batch.RowSplit | None = None
    gradient_sum: batch.GradientSum | None = None
    batch_convs: tuple[str, ...] = ()  # the batch-mode groups' convs, by module name

    def counts(self) -> dict[str, tuple[int, ...]]:
        """Kernels per rank of every kernel-mode group, by name."""
        return {name: g.split.counts for name, g in self.groups.items()}

    def sync(self) -> None:
        """Make the replicated part identical on every rank: finish the sum of
        the batch-mode weights' gradients, then broadcast from group rank 0
        the gradients of the other replicated parameters and the
        floating-point buffers of replicated modules (e.g. BatchNorm running
        statistics). Between ``backward()`` and ``optimizer.step()``."""
        if comm.world_size(self.group) == 1:
            return
        if self.gradient_sum is not None:
            self.gradient_sum.wait()
        split = set(sharded_state(self.model))
        summed = {id(p) for p in self.gradient_sum.parameters()} if self.gradient_sum is not None else set()
        grads = [p.grad for n, p in self.model.named_parameters()
                 if n not in split and id(p) not in summed and p.grad is not None]
        buffers = [b for n, b in self.model.named_buffers() if n not in split and b.is_floating_point()]
        comm.broadcast_(grads + buffers, group=self.group)

    def apply(self, styles: Mapping[str, Style], optimizer: torch.optim.Optimizer) -> None:
        """Re-split to ``styles`` (a re-planned split of the same modes; a
        collective): every kernel-mode group moves its slices with their
        optimizer state (``reshard.reshard``), and the batch-mode groups
        take the new rows."""
        kernel = {name: s.counts for name, s in styles.items() if isinstance(s, KernelSplit)}
        rows = {s.rows for s in styles.values() if isinstance(s, BatchSplit)}
        if set(kernel) != set(self.groups) or (rows and self.rows is None):
            raise ConfigError(f"a new split changes the groups' modes: kernel mode {sorted(kernel)}, "
                              f"today {sorted(self.groups)}")
        reshard(self.model, optimizer, kernel)
        if rows:
            self.rows.resplit(rows.pop())


_HANDLES: weakref.WeakKeyDictionary[nn.Module, Sharded] = weakref.WeakKeyDictionary()


def shard(model: nn.Module, styles: Mapping[str, Style] | Callable[[str, int], Style], *, group: comm.Group = None,
          gradient_dtype: torch.dtype | None = None, check_batch: bool = True, traced: bool = True) -> Sharded:
    """Shard ``model`` for a plan: every channel group gets its style from
    ``styles`` (by the group's name, or ``styles(name, kernels)``):
    ``KernelSplit(counts)``, its kernels split over the ranks of ``group``,
    or ``BatchSplit(rows)``, whole on every rank over a split of the batch.
    Parameters and buffers are first broadcast from group rank 0.

    A model that cannot be traced (``traced=False`` also means: do not
    trace) keeps its own class, every conv gathering its own output; batch
    mode needs the trace, so it is then refused. With ``check_batch`` the
    first forward at world size > 1 checks that every rank feeds the same
    batch (``_check_batch_on_first_forward``). Batch-mode gradients are
    summed in ``gradient_dtype`` when given (None: their own dtype).
    """
    world, me = comm.world_size(group), comm.rank(group)
    style_of = styles if callable(styles) else _named(styles)
    if world > 1:
        fmt = formats.model_format(model)
        _check_same_model(model, fmt, group)
        formats.set_wire(group, fmt)
        comm.broadcast_([*model.parameters(), *model.buffers()], group=group)
    graph = layouts.trace(model) if traced else None
    rows_of = {s.rows for s in (styles.values() if isinstance(styles, Mapping) else ())
               if isinstance(s, BatchSplit)}
    if len(rows_of) > 1:
        raise ConfigError(f"batch-mode groups share one row split; got {sorted(rows_of)}")
    if graph is not None:
        rows = batch.RowSplit(next(iter(rows_of)), me, group) if rows_of else batch.RowSplit([1.0] * world, me,
                                                                                               group)
        made = layouts.shard_graph(graph, style_of, rank=me, group=group, rows=rows)
        summed = made.summed
        handle = Sharded(made.graph, group, made.groups, rows if made.batch_convs else None,
                         batch.GradientSum(summed, group, dtype=gradient_dtype) if summed else None,
                         made.batch_convs)
    else:
        handle = _shard_in_place(model, style_of, me, group, fuse_channelwise=traced)
    if isinstance(styles, Mapping):
        unknown = sorted(set(styles) - set(handle.groups) - _batch_group_names(handle, styles))
        if unknown:
            raise ConfigError(f"the plan names {unknown[:3]}, which are not channel groups of this model "
                              f"(its groups: {list(handle.groups)[:6]}...)")
    log.info("kernels per rank: %s", _shown_counts(handle.counts(), handle.batch_convs))
    if world > 1 and check_batch and comm.switch("CONVSHARD_CHECK_BATCH"):  # rank 0's value on every rank
        _check_batch_on_first_forward(handle.model, group)
    _HANDLES[handle.model] = handle
    return handle


def _named(styles: Mapping[str, Style]) -> Callable[[str, int], Style]:
    """``styles`` looked up by group name; a group it does not name is a ConfigError."""
    def style_of(name: str, kernels: int) -> Style:
        if name not in styles:
            raise ConfigError(f"the plan gives no split for channel group {name!r} ({kernels} kernels)")
        return styles[name]
    return style_of


def _batch_group_names(handle: Sharded, styles: Mapping[str, Style]) -> set[str]:
    """The names in ``styles`` of batch-mode groups that the model has (their first convs)."""
    return {name for name, s in styles.items() if isinstance(s, BatchSplit) and name in handle.batch_convs}


def _shown_counts(counts: Mapping[str, Sequence[int]], batch_convs: Sequence[str] = (), width: int = 100) -> str:
    """Kernels per rank for the log, in about ``width`` characters: every group
    (``{'features.0': [16, 16], ...}``) when that fits, else each distinct
    split with how many groups have it, the commonest first (``9 groups:
    [32, 32] x4, ...``), cut at ``...``; and the convs that run whole on every
    rank over its rows (batch mode), which is all an all-batch plan does."""
    batch = f"{len(batch_convs)} conv(s) whole on every rank, each rank on its rows (batch mode)"
    if not counts:
        return f"none split: {batch}" if batch_convs else "none split: the model has no conv group"
    shown = str({n: list(c) for n, c in counts.items()})
    if len(shown) > width:
        tally = Counter(tuple(c) for c in counts.values()).most_common()
        shown = f"{len(counts)} groups: " + ", ".join(f"{list(c)} x{n}" for c, n in tally)
        if len(shown) > width:
            cut = shown.rfind(", ", 0, width - 5)
            shown = f"{shown[:cut] if cut > 0 else shown[:width - 5]}, ..."
    return f"{shown}; {batch}" if batch_convs else shown


def handle_of(model: nn.Module) -> Sharded | None:
    """The handle ``shard`` returned for ``model`` (None for a model it did not make)."""
    return _HANDLES.get(model)


def sync_replicas(model: nn.Module, *, group: comm.Group = None) -> None:
    """``Sharded.sync`` for a model made by ``shard_model``: call it after
    ``backward()`` and before ``optimizer.step()``. Ranks that round alike
    (same hardware, same thread count) already agree; ranks that do not (a
    CPU beside a GPU) would otherwise drift apart."""
    handle = handle_of(model)
    (handle if handle is not None else Sharded(model, group)).sync()


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
    chunks: int = 1,
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
    Batch mode needs a traced model: an untraceable one is refused.

    ``chunks``: each kernel-mode group's output reaches the sharded convs reading
    it in this many chunks of rows, overlapping (``convshard.parallel.pipeline``).

    This is the library's form of ``shard``, which takes a plan's typed
    styles per group and returns the handle the training engine uses.

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
    world = comm.world_size(group)
    shares = [1.0] * world if shares is None else list(shares)
    row_weights = tuple(float(r) for r in ([1.0] * world if rows is None else rows))
    for name, weights in [("shares", shares), ("rows", row_weights), *(layer_shares or {}).items()]:
        if len(weights) != world:
            raise ConfigError(f"{name} {list(weights)} has {len(weights)} entries for {world} ranks")
    if not isinstance(chunks, int) or chunks < 1:
        raise ConfigError(f"chunks {chunks!r} is not a positive integer")

    def style_of(name: str, kernels: int) -> Style:
        if (modes or {}).get(name, "kernel") == "batch":
            return BatchSplit(row_weights)
        return KernelSplit(split_counts(kernels, (layer_shares or {}).get(name, shares)), chunks)

    if modes and any(m == "batch" for m in modes.values()) and fuse_channelwise:
        styles: Mapping[str, Style] | Callable[[str, int], Style] = _with_defaults(model, style_of)
    else:
        styles = style_of
    return shard(model, styles, group=group, gradient_dtype=gradient_dtype, check_batch=check_batch,
                 traced=fuse_channelwise).model


def _with_defaults(model: nn.Module, style_of: Callable[[str, int], Style]) -> dict[str, Style]:
    """Every channel group of ``model`` (``group_kernels``) with its style, so
    that ``shard`` checks the names and the row split is one."""
    return {name: style_of(name, k) for name, k in group_kernels(model).items()}


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


def _shard_in_place(model: nn.Module, style_of: Callable[[str, int], Style], rank: int, group: comm.Group, *,
                    fuse_channelwise: bool) -> Sharded:
    """Each shardable conv becomes a ``ShardedConv2d`` that gathers its own
    output; the stateless channel-wise layers after it in an ``nn.Sequential``
    move onto its shard (their places hold ``nn.Identity``). Every style must
    be a kernel split: batch mode needs a traced model."""
    groups: dict[str, ChannelGroup] = {}
    for site in conv_sites(model, fuse_channelwise=fuse_channelwise):
        if not site.shardable:
            log.warning("left replicated (groups=%d or parametrized): %s", site.conv.groups, site.name or "model")
            continue
        style = style_of(site.name, site.conv.out_channels)
        if not isinstance(style, KernelSplit):
            raise ConfigError(f"{type(model).__name__} cannot be traced, and batch mode (asked for {site.name!r}) "
                              f"needs a traced model: plan its groups in kernel mode (--strategy kernel)")
        channels = ChannelGroup(site.name, ShardSplit(tuple(style.counts), rank, group))
        groups[site.name] = channels
        layer = ShardedConv2d(site.conv, channels, local_ops=[op for _, op in site.fused])
        if site.parent is None:
            return Sharded(layer, group, groups)
        for later_name, _ in site.fused:
            setattr(site.parent, later_name, nn.Identity())
        setattr(site.parent, site.attr, layer)
    return Sharded(model, group, groups)


def group_kernels(model: nn.Module) -> dict[str, int]:
    """The channel groups ``shard`` makes of an unsharded ``model``:
    name -> kernels, in graph order (a plan names these). No collective."""
    graph = layouts.trace(copy.deepcopy(model))
    if graph is None:
        return {s.name: s.conv.out_channels for s in conv_sites(model) if s.shardable}
    return {name: graph.get_submodule(str(convs[0].target)).out_channels
            for name, convs in layouts.analyse(graph).group_convs().items()}
