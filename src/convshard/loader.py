"""Each rank's batches: read once per host, augmented per image, ready before the step asks.

Step s of epoch e trains on the global batch ``order[b B : (b + 1) B]`` of
``data.epoch_permutation`` (b the step's batch in the epoch, B the batch
size); a rank feeds the rows ``rows(n)`` of it that its engine names (all
of them in a kernel-split group, its share in batch mode). Reading a batch
takes two stages:

1. **read** (``Reader``): image i of epoch e as uint8 pixels, with the
   random resized crop that (seed, e, i) draws. For a source that decodes
   (files, a user's dataset), the ranks of one host split the rows any of
   them needs, ``U``, so rank j of the k on a host reads ``U[j::k]`` (in
   ``workers`` DataLoader processes), and they exchange the pixels in one
   uint8 all-gather over a gloo group of the host: each image is decoded
   once per host. An in-memory source is read by each rank for its rows.
2. **finish** (``Dataset.finish``): this rank's rows jittered, turned,
   shifted, flipped and normalised, float32.

A thread runs both for the next ``DEPTH`` steps while the current one
computes; ``next`` returns the step's (x, y) and how long it waited.
Memory holds at most DEPTH finished batches, the DataLoader's
``workers * PREFETCH`` read ones, and no more, whatever the dataset's size.
``TestBatches`` reads a rank's test images, unaugmented, through loader
processes kept between evaluations.
"""

from __future__ import annotations

import datetime
import functools
import math
import multiprocessing
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import augment, data, devices
from .parallel import comm

DEPTH = 2  # finished batches kept ready ahead of the step
PREFETCH = 2  # read batches each DataLoader process keeps ahead


def default_workers(dataset: data.Dataset, device: torch.device) -> int:
    """Loader processes per rank when --workers is not given: none for an
    in-memory source (reading is indexing); for one that decodes, 1 on a
    CPU device (its decode shares the machine's cores with the compute)
    and 4 on a GPU, whose host cores are otherwise idle."""
    if not dataset.train.decodes:
        return 0
    return 1 if device.type == "cpu" else 4


def decode_seconds(dataset: data.Dataset, *, images: int = 8) -> float:
    """Seconds to read one training image of a source that decodes (0 for
    one in memory): the mean over ``images`` spread over the split, after
    one read that warms the file cache and Pillow."""
    split = dataset.train
    if not split.decodes:
        return 0.0
    picks = [int(i) for i in torch.linspace(0, len(split) - 1, images + 1).long()]
    split.read(picks[0])
    started = time.perf_counter()
    for i in picks[1:]:
        split.read(i)
    return (time.perf_counter() - started) / images


@dataclass(frozen=True)
class Reader(torch.utils.data.Dataset):
    """Stage 1, sent to the loader processes: key (epoch, i) -> image i read
    with the resized crop (seed, epoch, i) draws, when ``crop``."""

    images: data.Images
    seed: int
    crop: bool

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int]) -> torch.Tensor:
        epoch, i = key
        box = augment.Draw.of(self.seed, epoch, i).box if self.crop else None
        return self.images.read(i, box)

    def batch(self, keys: list[tuple[int, int]]) -> torch.Tensor | None:
        """The images of ``keys`` stacked (None for no keys): at once where no crop is drawn."""
        if not keys:
            return None
        if not self.crop:
            return self.images.read_many([i for _, i in keys])
        return torch.stack([self[key] for key in keys])


def _stack(images: list[torch.Tensor]) -> torch.Tensor | None:
    return torch.stack(images) if images else None  # None: this rank reads nothing of the step


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)  # a loader process decodes one image at a time; its cores are the compute's


def _loader(reader: Reader, keys: Iterator[list], workers: int) -> Iterator[torch.Tensor]:
    """The read batches of ``keys`` (lists of (epoch, i)), in order: through
    ``workers`` DataLoader processes, or here when ``workers`` is 0."""
    if workers == 0:
        return (reader.batch(batch) for batch in keys)
    loader = torch.utils.data.DataLoader(reader, batch_sampler=_Keys(keys), num_workers=workers,
                                         collate_fn=_stack, prefetch_factor=PREFETCH, worker_init_fn=_one_thread,
                                         multiprocessing_context=_context())
    return iter(loader)


def _context():
    """Loader processes start from a fork server that has imported this module (and torch) once:
    a rank holds threads (gloo's, the loader's), which a plain fork would copy mid-lock, and
    spawning would import torch again in each."""
    if os.name != "posix":
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


class _Keys:
    """A batch sampler over an iterator of key lists (the DataLoader asks it for batches in order)."""

    def __init__(self, keys: Iterator[list]) -> None:
        self.keys = keys

    def __iter__(self) -> Iterator[list]:
        return self.keys


