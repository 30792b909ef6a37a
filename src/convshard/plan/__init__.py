"""The plan: one value that describes a whole training job.

A ``Plan`` names the engine that runs the job, its devices (one worker
each) and their threads, and for every channel group (a conv, or convs
whose outputs meet; ``convshard.parallel.layouts``) its mode and split:

- kernel mode: rank r holds c_r of the group's K kernels (sum_r c_r = K),
  for the whole batch;
- batch mode: every rank holds all K kernels and rows [p_r, p_r + b_r) of
  the global batch of B images, (b_0, ..., b_{W-1}) = ``rows``.

The engines (``convshard.run.engines``):

- ``sharded``: convshard's own, any mix of modes at any world size; one
  device alone (``single``), the paper's kernel split, all-batch and the
  per-layer plans are all values of it. It trains the model one device
  trains, BatchNorm over the global batch included.
- ``ddp``: PyTorch's DistributedDataParallel as people run it, the
  baseline: rank r trains on its ``rows[r]`` images, every group in batch
  mode, BatchNorm over each rank's own rows.

``rows`` are counts at ``batch_size``; a shorter batch of n (an epoch's
last) is split ``splits.split_counts(n, rows)``. ``ranks`` names the
started processes that train when a job's processes are fixed (torchrun):
the others stand by (``convshard.run.alone``). ``precision`` (32, bf16,
fp16) and ``memory_format`` say what every rank computes in, and
``grad_precision`` (32, bf16) what the gradient sums of batch-mode groups
and DDP travel in (``convshard.precision``). The CLI's strategy flags,
``--strategy auto`` and rebalancing only build values of this type;
``cost.predict`` prices one, ``to_json`` / ``from_json`` save and replay it
(``--plan FILE``, a run's ``job_plan``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from ..errors import ConfigError
from ..precision import GRAD_PRECISIONS, MEMORY_FORMATS, PRECISIONS
from . import splits

KERNEL, BATCH = "kernel", "batch"
SHARDED, DDP = "sharded", "ddp"
ENGINES = (SHARDED, DDP)
FORMAT = 3  # the JSON layout written by ``to_json``; files without "format" are read as today's earlier ones


@dataclass(frozen=True)
class GroupSplit:
    """One channel group: its mode and, in kernel mode, its kernels per rank."""

    name: str
    kernels: int  # K, the group's kernels
    mode: str = KERNEL  # "kernel" | "batch"
    counts: tuple[int, ...] = ()  # kernel mode: c_r per rank, summing to K; batch mode: () (all K on every rank)
    chunks: int = 1  # kernel mode: chunks of rows its output travels in to the sharded convs reading it

    def __post_init__(self) -> None:
        if not isinstance(self.chunks, int) or self.chunks < 1:
            raise ConfigError(f"group {self.name!r}: chunks {self.chunks!r} is not a positive integer")
        if self.mode not in (KERNEL, BATCH):
            raise ConfigError(f"group {self.name!r}: mode {self.mode!r} is not kernel or batch")
        if self.mode == KERNEL and (sum(self.counts) != self.kernels or min(self.counts, default=-1) < 0):
            raise ConfigError(f"group {self.name!r}: kernel counts {list(self.counts)} must be non-negative "
                              f"and sum to its {self.kernels} kernels")


@dataclass(frozen=True)
class KernelSplit:
    """A group's style in kernel mode: rank r holds ``counts[r]`` of its K
    kernels (sum_r c_r = K) and computes their channels for the whole batch;
    its output reaches the sharded convs that read it in ``chunks`` chunks
    of rows, each chunk's transfer overlapping the compute of the one
    before (``convshard.parallel.pipeline``)."""

    counts: tuple[int, ...]
    chunks: int = 1


@dataclass(frozen=True)
class BatchSplit:
    """A group's style in batch mode: every rank holds all its kernels and
    ``rows[r]`` rows of the global batch of sum_r b_r images; a batch of n
    is split ``splits.split_counts(n, rows)``. Every batch-mode group of a
    model shares one row split."""

    rows: tuple[float, ...]


Style = KernelSplit | BatchSplit


@dataclass(frozen=True)
class Plan:
    """A whole job: engine, devices, every group's mode and split, the batch rows."""

    engine: str  # "sharded" | "ddp"
    devices: tuple[str, ...]  # one worker per device, in rank order (``convshard.devices`` specs)
    groups: tuple[GroupSplit, ...]  # every channel group of the model, in graph order
    rows: tuple[int, ...]  # rows of the global batch per rank (batch-mode groups; ddp: each rank's part)
    batch_size: int  # B = sum(rows)
    threads: int | None = None  # intra-op threads per worker; None: the cores its device names
    ranks: tuple[int, ...] | None = None  # started processes that train (torchrun); None: all of them
    precision: str = "32"  # compute: 32 | bf16 | fp16 (weights and optimizer state stay float32)
    memory_format: str = "contiguous"  # contiguous | channels_last
    grad_precision: str = "32"  # gradient sums on the wire: 32 | bf16

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ConfigError(f"a plan's engine is one of {', '.join(ENGINES)}; got {self.engine!r}")
        world = len(self.devices)
        if world == 0:
            raise ConfigError("a plan names at least one device")
        if len(self.rows) != world or sum(self.rows) != self.batch_size or min(self.rows) < 0:
            raise ConfigError(f"a plan's rows {list(self.rows)} must be {world} counts summing to its batch "
                              f"size {self.batch_size}")
        for g in self.groups:
            if g.mode == KERNEL and len(g.counts) != world:
                raise ConfigError(f"group {g.name!r}: {len(g.counts)} kernel counts for {world} devices")
        if self.engine == DDP and any(g.mode != BATCH for g in self.groups):
            raise ConfigError("a ddp plan runs every group in batch mode")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"a plan's precision is one of {', '.join(PRECISIONS)}; got {self.precision!r}")
        if self.memory_format not in MEMORY_FORMATS:
            raise ConfigError(f"a plan's memory format is one of {', '.join(MEMORY_FORMATS)}; "
                              f"got {self.memory_format!r}")
        if self.grad_precision not in GRAD_PRECISIONS:
            raise ConfigError(f"a plan's gradient precision is one of {', '.join(GRAD_PRECISIONS)}; "
                              f"got {self.grad_precision!r}")
        if self.ranks is not None and len(self.ranks) != world:
            raise ConfigError(f"a plan's ranks {list(self.ranks)} name {len(self.ranks)} processes for "
                              f"{world} devices")

    @property
    def world(self) -> int:
        return len(self.devices)

    @property
    def name(self) -> str:
        """What the plan is, in the words of the CLI: single, kernel, batch (all
        groups), layers (a mix) or ddp. For display only: nothing runs by it."""
        if self.engine == DDP:
            return "ddp"
        if self.world == 1:
            return "single"
        modes = {g.mode for g in self.groups}
        return "layers" if len(modes) > 1 else modes.pop() if modes else KERNEL

    def kernel_counts(self) -> dict[str, tuple[int, ...]]:
        """Kernels per rank of every kernel-mode group."""
        return {g.name: g.counts for g in self.groups if g.mode == KERNEL}

    def batch_groups(self) -> tuple[str, ...]:
        return tuple(g.name for g in self.groups if g.mode == BATCH)

    def styles(self) -> dict[str, Style]:
        """Every group's style by name, what ``shard`` applies: its kernels
        per rank, or the plan's rows."""
        return {g.name: KernelSplit(g.counts, g.chunks) if g.mode == KERNEL else BatchSplit(self.rows)
                for g in self.groups}

    def rows_of(self, n: int) -> tuple[int, ...]:
        """Rows per rank of a global batch of ``n`` images."""
        return self.rows if n == self.batch_size else splits.split_counts(n, self.rows)

    def resplit(self, counts: Mapping[str, Sequence[int]], rows: Sequence[int] | None = None) -> Plan:
        """This plan with new kernel counts for the named groups and, when
        given, new rows (online rebalancing)."""
        groups = tuple(replace(g, counts=tuple(counts[g.name])) if g.name in counts and g.mode == KERNEL else g
                       for g in self.groups)
        return replace(self, groups=groups, rows=tuple(rows) if rows else self.rows)

    def to_json(self) -> dict:
        return {"format": FORMAT, "engine": self.engine, "devices": list(self.devices), "threads": self.threads,
                "batch_size": self.batch_size, "rows": list(self.rows), "precision": self.precision,
                "memory_format": self.memory_format, "grad_precision": self.grad_precision,
                "groups": [{"name": g.name, "kernels": g.kernels, "mode": g.mode, "counts": list(g.counts),
                            **({"chunks": g.chunks} if g.chunks != 1 else {})} for g in self.groups],
                **({"ranks": list(self.ranks)} if self.ranks is not None else {})}


