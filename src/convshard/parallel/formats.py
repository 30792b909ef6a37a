"""Memory formats of split activations, on the wire and back.

A channels_last activation (B, C, H, W) lies in memory as (B, H, W, C).
Moving it between the two layouts is a strided copy, several times slower
than a plain one (docs/architecture.md has the measured step), so the
collectives of a channels_last model move its 4-d tensors in their own
layout: permuted to (B, H, W, C), a view, the split dimension mapped there
(channels 1 -> 3, rows 0 -> 0), and permuted back when they arrive,
channels_last again.

Every rank of a group must lay a transfer out alike (its slices are cut
and padded along one dimension), so the layout is the group's: ``shard``
sets it from the model (``model_format``), which it checks is the same on
every rank. A tensor in the other format still travels right, through
strided copies.
"""

from __future__ import annotations

import torch
from torch import nn

_NHWC = (0, 2, 3, 1)  # (B, C, H, W) -> (B, H, W, C)
_NCHW = (0, 3, 1, 2)  # and back
_WIRE: dict[object, torch.memory_format] = {}  # by process group (None: the default group)


def format_of(t: torch.Tensor) -> torch.memory_format:
    """``t``'s memory format: channels_last for a 4-d tensor laid out so (and
    not also contiguous, as a 1x1 image or a single channel is), else contiguous."""
    channels_last = t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def in_format_of(like: torch.Tensor | torch.memory_format, out: torch.Tensor) -> torch.Tensor:
    """``out`` in ``like``'s memory format (a tensor's, or a format): a
    gathered activation stays channels_last when its shards were, and a
    gradient comes back in its input's format (a gradient in another format
    than its activation sends every elementwise backward on a slow path)."""
    fmt = like if isinstance(like, torch.memory_format) else format_of(like)
    return out.contiguous(memory_format=fmt) if out.dim() == 4 else out


def model_format(model: nn.Module) -> torch.memory_format:
    """channels_last when one of ``model``'s 4-d parameters (a conv's
    weight) is laid out so, else contiguous."""
    fmts = {format_of(p) for p in model.parameters()}
    return torch.channels_last if torch.channels_last in fmts else torch.contiguous_format


def set_wire(group: object, fmt: torch.memory_format) -> None:
    """Move ``group``'s 4-d tensors in ``fmt``'s layout (module docstring)."""
    _WIRE[group] = fmt


def to_wire(t: torch.Tensor, dim: int, group: object) -> tuple[torch.Tensor, int, bool]:
    """``t`` and its split dimension ``dim`` as ``group`` moves them, and
    whether they were permuted (then ``from_wire`` turns the result back)."""
    if t.dim() != 4 or _WIRE.get(group) is not torch.channels_last:
        return t, dim, False
    return t.permute(*_NHWC), _NHWC.index(dim), True


def from_wire(t: torch.Tensor) -> torch.Tensor:
    """A (B, H, W, C) result of ``to_wire``'s layout as (B, C, H, W), channels_last."""
    return t.permute(*_NCHW)