@dataclass(frozen=True)
class Host:
    """This rank's host: the gloo group of its ranks (None alone), its index
    among them, and each one's rows of a global batch of n (``rows[j](n)``)."""

    group: object
    index: int
    rows: tuple[Callable[[int], slice], ...]

    @property
    def size(self) -> int:
        return len(self.rows)


def host_of(rows: Callable[[int], slice], sizes: Sequence[int], *, group: comm.Group, timeout: float) -> Host:
    """This rank's ``Host`` among the ranks of ``group`` (a collective over
    it): ranks share a host when they share ``devices.host_name``. ``sizes``: the
    global batch sizes the run uses, whose rows every rank of the host
    learns. Only the host's ranks make its group, so a group of part of the
    job (a trial) needs nothing from the others."""
    mine = devices.host_name()
    rank = dist.get_rank() if dist.is_initialized() else 0
    everyone = comm.gather_objects((mine, rank, {n: (rows(n).start, rows(n).stop) for n in sizes}), group=group)
    members = [(r, table) for host, r, table in everyone if host == mine]
    host_group = None
    if len(members) > 1:
        host_group = dist.new_group([r for r, _ in members], backend="gloo", use_local_synchronization=True,
                                    timeout=datetime.timedelta(seconds=timeout))
    return Host(host_group, [r for r, _ in members].index(rank),
                tuple((lambda n, t=table: slice(*t[n])) for _, table in members))


def batch_sizes(n: int, batch_size: int) -> list[int]:
    """The global batch sizes of an epoch of ``n`` images: ``batch_size``, and the epoch's last batch."""
    return sorted({batch_size, n - (math.ceil(n / batch_size) - 1) * batch_size})


def for_run(dataset: data.Dataset, settings, progress: dict, batch_size: int, rows: Callable[[int], slice], *,
            group: comm.Group, workers: int, pin: bool) -> TrainBatches:
    """A run's training batches from its ``progress`` (epoch, batch, step) to
    its end (``settings.epochs``, ``settings.max_steps``); a collective over
    ``group`` when the source decodes, whose host's ranks share the reading."""
    per_epoch = math.ceil(len(dataset.train) / batch_size)
    left = per_epoch * (settings.epochs - progress["epoch"]) - progress["batch"]
    if settings.max_steps is not None:
        left = min(left, settings.max_steps - progress["step"])
    if dataset.train.decodes:
        host = host_of(rows, batch_sizes(len(dataset.train), batch_size), group=group, timeout=settings.timeout)
    else:
        host = Host(None, 0, (rows,))
    return TrainBatches(dataset, seed=settings.seed, batch_size=batch_size, transforms=settings.augment,
                        start=Position(progress["epoch"], progress["batch"], left), host=host, workers=workers,
                        pin=pin)


@dataclass
class Position:
    """Where a stream starts: ``epoch``, its ``batch``, and the run's ``steps`` left."""

    epoch: int
    batch: int
    steps: int


