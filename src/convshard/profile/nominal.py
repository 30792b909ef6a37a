"""A nominal profile: the model's shape, every device at one rate, free links.

A job whose plan was given (flags, ``--plan FILE``) has measured nothing;
rebalancing it (``convshard.run.rebalance``) still prices splits with the
one cost model, ``cost.predict``, on this profile. For channel group g of
K_g kernels, each kernel costs w_g multiply-adds per image: the sum over
the group's convs of C_in kh kw P, with P the conv's output pixels. On
every device

    t_g(k) = 3 w_g B k / RATE            (kernel mode: a = 0, b = 3 w_g B / RATE)
    T_g    = 3 w_g K_g b / RATE          (batch mode, b = ceil(B / W) rows)

(forward and the two convolutions of backward, at RATE multiply-adds per
second); the replicated rest and the optimizer cost nothing, and every
link moves any number of bytes at once. Only ratios between ranks matter
to rebalancing, which multiplies each device's times by how much slower
it measures than they say.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..precision import activation_bytes
from .schema import VERSION, Profile, check
from .segments import Segment, cut, layer_fields
from .timings import profile_key

RATE = 1e9  # multiply-adds per second of every device
FREE_LINK = {"latency": 0.0, "bandwidth": 1e30}  # bytes per second: no transfer takes time
COLLECTIVES = ("all_gather", "all_reduce", "ddp_all_reduce", "reduce_scatter", "broadcast", "all_to_all")


def conv_work(segment: Segment) -> int:
    """Multiply-adds per image of one kernel of ``segment``'s conv: C_in kh kw P."""
    conv = segment.conv
    x = torch.empty(1, *segment.input_shape, device="meta")
    w = torch.empty(1, conv.in_channels, *conv.kernel_size, device="meta")
    out = F.conv2d(x, w, None, conv.stride, conv.padding, conv.dilation)  # (1, 1, H', W'), shapes only
    return conv.in_channels * math.prod(conv.kernel_size) * out.size(-2) * out.size(-1)


def nominal(model: nn.Module, *, devices: Sequence[str], input_shape: Sequence[int], batch_size: int,
            precision: str = "32") -> Profile:
    """The nominal profile of ``model`` (unsharded, on any device) on
    ``devices`` at ``batch_size`` rows (module docstring)."""
    world = len(devices)
    rows = -(-batch_size // world)
    param = next(model.parameters())
    elem = activation_bytes(precision, param.dtype)
    layers, model_cut = [], cut(model, input_shape)
    for group in model_cut.groups:
        per_kernel = 3 * sum(conv_work(s) for s in group.segments) / RATE  # seconds per kernel and image
        layers.append({**layer_fields(group, batch_size, elem, param.element_size(), rows),
                       "a": [0.0] * world, "b": [per_kernel * batch_size] * world,
                       **({"batch_seconds": [per_kernel * group.kernels * rows] * world} if world > 1 else {})})
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    grouped = sum(layer["param_bytes"] for layer in layers)
    key = profile_key(devices=devices, threads=[1] * world, hosts=["nominal"] * world, model=model,
                      input_shape=input_shape, batch_size=batch_size, precision=precision)
    return check({"version": VERSION, "key": key, "batch_size": batch_size, "devices": list(devices),
                  "layers": layers, "rest_seconds": [0.0] * world, "update_seconds_per_byte": [0.0] * world,
                  "param_bytes": param_bytes, "replicated_param_bytes": param_bytes - grouped,
                  "links": {kind: dict(FREE_LINK) for kind in COLLECTIVES} if world > 1 else {},
                  "precision": precision, "traced": model_cut.traced}, "nominal profile")
