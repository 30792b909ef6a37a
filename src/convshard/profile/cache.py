"""The profile cache: ``read`` a cached profile, ``load`` one measured for the same key, ``save`` one atomically, print one."""


from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from .. import atomic
from ..errors import ConfigError
from ..plan.search import restrict
from .schema import VERSION, Profile, ProfileKey, check

log = logging.getLogger(__name__)

def read(path: str | os.PathLike) -> Profile | None:
    """The profile cached at ``path``, checked against the schema; None when
    there is none or it is of another version (measured anew). A file that
    is no profile, or breaks the schema, is a ``ConfigError``."""
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
    return check(profile, f"profile {path}")


PER_DEVICE_KEY = ("devices", "threads", "hosts")  # the key's fields of one entry per device


def load(path: str | os.PathLike, key: ProfileKey) -> Profile | None:
    """The profile cached at ``path`` (``read``) if it was measured for
    ``key``, or for a job of the same model on more devices, among them
    every device of ``key`` (the same spec, threads and host): then the
    profile of those devices alone (``search.restrict``, as the planner
    prices a subset), so that a job that lost a host measures nothing. Else None."""
    profile = read(path)
    if profile is None:
        return None
    if profile["key"] == key:
        log.info("profile: reusing %s", path)
        return profile
    ranks = _ranks_within(profile["key"], key)
    if ranks is None:
        return None
    log.info("profile: reusing %s for %d of its %d devices", path, len(ranks), len(profile["devices"]))
    return {**restrict(profile, ranks), "key": key}


def _ranks_within(cached: ProfileKey, key: ProfileKey) -> list[int] | None:
    """For each device of ``key``, in order, a distinct rank of ``cached``
    with the same spec, threads and host; None when ``key`` differs in any
    other field or some device has no such rank."""
    if {k: v for k, v in cached.items() if k not in PER_DEVICE_KEY} != \
            {k: v for k, v in key.items() if k not in PER_DEVICE_KEY}:
        return None
    theirs = list(zip(*(cached[k] for k in PER_DEVICE_KEY)))
    ranks: list[int] = []
    for device in zip(*(key[k] for k in PER_DEVICE_KEY)):
        free = [r for r, d in enumerate(theirs) if d == device and r not in ranks]
        if not free:
            return None
        ranks.append(free[0])
    return ranks


def save(path: str | os.PathLike, profile: Profile) -> None:
    """Write ``profile`` to ``path`` atomically (``convshard.atomic``)."""
    atomic.write_text(path, json.dumps(profile, indent=1) + "\n")


def describe(profile: Profile) -> str:
    """What ``profile`` measured, in the words a user knows it by rather than
    its key's model hash: the model's conv groups (name and kernels; the first
    two and the last when there are more than three), one input's C x H x W,
    the precision when not 32, and the devices, e.g. ``conv groups conv1 64,
    conv2 128 kernels on 3x32x32 inputs, measured on cpu@0, cpu@1``."""
    groups = [f"{layer['name']} {layer['kernels']}" for layer in profile["layers"]]
    if len(groups) > 3:
        groups = [*groups[:2], f"... {groups[-1]} ({len(groups)} groups)"]
    key = profile.get("key", {})
    shape = f" on {'x'.join(map(str, key['input_shape']))} inputs" if "input_shape" in key else ""
    precision = f" in {key['precision']}" if key.get("precision", "32") != "32" else ""
    return (f"conv groups {', '.join(groups)} kernels{shape}{precision}, "
            f"measured on {', '.join(profile['devices'])}")


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
    if "device_memory" in profile:
        lines.append("memory (GiB): " + ", ".join(
            f"{d} {m / 2 ** 30:.1f}" for d, m in zip(profile["devices"], profile["device_memory"])))
    if "runtime_bytes" in profile:
        lines.append("held by each worker (MiB) and a step's bytes over the memory model's count: " + ", ".join(
            f"{d} {r / 2 ** 20:.0f}, x{s:.2f}" for d, r, s in zip(
                profile["devices"], profile["runtime_bytes"],
                profile.get("activation_scale", [1.0] * len(profile["devices"])))))
    for name, link in profile["links"].items():
        lines.append(f"{name}: latency {1e6 * link['latency']:.0f} us, bandwidth {link['bandwidth'] / 1e9:.2f} GB/s")
    return "\n".join(lines)
