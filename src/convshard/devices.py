"""Devices: what ``--devices`` means, and how a worker process claims its device.

convshard runs one worker process per device and gives each worker a share of
every conv layer's kernels. ``--devices`` is a comma-separated list of devices:

``cpu``
    a CPU worker not pinned to particular cores; the OS schedules it.
``cpu@N``
    a CPU worker pinned to core N, e.g. ``cpu@3``.
``cpu@N-M``
    pinned to cores N..M inclusive (N <= M), e.g. ``cpu@0-3``.
``cpu@0+2`` / ``cpu@0-1+4``
    pinned to a core *set*: core items (``N`` or ``N-M``) joined by ``+``.
    ``+`` reads as "and", needs no quoting in a shell (braces, as in
    ``cpu@{0,2}``, would be expanded by bash into two words), and cannot be
    read as a second device, which is what a comma separates everywhere else.
``cpu@0,1``
    refused as ambiguous: it could be two workers (``cpu@0,cpu@1``) or one
    worker on two cores (``cpu@0-1`` or ``cpu@0+1``); the error names both.
``cuda``
    the current CUDA device (``cuda:0`` in a fresh worker process).
``cuda:N``
    CUDA device N.

Examples::

    --devices cpu                     one unpinned CPU worker
    --devices cpu@0,cpu@1             two workers, one per core
    --devices cpu@0+2,cpu@1           two workers: cores {0, 2} and core {1}
    --devices cpu@0-1+4,cuda:1        cores {0, 1, 4}, and GPU 1
    --devices "cuda:0, cuda:1"        spaces around elements are ignored

Core numbers go from 0 to 65535 and CUDA ordinals from 0 to 127; a core listed
twice inside one set counts once.

Several workers may be pinned to the same core. They then share that core's
speed: ``cpu@0,cpu@1,cpu@1`` gives three workers running at about 1, 1/2 and
1/2 of a core each. The same CUDA device may not be listed twice.

Every device is written back in one canonical form (``str(device)``):
consecutive runs of two or more cores collapse to ``N-M``, so
``cpu@4+0+1`` prints as ``cpu@0-1+4`` and ``cuda:01`` as ``cuda:1``.

Plan files written before ``+`` spelt a core set with commas (``cpu@0-1,4``);
``parse_devices(text, legacy=True)`` reads that spelling, where a bare core
item after a ``cpu@...`` element joins its core set.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from convshard.errors import ConfigError

MAX_CORE = 65535
"""Largest core number a spec may name."""

MAX_CUDA_INDEX = 127
"""Largest CUDA ordinal a spec may name (torch keeps device indices in 8 bits)."""

_NUMBER = r"[0-9]+"  # ASCII digits only: int() accepts other scripts' digits too
_CORE_ITEM = re.compile(rf"({_NUMBER})(?:-({_NUMBER}))?")
_CUDA = re.compile(rf"cuda(?::({_NUMBER}))?")


@dataclass(frozen=True)
class Device:
    """One worker's device: a CPU (optionally pinned to cores) or a CUDA GPU."""

    kind: str
    """``"cpu"`` or ``"cuda"``."""
    cpus: tuple[int, ...] = ()
    """Sorted cores a CPU worker is pinned to; ``()`` means not pinned."""
    index: int | None = None
    """CUDA ordinal; ``None`` means the current device."""

    def __post_init__(self) -> None:
        if self.kind not in ("cpu", "cuda"):
            raise ConfigError(f"bad device kind {self.kind!r}: expected 'cpu' or 'cuda'")
        cpus = tuple(sorted(set(self.cpus)))
        if any(not 0 <= c <= MAX_CORE for c in cpus):
            raise ConfigError(f"bad core list {cpus!r}: cores go from 0 to {MAX_CORE}")
        if cpus and self.kind != "cpu":
            raise ConfigError(f"bad core list {cpus!r}: only cpu devices are pinned to cores")
        if self.index is not None:
            if self.kind != "cuda":
                raise ConfigError(f"bad index {self.index!r}: only cuda devices have one")
            if not 0 <= self.index <= MAX_CUDA_INDEX:
                raise ConfigError(f"bad CUDA index {self.index!r}: must be 0..{MAX_CUDA_INDEX}")
        object.__setattr__(self, "cpus", cpus)

    def __str__(self) -> str:
        """The canonical spec, e.g. ``cpu``, ``cpu@0-1+4``, ``cuda``, ``cuda:1``."""
        if self.kind == "cuda":
            return "cuda" if self.index is None else f"cuda:{self.index}"
        return f"cpu@{format_cores(self.cpus)}" if self.cpus else "cpu"

    @property
    def torch_device(self) -> torch.device:
        """The ``torch.device`` this worker allocates its tensors on."""
        if self.kind == "cpu":
            return torch.device("cpu")
        return torch.device("cuda") if self.index is None else torch.device("cuda", self.index)


