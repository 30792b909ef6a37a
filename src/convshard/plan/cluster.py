"""A cluster described in a TOML file: hosts, their devices, memory and links, read into a profile.

``convshard plan --cluster FILE`` plans for devices and links convshard has
never run on. Each device names a profile that ``convshard profile
--profile PATH`` wrote on that kind of device (``device`` picks one of the
devices it measured), optionally scaled by a ``speed`` factor; ``load``
builds from them the profile the cost model reads (``convshard.profile.schema``),
with the cluster's topology, under which ``ring.ring_links`` prices every
collective, and each device's memory, which the search keeps every plan within::

    batch_size = 64                     # default: the first device's profile's batch
    [links]                             # defaults per kind of link
    within_host   = { bandwidth = "4 GB/s", latency = "75 us" }
    between_hosts = { profile = "link.json" }   # as a profile of two hosts measured it

    [[hosts]]
    name = "a"
    between = { bandwidth = "100 Mbit/s" }  # this host's link to the switch (default: links.between_hosts)
    devices = [
      { name = "cpu", profile = "cpu.json", device = "cpu@0", count = 2, memory = "8 GiB" },
      { name = "old", profile = "cpu.json", device = "cpu@0", speed = 0.5 },
    ]

Device ``i`` of host h is named "h/name" ("h/name.i" when ``count`` > 1).
Numbers take units: bandwidth in bit/s, kbit/s, Mbit/s, Gbit/s (also tc's
kbit, mbit, gbit), B/s, kB/s, MB/s, GB/s, or bytes per second; latency in
s, ms, us, ns, or seconds; memory in B, KB, MB, GB, TB, KiB, MiB, GiB,
TiB, or bytes. Relative profile paths are read from the cluster file's folder.

A link may name a profile of two devices (``profile = PATH``) under or
instead of its bandwidth and latency: for a link between hosts, one device
on each of two hosts (``convshard train --profile PATH`` under torchrun
measures one); within a host, two devices on it (``convshard profile``).
Its all-gather took t(n) = L + n / BW, which a ring of two hops prices
alpha + n / (2 beta) (``ring.ring_links``): beta = BW / 2, and the hop's
latency L is the link's within a host, or half of it on each host's side.

From a device's profile, measured at batch B_p, at the cluster's batch B
and speed factor s: the fit a + b k and the replicated rest scale by
(B / B_p) / s (a group's time grows with its rows), the optimizer's
seconds per byte by 1 / s, and a group in batch mode takes T / n per row
(its measured batch-mode time T over n rows; a profile of one device
measured none: (a + b K) / B_p). Activation bytes scale by B / B_p.
Memory defaults to what the profile recorded for the device; a device
with neither is unbounded (2^63 bytes) beside devices that have it.
Any bad key or value is a ``ConfigError`` of one line naming it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path

import tomllib

from .. import profile as profiles
from ..errors import ConfigError
from . import ring
from .memory import DEFAULT_OPTIMIZER, optimizer_of

UNBOUNDED = float(2 ** 63)  # the memory of a device that records none, beside devices that do
DEFAULT_LINKS = {  # per kind of link, when the file gives none
    # shared memory between the processes of one host: a meeting took 69-81 us on the 2-core test machine
    "within_host": {"bandwidth": 4e9, "latency": 75e-6},
    "between_hosts": {"bandwidth": 1.25e8, "latency": 100e-6},  # 1 Gbit/s Ethernet
}
BANDWIDTH = {"bit/s": 1 / 8, "kbit/s": 1e3 / 8, "Mbit/s": 1e6 / 8, "Gbit/s": 1e9 / 8, "kbit": 1e3 / 8,
             "mbit": 1e6 / 8, "gbit": 1e9 / 8, "B/s": 1, "kB/s": 1e3, "MB/s": 1e6, "GB/s": 1e9}
LATENCY = {"s": 1, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}
MEMORY = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KiB": 2 ** 10, "MiB": 2 ** 20, "GiB": 2 ** 30,
          "TiB": 2 ** 40}
KEYS = {"": {"batch_size", "links", "hosts"}, "links": {"within_host", "between_hosts"},
        "link": {"bandwidth", "latency", "profile"}, "host": {"name", "within", "between", "devices"},
        "device": {"name", "profile", "device", "speed", "memory", "count"}}


class _Reader:
    """Reads one cluster file; every error names the file and the key."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, where: str, problem: str) -> ConfigError:
        return ConfigError(f"cluster {self.path}: {where} {problem}")

    def table(self, value: object, where: str, kind: str) -> Mapping:
        if not isinstance(value, dict):
            raise self.fail(where or "the file", f"is {_kind(value)}, expected a table")
        unknown = sorted(set(value) - KEYS[kind])
        if unknown:
            dot = f"{where}." if where else ""
            raise self.fail(f"{dot}{unknown[0]}", f"is not a key here (expected one of {', '.join(sorted(KEYS[kind]))})")
        return value

    def number(self, value: object, where: str, units: Mapping[str, float], *, zero: bool = False) -> float:
        """A positive number (or zero, with ``zero``), or a string "<number> <unit>" with a unit of ``units``."""
        if isinstance(value, str):
            match = re.fullmatch(r"\s*([0-9.]+(?:[eE][+-]?\d+)?)\s*([A-Za-z/]+)\s*", value)
            if not units:
                raise self.fail(where, f"is {value!r}, expected a number")
            if not match or match.group(2) not in units:
                raise self.fail(where, f"is {value!r}, expected a number or '<number> <unit>' with a unit of "
                                       f"{', '.join(units)}")
            value = float(match.group(1)) * units[match.group(2)]
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                or value < 0 or (value == 0 and not zero)):
            raise self.fail(where, f"is {value!r}, expected a finite number {'>= 0' if zero else 'above 0'}")
        return float(value)

    def link(self, value: object, where: str, default: Mapping, *, between: bool) -> dict:
        """A link between hosts (``between``: one host's side of it) or within a host."""
        given = self.table(value, where, "link")
        if "profile" in given:
            default = self.measured_link(given["profile"], f"{where}.profile", between=between)
        return {"bandwidth": self.number(given["bandwidth"], f"{where}.bandwidth", BANDWIDTH)
                if "bandwidth" in given else default["bandwidth"],
                "latency": self.number(given["latency"], f"{where}.latency", LATENCY, zero=True)
                if "latency" in given else default["latency"],
                **({"reduce_scatter": default["reduce_scatter"]} if "reduce_scatter" in default else {})}


    def measured_link(self, value: object, where: str, *, between: bool) -> dict:
        """The link a profile of two devices measured (module docstring): on two
        hosts (``between``) one host's side of it, else on one host the link within."""
        hosts = 2 if between else 1
        wanted = "one device on each of two hosts" if between else "two devices on one host"
        if not isinstance(value, str):
            raise self.fail(where, f"is {_kind(value)}, expected the path of a profile of {wanted}")
        if not (self.path.parent / value).is_file():
            raise self.fail(where, f"{value!r}: no such file ({(self.path.parent / value).resolve()}); write one "
                                   f"with convshard profile --profile PATH on {wanted}")
        measured = profiles.read(self.path.parent / value)
        if measured is None or len(measured["devices"]) != 2 or "all_gather" not in measured["links"]:
            raise self.fail(where, f"{value!r} is no profile of {wanted}")
        link, links = measured["links"]["all_gather"], measured["links"]
        ratio = links["reduce_scatter"]["bandwidth"] / link["bandwidth"] if "reduce_scatter" in links else 1.0
        return {"bandwidth": link["bandwidth"] / 2, "latency": link["latency"] / hosts, "reduce_scatter": ratio}