def kernel_split(devices: Sequence[str], groups: Mapping[str, int], batch_size: int, *,
                 shares: Sequence[float] | None = None, counts: Mapping[str, Sequence[int]] | None = None,
                 modes: Mapping[str, str] | None = None, rows: Sequence[int] | None = None,
                 threads: int | None = None) -> Plan:
    """A sharded plan: each group in ``modes`` (default kernel), kernel
    groups split by ``counts`` or else in proportion to ``shares`` (None:
    equal), the batch by ``rows`` (None: even). One device is ``single``."""
    world, counts, modes = len(devices), counts or {}, modes or {}
    weights = [1.0] * world if shares is None else list(shares)
    if len(weights) != world:
        raise ConfigError(f"shares {list(weights)} has {len(weights)} weights for {world} devices")
    plan_groups = tuple(
        GroupSplit(name, k, BATCH) if modes.get(name, KERNEL) == BATCH else
        GroupSplit(name, k, KERNEL, tuple(counts[name]) if name in counts else splits.split_counts(k, weights))
        for name, k in groups.items())
    return Plan(SHARDED, tuple(devices), plan_groups,
                tuple(rows) if rows is not None else splits.even(batch_size, world), batch_size, threads)


def single(device: str, groups: Mapping[str, int], batch_size: int, *, threads: int | None = None,
           rank: int | None = None) -> Plan:
    """One device trains the whole model (under torchrun: process ``rank``, the others standing by)."""
    plan = kernel_split([device], groups, batch_size, threads=threads)
    return replace(plan, ranks=(rank,)) if rank is not None else plan


