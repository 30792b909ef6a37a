"""The cost model: ``predict(profile, plan)``, the step time of any plan with its breakdown.

The profile (``convshard.profile``) was measured on the plan's devices, one
rank each, at batch B. For channel group g on rank r it gives a fit
t = a_{r,g} + b_{r,g} k of k kernels over the whole batch, T_{r,g}, the
group with all its kernels over n_g rows (batch mode), the bytes of the
values entering and leaving it; per rank the replicated rest rest_r and
the optimizer's seconds per weight byte u_r; per collective x a link
t_x(n bytes) = latency_x + n / bandwidth_x (nothing is sent at W = 1):
measured, or for a cluster file (``convshard.plan.cluster``) priced on its
topology by ``ring.ring_links``, a ring at its slowest hop.

Bytes per element come from the plan: activations and their gradients
travel in its compute precision (``convshard.precision``: 2 bytes in bf16
and fp16, 4 in float32), broadcasts in float32, and the sums of weights'
gradients (P_batch below, and DDP's P) in the plan's ``grad_precision``
(``grad_bytes``: half of P in bf16). A
profile counts its activation bytes in the precision it was timed in;
``in_precision`` rescales them to the plan's (its times stay as measured,
so a profile is taken in the precision of the job it plans).

Data that decodes (image folders, a user's dataset) adds its decode:
``with_data`` prices d, the profile's seconds per image, over the images
each host decodes per step.

**Sharded engine.** Group g's compute on rank r is

    kernel mode: a_{r,g} + b_{r,g} max(c_{r,g}, 1)      (a rank without kernels runs a placeholder)
    batch mode:  T_{r,g} b_r / n_g

and the group takes its slowest rank's compute plus its collectives:

- a replicated input that needs a gradient: in kernel mode its all-reduce
  beyond a third of the group's compute (the weight gradient, one of the
  three convolutions of a conv's step, runs while it travels); in batch
  mode an all-gather of rows;
- each batch-mode BatchNorm meets the ranks twice (statistics, sums);
- each value leaving the group (n bytes over the batch), per kind of reader:

      from kernel mode: whole    t_ag(n W max_r c_r / K)     (channels padded to the largest share)
                        kernel   t_ag(...) + t_rs(n)          (input gradients summed back), or, where
                                 transfers run beside compute (``overlaps``: between hosts, NCCL), what
                                 its group's chunks leave exposed beside the readers' compute (``exposed``)
                        batch    2 t_a2a(n / W)               (all-to-all each way)
      from batch mode:  whole    t_ag(n)
                        kernel   t_ag(n) + t_rs(n)
                        batch    0

Then

    step = sum_g group_g + max_r rest_r + t_ar(P_batch) + t_bc(P_rep) + sum_g max_r u_r h_{r,g}

with P_batch the bytes of the batch-mode groups' weights (their gradients
are summed), P_rep those of the replicated rest (broadcast), h_{r,g} the
weight bytes of group g that rank r updates (all of a batch-mode group,
c_{r,g} / K_g of a kernel-mode one): each group's update is priced on its
slowest rank, so that the step is a sum over groups and the search
(``convshard.plan.search``) can be exact. One device is the same formula at W = 1:
sum_g (a + b K) + rest + u P_groups.

**DDP engine.** Rank r runs the whole model on its b_r rows:

    busy_r = sum_g T_{r,g} b_r / n_g + rest_r b_r / B + u_r P_groups
    step   = max_r busy_r + t_ddp(P) - OVERLAP * min(t_ddp(P), 2/3 sum_g T_{r,g} b_r / n_g)

DDP's reducer starts its all-reduce buckets while backward (two thirds of
a conv's step) goes on. OVERLAP is the fraction of that window which hides
the transfer, fitted by least squares to the bandwidth sweep of
docs/benchmarks.md (ResNet-18, two namespace hosts, ms/step, DDP charged
in full against measured): 10 Gbit/s b16 374/364 and b32 634/614, 1 Gbit/s
b16 683/512 and b32 953/736. The hidden time is h = predicted - measured
= 10, 20, 171, 217 ms. Taking each rank's compute as half the one-device
step (567 ms at b16, 1087 at b32, the same sweep), t_ddp is the rest of
the full-charge prediction (91, 91, 400, 410 ms) and the window
m = min(t_ddp, 2/3 compute) = 91, 91, 189, 362 ms, so OVERLAP =
sum m h / sum m^2 = 0.62, taken as 0.6. On one CPU thread the
transfer shares the core with backward, hence less than 1.

**A link without a reduce-scatter.** A profile that measured no
reduce-scatter (one written before it timed one, or edited by hand) prices
it on the all-gather's link at REDUCE_SCATTER_RATE of its bandwidth, the
latency unchanged: convshard's reduce-scatter is gloo's on slices padded to
the largest, not an ideal ring, and on the namespace links of
docs/cluster.md its measured rate over the all-gather's was 0.50, 0.66
and 0.62 (10 Gbit/s, 1 Gbit/s, 100 Mbit/s): their mean, 0.59, taken as 0.6.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from ..errors import ConfigError
from ..precision import activation_bytes, grad_dtype
from . import BATCH, DDP, KERNEL, Plan

OVERLAP = 0.6  # the share of DDP's backward window that hides its all-reduce (fit in the module docstring)
REDUCE_SCATTER_RATE = 0.6  # a reduce-scatter's bandwidth over the all-gather's, where none was measured (docstring)


@dataclass(frozen=True)
class Prediction:
    """A plan's predicted step, seconds, and where it goes."""

    step: float
    busy: tuple[float, ...]  # per rank: seconds computing (groups, rest, optimizer)
    groups: dict[str, float]  # per group: slowest rank's compute plus its collectives
    collectives: dict[str, float] = field(default_factory=dict)  # seconds per kind on the critical path
    rest: float = 0.0  # the replicated rest (ddp: inside busy)
    gradient_sum: float = 0.0  # batch-mode weights' gradient all-reduce (ddp: its exposed all-reduce)
    broadcast: float = 0.0  # replicated gradients' broadcast
    update: float = 0.0  # optimizer step over the groups' weights
    data: float = 0.0  # decoding the step's images, where it is not hidden (``data_seconds``)

    @property
    def wait(self) -> tuple[float, ...]:
        """Per rank: seconds of the step it is not busy (waiting for peers or links)."""
        return tuple(self.step - b for b in self.busy)

    def to_json(self) -> dict:
        return {"step": self.step, "busy": list(self.busy), "groups": self.groups, "collectives": self.collectives,
                "rest": self.rest, "gradient_sum": self.gradient_sum, "broadcast": self.broadcast,
                "update": self.update, "data": self.data}