def format_cores(cores: Iterable[int]) -> str:
    """Cores as a spec's core set: ``[0, 1, 2, 5]`` -> ``"0-2+5"``."""
    runs: list[list[int]] = []
    for core in sorted(set(cores)):
        if runs and core == runs[-1][1] + 1:
            runs[-1][1] = core
        else:
            runs.append([core, core])
    return "+".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def parse_devices(text: str, *, legacy: bool = False) -> tuple[Device, ...]:
    """Parse a ``--devices`` string (grammar in the module docstring).

    ``legacy`` also reads the earlier comma spelling of a core set
    (``cpu@0-1,4``), for plan files saved before ``+``. Raises
    ``ConfigError`` naming the bad element and the whole string.
    """
    if not text.strip():
        raise ConfigError(f"empty device list in --devices {text!r}")
    # Each device is built from a kind plus, for pinned CPUs, a growing core set.
    parsed: list[tuple[str, set[int] | None, int | None]] = []
    open_set: set[int] | None = None  # core set a bare number would extend
    for raw in text.split(","):
        element = raw.strip()
        try:
            open_set = _parse_element(element, open_set if legacy else None, parsed)
        except _Ambiguous:
            raise ConfigError(_ambiguous(element, parsed[-1][1] or set(), text)) from None
        except _BadElement as why:
            raise ConfigError(
                f"bad device spec {element!r} in --devices {text!r}: {why}"
            ) from None
    return tuple(Device(kind, tuple(cores or ()), index) for kind, cores, index in parsed)


class _BadElement(Exception):
    """Why one element of a device list is invalid."""


class _Ambiguous(Exception):
    """A bare core item right after a ``cpu@...`` element (``cpu@0,1``)."""


def _ambiguous(element: str, cores: set[int], text: str) -> str:
    """The one-line hint for ``cpu@N,M``: both readings and how to write each."""
    alone = format_cores(cores)
    joined = format_cores(cores | _parse_cores(element))
    plus = f"{alone}+{element}"
    one = f"cpu@{joined}" if joined == plus else f"cpu@{joined} or cpu@{plus}"
    return (f"ambiguous device spec 'cpu@{alone},{element}' in --devices {text!r}: a comma separates devices; "
            f"write cpu@{alone},cpu@{element} for two workers, or {one} for one worker on those cores")


def _parse_element(
    element: str,
    open_set: set[int] | None,
    parsed: list[tuple[str, set[int] | None, int | None]],
) -> set[int] | None:
    """Add ``element`` to ``parsed``; return the core set a bare number would extend next."""
    if not element:
        raise _BadElement("empty element")
    if element == "cpu":
        parsed.append(("cpu", None, None))
        return None
    if element.startswith("cpu@"):
        cores: set[int] = set()
        for item in element[len("cpu@"):].split("+"):
            cores |= _parse_cores(item)
        parsed.append(("cpu", cores, None))
        return cores
    if _CORE_ITEM.fullmatch(element):
        if open_set is not None:
            open_set |= _parse_cores(element)
            return open_set
        if parsed and parsed[-1][1]:
            _parse_cores(element)  # a bad core item is reported as such, not as ambiguous
            raise _Ambiguous
        raise _BadElement("a core number needs cpu@ before it")
    if cuda := _CUDA.fullmatch(element):
        index = None if cuda.group(1) is None else _number(cuda.group(1))
        if index is not None and index > MAX_CUDA_INDEX:
            raise _BadElement(f"CUDA index must be 0..{MAX_CUDA_INDEX}")
        parsed.append(("cuda", None, index))
        return None
    raise _BadElement("expected cpu, cpu@N, cpu@N-M, cuda or cuda:N")


def _number(digits: str) -> int:
    """A spec's number; absurdly long ones read as 10**9 (beyond every limit)."""
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= 9 else 10**9


def _parse_cores(item: str) -> set[int]:
    """One core item, ``N`` or ``N-M``, as a set of cores."""
    match = _CORE_ITEM.fullmatch(item)
    if match is None:
        raise _BadElement("expected cores N, N-M or N+M after cpu@")
    first = _number(match.group(1))
    last = first if match.group(2) is None else _number(match.group(2))
    if last > MAX_CORE:
        raise _BadElement(f"core numbers go from 0 to {MAX_CORE}")
    if first > last:
        raise _BadElement(f"core range {item} runs backwards")
    return set(range(first, last + 1))


def format_devices(devices: Sequence[Device]) -> str:
    """The ``--devices`` string for ``devices``; inverse of ``parse_devices``."""
    return ",".join(str(d) for d in devices)


