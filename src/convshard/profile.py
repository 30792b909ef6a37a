"""Profiling: how fast each device runs each conv layer, and how fast the links are.

``measure`` is a collective: every rank of the job calls it at once, on its
own device, so that workers sharing a core are measured while they share it.
For every channel group l (its convs with the ops that run on their shard,
as ``shard_model`` runs them; ``convshard.segments``) and rank r it times
forward+backward at the run's batch size B for a few kernel counts k
around K_l / W, takes the median of ``repeats`` runs after a warm-up, and fits

    t_{r,l}(k) = a_{r,l} + b_{r,l} * k       (least squares, a >= 0, b > 0).

A second pass times each rank once more at the count the split of these
fits gives it, all ranks at once, and sets b_{r,l} = (t - a_{r,l}) / k: the
cost at the working point, contention between workers included.

``rest_seconds[r]`` is the replicated part: forward+backward of the model
with every segment replaced by a constant of its output's shape, plus the
optimizer step of its parameters; ``update_seconds_per_byte[r]`` the
optimizer step (SGD with momentum) per byte of the groups' parameters.
``batch_seconds[r]`` times each group in batch mode: all kernels,
``batch_rows`` = ceil(B / W) rows. Each collective the plans use
(all-gather, all-reduce, reduce-scatter, all-to-all, broadcast; and the
backend's own all-reduce, as DDP runs it) is timed at a small and a large size, giving
t(n bytes) = latency + n / bandwidth. ``batchnorm`` says whether the model
holds a BatchNorm anywhere.

The result is a ``Profile``, the dict that the planner reads: the
TypedDicts below are its schema, field by field, and ``check`` validates a
profile against them (types, finite non-negative numbers, one entry per
device in every per-device list, unique layer names, readers that exist),
raising a one-line ``ConfigError`` that names the field. ``measure`` checks
what it returns; ``load`` checks what it reads from the JSON cache, and
returns it only when its ``key`` (what it was measured on) matches the job's.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import socket
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, TypedDict, get_args, get_origin, get_type_hints, is_typeddict

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import atomic, comm
from .errors import ConfigError
from .splits import choose_counts
from .segments import Cut, Group, cut

log = logging.getLogger(__name__)

VERSION = 2
LINK_SIZES = (1 << 10, 1 << 24)  # bytes: one for the latency, one for the bandwidth
MIN_SECONDS = 0.05  # a layer's timed runs grow until one takes this long


# The schema. Byte counts are per training step at ``batch_size`` rows (B),
# in the model's parameter dtype; seconds are forward+backward unless said
# otherwise. ``check`` reads the annotations: a ``_Bound`` limits a number
# (every float must also be finite), ``_PER_DEVICE`` a list's length.

@dataclass(frozen=True)
class _Bound:
    """A number's lower limit: value >= low, or value > low when ``strict``."""

    low: float
    strict: bool = False

    def holds(self, value: float) -> bool:
        return value > self.low if self.strict else value >= self.low

    def __str__(self) -> str:
        return f"{'>' if self.strict else '>='} {self.low:g}"


_PER_DEVICE = "one entry per device"  # a list as long as ``devices``, in its order

NonNegative = Annotated[float, _Bound(0)]
Size = Annotated[int, _Bound(0)]  # bytes, elements or a count
PositiveSize = Annotated[int, _Bound(1)]
PerDevice = Annotated[list[NonNegative], _PER_DEVICE]


class ProfileKey(TypedDict):
    """What a profile was measured on (``profile_key``); ``load`` reuses a cache only for an equal key."""

    devices: Annotated[list[str], _PER_DEVICE]  # each rank's device spec, e.g. "cpu@0", "cuda:1"
    threads: Annotated[list[PositiveSize], _PER_DEVICE]  # each rank's torch intra-op threads
    hosts: Annotated[list[str], _PER_DEVICE]  # each rank's hostname
    model: str  # ``model_signature``: hash of the model's class and parameter shapes
    input_shape: list[PositiveSize]  # one sample's (C, H, W)
    batch_size: PositiveSize  # rows per step, over all ranks
    torch: str  # torch.__version__


class Link(TypedDict):
    """One collective over all ranks: t(n bytes) = latency + n / bandwidth."""

    latency: NonNegative  # seconds at zero bytes
    bandwidth: Annotated[float, _Bound(0, strict=True)]  # bytes per second