def predict(profile: Mapping, plan: Plan) -> Prediction:
    """The predicted step of ``plan`` on the devices ``profile`` measured (one per rank)."""
    world = len(profile["devices"])
    if world != plan.world:
        raise ConfigError(f"the profile measured {world} devices, the plan runs on {plan.world}")
    names = sorted(layer["name"] for layer in profile["layers"])
    if names != sorted(g.name for g in plan.groups):
        raise ConfigError(f"the plan's groups {sorted(g.name for g in plan.groups)} are not the profile's {names}")
    profile = in_precision(profile, plan.precision)
    step = _ddp(profile, plan) if plan.engine == DDP else _sharded(profile, plan)
    return with_data(step, profile, plan)


LOADER_WORKERS = 4  # a GPU rank's loader processes (``loader.default_workers``)


def with_data(step: Prediction, profile: Mapping, plan: Plan) -> Prediction:
    """``step`` with the decoding of its images: a host decodes each image
    its ranks feed once (the whole batch B where a rank feeds all of it, as
    in every sharded plan; the sum of its ranks' rows under DDP), its ranks
    d (images) / (its ranks) each, d the profile's ``decode_seconds``. On a
    CPU the loader shares the rank's core, so its decode adds to the step
    (the slowest CPU rank's, as every rank waits for it at the next
    collective); on a GPU it runs on idle host cores in LOADER_WORKERS
    processes and shows only where it is longer than the step."""
    per_image = profile.get("decode_seconds", 0.0)
    if not per_image:
        return step
    hosts = hosts_of(profile)
    ranks = {h: [r for r in range(plan.world) if hosts[r] == h] for h in set(hosts)}
    decoded = {h: sum(plan.rows[r] for r in rs) if plan.engine == DDP else plan.batch_size for h, rs in ranks.items()}
    share = [per_image * decoded[hosts[r]] / len(ranks[hosts[r]]) for r in range(plan.world)]
    gpu = [str(profile["devices"][r]).startswith("cuda") for r in range(plan.world)]
    added = max((share[r] for r in range(plan.world) if not gpu[r]), default=0.0)
    total = max([step.step + added, *(share[r] / LOADER_WORKERS for r in range(plan.world) if gpu[r])])
    busy = tuple(b + (0.0 if gpu[r] else share[r]) for r, b in enumerate(step.busy))
    return replace(step, step=total, busy=busy, data=total - step.step)


