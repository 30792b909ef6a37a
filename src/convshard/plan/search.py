"""The planner: the plans worth running for a profile, each priced by ``cost.predict``.

For the W profiled devices, on every subset of two or more (for W up to
EVERY_SUBSET; beyond, the m fastest by their step alone for m = 2..W; all
W where a job's processes are fixed):

- ``single``: the fastest device alone (m = 1);
- ``kernel``: every group in kernel mode, each group's kernels split by
  ``splits.sized_kernels`` on its fits a + b k (the m devices finish the
  group together);
- ``layers``: the best mix of modes (``best_modes``), kernel counts as
  above, the batch rows sized to the devices (``sized_rows``); only for a
  model fx traced (``batch_mode``): an untraceable one runs kernel mode;
- ``ddp``, ``ddp sized``: PyTorch DDP over all W, even rows or rows sized
  to the devices. For a model with BatchNorm these are left out of
  ``--strategy auto``: DDP normalises over each rank's rows, another
  model's maths, and the all-batch plan among the ``layers`` candidates
  is the same split with BatchNorm over the global batch.

Every plan stays within each device's memory where the profile records it
(``device_memory``; ``convshard.plan.memory``): kernel counts and rows are
capped by ``memory.caps`` (the greedy split stays optimal under caps), and a
candidate whose peak bytes (``memory.peak_bytes``) overflow a device is
dropped; ``single`` is the fastest device that holds the model alone. When
no plan fits, ``candidates`` refuses the job in one line naming the plan
that comes closest, the device it overflows and the bytes.

``best_modes`` is exact: a dynamic programme over the groups in graph
order. ``cost.predict``'s step is a sum of terms of one group's mode
(compute, inputs, BatchNorms, values read whole, update, its share of the
gradient sum), terms of a value's scope (its producer's mode and its
readers' modes: which of them compute beside its chunked transfers, at
the chunk count that leaves least exposed), and the gradient sum's
latency once if any group is in batch mode. A value's term is added at the
last group of its scope; readers may come before the producer (tied
groups span a ResNet stage). The state after deciding groups 0..i is the
modes of the decided groups that a later term still needs, and whether a
batch group has been seen; each state keeps its cheapest prefix. A ResNet
keeps a few groups active at a time, so there are a few dozen states.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from .. import plan
from ..errors import ConfigError
from . import BATCH, KERNEL, Plan, cost, memory, ring, splits

log = logging.getLogger(__name__)

TRIAL_STEPS = 6  # steps of each of auto's trials: 3 warm-up, 3 timed
TRIAL_MARGIN = 0.15  # auto tries every plan predicted within this much of the fastest
EVERY_SUBSET = 6  # up to this many devices, the splits are tried on every subset of them


@dataclass(frozen=True)
class Candidate:
    """A plan the planner considered, and its prediction."""

    name: str  # single | kernel | layers | ddp | ddp sized
    plan: Plan
    prediction: cost.Prediction
    memory: tuple[float, ...] = ()  # per rank of the plan: peak bytes (``memory.peak_bytes``)
    caps: dict | None = None  # per rank: the largest kernel share and rows its memory holds (``memory.caps``)
    profile: Mapping | None = field(default=None, repr=False, compare=False)  # the plan's devices' profile


def restrict(profile: Mapping, ranks: Sequence[int]) -> dict:
    """The profile of the devices ``ranks`` alone: links as measured, or,
    for a cluster, priced on its topology for these devices (``ring.ring_links``)."""
    def pick(values: Sequence) -> list:
        return [values[r] for r in ranks]

    layers = [{**layer, **{key: pick(layer[key]) for key in ("a", "b", "batch_seconds") if key in layer}}
              for layer in profile["layers"]]
    out = {**profile, "devices": pick(profile["devices"]), "layers": layers,
           "rest_seconds": pick(profile["rest_seconds"])}
    for key in ("update_seconds_per_byte", "device_memory", "runtime_bytes", "activation_scale"):
        if key in profile:
            out[key] = pick(profile[key])
    if "topology" in profile:
        out["topology"] = {**profile["topology"], "hosts": pick(profile["topology"]["hosts"])}
        out["links"] = ring.ring_links(out["topology"], range(len(ranks)))
    return out


def scaled(profile: Mapping, factors: Sequence[float]) -> dict:
    """``profile`` with every time of device r (its groups' fits and batch
    timings, its rest and its optimizer) multiplied by ``factors[r]``: the
    devices as they run now, when they run f_r times slower than measured."""
    def times(values: Sequence[float]) -> list[float]:
        return [v * f for v, f in zip(values, factors)]

    layers = [{**layer, **{key: times(layer[key]) for key in ("a", "b", "batch_seconds") if key in layer}}
              for layer in profile["layers"]]
    out = {**profile, "layers": layers, "rest_seconds": times(profile["rest_seconds"])}
    if "update_seconds_per_byte" in profile:
        out["update_seconds_per_byte"] = times(profile["update_seconds_per_byte"])
    return out


def resized(profile: Mapping, job: Plan, active: Sequence[int]) -> Plan:
    """``job`` with its modes kept and its split sized to ``profile``'s
    devices: every kernel-mode group's counts by ``sized_kernels`` on its
    fits a + b k, the rows by the batch-mode groups' time per row, each
    within its device's memory (``memory.caps``). Ranks not in ``active``
    get no kernels and no rows; an active rank keeps at least one row. A
    group (or the batch) the caps cannot hold keeps its split."""
    world, batch = job.world, job.batch_size
    shares, row_caps = memory.caps(profile)
    layers = {layer["name"]: layer for layer in profile["layers"]}
    counts = {}
    for g in job.groups:
        if g.mode != KERNEL:
            continue
        caps = [max(0, math.floor(shares[r] * g.kernels)) if r in active else 0 for r in range(world)]
        if sum(caps) >= g.kernels:
            counts[g.name] = splits.sized_kernels(g.kernels, layers[g.name]["a"], layers[g.name]["b"], caps=caps)
    rows = job.rows
    timed = [layers[g.name] for g in job.groups if g.mode == BATCH]
    caps = [row_caps[r] if r in active else 0 for r in range(world)]
    if timed and all("batch_seconds" in layer for layer in timed) and sum(max(c, 0) for c in caps) >= batch:
        per_row = [sum(layer["batch_seconds"][r] / layer["batch_rows"] for layer in timed) for r in range(world)]
        rows = _at_least_one(splits.choose_counts(batch, [0.0] * world, per_row, caps=caps), active)
    return job.resplit(counts, rows)


def _at_least_one(rows: Sequence[int], active: Sequence[int]) -> tuple[int, ...]:
    """``rows`` with every active rank holding at least one row (taken from the largest)."""
    rows = list(rows)
    for r in active:
        if rows[r] == 0 and max(rows) > 1:
            rows[rows.index(max(rows))] -= 1
            rows[r] = 1
    return tuple(rows)


def groups_of(profile: Mapping) -> dict[str, int]:
    """Group name -> kernels, in graph order."""
    return {layer["name"]: layer["kernels"] for layer in profile["layers"]}


def sized_counts(profile: Mapping) -> dict[str, tuple[int, ...]] | None:
    """Per group, kernels per device that make the devices finish it together
    (``sized_kernels``), each device's share within its memory
    (``memory.caps``); None when the devices' memory cannot hold a group."""
    shares, _ = memory.caps(profile)
    out = {}
    for layer in profile["layers"]:
        k = layer["kernels"]
        caps = [max(0, math.floor(f * k)) for f in shares]
        if sum(caps) < k:
            return None
        out[layer["name"]] = splits.sized_kernels(k, layer["a"], layer["b"], caps=caps)
    return out


