"""Profiling: how fast each device runs each conv layer, and how fast the links are.

``measure`` is a collective: every rank of the job calls it at once, on its
own device, so that workers sharing a core are measured while they share it.
Ranks whose devices share a core or a GPU (``devices.sharing``) are timed
together: each of their runs ends when all of them are done, as their
training steps do, so the one the scheduler happened to run first does not
look faster than the hardware it shares.
For every channel group l (its convs with the ops that run on their shard,
as ``shard_model`` runs them; ``convshard.profile.segments``) and rank r it times
forward+backward at the run's batch size B for a few kernel counts k
around K_l / W, takes the median of ``repeats`` runs after a warm-up, and fits

    t_{r,l}(k) = a_{r,l} + b_{r,l} * k       (least squares, a >= 0, b > 0).

A second pass times each rank once more at the count the split of these
fits gives it, all ranks at once, and sets b_{r,l} = (t - a_{r,l}) / k: the
cost at the working point, contention between workers included.

``rest_seconds[r]`` is the replicated part: forward+backward of the model
with every segment replaced by a constant of its output's shape, plus the
optimizer step of its parameters; ``update_seconds_per_byte[r]`` the
optimizer step per byte of the groups' parameters. Every step, timed or
measured for memory, is the job's optimizer's (``optimizer`` and
``momentum`` of the key: SGD, with or without momentum, Adam or AdamW;
without weight decay, one more multiply-add per element), whose state the
memory model counts too (``convshard.plan.memory.state_copies``).
``batch_seconds[r]`` times each group in batch mode: all kernels,
``batch_rows`` = ceil(B / W) rows. Each collective the plans use
(all-gather, all-reduce, reduce-scatter, all-to-all, broadcast; and the
backend's own all-reduce, as DDP runs it) is timed at a small and a large size, giving
t(n bytes) = latency + n / bandwidth. ``batchnorm`` says whether the model
holds a BatchNorm anywhere; ``device_memory[r]`` the bytes rank r's device
can hold (``convshard.plan.memory.device_memory``: a GPU's free memory, a
CPU host's RAM), which the planner keeps every plan within;
``runtime_bytes[r]`` what rank r's process holds (its resident set on a
CPU) and ``activation_scale[r]`` how much more than the memory model
counts one training step of the whole model added to it, at
``batch_rows`` rows (``convshard.plan.memory``).

Every timing runs in the job's compute: ``precision`` (under autocast, as
training runs) and memory format. With memory format ``auto`` the whole
model's step is first timed in both formats on every rank
(``format_seconds``) and the profile is taken in the one whose slowest rank
is faster. Activation bytes count the precision's element size (2 bytes in
bf16 and fp16), parameter bytes the model's dtype: weights, their gradients
and the optimizer state stay float32.

The result is a ``Profile`` (``convshard.profile.schema``), which
``measure`` checks before it returns it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .. import devices
from .. import precision as compute
from ..parallel import comm
from ..plan.memory import (DEFAULT_OPTIMIZER, activation_scale, device_memory, held_bytes, peak_held_bytes,
                           reset_peak, state_copies)
from ..plan.splits import sized_kernels
from .schema import VERSION, Profile, ProfileKey, check
from .segments import Group, cut, layer_fields

log = logging.getLogger(__name__)

LINK_SIZES = (1 << 10, 1 << 24)  # bytes: one for the latency, one for the bandwidth
MIN_SECONDS = 0.05  # a layer's timed runs grow until one takes this long


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn: Callable[[], object], device: torch.device, *, repeats: int, group: comm.Group,
                    together: comm.Group = None) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs after one warm-up.
    Ranks start each run together, so workers that share a core or a GPU
    contend as in training; each run of theirs ends when all of them are done
    (a barrier of ``together``, the ranks sharing this one's hardware), as a
    step of theirs does: whichever ran first, each is timed for both."""
    times = []
    for i in range(repeats + 1):
        comm.barrier(group)
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        if together is not None:
            comm.barrier(together)
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
    return comm.reduce_scalar(float(flag), op="min", group=group) == 1.0


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