ACTIVATION_BYTES = ("gather_bytes_per_kernel", "input_grad_bytes", "input_grad_scatter_bytes")  # per layer


def in_precision(profile: Mapping, precision: str) -> Mapping:
    """``profile`` with its activation bytes (each layer's gathers, input
    gradients, values leaving it, inputs) counted at ``precision``'s element
    size instead of the profile's own; the profile itself when they agree."""
    measured = profile.get("precision", "32")
    if measured == precision:
        return profile
    ratio = activation_bytes(precision) / activation_bytes(measured)
    layers = [{**layer, **{k: layer[k] * ratio for k in ACTIVATION_BYTES},
               "outputs": [{**out, "bytes": out["bytes"] * ratio} for out in layer["outputs"]],
               "inputs": [{**value, "bytes": value["bytes"] * ratio} for value in layer["inputs"]]}
              for layer in profile["layers"]]
    return {**profile, "layers": layers, "precision": precision}


def grad_bytes(plan: Plan, nbytes: float) -> float:
    """The bytes a sum of ``nbytes`` of float32 gradients sends at the plan's ``grad_precision``."""
    dtype = grad_dtype(plan.grad_precision)
    return nbytes if dtype is None else nbytes * dtype.itemsize / 4


def transfer(profile: Mapping, kind: str, nbytes: float) -> float:
    """Seconds of collective ``kind`` moving ``nbytes``; 0 on one device. A
    reduce-scatter the profile did not measure runs at REDUCE_SCATTER_RATE
    of the all-gather's bandwidth (module docstring)."""
    if len(profile["devices"]) == 1:
        return 0.0
    links = profile.get("links", {})
    link = links.get(kind)
    if link is None and kind == "reduce_scatter" and "all_gather" in links:
        gather = links["all_gather"]
        link = {"latency": gather["latency"], "bandwidth": REDUCE_SCATTER_RATE * gather["bandwidth"]}
    if link is None:
        raise ConfigError(f"profile has no {kind!r} link, which more than one device needs")
    return link["latency"] + nbytes / link["bandwidth"]


def group_compute(layer: Mapping, mode: str, counts: Sequence[int], rows: Sequence[int]) -> tuple[float, ...]:
    """Group ``layer``'s compute seconds per rank in ``mode``."""
    if mode == BATCH:
        return tuple(t * b / layer["batch_rows"] for t, b in zip(layer["batch_seconds"], rows))
    return tuple(a + b * max(c, 1) for a, b, c in zip(layer["a"], layer["b"], counts))


def group_own(profile: Mapping, layer: Mapping, mode: str, counts: Sequence[int],
              rows: Sequence[int]) -> tuple[tuple[float, ...], dict[str, float]]:
    """What group ``layer`` costs by its own mode alone: compute per rank, and
    the collectives of its inputs, its BatchNorms and its values read whole."""
    compute = group_compute(layer, mode, counts, rows)
    comm: dict[str, float] = {}
    if mode == BATCH and layer["batchnorms"]:
        _add(comm, "all_gather", 2 * layer["batchnorms"] * transfer(profile, "all_gather", 0))
    for value in layer["inputs"]:
        if value["grad"] and mode == BATCH:
            _add(comm, "all_gather", transfer(profile, "all_gather", value["bytes"]))
        elif value["grad"]:
            _add(comm, "all_reduce", max(transfer(profile, "all_reduce", value["bytes"]) - max(compute) / 3, 0.0))
    for value in layer["outputs"]:
        if value["whole"]:
            _add(comm, "all_gather", transfer(profile, "all_gather", gathered_bytes(profile, layer, value, mode,
                                                                                     counts)))
    return compute, comm


