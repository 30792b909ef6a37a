"""The memory model: the bytes each device holds at its peak under a plan, and the most a device may be given.

From the profile (batch B, W devices; bytes in the parameters' dtype): per
channel group g its K_g kernels, parameter bytes P_g, the bytes of its
output over the whole batch with all kernels O_g = max(K_g
gather_bytes_per_kernel, sum of its outputs' bytes) and of its inputs held
whole I_g (replicated inputs and inputs gathered from a channel split);
P_rep, the parameters of the replicated rest. Each parameter byte comes
with a gradient and s bytes of optimizer state (``state_copies``: s = 2
for Adam and AdamW, their two moments; 1 for SGD with momentum, its
momentum buffer; 0 for SGD with momentum 0, which keeps none): (2 + s)
bytes held per parameter byte, s read from the optimizer the profile names
(``optimizer_of``). Rank r of a plan holds

    R_r + sharded engine:  (2+s) P_rep + sum_g m_{r,g}
      kernel mode:   m_{r,g} = (2+s) P_g c_r/K + sigma_r (I_g + SAVED O_g c_r/K + O_g W max_r c_r / K)
      batch mode:    m_{r,g} = (2+s) P_g + sigma_r ((I_g + SAVED O_g) b_r/B + O_g)
    R_r + ddp engine:      (2+s) P + P + sigma_r sum_g (I_g + SAVED O_g) b_r/B

SAVED = 4 counts what backward keeps per byte of a group's output (the
conv's output before pooling, the normalised and activated values); the
last term of each mode is the gathered buffer (padded to the largest share
in kernel mode); DDP adds its gradient buckets, a copy of P.

Two terms are measured by the profile on each device
(``convshard.profile.timings``), because a process holds more than its
tensors: R_r, the bytes rank r's process held before a training step
(Python, torch, the data, the model, the allocator's cache: its resident
set on a CPU; 0 on a GPU, whose free memory is read with the process
already there), and sigma_r (``activation_scale``), the bytes one step of
the whole model at b rows added, S_r, over what the terms above count for
it: sigma_r = max(1, (S_r - (1+s) P) / (sum_g (I_g + SAVED O_g) b / B)),
the step's gradients and the optimizer state it creates taken out. It
folds in what the count leaves out: the rest's activations, the
convolution's work buffers, the allocator's slack.

``caps`` inverts it for the planner: the largest share f_r = c_r / K of
every group, and the most rows b_r, that keep rank r within its memory
M_r, from the model above with each gathered buffer taken as O_g (an even
split's; the planner still checks every plan it builds with ``peak_bytes``):

    f_r <= (M_r - R_r - (2+s) P_rep - sum_g (I_g + O_g)) / sum_g ((2+s) P_g + SAVED O_g)
    b_r <= B (M_r - R_r - (2+s) P - sum_g O_g) / sum_g (I_g + SAVED O_g)

M_r is the device's memory as the profile read it (``device_memory``), or
the limit a user sets (``--device-memory``, ``with_limits``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import torch

from ..errors import ConfigError
from . import DDP, KERNEL, Plan

SAVED = 4  # bytes backward keeps per byte of a group's output
DEFAULT_OPTIMIZER = ("sgd", 0.9)  # (name, momentum) of a profile that names none: what every such one measured


def state_copies(optimizer: str, momentum: float) -> int:
    """s: the bytes of optimizer state torch keeps per parameter byte:
    Adam and AdamW two (``exp_avg``, ``exp_avg_sq``; their one-element step
    count is left out), SGD with momentum one (``momentum_buffer``), SGD
    with momentum 0 none."""
    if optimizer in ("adam", "adamw"):
        return 2
    if optimizer == "sgd":
        return 1 if momentum else 0
    raise ConfigError(f"optimizer {optimizer!r}: expected sgd, adam or adamw")


def optimizer_of(profile: Mapping) -> tuple[str, float]:
    """(name, momentum) of the optimizer the profile was measured with and is
    planned for; ``DEFAULT_OPTIMIZER`` where it names none."""
    return profile.get("optimizer", DEFAULT_OPTIMIZER[0]), profile.get("momentum", DEFAULT_OPTIMIZER[1])


def held_per_byte(profile: Mapping) -> int:
    """2 + s: the bytes held per parameter byte (weight, gradient, optimizer state)."""
    return 2 + state_copies(*optimizer_of(profile))


def output_bytes(layer: Mapping) -> float:
    """O_g: the group's output, whole batch, all kernels."""
    return max(layer["kernels"] * layer["gather_bytes_per_kernel"], sum(v["bytes"] for v in layer["outputs"]))


def input_bytes(layer: Mapping) -> float:
    """I_g: the group's inputs that every rank holds whole."""
    return sum(v["bytes"] for v in layer["inputs"]) + layer["input_grad_scatter_bytes"]