def sized_rows(profile: Mapping) -> tuple[int, ...] | None:
    """Rows per device in proportion to its batch-mode speed over all groups:
    b_r minimising max_r b_r sum_g T_{r,g} / n_g (even without batch timings),
    within each device's memory (``memory.caps``); None when they cannot hold the batch."""
    world, batch = len(profile["devices"]), profile["batch_size"]
    _, caps = memory.caps(profile)
    if sum(max(c, 0) for c in caps) < batch:
        return None
    per_row = [1.0] * world  # equal costs: the even split (the lower ranks take the remainder)
    if world > 1 and profile["layers"] and all("batch_seconds" in layer for layer in profile["layers"]):
        per_row = [sum(layer["batch_seconds"][r] / layer["batch_rows"] for layer in profile["layers"])
                   for r in range(world)]
    return splits.choose_counts(batch, [0.0] * world, per_row, caps=caps)


def single_step(profile: Mapping, rank: int) -> float:
    """The predicted step of device ``rank`` alone."""
    sub = restrict(profile, [rank])
    return cost.predict(sub, plan.single(sub["devices"][0], groups_of(sub), sub["batch_size"])).step


def best_modes(profile: Mapping, counts: Mapping[str, Sequence[int]], rows: Sequence[int]) -> dict[str, str]:
    """The modes per group that minimise ``cost.predict`` for these kernel
    counts and rows (exact; the module docstring gives the programme)."""
    layers = profile["layers"]
    index = {layer["name"]: i for i, layer in enumerate(layers)}
    values = []  # (producer, value, its scope: producer and readers, the last group of the scope)
    for i, layer in enumerate(layers):
        for j, value in enumerate(layer["outputs"]):
            scope = sorted({i, *(index[name] for name in value["convs"])})
            if len(scope) > 1 or value["convs"]:
                values.append((i, j, scope, scope[-1]))
    closing = {i: [v for v in values if v[3] == i] for i in range(len(layers))}
    active = [sorted({g for (_, _, scope, last) in values if last > i for g in scope if g <= i})
              for i in range(len(layers))]  # groups decided by i whose mode a later cost needs
    summed = [layer["param_bytes"] for layer in layers]
    ar = profile.get("links", {}).get("all_reduce")
    latency = ar["latency"] if ar and len(profile["devices"]) > 1 else 0.0
    per_byte = 1 / ar["bandwidth"] if ar and len(profile["devices"]) > 1 else 0.0
    # state: (any batch group so far, the modes of the active groups) -> (cost so far, every mode so far)
    states: dict[tuple, tuple[float, tuple[str, ...]]] = {(False, ()): (0.0, ())}
    for i, layer in enumerate(layers):
        own = {}
        for mode in (KERNEL, BATCH):
            compute, comm = cost.group_own(profile, layer, mode, counts[layer["name"]], rows)
            own[mode] = (max(compute) + sum(comm.values()) + cost.group_update(profile, layer, mode,
                                                                             counts[layer["name"]])
                         + (summed[i] * per_byte if mode == BATCH else 0.0))
        nxt: dict[tuple, tuple[float, tuple[str, ...]]] = {}
        for (any_batch, _), (spent, modes) in states.items():
            for mode in (KERNEL, BATCH):
                chosen = (*modes, mode)
                total = spent + own[mode] + (latency if mode == BATCH and not any_batch else 0.0)
                for producer, j, _, _ in closing[i]:
                    value = layers[producer]["outputs"][j]
                    readers = {name: chosen[index[name]] for name in value["convs"]}
                    total += min(cost.values_seconds(profile, layers[producer], chosen[producer], readers, counts,
                                                     rows, k, [value])
                                 for k in cost.chunk_choices(profile, chosen[producer], profile["batch_size"]))
                key = (any_batch or mode == BATCH, tuple(chosen[g] for g in active[i]))
                if key not in nxt or total < nxt[key][0]:
                    nxt[key] = (total, chosen)
        states = nxt
    _, modes = min(states.values(), key=lambda s: s[0])
    return {layer["name"]: mode for layer, mode in zip(layers, modes)}