class Output(TypedDict):
    """A value that leaves its group's channel layout (``segments.Group.outputs``):
    what a per-layer plan moves when the group and its readers are split differently."""

    elements: Size  # elements per sample, all channels
    convs: list[str]  # names of the layers whose convs read it (sorted; may be empty)
    whole: bool  # whether an op outside any group's layout reads it, needing it gathered whole
    bytes: Size  # B * elements * element size


class Input(TypedDict):
    """The replicated input of one of a group's convs (one not gathered from a channel split)."""

    bytes: Size  # B * the input's elements per sample * element size
    grad: bool  # whether it needs a gradient (False for the data)


class _RequiredLayer(TypedDict):
    """The fields of ``Layer`` that every version-2 profile has."""

    name: str  # the group's name: its first conv's module name, e.g. "features.0"
    kernels: PositiveSize  # K: out_channels of each of the group's convs, split alike
    gather_bytes_per_kernel: Size  # bytes one kernel adds to the group's forward all-gathers
    input_grad_bytes: Size  # bytes of the backward all-reduce of replicated inputs' gradients
    input_grad_scatter_bytes: Size  # bytes of input gradients reduce-scattered back to a channel split
    param_bytes: Size  # bytes of the parameters split with the group (convs, BatchNorms, depthwise convs)
    batchnorms: Size  # BatchNorm members: each a collective each way in batch mode
    outputs: list[Output]  # the values leaving the group's layout
    inputs: list[Input]  # the replicated inputs of its convs, one per such conv
    batch_rows: PositiveSize  # rows per rank at which ``batch_seconds`` was timed: ceil(B / W)
    a: PerDevice  # t(k) = a + b k: fixed seconds of the group with k kernels at B rows
    b: PerDevice  # seconds per kernel, at the working point (contention included)


class Layer(_RequiredLayer, total=False):
    """One channel group (``convshard.segments``): its convs, split alike, and the ops on their shards."""

    batch_seconds: PerDevice  # batch mode, all K kernels at ``batch_rows`` rows; only when W > 1


class _RequiredProfile(TypedDict):
    """The fields of ``Profile`` that every version-2 profile has."""

    version: int  # VERSION; a cached profile of another version is measured anew
    key: ProfileKey  # what it was measured on
    batch_size: PositiveSize  # B, rows per step over all ranks
    devices: list[str]  # W device specs, rank order (key["devices"]); non-empty
    layers: list[Layer]  # the channel groups in model order, names unique
    rest_seconds: PerDevice  # the replicated part (the model without the groups) and its optimizer step
    update_seconds_per_byte: PerDevice  # SGD-with-momentum step per byte of the groups' parameters
    param_bytes: Size  # all the model's parameters
    replicated_param_bytes: Size  # those split with no group (<= param_bytes)
    # by collective (all_gather, all_reduce, ddp_all_reduce, reduce_scatter, broadcast, all_to_all); {} for W = 1
    links: dict[str, Link]


