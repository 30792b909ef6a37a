"""Joining a job: the process group, pinning, the data, and what rank 0 answers for every rank.

Every worker, launched locally or by torchrun, ``join``s first: it enters
the process group (``launch.init_from_env``), sets up its log lines, pins
itself to its device and loads the data. Rank 0 answers every question
about files for the job (``read_on_rank0``): the checkpoint, the profile
cache, so that hosts need not share storage and never act on different
answers. ``measure_job`` is the job's profile, a collective.
"""

from __future__ import annotations

import logging
import os
import pickle
import sys
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import torch.distributed as dist
from tqdm import tqdm

from .. import data, devices, loader, profile
from ..errors import TrainingError
from ..parallel import comm
from . import launch
from .config import RunSettings, TrainConfig, load_data, make_model

log = logging.getLogger(__name__)


def in_terminal() -> bool:
    """Whether the log goes to a terminal, where a progress bar redraws; elsewhere (a file, CI, a
    scheduler, or a terminal that says it is zero columns wide, where a bar has no room and tqdm
    draws nothing) the loop writes a timestamped line every --log-every steps instead."""
    if not sys.stderr.isatty():
        return False
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns > 0
    except OSError:  # a terminal that answers no size: the bar takes tqdm's default width
        return True


T = TypeVar("T")


def job_group() -> comm.Group:
    """The process group of the job every rank joined (None without one)."""
    return dist.group.WORLD if dist.is_initialized() else None


def read_on_rank0(read: Callable[[], T], *, group: comm.Group) -> T:
    """``read()`` as rank 0 answers it, on every rank (a collective).

    Files differ between hosts (no shared storage, a stale copy): a rank
    that read its own could skip collectives the others enter, or resume at
    another step. So rank 0 reads and broadcasts the result; an exception
    there, whatever its type, is sent too and raised on every rank at once
    (the same exception where it pickles, else a ``TrainingError`` naming it).
    """
    if comm.world_size(group) == 1:
        return read()
    answer = None
    if comm.rank(group) == 0:
        try:
            answer = (read(), None)
        except Exception as exc:  # noqa: BLE001 - every rank must hear of it, or the others wait for the timeout
            answer = (None, _portable(exc))
            comm.broadcast_object(answer, group=group)
            raise
    value, error = comm.broadcast_object(answer, group=group)
    if error is not None:
        raise error
    return value


def read_newest(read: Callable[[], dict | None], *, group: comm.Group) -> dict | None:
    """The newest of the checkpoints each rank's ``read()`` finds on its own
    host (the most steps; the lowest rank among equals), sent by the rank
    that holds it to every rank (a collective); None when no rank has one.

    Hosts need not share storage, and ranks are numbered anew each time
    torchrun re-forms a job: the host holding the checkpoint may no longer
    be rank 0's. A read that raised on any rank raises on every rank."""
    if comm.world_size(group) == 1:
        return read()
    try:
        mine, error = read(), None
    except Exception as exc:  # noqa: BLE001 - every rank must hear of it, or the others wait for the timeout
        mine, error = None, _portable(exc)
    found = comm.gather_objects((mine["progress"]["step"] if mine is not None else -1, error), group=group)
    errors = [e for _, e in found if e is not None]
    if errors:
        raise errors[0]
    newest = max(range(len(found)), key=lambda r: (found[r][0], -r))
    if found[newest][0] < 0:
        return None
    return comm.broadcast_object(mine if comm.rank(group) == newest else None, group=group, src=newest)


def _portable(exc: Exception) -> Exception:
    """``exc`` if it survives pickling (to be sent to the other ranks), else a ``TrainingError`` naming it."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - any failure to round-trip means: send a plain one
        return TrainingError(f"rank 0 failed reading for the job: {type(exc).__name__}: {exc}".splitlines()[0])


def join(settings: RunSettings, dataset: data.Dataset | None, device_of: Callable[[int], devices.Device],
          threads_for: Callable[[devices.Device], int], backend: str
          ) -> tuple[int, int, devices.Device, data.Dataset]:
    """Join the job over ``backend``, pin to this rank's device
    (``device_of(local rank)``, ``threads_for`` it), load the data:
    (rank, world size, device, dataset)."""
    rank, world, local_rank = launch.init_from_env(backend, timeout=settings.timeout)
    level = logging.INFO if rank == 0 and not settings.quiet else logging.WARNING
    stamp = "" if in_terminal() else "%(asctime)s "  # a log read later says when each line was written
    logging.basicConfig(level=level, format=stamp + ("%(message)s" if rank == 0 else f"rank {rank}: %(message)s"),
                        datefmt="%Y-%m-%d %H:%M:%S", force=True)
    tqdm.set_lock(threading.RLock())  # only rank 0 draws: no cross-process lock needed
    device_spec = device_of(local_rank)
    devices.pin(device_spec, threads_for(device_spec))
    comm.set_rank_device(device_spec.torch_device)
    return rank, world, device_spec, dataset if dataset is not None else load_data(settings)


def measure_job(config: TrainConfig, dataset: data.Dataset, device_spec: devices.Device) -> dict:
    """This job's profile (a collective): from the cache at ``config.profile``
    when it was measured for the same key (devices, threads, hosts, model,
    compute, optimizer; rank 0 reads it for every rank), else measured now
    and written there."""
    model = make_model(config, dataset).to(device_spec.torch_device)
    group = job_group()
    key = profile.job_key(model, device_spec=str(device_spec), input_shape=dataset.input_shape,
                          batch_size=config.batch_size, precision=config.precision,
                          memory_format=config.memory_format, optimizer=config.optimizer,
                          momentum=config.momentum, group=group)
    cached = read_on_rank0(lambda: profile.load(config.profile, key), group=group) if config.profile else None
    if cached is None:
        log.info("profiling %d device(s) at batch %d ...", len(key["devices"]), config.batch_size)
        cached = profile.measure(model, key=key, input_shape=dataset.input_shape, classes=dataset.classes,
                                 batch_size=config.batch_size, group=group)
        if config.profile and comm.rank(group) == 0:
            profile.save(config.profile, cached)
    if not dataset.train.decodes:
        return cached
    # the data's decode, measured for this job's data (a cached profile may have timed other files)
    decode = read_on_rank0(lambda: loader.decode_seconds(dataset), group=group)
    return {**cached, "decode_seconds": decode}


def profile_worker(config: TrainConfig, dataset: data.Dataset | None = None) -> tuple[dict, float] | None:
    """Profile the job as one rank of it; rank 0 returns the profile and the
    seconds it took to measure (or read) it, the others None."""
    listed = config.device_list
    rank, _, device_spec, dataset = join(
        config, dataset, lambda local_rank: listed[local_rank],
        lambda device: config.threads or devices.default_threads(device, listed), devices.backend_for(listed))
    started = time.perf_counter()
    result = measure_job(config, dataset, device_spec)
    measuring = time.perf_counter() - started
    launch.shutdown()
    return (result, measuring) if rank == 0 else None