class TrainBatches:
    """This rank's training batches from ``start`` on, prepared ``DEPTH`` steps ahead by a thread."""

    def __init__(self, dataset: data.Dataset, *, seed: int, batch_size: int, transforms: Sequence[str],
                 start: Position, host: Host, workers: int, pin: bool = False) -> None:
        self.dataset, self.seed, self.batch_size, self.transforms = dataset, seed, batch_size, tuple(transforms)
        self.host, self.pin = host, pin
        self.decoded = 0  # images this rank read from a decoding source
        self._ready: queue.Queue = queue.Queue()
        self._slots = threading.Semaphore(DEPTH)
        self._horizon = math.inf  # the thread prepares the steps before this many
        self._taken = 0
        self._positions: dict[int, list[int]] = {}  # _needed's answer by batch size (two sizes at most)
        reader = Reader(dataset.train, seed, "resized-crop" in self.transforms)
        self._steps = list(self._walk(start))
        shares = (self._share(epoch, order) for epoch, order in self._steps)
        self._read = _loader(reader, shares, workers if dataset.train.decodes else 0)
        self._thread = threading.Thread(target=self._prepare, name="convshard-loader", daemon=True)
        self._thread.start()

    def _walk(self, start: Position) -> Iterator[tuple[int, torch.Tensor]]:
        """(epoch, global batch's image indices) of each step from ``start``."""
        n = len(self.dataset.train)
        per_epoch = math.ceil(n / self.batch_size)
        epoch, b, left = start.epoch, start.batch, start.steps
        while left > 0:
            order = data.epoch_permutation(n, seed=self.seed, epoch=epoch)
            while b < per_epoch and left > 0:
                yield epoch, order[b * self.batch_size:(b + 1) * self.batch_size]
                b, left = b + 1, left - 1
            epoch, b = epoch + 1, 0

    def _needed(self, n: int) -> list[int]:
        """Positions in a global batch of n that some rank of this host feeds, in order."""
        if n not in self._positions:
            self._positions[n] = sorted({p for rows in self.host.rows for p in range(n)[rows(n)]})
        return self._positions[n]

    def _share(self, epoch: int, order: torch.Tensor) -> list[tuple[int, int]]:
        """The keys this rank reads for a step: its share of the host's
        positions when the source decodes, else its own rows."""
        if self.dataset.train.decodes:
            positions = self._needed(len(order))[self.host.index::self.host.size]
        else:
            positions = range(len(order))[self.host.rows[self.host.index](len(order))]
        return [(epoch, int(order[p])) for p in positions]

    def _prepare(self) -> None:
        try:
            for t, (epoch, order) in enumerate(self._steps):
                self._slots.acquire()
                if t >= self._horizon:
                    return
                self._ready.put(self._batch(epoch, order))
        except BaseException as exc:  # noqa: BLE001 - the step that asks for the batch raises it
            self._ready.put(exc)

    def _batch(self, epoch: int, order: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (x (b, C, H, W) float32, y (b,)) of the step on ``order``."""
        n = len(order)
        read = next(self._read)
        mine = range(n)[self.host.rows[self.host.index](n)]
        if self.dataset.train.decodes:
            self.decoded += 0 if read is None else len(read)
            read = self._exchange(read, n)  # position -> pixels, for the host's positions
            pixels = [read[p] for p in mine]
        else:
            pixels = read if read is not None else []
        if not len(pixels):
            x = torch.empty(0, *self.dataset.input_shape)
        elif not self.transforms:  # one normalisation of the batch: the same values as image by image
            x = self.dataset.finish(torch.stack(list(pixels)))
        else:
            x = torch.stack([self.dataset.finish(image, augment.Draw.of(self.seed, epoch, int(order[p])),
                                                 self.transforms) for image, p in zip(pixels, mine)])
        y = self.dataset.train.labels[order[list(mine)]] if len(mine) else torch.empty(0, dtype=torch.long)
        return (x.pin_memory(), y.pin_memory()) if self.pin else (x, y)

    def _exchange(self, read: torch.Tensor | None, n: int) -> dict[int, torch.Tensor]:
        """Every host rank's read share, by position (one all-gather on the host's group)."""
        needed = self._needed(n)
        k = self.host.size
        if k == 1:
            return dict(zip(needed, read))
        width = math.ceil(len(needed) / k)
        padded = torch.zeros(width, *self.dataset.input_shape, dtype=read.dtype if read is not None
                             else self._pixels_dtype)
        if read is not None:
            padded[:len(read)] = read
        gathered = [torch.empty_like(padded) for _ in range(k)]
        # a gloo group of CPU tensors on the loader's thread: outside the step's collectives (``wire``)
        dist.all_gather(gathered, padded, group=self.host.group)
        return {p: gathered[j % k][j // k] for j, p in enumerate(needed)}

    @functools.cached_property
    def _pixels_dtype(self) -> torch.dtype:
        """What the source reads into (uint8 pixels, or its float values): for a step this rank reads nothing of."""
        return self.dataset.train.read(0).dtype

    def next(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The next step's (x, y) and the seconds spent waiting for them."""
        started = time.perf_counter()
        item = self._ready.get()
        waited = time.perf_counter() - started
        if isinstance(item, BaseException):
            raise item
        self._taken += 1
        self._slots.release()
        return item[0], item[1], waited

    def close(self) -> None:
        """Stop the thread after the steps it may already be preparing, which
        every rank has alike (``DEPTH`` past the last taken), so no host
        exchange is left waiting for a rank that stopped."""
        self._horizon = self._taken + DEPTH
        self._slots.release()
        self._thread.join()
        self._read = None  # ends the loader processes


class TestBatches:
    """The test images of ``part`` in batches of ``batch_size``, each pass
    an iterator of (x (b, C, H, W) float32 normalised, y (b,)): read in
    ``workers`` loader processes, kept between passes, when the source
    decodes; here otherwise."""

    def __init__(self, dataset: data.Dataset, part: range, batch_size: int, workers: int) -> None:
        self.dataset = dataset
        self.chunks = [list(part[i:i + batch_size]) for i in range(0, len(part), batch_size)]
        self.reader = Reader(dataset.test, 0, False)
        self.keys = [[(0, i) for i in chunk] for chunk in self.chunks]
        self.loader = None
        if workers and dataset.test.decodes and self.chunks:
            self.loader = torch.utils.data.DataLoader(
                self.reader, batch_sampler=self.keys, num_workers=workers, collate_fn=_stack,
                prefetch_factor=PREFETCH, persistent_workers=True, worker_init_fn=_one_thread,
                multiprocessing_context=_context())

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        reads = iter(self.loader) if self.loader is not None else _loader(self.reader, iter(self.keys), 0)
        for chunk, read in zip(self.chunks, reads):
            yield self.dataset.finish(read), self.dataset.test.labels[chunk]  # (b, C, H, W) at once