class Profile(_RequiredProfile, total=False):
    """What ``measure`` returns, ``save`` writes and ``load`` reads."""

    batchnorm: bool  # whether the model holds a BatchNorm anywhere; absent from profiles cached before it


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn: Callable[[], object], device: torch.device, *, repeats: int, group: comm.Group) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs after one warm-up.
    Ranks start each run together, so co-located workers contend as in training."""
    times = []
    for i in range(repeats + 1):
        if comm.world_size(group) > 1:
            dist.barrier(group=group)
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _fit_line(ks: Sequence[int], ts: Sequence[float]) -> tuple[float, float]:
    """Least-squares (a, b) of t = a + b k, with a >= 0 and b > 0."""
    mk, mt = statistics.fmean(ks), statistics.fmean(ts)
    var = sum((k - mk) ** 2 for k in ks)
    b = sum((k - mk) * (t - mt) for k, t in zip(ks, ts)) / var if var else mt / max(mk, 1)
    b = max(b, 1e-9)
    return max(mt - b * mk, 0.0), b


def _slowest_agrees(flag: bool, group: comm.Group) -> bool:
    """Whether ``flag`` holds on every rank (a collective: all ranks decide alike)."""
    if comm.world_size(group) == 1:
        return flag
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return bool(t.item())


def _fit_layer(time_k: Callable[[int], float], total: int, world: int, group: comm.Group) -> tuple[float, float]:
    """(a, b) of t(k) = a + b k for one layer of ``total`` kernels over ``world`` ranks.

    Starts at an eighth of an equal share and doubles k until one run takes
    ``MIN_SECONDS`` on every rank (so that noise is small against it) or k reaches the
    share; fits the last three sizes. Big layers stop after two sizes,
    which keeps profiling to seconds; the fit extrapolates.
    """
    share = max(2, -(-total // max(world, 1)))
    ks, ts = [], []
    k = max(1, share // 8)
    while True:
        ks.append(k)
        ts.append(time_k(k))
        if len(ks) >= 2 and (_slowest_agrees(ts[-1] >= MIN_SECONDS, group) or k >= share):
            break
        k = min(2 * k, share) if k < share else k + 1
    return _fit_line(ks[-3:], ts[-3:])


def _calibrate(fits: list[tuple[float, float]], groups: list[Group], batch: int,
               device: torch.device, group: comm.Group) -> None:
    """Re-measure every group where it will run: each rank at the kernel count
    the greedy split of the first fits gives it, all ranks at once (workers on
    a shared core contend as in training), once after a warm-up. b becomes
    (t - a) / k; ``fits`` (this rank's, per group) is updated in place."""
    everyone = comm.gather_objects(fits, group=group)
    me = comm.rank(group)
    for i, layer in enumerate(groups):
        a = [r[i][0] for r in everyone]
        counts = choose_counts(layer.kernels, a, [r[i][1] for r in everyone])
        k = counts[me]
        seconds = _time_group(layer, max(k, 1), batch, device, 1, group)
        if k >= 2 and seconds > a[me]:
            fits[i] = (a[me], (seconds - a[me]) / k)


def _time_group(layer: Group, k: int, batch: int, device: torch.device, repeats: int, group: comm.Group) -> float:
    """Forward+backward seconds of the group's segments with k kernels each."""
    runs = []
    for segment in layer.segments:
        run = segment.build(k, device)
        x = torch.randn(batch, *segment.input_shape, device=device, requires_grad=segment.input_grad)
        runs.append((run, x))

    def once() -> None:
        for run, x in runs:
            y = run(x)
            y.backward(torch.ones_like(y))
            for p in run.parameters():
                p.grad = None
            x.grad = None

    return _median_seconds(once, device, repeats=repeats, group=group)


def _update_seconds_per_byte(elements: int, device: torch.device, repeats: int, group: comm.Group) -> float:
    """Seconds per parameter byte of an SGD-with-momentum step (the default
    optimizer), over one tensor as large as the groups' parameters."""
    flat = torch.zeros(max(elements, 1), device=device, requires_grad=True)
    flat.grad = torch.zeros_like(flat)
    optimizer = torch.optim.SGD([flat], lr=0.0, momentum=0.9)
    optimizer.step()  # creates the momentum buffer
    return _median_seconds(optimizer.step, device, repeats=repeats, group=group) / (flat.numel() * flat.element_size())


def _rest_seconds(model_cut: Cut, input_shape: Sequence[int], classes: int, batch: int, device: torch.device,
                  repeats: int, group: comm.Group) -> float:
    rest = model_cut.rest(batch, device)
    params = [p for p in rest.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.0, momentum=0.9) if params else None
    x = torch.randn(batch, *input_shape, device=device)
    y = torch.randint(classes, (batch,), device=device)

    def run() -> None:
        loss = F.cross_entropy(rest(x), y)
        if loss.requires_grad:
            loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return _median_seconds(run, device, repeats=repeats, group=group)


def _links(device: torch.device, group: comm.Group) -> dict[str, dict[str, float]]:
    """Latency (s) and bandwidth (bytes/s) of each collective, over the group."""
    world = comm.world_size(group)
    ops = {
        "all_gather": lambda n: comm.all_gather_uneven(
            torch.zeros(n // 4 // world, device=device), [n // 4 // world] * world, dim=0, group=group),
        "all_reduce": lambda n: comm.all_reduce_sum_(torch.zeros(n // 4, device=device), group=group),
        # DDP's reducer calls the backend itself (gloo over TCP even on one host)
        "ddp_all_reduce": lambda n: dist.all_reduce(torch.zeros(n // 4, device=device), group=group),
        "reduce_scatter": lambda n: comm.reduce_scatter_uneven(
            torch.zeros(n // 4, device=device), [n // 4 // world] * world, dim=0, group=group),
        "broadcast": lambda n: comm.broadcast_([torch.zeros(n // 4, device=device)], group=group),
        "all_to_all": lambda n: comm.all_to_all_uneven(  # n bytes sent by each rank, n / world to each
            torch.zeros(n // 4 // world * world, device=device), [[n // 4 // world] * world] * world, group=group),
    }
    links = {}
    for name, op in ops.items():
        small, large = (_median_seconds(lambda n=n: op(n), device, repeats=5, group=group) for n in LINK_SIZES)
        bandwidth = (LINK_SIZES[1] - LINK_SIZES[0]) / max(large - small, 1e-9)
        links[name] = {"latency": max(small - LINK_SIZES[0] / bandwidth, 0.0), "bandwidth": bandwidth}
    return comm.gather_objects(links, group=group)[0]  # every rank plans from the same figures: rank 0's


def hostname() -> str:
    return socket.gethostname()


def model_signature(model: nn.Module) -> str:
    """A short hash of the model's class and parameter shapes."""
    text = json.dumps([type(model).__name__, [(k, list(v.shape)) for k, v in model.state_dict().items()]])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def profile_key(*, devices: Sequence[str], threads: Sequence[int], hosts: Sequence[str], model: nn.Module,
                input_shape: Sequence[int], batch_size: int) -> ProfileKey:
    """What a profile was measured on; a cached profile is reused only for the same key."""
    return {"devices": list(devices), "threads": list(threads), "hosts": list(hosts),
            "model": model_signature(model), "input_shape": list(input_shape), "batch_size": batch_size,
            "torch": torch.__version__}


def job_key(model: nn.Module, *, device_spec: str, input_shape: Sequence[int], batch_size: int,
            group: comm.Group = None) -> ProfileKey:
    """``profile_key`` of the running job (a collective: every rank names its device, threads and host)."""
    everyone = comm.gather_objects((device_spec, torch.get_num_threads(), hostname()), group=group)
    return profile_key(devices=[e[0] for e in everyone], threads=[e[1] for e in everyone],
                       hosts=[e[2] for e in everyone], model=model, input_shape=input_shape, batch_size=batch_size)


def measure(model: nn.Module, *, key: ProfileKey, input_shape: Sequence[int], classes: int, batch_size: int,
            repeats: int = 2, group: comm.Group = None) -> Profile:
    """Profile this job (a collective; ``model`` unsharded, on this rank's
    device, the same on every rank; ``key`` from ``job_key``). Returns the
    same profile on every rank."""
    device = next(model.parameters()).device
    world = comm.world_size(group)
    model_cut = cut(model, input_shape)
    elem = next(model.parameters()).element_size()
    mine: dict = {"fits": [], "batch": []}
    layers = []
    rows = -(-batch_size // world)  # a batch-mode group's rows per rank, evenly split
    for layer in model_cut.groups:
        mine["fits"].append(_fit_layer(
            lambda k: _time_group(layer, k, batch_size, device, repeats, group), layer.kernels, world, group))
        layers.append({
            "name": layer.name, "kernels": layer.kernels,
            "gather_bytes_per_kernel": batch_size * layer.gather_elements_per_kernel * elem,
            "input_grad_bytes": sum(batch_size * elem * math.prod(s.input_shape)
                                    for s in layer.segments if s.input_grad and not s.input_split),
            "input_grad_scatter_bytes": sum(batch_size * elem * math.prod(s.input_shape)
                                            for s in layer.segments if s.input_split),
            "param_bytes": layer.param_elements * elem,
            "batchnorms": layer.batchnorms,
            "outputs": [{**out, "bytes": batch_size * out["elements"] * elem} for out in layer.outputs],
            "inputs": [{"bytes": batch_size * elem * math.prod(s.input_shape), "grad": s.input_grad}
                       for s in layer.segments if not s.input_split],
            "batch_rows": rows,
        })
    if world > 1:
        _calibrate(mine["fits"], model_cut.groups, batch_size, device, group)
        mine["batch"] = [_time_group(layer, layer.kernels, rows, device, repeats, group) for layer in model_cut.groups]
    mine["rest"] = _rest_seconds(model_cut, input_shape, classes, batch_size, device, repeats, group)
    mine["update"] = _update_seconds_per_byte(sum(layer.param_elements for layer in model_cut.groups), device,
                                              repeats, group)
    links = _links(device, group) if world > 1 else {}
    everyone = comm.gather_objects(mine, group=group)
    for i, layer in enumerate(layers):
        layer["a"] = [r["fits"][i][0] for r in everyone]
        layer["b"] = [r["fits"][i][1] for r in everyone]
        if world > 1:  # the group in batch mode: all kernels, ``batch_rows`` rows
            layer["batch_seconds"] = [r["batch"][i] for r in everyone]
    params = list(model.parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    sharded_bytes = sum(layer.param_elements for layer in model_cut.groups) * params[0].element_size()
    return check({
        "version": VERSION,
        "key": key,
        "batch_size": batch_size,
        "devices": key["devices"],
        "layers": layers,
        "rest_seconds": [r["rest"] for r in everyone],
        "update_seconds_per_byte": [r["update"] for r in everyone],
        "param_bytes": param_bytes,
        "replicated_param_bytes": param_bytes - sharded_bytes,
        "links": links,
        "batchnorm": any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()),
    }, "measured profile")


class _Invalid(Exception):
    """A profile field that breaks the schema: its path (empty for the whole) and what is wrong."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(where, problem)
        self.where, self.problem = where, problem


def check(profile: object, source: str) -> Profile:
    """``profile`` if it follows the schema (the TypedDicts above), else a
    ``ConfigError`` of one line naming ``source`` and the field, e.g.
    "profile p.json: layers[2].b has 1 entries, expected 2 (one per device)".
    Keys the schema does not name are allowed."""
    try:
        if not isinstance(profile, dict):
            raise _Invalid("", f"is {_describe(profile)}, expected an object")
        for name in ("version", "devices"):  # before the rest: they say how to read it
            if name not in profile:
                raise _Invalid(name, "is missing")
        if type(profile["version"]) is not int or profile["version"] != VERSION:
            raise _Invalid("version", f"is {_describe(profile['version'])}, expected {VERSION}")
        _check_value(profile["devices"], _hints(Profile)["devices"], "devices", 0)
        world = len(profile["devices"])
        if not world:
            raise _Invalid("devices", "is empty, expected at least one device")
        _check_value(profile, Profile, "", world)
        if profile["replicated_param_bytes"] > profile["param_bytes"]:
            raise _Invalid("replicated_param_bytes", f"is {profile['replicated_param_bytes']}, "
                           f"more than param_bytes {profile['param_bytes']}")
        first: dict[str, int] = {}  # layer name -> its index
        for i, layer in enumerate(profile["layers"]):
            if layer["name"] in first:
                raise _Invalid(f"layers[{i}].name", f"{layer['name']!r} repeats layers[{first[layer['name']]}].name")
            first[layer["name"]] = i
        for i, layer in enumerate(profile["layers"]):
            for j, out in enumerate(layer["outputs"]):
                for n, reader in enumerate(out["convs"]):
                    if reader not in first:
                        raise _Invalid(f"layers[{i}].outputs[{j}].convs[{n}]", f"{reader!r} names no layer")
    except _Invalid as exc:
        where = f": {exc.where}" if exc.where else ""
        raise ConfigError(f"{source}{where} {exc.problem}") from None
    return profile


def _check_value(value: object, hint: object, where: str, world: int) -> None:
    """Raise ``_Invalid`` unless ``value`` (at path ``where``) is of type ``hint``,
    within its bounds; per-device lists must have ``world`` entries."""
    metadata: tuple = ()
    if get_origin(hint) is Annotated:
        hint, *metadata = get_args(hint)
    origin, args = get_origin(hint), get_args(hint)
    if is_typeddict(hint):
        if not isinstance(value, dict):
            raise _Invalid(where, f"is {_describe(value)}, expected an object")
        for name, field_hint in _hints(hint).items():
            field = f"{where}.{name}" if where else name
            if name in value:
                _check_value(value[name], field_hint, field, world)
            elif name in hint.__required_keys__:
                raise _Invalid(field, "is missing")
    elif origin is list:
        if not isinstance(value, list):
            raise _Invalid(where, f"is {_describe(value)}, expected a list")
        if _PER_DEVICE in metadata and len(value) != world:
            raise _Invalid(where, f"has {len(value)} entries, expected {world} (one per device)")
        for i, item in enumerate(value):
            _check_value(item, args[0], f"{where}[{i}]", world)
    elif origin is dict:
        if not isinstance(value, dict):
            raise _Invalid(where, f"is {_describe(value)}, expected an object")
        for name, item in value.items():
            if not isinstance(name, str):
                raise _Invalid(where, f"has key {name!r}, expected strings")
            _check_value(item, args[1], f"{where}.{name}", world)
    elif hint is bool:
        if not isinstance(value, bool):
            raise _Invalid(where, f"is {_describe(value)}, expected true or false")
    elif hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid(where, f"is {_describe(value)}, expected an integer")
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Invalid(where, f"is {_describe(value)}, expected a number")
        if not math.isfinite(value):
            raise _Invalid(where, f"is {value}, expected a finite number")
    elif hint is str:
        if not isinstance(value, str):
            raise _Invalid(where, f"is {_describe(value)}, expected a string")
    else:
        raise TypeError(f"profile schema: no check for {hint!r} at {where}")
    for bound in metadata:
        if isinstance(bound, _Bound) and not bound.holds(value):
            raise _Invalid(where, f"is {value}, expected {bound}")


@functools.cache
def _hints(schema: type) -> dict[str, object]:
    """A TypedDict's field annotations, resolved, with their ``Annotated`` bounds."""
    return get_type_hints(schema, include_extras=True)


def _describe(value: object) -> str:
    """A value for a one-line message: its JSON type, and itself where short."""
    if value is None:
        return "null"
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)
    text = repr(value)
    return f"{kind} {text}" if len(text) <= 40 and not isinstance(value, (list, dict)) else kind


def load(path: str | os.PathLike, key: ProfileKey) -> Profile | None:
    """The profile cached at ``path`` if it was measured for ``key``, else None
    (also for another version); a cache that breaks the schema is a ``ConfigError``."""
    try:
        profile = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read profile {path}: {exc}") from None
    if not isinstance(profile, dict) or "version" not in profile:
        raise ConfigError(f"{path} is not a convshard profile (version {VERSION})")
    if profile["version"] != VERSION:
        log.info("profile: %s is of version %s, measuring anew (version %d)", path, profile["version"], VERSION)
        return None
    check(profile, f"profile {path}")
    if profile["key"] != key:
        return None
    log.info("profile: reusing %s", path)
    return profile


def save(path: str | os.PathLike, profile: Profile) -> None:
    """Write ``profile`` to ``path`` atomically (``convshard.atomic``)."""
    atomic.write_text(path, json.dumps(profile, indent=1) + "\n")


def format_profile(profile: Profile) -> str:
    """The profile as a plain-text table: per layer and device the fit
    t(k) = a + b k, per device the replicated part, then the links."""
    width = max(len("device"), *(len(d) for d in profile["devices"]))
    lines = [f"profile at batch {profile['batch_size']}: t(k kernels) = a + b*k, forward+backward"]
    for layer in profile["layers"]:
        lines.append(f"{layer['name']} ({layer['kernels']} kernels)")
        lines.append(f"  rank  {'device':<{width}}  {'a ms':>8}  {'b ms/kernel':>11}  {'all kernels ms':>14}")
        for r, device in enumerate(profile["devices"]):
            a, b = layer["a"][r], layer["b"][r]
            lines.append(f"  {r:>4}  {device:<{width}}  {1000 * a:>8.2f}  {1000 * b:>11.4f}  "
                         f"{1000 * (a + b * layer['kernels']):>14.1f}")
    lines.append("replicated part (ms): " + ", ".join(
        f"{d} {1000 * t:.1f}" for d, t in zip(profile["devices"], profile["rest_seconds"])))
    for name, link in profile["links"].items():
        lines.append(f"{name}: latency {1e6 * link['latency']:.0f} us, bandwidth {link['bandwidth'] / 1e9:.2f} GB/s")
    return "\n".join(lines)