@dataclass(frozen=True)
class _Compute:
    """What every timing runs in: the job's precision, (resolved) memory format and optimizer."""

    precision: str = "32"
    memory_format: str = "contiguous"
    optimizer: str = DEFAULT_OPTIMIZER[0]  # sgd | adam | adamw
    momentum: float = DEFAULT_OPTIMIZER[1]  # SGD's
    together: comm.Group = field(default=None, compare=False)  # the ranks sharing this one's core or GPU

    def step(self, params: Sequence[nn.Parameter]) -> torch.optim.Optimizer:
        """The job's optimizer over ``params``, at learning rate 0 (timing and memory, no change)."""
        if self.optimizer == "adam":
            return torch.optim.Adam(params, lr=0.0)
        if self.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=0.0)
        return torch.optim.SGD(params, lr=0.0, momentum=self.momentum)

    def module(self, module: nn.Module) -> nn.Module:
        return module.to(memory_format=compute.memory_format(self.memory_format))

    def input(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=compute.memory_format(self.memory_format)) if x.dim() == 4 else x

    def autocast(self, device: torch.device):
        return compute.autocast(device, self.precision)


def _calibrate(fits: list[tuple[float, float]], groups: list[Group], batch: int,
               device: torch.device, group: comm.Group, how: _Compute, sharing: Sequence[int]) -> None:
    """Re-measure every group where it will run: each rank at the kernel count
    the greedy split of the first fits gives it, all ranks at once (workers on
    a shared core contend as in training), once after a warm-up. b becomes
    (t - a) / k; ``fits`` (this rank's, per group) is updated in place.

    The n ranks of ``sharing`` (this one and those sharing its core or GPU)
    are timed until all of them are done, t = a + b_hw (k_1 + ... + k_n);
    each takes b = n (t - a) / (k_1 + ... + k_n), its cost per kernel when
    they hold equal shares, so that the split gives them equal shares, as
    their hardware's speed is theirs together."""
    everyone = comm.gather_objects(fits, group=group)
    me = comm.rank(group)
    for i, layer in enumerate(groups):
        a = [r[i][0] for r in everyone]
        counts = sized_kernels(layer.kernels, a, [r[i][1] for r in everyone])
        k = counts[me]
        shared = sum(counts[r] for r in sharing)
        seconds = _time_group(layer, max(k, 1), batch, device, 1, group, how)
        if shared >= 2 * len(sharing) and seconds > a[me]:
            fits[i] = (a[me], len(sharing) * (seconds - a[me]) / shared)


def _time_group(layer: Group, k: int, batch: int, device: torch.device, repeats: int, group: comm.Group,
                how: _Compute) -> float:
    """Forward+backward seconds of the group's segments with k kernels each."""
    runs = []
    for segment in layer.segments:
        run = how.module(segment.build(k, device))
        x = how.input(torch.randn(batch, *segment.input_shape, device=device)).requires_grad_(segment.input_grad)
        runs.append((run, x))

    def once() -> None:
        for run, x in runs:
            with how.autocast(device):
                y = run(x)
            y.backward(torch.ones_like(y))
            for p in run.parameters():
                p.grad = None
            x.grad = None

    return _median_seconds(once, device, repeats=repeats, group=group, together=how.together)


def _update_seconds_per_byte(elements: int, device: torch.device, repeats: int, group: comm.Group,
                             how: _Compute) -> float:
    """Seconds per parameter byte of a step of the job's optimizer, over one
    tensor as large as the groups' parameters."""
    flat = nn.Parameter(torch.zeros(max(elements, 1), device=device))
    flat.grad = torch.zeros_like(flat)
    optimizer = how.step([flat])
    optimizer.step()  # creates its state
    seconds = _median_seconds(optimizer.step, device, repeats=repeats, group=group, together=how.together)
    return seconds / (flat.numel() * flat.element_size())