def ddp(devices: Sequence[str], groups: Mapping[str, int], batch_size: int, *,
        shares: Sequence[float] | None = None, threads: int | None = None) -> Plan:
    """PyTorch DDP: rank r trains on ``split_counts(B, shares)[r]`` images (None: even)."""
    rows = splits.split_counts(batch_size, shares) if shares is not None else splits.even(batch_size, len(devices))
    if len(rows) != len(devices):
        raise ConfigError(f"shares {list(shares or ())} has {len(rows)} weights for {len(devices)} devices")
    if min(rows) == 0:
        raise ConfigError(f"batch shares {list(shares or ())} leave a ddp worker no image of the {batch_size}")
    return Plan(DDP, tuple(devices), tuple(GroupSplit(n, k, BATCH) for n, k in groups.items()), rows,
                batch_size, threads)


def from_json(saved: object, *, groups: Mapping[str, int], batch_size: int, source: str = "plan") -> Plan:
    """The plan saved in ``saved`` (``to_json``, or a job plan written before
    the format had a number), checked against the model's ``groups``
    (name -> kernels, graph order). ``batch_size`` serves files that predate
    its record. Raises ConfigError naming ``source``."""
    what = ("a plan file holds a run's metrics JSON (--metrics-out) or its 'job_plan' entry: "
            "engine, devices, groups and rows")
    if not isinstance(saved, dict):
        raise ConfigError(f"{source}: not a plan ({what}); got {type(saved).__name__}")
    try:
        plan = _current(saved) if "format" in saved else _earlier(saved, groups, batch_size)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc} ({what})") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: not a plan ({what}): {type(exc).__name__} {exc}") from None
    saved_groups = {g.name: g.kernels for g in plan.groups}
    if saved_groups != dict(groups):
        raise ConfigError(f"{source}: its groups {saved_groups} are not the model's {dict(groups)}")
    return plan


