"""The cost model and the planner: how many kernels each rank gets, on which ranks, or whether to shard at all.

A profile (measured elsewhere, for W ranks at one batch size) gives, per rank
r and sharded conv layer l with K_l kernels, a fixed cost a_{r,l} and a cost
per kernel b_{r,l} (seconds of forward + backward); per rank the seconds
rest_r of the replicated part (the other layers and the optimizer step); and
per collective x a link model t_x(n) = latency_x + n / bandwidth_x for n bytes.

Strategy ``kernel`` on a set S of m ranks with integer counts c_{r,l} >= 0,
sum_r c_{r,l} = K_l::

    compute_{r,l} = a_{r,l} + b_{r,l} * max(c_{r,l}, 1)
    comm_l        = t_gather(m * max_r c_{r,l} * g_l) + max(t_reduce(d_l) - compute_{s,l} / 3, 0)
                    + t_scatter(e_l)
                    (s: the rank with the largest compute_{r,l} of the layer)
    layer_l       = max_{r in S} compute_{r,l} + comm_l
    wait_{r,l}    = max_{r' in S} compute_{r',l} - compute_{r,l}
    step          = sum_l layer_l + min_{r in S} rest_r + t_broadcast(P_rep)

with g_l the bytes one kernel adds to the forward all-gathers, d_l the bytes
of the backward all-reduce of the layer's input gradient where that input
is replicated (the term is left out when d_l = 0: the input needs no
gradient), e_l the bytes of the input gradients reduce-scattered back to
the channel split they were gathered from (``convshard.layouts``), and
P_rep the bytes of the replicated parameters' gradients. The all-reduce travels while the weight
gradient is computed: a conv's forward, input gradient and weight gradient
are one convolution each of the same multiply-adds, so the weight gradient
is taken as a third of the layer's compute on its slowest rank, and only
the transfer beyond it counts. Every rank runs the replicated part
between the last conv layer's forward gather and its backward all-reduce,
so a rank slower at it by e_r = rest_r - min_{S} rest gets that much added
to its last-layer compute, and fewer kernels of that layer: the replicated
part stays off the critical path as far as the last layer can absorb it.
A rank with no kernels still runs one
zero kernel, hence max(c, 1); the all-gather pads every rank's part to the
largest count, hence m * max c. With m = 1 nothing is communicated:
step = sum_l (a_{r,l} + b_{r,l} K_l) + rest_r, which is strategy ``single``
on rank r. Strategy ``ddp`` splits the batch evenly over all W ranks and
all-reduces the P bytes of all gradients:
step = max_r (sum_l (a_{r,l} + b_{r,l} K_l) + rest_r) / W + t_reduce(P).

``make_plan`` splits every layer with ``choose_counts``, evaluates the kernel
strategy on the m fastest ranks (by single-device step) for m = 1..W and
keeps the fastest subset; the ranks outside it are dropped (no kernels).
Strategy ``layers`` is the best per-layer plan (``convshard.perlayer``:
each channel group splits its kernels or the batch), predicted when the
profile times batch mode (W > 1). ``auto`` picks the strategy with the
smallest predicted step, ties going to kernel, then single, then layers,
then ddp. Since m = 1 is the best single device, auto is
never predicted slower than it; a kernel plan that keeps one rank is that
device alone, so auto reports it as ``single``.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, is_dataclass
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    from .perlayer import LayersPlan

STRATEGIES = ("kernel", "single", "layers", "ddp")  # auto's order of preference on a tie
_REQUIRED = ("version", "devices", "layers", "rest_seconds", "param_bytes", "replicated_param_bytes")


@dataclass(frozen=True)
class LayerPlan:
    """One sharded conv layer under the kernel strategy."""

    name: str
    counts: tuple[int, ...]  # kernels per rank, all W ranks (0 for ranks left out)
    compute: tuple[float, ...]  # predicted fwd+bwd seconds per rank (0.0 for ranks left out)
    wait: tuple[float, ...]  # seconds each rank waits for the slowest (0.0 for ranks left out)
    comm: float  # all-gather plus the input-gradient all-reduce beyond the weight-gradient compute, seconds
    seconds: float  # slowest rank's compute + comm


@dataclass(frozen=True)
class Plan:
    """The chosen strategy, the kernel strategy's per-layer plan and every strategy's predicted step."""

    strategy: str  # "kernel" | "single" | "ddp"
    devices: tuple[str, ...]  # device spec per rank
    ranks: tuple[int, ...]  # ranks the kernel plan uses, ascending
    dropped: tuple[int, ...]  # ranks the kernel plan leaves out
    layers: tuple[LayerPlan, ...]
    rest: float  # fastest used rank's replicated part, seconds (the excess of slower ones is in the last layer)
    sync: float  # replicated-gradient broadcast, seconds
    predicted: dict[str, float]  # predicted step seconds per strategy ("ddp" only when W > 1)
    best_single: int  # rank of the fastest single device
    ddp_shares: tuple[float, ...] = ()  # batch share per rank sized to its speed (``--strategy ddp --shares auto``)
    ddp_sized: float = 0.0  # predicted step seconds of ddp with those shares
    per_layer: LayersPlan | None = None  # the best per-layer plan (``convshard.perlayer``), for W > 1
    trials: dict[str, float] | None = None  # measured seconds per step of the strategies ``auto`` tried

    def worth_trying(self) -> list[str]:
        """The strategies predicted within TRIAL_MARGIN of the fastest (ddp:
        DDP_TRIAL_MARGIN), which ``auto`` runs for TRIAL_STEPS before it
        chooses (a kernel plan on one rank is that device alone, ``single``,
        and is left out)."""
        best = min(self.predicted.values())
        return [s for s, t in self.predicted.items()
                if t <= best * (1 + (DDP_TRIAL_MARGIN if s == "ddp" else TRIAL_MARGIN))
                and not (s == "kernel" and len(self.ranks) == 1)]

    def counts(self) -> dict[str, tuple[int, ...]]:
        """Layer name -> kernels per rank under the kernel plan."""
        return {layer.name: layer.counts for layer in self.layers}

    def speedup(self, over: str) -> float:
        """How many times faster the chosen strategy's predicted step is than ``over``'s."""
        return self.predicted[over] / self.predicted[self.strategy]

    def idle(self) -> tuple[int, ...]:
        """Ranks the kernel plan gives no kernels in any layer (the dropped ones among them)."""
        return tuple(r for r in range(len(self.devices)) if not any(layer.counts[r] for layer in self.layers))

    def idle_note(self, rank: int) -> str:
        return f"{self.devices[rank]} (rank {rank}) gets no kernels: it would slow the step"

    def to_json(self) -> dict:
        """Every field, nested plans included, as plain dicts and lists."""
        return _plain(self)


def _plain(value):
    if is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def choose_counts(total: int, a: Sequence[float], b: Sequence[float]) -> tuple[int, ...]:
    """Kernels per rank, summing to ``total``, that minimise max_r a_r + b_r * max(c_r, 1).

    Greedy: each kernel goes to the rank whose cost after taking it is
    smallest (ties to the lower rank). This is optimal for a min-max of
    non-decreasing costs: were a kernel given at a cost above the optimum T,
    every rank would already hold as many kernels as it can within T, i.e. at
    least the total. Comm is left out of the objective: it depends on the
    split only through max_r c_r, and lowering that means moving kernels from
    the rank that takes them cheapest to a slower one; the planner meets a
    slow link by using fewer ranks instead.
    """
    if not a or len(a) != len(b):
        raise ConfigError(f"a ({len(a)} entries) and b ({len(b)} entries) must give one cost per rank")
    if total < 0:
        raise ConfigError(f"kernel total {total} must be non-negative")
    counts = [0] * len(a)
    heap = [(a[r] + b[r], r) for r in range(len(a))]
    heapq.heapify(heap)
    for _ in range(total):
        _, r = heapq.heappop(heap)
        counts[r] += 1
        heapq.heappush(heap, (a[r] + b[r] * (counts[r] + 1), r))
    return tuple(counts)


def kernel_step(
    profile: Mapping, counts: Mapping[str, Sequence[int]], ranks: Sequence[int] | None = None
) -> tuple[float, tuple[LayerPlan, ...]]:
    """Predicted step seconds and per-layer plan of the kernel strategy with the given counts.

    ``counts`` maps each layer name to kernels for all W ranks; ``ranks`` is
    the participating subset (all ranks when None), outside which counts must be 0.
    """
    world = _world(profile)
    used = _subset(ranks, world)
    last = len(profile["layers"]) - 1
    layers = tuple(
        _layer_plan(profile, layer, _checked_counts(layer, counts, used, world), used,
                    _rest_excess(profile, used) if i == last else None)
        for i, layer in enumerate(profile["layers"])
    )
    update = max(sum(_update(profile, r, layer["param_bytes"] * counts[layer["name"]][r] / layer["kernels"])
                     for layer in profile["layers"] if "param_bytes" in layer) for r in used)
    return sum(layer.seconds for layer in layers) + _rest(profile, used) + _sync(profile, used) + update, layers


def single_step(profile: Mapping, rank: int) -> float:
    """Predicted step seconds of the whole model on ``rank`` alone."""
    world = _world(profile)
    if not 0 <= rank < world:
        raise ConfigError(f"rank {rank} is not in 0..{world - 1}")
    return _single(profile, rank)


def ddp_step(profile: Mapping, shares: Sequence[float] | None = None) -> float:
    """Predicted step seconds of data parallelism over all ranks: rank r takes
    the fraction s_r of the batch (evenly when ``shares`` is None), so
    step = max_r single_r * s_r + t_reduce(P), the all-reduce as DDP's
    reducer runs it (the backend's own, ``ddp_all_reduce``, where profiled)."""
    world = _world(profile)
    fractions = [1 / world] * world if shares is None else [s / sum(shares) for s in shares]
    grouped = profile["param_bytes"] - profile["replicated_param_bytes"]  # every rank updates all weights
    compute = max((_single(profile, r) - _update(profile, r, grouped)) * fractions[r] + _update(profile, r, grouped)
                  for r in range(world))
    link = "ddp_all_reduce" if "ddp_all_reduce" in profile.get("links", {}) else "all_reduce"
    return compute + (_transfer(profile, link, profile["param_bytes"]) if world > 1 else 0.0)


def _update(profile: Mapping, rank: int, nbytes: float) -> float:
    """Seconds of the optimizer step over ``nbytes`` of the groups' parameters
    on ``rank`` (0 for a profile that does not time it)."""
    return profile["update_seconds_per_byte"][rank] * nbytes if "update_seconds_per_byte" in profile else 0.0


def ddp_shares(profile: Mapping) -> tuple[float, ...]:
    """Batch shares that make every rank finish its part together: s_r proportional to 1 / single_r."""
    speeds = [1 / _single(profile, r) for r in range(_world(profile))]
    return tuple(s / sum(speeds) for s in speeds)


TRIAL_STEPS = 6  # steps of each of auto's trials: 3 warm-up, 3 timed
TRIAL_MARGIN = 0.15  # auto tries every strategy predicted within this much of the fastest
# ddp's prediction charges its all-reduce in full, but DDP's reducer overlaps it
# with backward as far as the device is free to: across a 1 Gbit/s link ResNet-18
# at batch 32 was predicted 953 ms and measured 736 (docs/benchmarks.md).
DDP_TRIAL_MARGIN = 0.5


def make_plan(profile: Mapping, *, strategy: str = "auto", allow_drop: bool = True) -> Plan:
    """Plan the kernel strategy, predict every strategy and choose one.

    ``strategy`` "auto" chooses the fastest predicted (a kernel plan on one
    rank is reported as ``single``); a named strategy is chosen as given. With
    ``allow_drop`` False the kernel plan uses every rank.
    """
    world = _world(profile)
    if strategy != "auto" and strategy not in STRATEGIES:
        raise ConfigError(f"strategy {strategy!r} is not one of auto, {', '.join(STRATEGIES)}")
    if strategy in ("ddp", "layers") and world == 1:
        raise ConfigError(f"strategy {strategy!r} needs more than one device")
    singles = [_single(profile, r) for r in range(world)]
    order = sorted(range(world), key=lambda r: (singles[r], r))
    subsets = [tuple(sorted(order[:m])) for m in (range(1, world + 1) if allow_drop else (world,))]
    candidates = [(*kernel_step(profile, _greedy_counts(profile, used), used), used) for used in subsets]
    step, layers, used = min(candidates, key=lambda c: c[0])
    predicted = {"kernel": step, "single": singles[order[0]]}
    per_layer = perlayer.search(profile) if perlayer.can_plan(profile) else None
    if per_layer is not None:
        predicted["layers"] = per_layer.step
    if world > 1:
        predicted["ddp"] = ddp_step(profile)
    sized = ddp_shares(profile)
    if strategy == "auto":
        strategy = min(predicted, key=lambda s: (predicted[s], STRATEGIES.index(s)))
        if strategy == "kernel" and len(used) == 1:
            strategy = "single"
    return Plan(
        strategy=strategy,
        devices=tuple(profile["devices"]),
        ranks=used,
        dropped=tuple(r for r in range(world) if r not in used),
        layers=layers,
        rest=_rest(profile, used),
        sync=_sync(profile, used),
        predicted=predicted,
        best_single=order[0],
        ddp_shares=sized,
        ddp_sized=ddp_step(profile, sized),
        per_layer=per_layer,
    )


def format_plan(plan: Plan) -> str:
    """The plan as a plain-text table: per layer and device, then the step and the choice."""
    width = max(len("device"), *(len(d) for d in plan.devices))
    lines = ["kernel plan:"]
    for layer in plan.layers:
        lines.append(f"{layer.name}: {sum(layer.counts)} kernels")
        lines.append(f"  {'rank':>4}  {'device':<{width}}  {'kernels':>7}  {'compute ms':>10}  {'wait ms':>8}")
        for r, device in enumerate(plan.devices):
            used = r in plan.ranks
            compute = f"{layer.compute[r] * 1e3:.2f}" if used else "-"
            wait = f"{layer.wait[r] * 1e3:.2f}" if used else "-"
            lines.append(f"  {r:>4}  {device:<{width}}  {layer.counts[r]:>7}  {compute:>10}  {wait:>8}")
        lines.append(f"  comm {_ms(layer.comm)}  time {_ms(layer.seconds)}")
    lines.append(f"rest {_ms(plan.rest)}  sync {_ms(plan.sync)}")
    if plan.per_layer is not None:
        lines.append(perlayer.format_layers(plan.per_layer, plan.devices))
    lines.append("predicted step: " + "  ".join(f"{s} {_ms(t)}" for s, t in plan.predicted.items()))
    if "ddp" in plan.predicted:
        lines.append(f"ddp with batch shares sized to the devices ({', '.join(f'{s:.2f}' for s in plan.ddp_shares)}): "
                     f"{_ms(plan.ddp_sized)}")
    best = plan.best_single
    speedups = [f"{plan.speedup('single'):.2f}x over the best single device ({plan.devices[best]}, rank {best})"]
    if "ddp" in plan.predicted:
        speedups.append(f"{plan.speedup('ddp'):.2f}x over ddp")
    lines.append(f"speedup of {plan.strategy}: " + ", ".join(speedups))
    lines.extend(plan.idle_note(r) for r in plan.dropped)
    lines.append(f"strategy: {plan.strategy}")
    return "\n".join(lines)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def _world(profile: Mapping) -> int:
    """W, after checking the profile has the shape the model reads."""
    missing = [key for key in _REQUIRED if key not in profile]
    if missing:
        raise ConfigError(f"profile lacks {', '.join(missing)}")
    if profile["version"] != 2:
        raise ConfigError(f"profile version {profile['version']!r} is not supported (expected 2)")
    world = len(profile["devices"])
    if world == 0:
        raise ConfigError("profile lists no devices")
    _per_rank("profile rest_seconds", profile["rest_seconds"], world)
    names = [layer["name"] for layer in profile["layers"]]
    if len(set(names)) != len(names):
        raise ConfigError(f"profile layer names {names} are not unique")
    for layer in profile["layers"]:
        _per_rank(f"profile layer {layer['name']!r}: a", layer["a"], world)
        _per_rank(f"profile layer {layer['name']!r}: b", layer["b"], world)
    return world


def _per_rank(what: str, values: Sequence[float], world: int) -> None:
    if len(values) != world:
        raise ConfigError(f"{what} has {len(values)} entries, expected {world} (one per device)")


def _subset(ranks: Sequence[int] | None, world: int) -> tuple[int, ...]:
    if ranks is None:
        return tuple(range(world))
    used = tuple(sorted(set(ranks)))
    if not used or used[0] < 0 or used[-1] >= world:
        raise ConfigError(f"ranks {list(ranks)} must be a non-empty subset of 0..{world - 1}")
    return used


def _checked_counts(
    layer: Mapping, counts: Mapping[str, Sequence[int]], used: tuple[int, ...], world: int
) -> tuple[int, ...]:
    name = layer["name"]
    if name not in counts:
        raise ConfigError(f"no kernel counts for layer {name!r}")
    given = tuple(int(c) for c in counts[name])
    if len(given) != world or min(given) < 0 or sum(given) != layer["kernels"]:
        raise ConfigError(
            f"kernel counts {list(given)} for layer {name!r} must be {world} non-negative integers"
            f" summing to {layer['kernels']}"
        )
    if any(given[r] for r in range(world) if r not in used):
        raise ConfigError(f"kernel counts {list(given)} for layer {name!r} give kernels to ranks outside {list(used)}")
    return given


def _greedy_counts(profile: Mapping, used: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """``choose_counts`` over the ranks in ``used`` for every layer, as counts for all ranks."""
    plan = {}
    excess = _rest_excess(profile, used)
    for i, layer in enumerate(profile["layers"]):
        extra = excess if i == len(profile["layers"]) - 1 else [0.0] * len(excess)
        part = choose_counts(layer["kernels"], [layer["a"][r] + extra[r] for r in used],
                             [layer["b"][r] for r in used])
        full = [0] * len(profile["devices"])
        for r, count in zip(used, part):
            full[r] = count
        plan[layer["name"]] = tuple(full)
    return plan


def _layer_plan(profile: Mapping, layer: Mapping, counts: tuple[int, ...], used: tuple[int, ...],
                extra: Sequence[float] | None = None) -> LayerPlan:
    conv = [layer["a"][r] + layer["b"][r] * max(counts[r], 1) if r in used else 0.0 for r in range(len(counts))]
    compute = [conv[r] + (extra[r] if extra and r in used else 0.0) for r in range(len(counts))]
    s = max(used, key=lambda r: compute[r])
    wait = tuple(compute[s] - compute[r] if r in used else 0.0 for r in range(len(counts)))
    comm = _comm(profile, layer, max(counts), len(used), weight_grad=conv[s] / 3)
    return LayerPlan(layer["name"], counts, tuple(compute), wait, comm, compute[s] + comm)


def _comm(profile: Mapping, layer: Mapping, largest: int, m: int, *, weight_grad: float) -> float:
    """The layer's communication on the critical path: the all-gather, and the
    input-gradient all-reduce beyond the ``weight_grad`` seconds it overlaps."""
    if m == 1:
        return 0.0
    seconds = _transfer(profile, "all_gather", m * largest * layer["gather_bytes_per_kernel"])
    if layer["input_grad_bytes"]:
        seconds += max(_transfer(profile, "all_reduce", layer["input_grad_bytes"]) - weight_grad, 0.0)
    if layer.get("input_grad_scatter_bytes"):
        seconds += _transfer(profile, "reduce_scatter", layer["input_grad_scatter_bytes"])
    return seconds


def _transfer(profile: Mapping, kind: str, nbytes: float) -> float:
    links = profile.get("links", {})
    link = links.get(kind, links.get("all_gather") if kind == "reduce_scatter" else None)  # same bytes moved
    if link is None:
        raise ConfigError(f"profile has no {kind!r} link, which more than one device needs")
    return link["latency"] + nbytes / link["bandwidth"]


def _single(profile: Mapping, rank: int) -> float:
    layers = sum(layer["a"][rank] + layer["b"][rank] * layer["kernels"] for layer in profile["layers"])
    return layers + profile["rest_seconds"][rank] + _update(profile, rank, profile["param_bytes"]
                                                            - profile["replicated_param_bytes"])


def _rest(profile: Mapping, used: tuple[int, ...]) -> float:
    return min(profile["rest_seconds"][r] for r in used)


def _rest_excess(profile: Mapping, used: tuple[int, ...]) -> list[float]:
    """Per rank, how much longer its replicated part takes than the fastest used rank's (0 if unused)."""
    base = _rest(profile, used)
    return [profile["rest_seconds"][r] - base if r in used else 0.0 for r in range(len(profile["devices"]))]


def _sync(profile: Mapping, used: tuple[int, ...]) -> float:
    return _transfer(profile, "broadcast", profile["replicated_param_bytes"]) if len(used) > 1 else 0.0


from . import perlayer  # noqa: E402  (the per-layer planner builds on the cost model above)