def _step_seconds(model: nn.Module, input_shape: Sequence[int], classes: int, batch: int, device: torch.device,
                  repeats: int, group: comm.Group, how: _Compute) -> float:
    """Seconds of one training step of ``model`` (forward, backward, the optimizer's step) in ``how``."""
    model = how.module(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = how.step(params) if params else None
    x = how.input(torch.randn(batch, *input_shape, device=device))
    y = torch.randint(classes, (batch,), device=device)

    def run() -> None:
        with how.autocast(device):
            out = model(x)
        loss = F.cross_entropy(out.float(), y)
        if loss.requires_grad:
            loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return _median_seconds(run, device, repeats=repeats, group=group, together=how.together)


def _step_memory(model: nn.Module, input_shape: Sequence[int], classes: int, rows: int, device: torch.device,
                 how: _Compute) -> tuple[int, int]:
    """(R, S): the bytes this process holds, and the most one training step of
    the whole ``model`` at ``rows`` rows adds to them (forward, backward, a
    step of the job's optimizer, on a copy; ``convshard.plan.memory``)."""
    model = how.module(copy.deepcopy(model))
    optimizer = how.step(list(model.parameters()))
    x = how.input(torch.randn(rows, *input_shape, device=device))
    y = torch.randint(classes, (rows,), device=device)
    before = held_bytes(device)
    reset_peak(device)
    with how.autocast(device):
        out = model(x)
    F.cross_entropy(out.float(), y).backward()
    optimizer.step()
    return before, max(0, peak_held_bytes(device) - before)


def _faster_format(model: nn.Module, input_shape: Sequence[int], classes: int, batch: int, device: torch.device,
                   group: comm.Group, how: _Compute) -> tuple[str, dict[str, list[float]]]:
    """The memory format whose whole-model step is faster on the slowest
    rank, and every rank's step seconds in each (a collective)."""
    mine = {fmt: _step_seconds(copy.deepcopy(model), input_shape, classes, batch, device, 2, group,
                               replace(how, memory_format=fmt)) for fmt in compute.MEMORY_FORMATS}
    everyone = comm.gather_objects(mine, group=group)
    seconds = {fmt: [r[fmt] for r in everyone] for fmt in compute.MEMORY_FORMATS}
    return min(compute.MEMORY_FORMATS, key=lambda fmt: max(seconds[fmt])), seconds


def _links(device: torch.device, group: comm.Group) -> dict[str, dict[str, float]]:
    """Latency (s) and bandwidth (bytes/s) of each collective, over the group."""
    world = comm.world_size(group)
    ops = {
        "all_gather": lambda n: comm.all_gather_uneven(
            torch.zeros(n // 4 // world, device=device), [n // 4 // world] * world, dim=0, group=group),
        "all_reduce": lambda n: comm.all_reduce_sum_(torch.zeros(n // 4, device=device), group=group),
        # DDP's reducer calls the backend itself (gloo over TCP even on one host)
        "ddp_all_reduce": lambda n: comm.all_reduce_sum_(torch.zeros(n // 4, device=device), group=group,
                                                         shared=False),
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


def model_signature(model: nn.Module) -> str:
    """A short hash of the model's class and its parameters' and buffers' shapes
    and dtypes (float64 weights hold twice the bytes and time otherwise)."""
    text = json.dumps([type(model).__name__, [(k, list(v.shape), str(v.dtype)) for k, v in model.state_dict().items()]])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def profile_key(*, devices: Sequence[str], threads: Sequence[int], hosts: Sequence[str], model: nn.Module,
                input_shape: Sequence[int], batch_size: int, precision: str = "32",
                memory_format: str = "contiguous", optimizer: str = DEFAULT_OPTIMIZER[0],
                momentum: float = DEFAULT_OPTIMIZER[1]) -> ProfileKey:
    """What a profile was measured on, everything its figures depend on; a
    cached profile is reused only for the same key."""
    state_copies(optimizer, momentum)  # refuses an unknown optimizer
    return {"devices": list(devices), "threads": list(threads), "hosts": list(hosts),
            "model": model_signature(model), "input_shape": list(input_shape), "batch_size": batch_size,
            "torch": torch.__version__, "precision": precision, "memory_format": memory_format,
            "optimizer": optimizer, "momentum": float(momentum)}


def job_key(model: nn.Module, *, device_spec: str, input_shape: Sequence[int], batch_size: int,
            precision: str = "32", memory_format: str = "contiguous", optimizer: str = DEFAULT_OPTIMIZER[0],
            momentum: float = DEFAULT_OPTIMIZER[1], group: comm.Group = None) -> ProfileKey:
    """``profile_key`` of the running job (a collective: every rank names its device, threads and host)."""
    everyone = comm.gather_objects((device_spec, torch.get_num_threads(), devices.host_name()), group=group)
    return profile_key(devices=[e[0] for e in everyone], threads=[e[1] for e in everyone],
                       hosts=[e[2] for e in everyone], model=model, input_shape=input_shape, batch_size=batch_size,
                       precision=precision, memory_format=memory_format, optimizer=optimizer, momentum=momentum)


def _sharing_group(key: ProfileKey, group: comm.Group) -> tuple[comm.Group, list[int]]:
    """The process group of the ranks that share this rank's core or GPU
    (``devices.sharing``; None when it has its hardware alone), and those
    ranks, this one included (a collective: every rank makes every such group)."""
    mine, members = None, [comm.rank(group)]
    if comm.world_size(group) > 1:
        ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
        for sharing in devices.sharing(key["devices"], key["hosts"]):
            made = dist.new_group([ranks[r] for r in sharing])
            if comm.rank(group) in sharing:
                mine, members = made, sharing
    return mine, members


def measure(model: nn.Module, *, key: ProfileKey, input_shape: Sequence[int], classes: int, batch_size: int,
            repeats: int = 2, group: comm.Group = None) -> Profile:
    """Profile this job (a collective; ``model`` unsharded, on this rank's
    device, the same on every rank; ``key`` from ``job_key``). Returns the
    same profile on every rank."""
    device = next(model.parameters()).device
    world = comm.world_size(group)
    model_cut = cut(model, input_shape)
    precision, fmt = key.get("precision", "32"), key.get("memory_format", "contiguous")
    name, momentum = key.get("optimizer", DEFAULT_OPTIMIZER[0]), key.get("momentum", DEFAULT_OPTIMIZER[1])
    rows = -(-batch_size // world)  # a batch-mode group's rows per rank, evenly split
    # memory first, before any timing leaves the allocator holding freed buffers
    together, sharing = _sharing_group(key, group)
    how = _Compute(precision, optimizer=name, momentum=momentum, together=together)
    held, step = _step_memory(model, input_shape, classes, rows, device, how)
    mine: dict = {"fits": [], "batch": [], "step": step,
                  "runtime": 0 if device.type == "cuda" else held}  # a GPU's free memory is read with us there
    format_seconds = None
    if fmt == "auto":
        fmt, format_seconds = _faster_format(model, input_shape, classes, batch_size, device, group, how)
    how = replace(how, memory_format=fmt)
    elem = compute.activation_bytes(precision, next(model.parameters()).dtype)  # per activation element
    layers = []
    for layer in model_cut.groups:
        mine["fits"].append(_fit_layer(
            lambda k: _time_group(layer, k, batch_size, device, repeats, group, how), layer.kernels, world, group))
        layers.append(layer_fields(layer, batch_size, elem, next(model.parameters()).element_size(), rows))
    if world > 1:
        _calibrate(mine["fits"], model_cut.groups, batch_size, device, group, how, sharing)
        mine["batch"] = [_time_group(layer, layer.kernels, rows, device, repeats, group, how)
                         for layer in model_cut.groups]
    mine["rest"] = _step_seconds(model_cut.rest(batch_size, device), input_shape, classes, batch_size, device,
                                 repeats, group, how)
    mine["update"] = _update_seconds_per_byte(sum(layer.param_elements for layer in model_cut.groups), device,
                                              repeats, group, how)
    links = _links(device, group) if world > 1 else {}
    mine["memory"] = device_memory(device)
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
        "device_memory": [r["memory"] for r in everyone],
        "runtime_bytes": [r["runtime"] for r in everyone],
        "activation_scale": [activation_scale(layers, param_bytes, batch_size, rows, r["step"],
                                              state=state_copies(name, momentum)) for r in everyone],
        "batchnorm": any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()),
        "traced": model_cut.traced,
        "precision": precision,
        "memory_format": fmt,
        "optimizer": name,
        "momentum": float(momentum),
        **({"format_seconds": format_seconds} if format_seconds else {}),
    }, "measured profile")