def candidates(profile: Mapping, *, can_drop: bool = True, threads: int | None = None,
               grad_precision: str = "32", rejected: list[Candidate] | None = None) -> list[Candidate]:
    """Every plan the planner considers (module docstring), with its
    prediction, summing gradients in ``grad_precision``. Without
    ``can_drop`` (torchrun) the split plans use every device, and
    ``single``'s plan names the process that trains alone. The plans that
    overflow a device's memory are left out, and added to ``rejected``."""

    world = len(profile["devices"])
    alone = [single_step(profile, r) for r in range(world)]
    order = sorted(range(world), key=lambda r: (alone[r], r))
    out, too_big = [], []  # plans within every device's memory; the others
    for r in order:  # the fastest device that holds the model alone
        sub = restrict(profile, [r])
        single = plan.single(sub["devices"][0], groups_of(sub), sub["batch_size"], threads=threads,
                             rank=None if can_drop else r)
        c = _priced(sub, "single", single, grad_precision)
        if _fits(sub, c):
            out.append(c)
            break
        too_big.append(c)
    splits_by_name: dict[str, Candidate] = {}
    for ranks in _subsets(order, can_drop):
        sub = restrict(profile, ranks)
        counts, rows = sized_counts(sub), sized_rows(sub)
        if counts is None or rows is None:
            continue
        kernel = plan.kernel_split(sub["devices"], groups_of(sub), sub["batch_size"], counts=counts,
                                   threads=threads)
        tries = [_priced(sub, "kernel", kernel, grad_precision)]
        if batch_mode(sub):
            layers = plan.kernel_split(sub["devices"], groups_of(sub), sub["batch_size"], counts=counts,
                                       modes=best_modes(sub, counts, rows), rows=rows, threads=threads)
            tries.append(_priced(sub, "layers", layers, grad_precision))
        for c in tries:
            if not _fits(sub, c):
                too_big.append(c)
            elif c.name not in splits_by_name or c.prediction.step < splits_by_name[c.name].prediction.step:
                splits_by_name[c.name] = c
    out.extend(splits_by_name.values())
    if world > 1 and all("batch_seconds" in layer for layer in profile["layers"]):
        speeds = [1 / t for t in alone]  # ``--shares auto`` for ddp: rows in proportion to each device's speed
        for name, shares in (("ddp", None), ("ddp sized", [s / sum(speeds) for s in speeds])):
            try:
                job = plan.ddp(profile["devices"], groups_of(profile), profile["batch_size"], shares=shares,
                               threads=threads)
            except ConfigError:  # a share too small for one image
                continue
            c = _priced(profile, name, job, grad_precision)
            if not _fits(profile, c) and name == "ddp sized" and (rows := _ddp_rows(profile, alone)):
                c = _priced(profile, name, plan.ddp(profile["devices"], groups_of(profile),
                                                    profile["batch_size"], shares=rows, threads=threads),
                            grad_precision)
            (out if _fits(profile, c) else too_big).append(c)
    if not out:
        raise ConfigError(_refusal(profile, too_big))
    if rejected is not None:
        rejected.extend(too_big)
    return out