def gathered_bytes(profile: Mapping, layer: Mapping, value: Mapping, mode: str, counts: Sequence[int]) -> float:
    """Bytes an all-gather of ``value`` moves: padded to the largest share in kernel mode."""
    world = len(profile["devices"])
    return value["bytes"] * (world * max(counts) / layer["kernels"] if mode == KERNEL else 1)


def value_readers(profile: Mapping, layer: Mapping, value: Mapping, mode: str, counts: Sequence[int],
                  kernel_readers: bool, batch_readers: bool, readers: Readers = (0.0, 0.0),
                  chunks: int = 1) -> dict[str, float]:
    """The collectives that carry ``value`` to conv readers in kernel and batch
    mode: from a kernel-mode producer to kernel-mode readers, what of them
    ``chunks`` chunks of rows leave exposed beside the readers' compute
    (``exposed``), and what the readers' extra calls cost (``chunking``)."""
    comm: dict[str, float] = {}
    if kernel_readers:
        gather = gathered_bytes(profile, layer, value, mode, counts)
        if mode == KERNEL and overlaps(profile):
            window, per_call = readers
            forward, backward = exposed(profile, gather, value["bytes"], window, chunks)
            _add(comm, "all_gather", forward)
            _add(comm, "reduce_scatter", backward)
            _add(comm, "chunking", (chunks - 1) * per_call)
        else:
            _add(comm, "all_gather", transfer(profile, "all_gather", gather))
            _add(comm, "reduce_scatter", transfer(profile, "reduce_scatter", value["bytes"]))
    if batch_readers and mode == KERNEL:
        _add(comm, "all_to_all", 2 * transfer(profile, "all_to_all", value["bytes"] / len(profile["devices"])))
    return comm


def overlaps(profile: Mapping) -> bool:
    """Whether the plan's transfers run beside its compute: on gloo between
    hosts and on NCCL (their own threads and streams), not through shared
    memory, which moves a transfer's bytes when it starts."""
    cuda = all(str(d).startswith("cuda") for d in profile["devices"])
    return len(profile["devices"]) > 1 and (cuda or len(set(hosts_of(profile))) > 1)


def hosts_of(profile: Mapping) -> list:
    """Each device's host: a cluster's topology, or the profile's key (one host without either)."""
    hosts = profile["topology"]["hosts"] if "topology" in profile else profile.get("key", {}).get("hosts")
    return list(hosts) if hosts else ["one"] * len(profile["devices"])


def exposed(profile: Mapping, gather: float, scatter: float, window: float, chunks: int) -> tuple[float, float]:
    """Seconds of a chunked gather into kernel-mode convs (``convshard.parallel.pipeline``)
    that no compute hides: (forward all-gathers, backward reduce-scatters).

    The readers' compute ``window`` is taken as three equal convolutions:
    forward F, input gradient D, weight gradient V. With k chunks, each
    chunk's all-gather taking g = t_ag(n / k) and its reduce-scatter
    r = t_rs(m / k), one after another on the link:

        forward:  max_i (i g + (k - i + 1) F / k) - F              (i = 1..k; chunk i's convs wait for its rows)
        backward: max(0, max_i (i D / k + (k - i + 1) r) - D - V)  (chunk i's sum starts after its D / k)
    """
    k = chunks
    g, r = transfer(profile, "all_gather", gather / k), transfer(profile, "reduce_scatter", scatter / k)
    f = d = v = window / 3
    forward = max(i * g + (k - i + 1) * f / k for i in range(1, k + 1)) - f
    backward = max(0.0, max(i * d / k + (k - i + 1) * r for i in range(1, k + 1)) - d - v)
    return forward, backward