def peak_bytes(profile: Mapping, plan: Plan) -> tuple[float, ...]:
    """Per rank of ``plan``, the bytes it holds at its peak (module docstring)."""
    batch, world = plan.batch_size, plan.world
    split = {g.name: g for g in plan.groups}
    per_byte = held_per_byte(profile)
    runtime = profile.get("runtime_bytes", [0] * world)
    sigma = profile.get("activation_scale", [1.0] * world)
    if plan.engine == DDP:
        acts = sum(input_bytes(layer) + SAVED * output_bytes(layer) for layer in profile["layers"])
        return tuple(held + (per_byte + 1) * profile["param_bytes"] + s * acts * b / batch
                     for held, s, b in zip(runtime, sigma, plan.rows))
    peak = [held + per_byte * profile["replicated_param_bytes"] for held in runtime]
    for layer in profile["layers"]:
        g, k = split[layer["name"]], layer["kernels"]
        out, inp, params = output_bytes(layer), input_bytes(layer), layer["param_bytes"]
        for r in range(world):
            if g.mode == KERNEL:
                share = g.counts[r] / k
                gathered = out * world * max(g.counts) / k  # padded to the largest share
                peak[r] += per_byte * params * share + sigma[r] * (inp + SAVED * out * share + gathered)
            else:
                peak[r] += per_byte * params + sigma[r] * ((inp + SAVED * out) * plan.rows[r] / batch + out)
    return tuple(peak)


def caps(profile: Mapping) -> tuple[list[float], list[int]]:
    """Per device, the largest kernel share f_r (0..1) and the most rows b_r
    that fit its memory (module docstring); unbounded without ``device_memory``."""
    world, batch = len(profile["devices"]), profile["batch_size"]
    limits = profile.get("device_memory")
    if limits is None:
        return [1.0] * world, [batch] * world
    layers, per_byte = profile["layers"], held_per_byte(profile)
    shares, rows = [], []
    for m, held, s in zip(limits, profile.get("runtime_bytes", [0] * world),
                          profile.get("activation_scale", [1.0] * world)):
        fixed = per_byte * profile["replicated_param_bytes"] + s * sum(input_bytes(g) + output_bytes(g) for g in layers)
        per_share = sum(per_byte * g["param_bytes"] + s * SAVED * output_bytes(g) for g in layers)
        whole = per_byte * profile["param_bytes"] + s * sum(output_bytes(g) for g in layers)
        per_row = s * sum(input_bytes(g) + SAVED * output_bytes(g) for g in layers) / batch
        free = m - held
        shares.append(min(1.0, (free - fixed) / per_share) if per_share else (1.0 if free >= fixed else -1.0))
        rows.append(min(batch, math.floor((free - whole) / per_row)) if per_row else batch)
    return shares, rows


def with_limits(profile: Mapping, limits: Sequence[float] | None) -> Mapping:
    """``profile`` with each device's memory set to ``limits`` (bytes, one per
    device, or one for all; ``--device-memory``); the profile itself without."""
    if not limits:
        return profile
    world = len(profile["devices"])
    if len(limits) not in (1, world):
        raise ConfigError(f"--device-memory gives {len(limits)} sizes for {world} devices: give one, or one "
                          f"per device")
    return {**profile, "device_memory": [float(m) for m in (limits * world if len(limits) == 1 else limits)]}


def activation_scale(layers: Sequence[Mapping], param_bytes: float, batch: int, rows: int, step: float, *,
                     state: int) -> float:
    """sigma_r: the bytes one measured training step of the whole model at
    ``rows`` rows added (``step``: gradients, the optimizer's ``state``
    bytes per parameter byte, what backward kept, the allocator's own) over
    what the model counts for it, (1 + state) P + sum_g (I_g + SAVED O_g)
    rows / B; at least 1."""
    counted = sum(input_bytes(g) + SAVED * output_bytes(g) for g in layers) * rows / batch
    return max(1.0, (step - (1 + state) * param_bytes) / counted) if counted > 0 else 1.0


def held_bytes(device: torch.device) -> int:
    """What this process holds on ``device`` now: its resident set on a CPU, its tensors on a GPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return _status_bytes("VmRSS")


def reset_peak(device: torch.device) -> None:
    """Start a new high-water mark of ``held_bytes`` (on Linux, writing 5 to
    /proc/self/clear_refs resets VmHWM; where that is refused the mark stays
    the process's own, an over-estimate)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_held_bytes(device: torch.device) -> int:
    """The high-water mark of ``held_bytes`` since ``reset_peak``."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _status_bytes("VmHWM")


def _status_bytes(field: str) -> int:
    """A ``kB`` field of /proc/self/status, in bytes (0 where there is none)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def device_memory(device: torch.device) -> int:
    """Bytes a worker on ``device`` may use: a GPU's free memory now
    (``torch.cuda.mem_get_info``), else the host's RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def format_bytes(n: float) -> str:
    """Bytes in a short binary unit: '1.5 GiB'."""
    units, i = ("B", "KiB", "MiB", "GiB", "TiB"), 0
    while abs(n) >= 1024 and i < len(units) - 1:
        n, i = n / 1024, i + 1
    return f"{n:.0f} B" if i == 0 else f"{n:.1f} {units[i]}"