def _current(saved: dict) -> Plan:
    if saved["format"] != FORMAT:
        raise ConfigError(f"plan format {saved['format']!r} is not {FORMAT}")
    groups = tuple(GroupSplit(g["name"], int(g["kernels"]), g["mode"], tuple(int(c) for c in g["counts"]),
                              g.get("chunks", 1)) for g in saved["groups"])
    ranks = tuple(int(r) for r in saved["ranks"]) if saved.get("ranks") is not None else None
    devices = tuple(_saved_device(d) for d in saved["devices"])
    return Plan(saved["engine"], devices, groups, tuple(int(r) for r in saved["rows"]),
                int(saved["batch_size"]), _threads(saved.get("threads")), ranks,
                str(saved.get("precision", "32")), saved.get("memory_format", "contiguous"),
                str(saved.get("grad_precision", "32")))


def _saved_device(label: str) -> str:
    """One device of a saved plan in today's spelling: files saved before
    ``+`` wrote a worker's core set with commas (``cpu@0-1,4`` -> ``cpu@0-1+4``);
    other labels (``cuda:1``, a cluster's ``host/gpu.0``) are kept as written."""
    from ..devices import parse_devices

    return str(parse_devices(label, legacy=True)[0]) if label.startswith("cpu@") and "," in label else label


def _earlier(saved: dict, groups: Mapping[str, int], batch_size: int) -> Plan:
    """A job plan of the earlier layout: strategy, devices (a --devices
    string), threads, layer_counts, modes, rows (weights), shares."""
    from ..devices import parse_devices  # a device string is split by its own grammar

    strategies = ("kernel", "single", "ddp", "layers")
    if saved.get("strategy") not in strategies:
        raise ConfigError(f"it names no strategy (one of {', '.join(strategies)}); got {saved.get('strategy')!r}")
    devices = [str(d) for d in parse_devices(saved["devices"], legacy=True)]
    threads, shares = _threads(saved.get("threads")), saved.get("shares")
    if saved["strategy"] == "single":
        return single(devices[0], groups, batch_size, threads=threads)
    if saved["strategy"] == "ddp":
        return ddp(devices, groups, batch_size, shares=shares, threads=threads)
    rows = splits.split_counts(batch_size, saved["rows"]) if saved.get("rows") else None
    return kernel_split(devices, groups, batch_size, shares=shares, counts=saved.get("layer_counts"),
                        modes=saved.get("modes"), rows=rows, threads=threads)


def _threads(value: object) -> int | None:
    if value is not None and (not isinstance(value, int) or value < 1):
        raise ConfigError(f"a plan's threads are a count of at least 1; got {value!r}")
    return value


def idle_ranks(plan: Plan) -> tuple[int, ...]:
    """The ranks a plan gives no work: no kernel of any kernel-mode group and,
    where a group is in batch mode, no rows. They only take part in collectives."""
    batch = any(g.mode == BATCH for g in plan.groups)
    return tuple(r for r in range(plan.world) if plan.groups and (not batch or plan.rows[r] == 0)
                 and all(g.counts[r] == 0 for g in plan.groups if g.mode == KERNEL))


def describe(plan: Plan) -> str:
    """The plan as a table: engine and devices, then per group its mode and
    split; a device the plan gives no work is named as not used."""
    width = max([len("group"), *(len(g.name) for g in plan.groups)])
    lines = [f"plan: {plan.name} ({plan.engine} engine) on {', '.join(plan.devices)}"
             + (f", {plan.threads} thread(s) each" if plan.threads else "")
             + (f", ranks {list(plan.ranks)}" if plan.ranks is not None else ""),
             f"  batch {plan.batch_size}, rows per rank {list(plan.rows)}, precision {plan.precision}, "
             f"{plan.memory_format}"
             + (f", gradient sums in {plan.grad_precision}" if plan.grad_precision != "32" else "")]
    if plan.groups:
        lines.append(f"  {'group':<{width}}  {'mode':<6}  kernels per rank")
        for g in plan.groups:
            split = list(g.counts) if g.mode == KERNEL else f"all {g.kernels} on every rank"
            lines.append(f"  {g.name:<{width}}  {g.mode:<6}  {split}")
    else:
        lines.append("  the model has no conv group: nothing is split")
    idle = idle_ranks(plan)
    if idle:
        lines.append("  not used: " + ", ".join(f"{plan.devices[r]} (rank {r}: no kernels, no rows)" for r in idle))
    return "\n".join(lines)