CHUNKS = (1, 2, 4, 8)  # the chunk counts a plan chooses from (``with_chunks``)


Readers = tuple[float, float]  # a value's kernel-mode readers: their compute, their seconds per extra call


def reader_window(profile: Mapping, value: Mapping, modes: Mapping[str, str],
                  counts: Mapping[str, Sequence[int]], rows: Sequence[int]) -> Readers:
    """The compute of ``value``'s kernel-mode readers, each on its slowest
    rank, and what one more call of them costs (``call_seconds``), summed over them."""
    layers = {layer["name"]: layer for layer in profile["layers"]}
    readers = [layers[name] for name in set(value["convs"]) if modes[name] == KERNEL]
    return (sum(max(group_compute(layer, KERNEL, counts[layer["name"]], rows)) for layer in readers),
            sum(call_seconds(profile, layer, counts[layer["name"]]) for layer in readers))


def call_seconds(profile: Mapping, layer: Mapping, counts: Sequence[int]) -> float:
    """The fixed cost of one call of kernel-mode group ``layer`` on its
    slowest rank, what each extra chunk of rows adds.

    A step of the group's K kernels over n rows is taken as t(n) = alpha +
    beta n; the profile measured it at the batch B (a + b K) and in batch
    mode at ``batch_rows`` rows (``batch_seconds``), which give alpha. A rank
    with c of the K kernels pays alpha max(c, 1) / K. Without batch-mode
    times (an untraced model, one device) a call is priced as the whole
    step, so that more chunks never pay."""
    batch = profile["batch_size"]
    worst = 0.0
    for r, c in enumerate(counts):
        whole = layer["a"][r] + layer["b"][r] * layer["kernels"]
        if "batch_seconds" in layer and layer["batch_rows"] < batch:
            n, t = layer["batch_rows"], layer["batch_seconds"][r]
            alpha = max(0.0, whole - (whole - t) / (batch - n) * batch)
        else:
            alpha = whole
        worst = max(worst, alpha * max(c, 1) / layer["kernels"])
    return worst


def chunk_choices(profile: Mapping, mode: str, batch_size: int) -> list[int]:
    """The chunk counts worth pricing for a group in ``mode``: more than one
    only in kernel mode, where transfers overlap, and at most the batch."""
    return [k for k in CHUNKS if k == 1 or (mode == KERNEL and k <= batch_size and overlaps(profile))]


def values_seconds(profile: Mapping, layer: Mapping, mode: str, modes: Mapping[str, str],
                   counts: Mapping[str, Sequence[int]], rows: Sequence[int], chunks: int,
                   values: Sequence[Mapping] | None = None) -> float:
    """Seconds the collectives carrying group ``layer``'s ``values`` (all its
    outputs by default) to their conv readers take, in ``chunks`` chunks."""
    return sum(sum(value_collectives(profile, layer, value, mode, modes, counts, rows, chunks).values())
               for value in (layer["outputs"] if values is None else values))


def value_collectives(profile: Mapping, layer: Mapping, value: Mapping, mode: str, modes: Mapping[str, str],
                      counts: Mapping[str, Sequence[int]], rows: Sequence[int], chunks: int) -> dict[str, float]:
    """``value_readers`` of one of group ``layer``'s values, its readers' modes
    and compute taken from ``modes`` and ``counts``."""
    readers = {modes[name] for name in value["convs"]}
    return value_readers(profile, layer, value, mode, counts[layer["name"]], KERNEL in readers, BATCH in readers,
                         reader_window(profile, value, modes, counts, rows), chunks)