def _priced(profile: Mapping, name: str, job: Plan, grad_precision: str) -> Candidate:
    """A candidate with its predicted step and peak bytes per rank, computing
    in the precision and memory format the profile was timed in, summing
    gradients in ``grad_precision``."""
    job = cost.with_chunks(profile, replace(job, precision=profile.get("precision", "32"),
                                            memory_format=profile.get("memory_format", "contiguous"),
                                            grad_precision=grad_precision))
    shares, rows = memory.caps(profile)
    caps = {"shares": shares, "rows": rows} if "device_memory" in profile else None
    return Candidate(name, job, cost.predict(profile, job), memory.peak_bytes(profile, job), caps, profile)


def _fits(profile: Mapping, c: Candidate) -> bool:
    """Whether every rank of ``c`` stays within its device's memory (always, without ``device_memory``)."""
    limits = profile.get("device_memory")
    return limits is None or all(need <= limit for need, limit in zip(c.memory, limits))


def _ddp_rows(profile: Mapping, alone: Sequence[float]) -> tuple[int, ...] | None:
    """DDP's rows sized to the devices' speed within their memory; None if they cannot hold the batch."""
    world, batch = len(profile["devices"]), profile["batch_size"]
    _, caps = memory.caps(profile)
    if sum(max(c, 0) for c in caps) < batch or min(caps) < 1:
        return None
    return splits.choose_counts(batch, [0.0] * world, list(alone), caps=caps)


def _refusal(profile: Mapping, too_big: Sequence[Candidate]) -> str:
    """One line for a job no plan fits: the plan that comes closest, and the device it overflows."""
    names = profile["devices"]
    limits = dict(zip(names, profile.get("device_memory", ())))

    def overflow(c: Candidate) -> tuple[float, str, float]:
        return max((need / limits[d], d, need) for d, need in zip(c.plan.devices, c.memory))

    closest = min(too_big, key=overflow)
    _, device, need = overflow(closest)
    return (f"no plan fits the devices' memory: the closest, {closest.name} on {', '.join(closest.plan.devices)}, "
            f"needs {memory.format_bytes(need)} ({need:.0f} bytes) on {device}, which holds "
            f"{memory.format_bytes(limits[device])} ({limits[device]:.0f} bytes)")


def _subsets(order: Sequence[int], can_drop: bool) -> list[list[int]]:
    """The device subsets of two or more that a split may run on: every one
    for up to EVERY_SUBSET devices, else the m fastest for each m; all of
    them alone where the processes are fixed."""
    world = len(order)
    if not can_drop:
        return [list(range(world))] if world > 1 else []
    if world <= EVERY_SUBSET:
        return [list(c) for m in range(2, world + 1) for c in itertools.combinations(range(world), m)]
    return [sorted(order[:m]) for m in range(2, world + 1)]


def batch_mode(profile: Mapping) -> bool:
    """Whether convshard's batch mode can run the profiled model: it was
    traced (batch mode rewrites the graph) and timed in batch mode."""
    return profile.get("traced", True) and all("batch_seconds" in layer for layer in profile["layers"])


def has_batchnorm(profile: Mapping) -> bool:
    """Whether the profiled model normalises batches (the profile's record, else its groups')."""
    return bool(profile.get("batchnorm", any(layer["batchnorms"] for layer in profile["layers"])))


def auto_candidates(found: Sequence[Candidate], profile: Mapping) -> list[Candidate]:
    """The candidates ``--strategy auto`` may choose: all of them, less DDP for
    a model with BatchNorm (it normalises each rank's rows alone: another
    model's maths; the all-batch plan is the same split, exact)."""
    return [c for c in found if not (c.plan.engine == plan.DDP and has_batchnorm(profile))]


def fastest(found: Sequence[Candidate]) -> Candidate:
    """The candidate with the least predicted step (ties: the earlier one)."""
    return min(found, key=lambda c: c.prediction.step)


def worth_trying(found: Sequence[Candidate]) -> list[Candidate]:
    """The candidates predicted within TRIAL_MARGIN of the fastest, which
    ``--strategy auto`` runs for TRIAL_STEPS before it chooses."""
    best = fastest(found).prediction.step
    return [c for c in found if c.prediction.step <= best * (1 + TRIAL_MARGIN)]