def load(path: str | Path, *, batch_size: int | None = None, optimizer: tuple[str, float] | None = None) -> dict:
    """The profile of the cluster described in ``path`` (module docstring),
    checked against the profile schema, with ``topology`` and ``device_memory``;
    ``batch_size`` replaces the file's. ``optimizer``, (name, momentum), is
    the job's: every device's profile must have measured its step."""
    path = Path(path)
    reader = _Reader(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read cluster {path}: {exc.strerror or exc}") from None
    try:
        top = reader.table(tomllib.loads(text), "", "")
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"cluster {path}: not TOML: {exc}") from None
    links = reader.table(top.get("links", {}), "links", "links")
    defaults = {kind: reader.link(links[kind], f"links.{kind}", DEFAULT_LINKS[kind], between=kind == "between_hosts")
                if kind in links else DEFAULT_LINKS[kind] for kind in DEFAULT_LINKS}
    hosts = top.get("hosts")
    if not isinstance(hosts, list) or not hosts:
        raise reader.fail("hosts", "is missing or empty, expected [[hosts]] tables, each with devices")
    devices, names = [], []  # devices: (name, host index, profile, its device index, speed, memory or None)
    within, between = [], []
    loaded: dict[Path, dict] = {}
    for h, host in enumerate(hosts):
        where = f"hosts[{h}]"
        host = reader.table(host, where, "host")
        name = host.get("name", f"host{h}")
        if not isinstance(name, str) or not name or name in names:
            raise reader.fail(f"{where}.name", f"is {name!r}, expected a name no other host has")
        names.append(name)
        within.append(reader.link(host.get("within", {}), f"{where}.within", defaults["within_host"], between=False))
        between.append(reader.link(host.get("between", {}), f"{where}.between", defaults["between_hosts"],
                                   between=True))
        listed = host.get("devices")
        if not isinstance(listed, list) or not listed:
            raise reader.fail(f"{where}.devices", "is missing or empty, expected a list of devices")
        for d, device in enumerate(listed):
            devices.extend(_device(reader, device, f"{where}.devices[{d}]", name, h, loaded))
    batch = batch_size or top.get("batch_size", devices[0][2]["batch_size"])
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise reader.fail("batch_size", f"is {batch!r}, expected a positive integer")
    topology = {"hosts": [d[1] for d in devices], "names": names, "within": within, "between": between}
    built = _profile(devices, batch, topology)
    if optimizer is not None and optimizer_of(built) != (optimizer[0], float(optimizer[1])):
        measured = optimizer_of(built)
        raise reader.fail("hosts", f"its devices' profiles measured optimizer {measured[0]} (momentum "
                                   f"{measured[1]:g}), not {optimizer[0]} (momentum {optimizer[1]:g}): profile them "
                                   f"with --optimizer {optimizer[0]} --momentum {optimizer[1]:g}")
    return profiles.check(built, f"cluster {path}")