def with_chunks(profile: Mapping, plan: Plan) -> Plan:
    """``plan`` with every kernel-mode group's chunks: the fewest whose
    values leave the least exposed (``values_seconds``)."""
    if plan.engine == DDP:
        return plan
    modes, counts = {g.name: g.mode for g in plan.groups}, {g.name: g.counts for g in plan.groups}
    layers = {layer["name"]: layer for layer in in_precision(profile, plan.precision)["layers"]}

    def best(g) -> int:
        return min(chunk_choices(profile, KERNEL, plan.batch_size),
                   key=lambda k: (values_seconds(profile, layers[g.name], KERNEL, modes, counts, plan.rows, k), k))

    groups = tuple(replace(g, chunks=best(g)) if g.mode == KERNEL else g for g in plan.groups)
    return replace(plan, groups=groups)


def group_update(profile: Mapping, layer: Mapping, mode: str, counts: Sequence[int]) -> float:
    """The optimizer step over the group's weights, on its slowest rank."""
    per_byte = profile.get("update_seconds_per_byte")
    if per_byte is None:
        return 0.0
    held = [c / layer["kernels"] for c in counts] if mode == KERNEL else [1.0] * len(per_byte)
    return max(u * layer["param_bytes"] * h for u, h in zip(per_byte, held))


def _sharded(profile: Mapping, plan: Plan) -> Prediction:
    layers = profile["layers"]
    mode = {g.name: g.mode for g in plan.groups}
    counts = {g.name: g.counts for g in plan.groups}
    chunks = {g.name: g.chunks for g in plan.groups}
    world = plan.world
    collectives: dict[str, float] = {}
    groups: dict[str, float] = {}
    busy = [0.0] * world
    update = 0.0
    for layer in layers:
        name = layer["name"]
        compute, comm = group_own(profile, layer, mode[name], counts[name], plan.rows)
        for value in layer["outputs"]:
            _merge(comm, value_collectives(profile, layer, value, mode[name], mode, counts, plan.rows, chunks[name]))
        groups[name] = max(compute) + sum(comm.values())
        _merge(collectives, comm)
        busy = [s + c for s, c in zip(busy, compute)]
        update += group_update(profile, layer, mode[name], counts[name])
    summed = sum(layer["param_bytes"] for layer in layers if mode[layer["name"]] == BATCH)
    gradient_sum = transfer(profile, "all_reduce", grad_bytes(plan, summed)) if summed else 0.0
    broadcast = transfer(profile, "broadcast", profile["replicated_param_bytes"])
    rest = max(profile["rest_seconds"])  # every rank runs it on the whole batch
    busy = [s + r + update for s, r in zip(busy, profile["rest_seconds"])]
    step = sum(groups.values()) + rest + gradient_sum + broadcast + update
    return Prediction(step, tuple(busy), groups, collectives, rest, gradient_sum, broadcast, update)


def _ddp(profile: Mapping, plan: Plan) -> Prediction:
    layers, rows, batch = profile["layers"], plan.rows, plan.batch_size
    all_reduce = transfer(profile, "ddp_all_reduce" if "ddp_all_reduce" in profile.get("links", {}) else
                          "all_reduce", grad_bytes(plan, profile["param_bytes"]))
    grouped = profile["param_bytes"] - profile["replicated_param_bytes"]
    per_byte = profile.get("update_seconds_per_byte", [0.0] * plan.world)
    per_group = {layer["name"]: group_compute(layer, BATCH, (), rows) for layer in layers}  # seconds per rank
    conv = [sum(t[r] for t in per_group.values()) for r in range(plan.world)]
    busy = [conv[r] + profile["rest_seconds"][r] * rows[r] / batch + per_byte[r] * grouped for r in range(plan.world)]
    exposed = [all_reduce - OVERLAP * min(all_reduce, 2 / 3 * conv[r]) for r in range(plan.world)]
    slowest = max(range(plan.world), key=lambda r: busy[r] + exposed[r])
    return Prediction(busy[slowest] + exposed[slowest], tuple(busy), {n: max(t) for n, t in per_group.items()},
                      {"all_reduce": exposed[slowest]}, gradient_sum=exposed[slowest])


def _add(comm: dict[str, float], kind: str, seconds: float) -> None:
    if seconds:
        comm[kind] = comm.get(kind, 0.0) + seconds


def _merge(into: dict[str, float], more: Mapping[str, float]) -> None:
    for kind, seconds in more.items():
        _add(into, kind, seconds)
