"""The profile's schema: TypedDicts field by field, and ``check``, which validates a profile against them.

Types, finite non-negative numbers, one entry per device in every per-device
list, unique layer names, readers that exist: a profile that breaks one gets a
one-line ``ConfigError`` naming the field.
"""


from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import Annotated, TypedDict, get_args, get_origin, get_type_hints, is_typeddict

from ..errors import ConfigError

log = logging.getLogger(__name__)

VERSION = 2

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


class _RequiredKey(TypedDict):
    """The fields of ``ProfileKey`` that every version-2 profile has."""

    devices: Annotated[list[str], _PER_DEVICE]  # each rank's device spec, e.g. "cpu@0", "cuda:1"
    threads: Annotated[list[PositiveSize], _PER_DEVICE]  # each rank's torch intra-op threads
    hosts: Annotated[list[str], _PER_DEVICE]  # each rank's host (``devices.host_name``)
    model: str  # ``model_signature``: hash of the model's class, parameter shapes and dtypes
    input_shape: list[PositiveSize]  # one sample's (C, H, W)
    batch_size: PositiveSize  # rows per step, over all ranks
    torch: str  # torch.__version__


class ProfileKey(_RequiredKey, total=False):
    """What a profile was measured on (``profile_key``); ``load`` reuses a cache only for an equal key."""

    precision: str  # the compute precision it was timed in: 32 | bf16 | fp16
    memory_format: str  # as asked: contiguous | channels_last | auto (timed in the faster)
    optimizer: str  # the optimizer whose step was timed and measured: sgd | adam | adamw
    momentum: float  # SGD's momentum (0: no momentum buffer); the others ignore it


class Link(TypedDict):
    """One collective over all ranks: t(n bytes) = latency + n / bandwidth."""

    latency: NonNegative  # seconds at zero bytes
    bandwidth: Annotated[float, _Bound(0, strict=True)]  # bytes per second


class HostLink(Link, total=False):
    """A cluster host's link (``convshard.plan.cluster``)."""

    reduce_scatter: Annotated[float, _Bound(0, strict=True)]  # reduce-scatter's rate over all-gather's, measured; 1


class Topology(TypedDict):
    """Where a cluster's devices sit (``convshard.plan.cluster``): collectives
    are priced on it (``convshard.plan.ring.ring_links``)."""

    hosts: Annotated[list[Size], _PER_DEVICE]  # each device's host, an index into the lists below
    names: list[str]  # each host's name
    within: list[HostLink]  # each host's link between its own devices
    between: list[HostLink]  # each host's link to the switch that joins the hosts


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
    """One channel group (``convshard.profile.segments``): its convs, split alike, and the ops on their shards."""

    batch_seconds: PerDevice  # batch mode, all K kernels at ``batch_rows`` rows; only when W > 1


class _RequiredProfile(TypedDict):
    """The fields of ``Profile`` that every version-2 profile has."""

    version: int  # VERSION; a cached profile of another version is measured anew
    key: ProfileKey  # what it was measured on
    batch_size: PositiveSize  # B, rows per step over all ranks
    devices: list[str]  # W device specs, rank order (key["devices"]); non-empty
    layers: list[Layer]  # the channel groups in model order, names unique
    rest_seconds: PerDevice  # the replicated part (the model without the groups) and its optimizer step
    update_seconds_per_byte: PerDevice  # the optimizer's step per byte of the groups' parameters
    param_bytes: Size  # all the model's parameters
    replicated_param_bytes: Size  # those split with no group (<= param_bytes)
    # by collective (all_gather, all_reduce, ddp_all_reduce, reduce_scatter, broadcast, all_to_all); {} for W = 1
    links: dict[str, Link]


class Profile(_RequiredProfile, total=False):
    """What ``measure`` returns, ``save`` writes and ``load`` reads."""

    batchnorm: bool  # whether the model holds a BatchNorm anywhere; absent from profiles cached before it
    traced: bool  # whether fx traced the model: batch mode needs it (absent: true)
    precision: str  # compute precision of every timing, and of the activation bytes (absent: 32)
    memory_format: str  # contiguous | channels_last: the format every timing ran in (absent: contiguous)
    optimizer: str  # sgd | adam | adamw: whose step every timing ran and whose state memory counts (absent: sgd)
    momentum: float  # SGD's momentum, 0 keeping no state (absent: 0.9)
    format_seconds: dict[str, PerDevice]  # the whole model's step in each memory format (memory_format auto)
    device_memory: PerDevice  # bytes each device can hold (``convshard.plan.memory``); absent: unbounded
    runtime_bytes: PerDevice  # bytes each worker holds before a step (a CPU's resident set; 0 on a GPU)
    activation_scale: PerDevice  # sigma: a measured step's bytes over the memory model's count (>= 1)
    topology: Topology  # a cluster's hosts and links; absent: ``links`` as measured, for any subset
    decode_seconds: NonNegative  # seconds to read one training image (decode and resize), for data that decodes; absent: 0


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
        topology = profile.get("topology")
        if topology is not None:
            count = len(topology["names"])
            for name in ("within", "between"):
                if len(topology[name]) != count:
                    raise _Invalid(f"topology.{name}", f"has {len(topology[name])} links, expected {count} "
                                   f"(one per host)")
            for r, h in enumerate(topology["hosts"]):
                if h >= count:
                    raise _Invalid(f"topology.hosts[{r}]", f"is {h}, expected a host index below {count}")
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