def _device(reader: _Reader, value: object, where: str, host: str, h: int,
            loaded: dict[Path, dict]) -> list[tuple]:
    """The devices one entry describes (``count`` alike)."""
    given = reader.table(value, where, "device")
    if "profile" not in given or not isinstance(given["profile"], str):
        raise reader.fail(f"{where}.profile", "is missing, expected the path of a profile (convshard profile "
                                              "--profile PATH)")
    path = (reader.path.parent / given["profile"]).resolve()
    if path not in loaded:
        if not path.is_file():
            raise reader.fail(f"{where}.profile", f"{given['profile']!r}: no such file ({path}); write one with "
                                                  f"convshard profile --profile PATH")
        found = profiles.read(path)
        if found is None:
            raise reader.fail(f"{where}.profile", f"{given['profile']!r}: no profile of version "
                                                  f"{profiles.VERSION} there")
        loaded[path] = found
    measured = loaded[path]
    listed = measured["devices"]
    if "device" in given:
        if given["device"] not in listed:
            raise reader.fail(f"{where}.device", f"is {given['device']!r}, not one of the profile's devices "
                                                 f"({', '.join(listed)})")
        index = listed.index(given["device"])
    elif len(listed) == 1:
        index = 0
    else:
        raise reader.fail(f"{where}.device", f"is missing: the profile measured {', '.join(listed)}; name one")
    speed = reader.number(given["speed"], f"{where}.speed", {}) if "speed" in given else 1.0
    recorded = measured.get("device_memory")
    memory = (reader.number(given["memory"], f"{where}.memory", MEMORY) if "memory" in given else
              recorded[index] if recorded else None)
    count = given.get("count", 1)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise reader.fail(f"{where}.count", f"is {count!r}, expected a positive integer")
    name = given.get("name", listed[index])
    if not isinstance(name, str) or not name:
        raise reader.fail(f"{where}.name", f"is {name!r}, expected a non-empty string")
    first_path, first = next(iter(loaded.items()))
    for field, default in (("model", None), ("input_shape", None), ("precision", "32"),
                           ("memory_format", "contiguous"), ("optimizer", DEFAULT_OPTIMIZER[0]),
                           ("momentum", DEFAULT_OPTIMIZER[1])):
        theirs, ours = measured["key"].get(field, default), first["key"].get(field, default)
        if theirs != ours:
            raise reader.fail(f"{where}.profile", f"{given['profile']!r} measured another {field.replace('_', ' ')} "
                                                  f"({_measured(field, theirs, measured)}) than the first device's "
                                                  f"{first_path.name} ({_measured(field, ours, first)})")
    labels = [f"{host}/{name}"] if count == 1 else [f"{host}/{name}.{i}" for i in range(count)]
    return [(label, h, measured, index, speed, memory) for label in labels]