def usable_cores() -> set[int]:
    """Cores this process may run on (its affinity mask)."""
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))


def host_name() -> str:
    """This process's host in the job: its hostname and torchrun's node
    (GROUP_RANK), since hosts may share a hostname (network namespaces).
    The loader decodes once per host name, and profiles key devices by it."""
    return f"{socket.gethostname()}/{os.environ.get('GROUP_RANK', '0')}"


def sharing(devices: Sequence[str], hosts: Sequence[str]) -> list[list[int]]:
    """The sets of two or more ranks whose devices share hardware, in rank
    order: on one host, CPU devices whose cores overlap (an unpinned one
    may run on any core, so it overlaps every CPU device there) or the same
    GPU. Such workers run at a fraction of their speed while the others
    compute, so they are timed together (``convshard.profile.timings``)."""
    parsed = [parse_devices(d)[0] for d in devices]
    parent = list(range(len(parsed)))

    def root(r: int) -> int:
        while parent[r] != r:
            r = parent[r]
        return r

    def share(a: Device, b: Device) -> bool:
        if a.kind != b.kind:
            return False
        if a.kind == "cuda":
            return (a.index or 0) == (b.index or 0)
        return not a.cpus or not b.cpus or bool(set(a.cpus) & set(b.cpus))

    for i in range(len(parsed)):
        for j in range(i):
            if hosts[i] == hosts[j] and share(parsed[i], parsed[j]):
                parent[root(i)] = root(j)
    sets: dict[int, list[int]] = {}
    for r in range(len(parsed)):
        sets.setdefault(root(r), []).append(r)
    return [ranks for ranks in sets.values() if len(ranks) > 1]


def check_available(devices: Sequence[Device]) -> None:
    """Raise ``ConfigError`` unless every device in ``devices`` exists here.

    Pinned cores must lie in this process's affinity mask; CUDA devices must
    exist, and none may be listed twice. A core may be listed several times.
    """
    usable = usable_cores()
    cuda_seen: dict[int, Device] = {}
    for device in devices:
        if device.kind == "cpu":
            if device.cpus and not hasattr(os, "sched_setaffinity"):
                raise ConfigError(f"{device} requested but this platform cannot pin to cores")
            for core in device.cpus:
                if core not in usable:
                    raise ConfigError(
                        f"{device} requested but core {core} is not usable here; "
                        f"usable cores: {format_cores(usable)}"
                    )
            continue
        if not torch.cuda.is_available():
            raise ConfigError(f"{device} requested but CUDA is not available")
        count = torch.cuda.device_count()
        ordinal = 0 if device.index is None else device.index  # a fresh worker starts on cuda:0
        if ordinal >= count:
            raise ConfigError(
                f"{device} requested but only {count} CUDA device(s) are visible "
                f"(cuda:0..cuda:{count - 1})"
            )
        if ordinal in cuda_seen:
            raise ConfigError(
                f"CUDA device cuda:{ordinal} listed twice ({cuda_seen[ordinal]} and {device}); "
                "each GPU can host one worker"
            )
        cuda_seen[ordinal] = device


def default_threads(device: Device, devices: Sequence[Device]) -> int:
    """Intra-op threads for ``device``'s worker when ``--threads`` is not given.

    A pinned CPU worker gets one thread per core; unpinned CPU workers split
    the usable cores evenly (at least one thread each); a CUDA worker gets one.
    """
    if device.kind == "cuda":
        return 1
    if device.cpus:
        return len(device.cpus)
    unpinned = sum(1 for d in devices if d.kind == "cpu" and not d.cpus)
    return max(1, len(usable_cores()) // max(1, unpinned))


def pin(device: Device, threads: int) -> None:
    """Claim ``device`` for the calling worker process; call it first thing.

    Pins the process to the device's cores, sets torch's intra-op thread
    count, and makes the device's GPU the current CUDA device.
    """
    if threads < 1:
        raise ConfigError(f"bad thread count {threads!r}: must be at least 1")
    if device.cpus:
        os.sched_setaffinity(0, device.cpus)
    torch.set_num_threads(threads)
    if device.kind == "cuda" and device.index is not None:
        torch.cuda.set_device(device.index)


@contextmanager
def pinning_restored() -> Iterator[None]:
    """Give back this process's CPU affinity and thread count on exit, for
    callers that run a worker in their own process (a one-device job)."""
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        if cores is not None:
            os.sched_setaffinity(0, cores)
        torch.set_num_threads(threads)


def backend_for(devices: Sequence[Device]) -> str:
    """The torch.distributed backend: ``"nccl"`` when every device is CUDA, else ``"gloo"``."""
    return "nccl" if devices and all(d.kind == "cuda" for d in devices) else "gloo"