def _measured(field: str, value: object, measured: dict) -> str:
    """A profile's ``field`` as a mismatch names it: by what the profile
    measured (model, input, devices), since a model's key is only a hash of it."""
    return profiles.describe(measured) if field == "model" else f"{value}: {profiles.describe(measured)}"


def _profile(devices: list[tuple], batch: int, topology: dict) -> dict:
    """The profile the cost model reads for ``devices`` at ``batch`` (module docstring)."""
    base = devices[0][2]
    ratio = batch / base["batch_size"]
    world = len(devices)
    rows = -(-batch // world)
    layers = []
    for g, layer in enumerate(base["layers"]):
        out = {**layer, "batch_rows": rows,
               "outputs": [{**v, "bytes": round(v["bytes"] * ratio)} for v in layer["outputs"]],
               "inputs": [{**v, "bytes": round(v["bytes"] * ratio)} for v in layer["inputs"]],
               "a": [], "b": []}
        for key in ("gather_bytes_per_kernel", "input_grad_bytes", "input_grad_scatter_bytes"):
            out[key] = round(layer[key] * ratio)
        per_row = []
        for _, _, measured, i, speed, _ in devices:
            theirs = measured["layers"][g]
            scale = batch / measured["batch_size"] / speed
            out["a"].append(theirs["a"][i] * scale)
            out["b"].append(theirs["b"][i] * scale)
            per_row.append((theirs["batch_seconds"][i] / theirs["batch_rows"] if "batch_seconds" in theirs else
                            (theirs["a"][i] + theirs["b"][i] * theirs["kernels"]) / measured["batch_size"]) / speed)
        out.pop("batch_seconds", None)
        if world > 1:
            out["batch_seconds"] = [t * rows for t in per_row]
        layers.append(out)
    labels = [d[0] for d in devices]
    memory = [d[5] for d in devices]
    built = {
        "version": profiles.VERSION,
        "key": {**base["key"], "devices": labels, "threads": [m["key"]["threads"][i] for _, _, m, i, _, _ in devices],
                "hosts": [topology["names"][h] for _, h, *_ in devices], "batch_size": batch},
        "batch_size": batch, "devices": labels, "layers": layers,
        "rest_seconds": [m["rest_seconds"][i] * batch / m["batch_size"] / s for _, _, m, i, s, _ in devices],
        "update_seconds_per_byte": [m["update_seconds_per_byte"][i] / s for _, _, m, i, s, _ in devices],
        "param_bytes": base["param_bytes"], "replicated_param_bytes": base["replicated_param_bytes"],
        "links": ring.ring_links(topology, range(world)), "topology": topology,
    }
    for key in ("batchnorm", "precision", "memory_format", "optimizer", "momentum"):  # alike in every profile
        if key in base:
            built[key] = base[key]
    if any(m is not None for m in memory):
        built["device_memory"] = [UNBOUNDED if m is None else m for m in memory]
        for key, alone in (("runtime_bytes", 0), ("activation_scale", 1.0)):  # as each device's profile measured
            built[key] = [m.get(key, [alone] * len(m["devices"]))[i] for _, _, m, i, _, _ in devices]
    return built


def describe(profile: Mapping) -> str:
    """The cluster a profile of ``load`` describes: hosts, devices, links, batch."""
    topology = profile["topology"]
    lines = [(f"cluster: {len(profile['devices'])} device(s) on {len(topology['names'])} host(s), "
              f"batch {profile['batch_size']}")]
    for h, name in enumerate(topology["names"]):
        listed = [d for d, at in zip(profile["devices"], topology["hosts"]) if at == h]
        lines.append(f"  {name}: {', '.join(listed)}; within {_link(topology['within'][h])}, "
                     f"to the switch {_link(topology['between'][h])}")
    return "\n".join(lines)


def _link(link: Mapping) -> str:
    return f"{8 * link['bandwidth'] / 1e9:.3g} Gbit/s, {1e6 * link['latency']:.0f} us"


def _kind(value: object) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array"}.get(
        type(value), type(value).__name__)
