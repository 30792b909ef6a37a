"""Compute precision and memory format: what a plan computes in, and how.

``--precision 32|bf16|fp16`` sets the dtype of the compute, not of the model:

- master weights, their gradients and the optimizer state stay float32 (the
  model's dtype); the forward runs under ``torch.autocast``, so convs and
  linear layers compute in the lower dtype and activations (and their
  gradients) are stored and sent in it: 2 bytes per element instead of 4;
- the loss is float32 (computed from the logits cast up), and so are
  BatchNorm's statistics: ``nn.BatchNorm2d`` accumulates in float32 on a
  bf16 input, the global-batch statistics of batch mode are taken on the
  input cast to float32 (``convshard.parallel.batch``);
- ``fp16`` scales the loss (``LossScaler``): its range ends at 65504, so
  small gradients underflow without it. Every rank takes or skips a step
  alike: whether any gradient overflowed is one flag, reduced across ranks.

``32`` is the default: the sharded run then matches one device up to float
rounding. ``bf16`` has float32's range, so it needs no loss scaling; its
8-bit mantissa rounds each stored activation to a relative 2^-9.

``--grad-precision bf16`` sends the gradient sums of batch-mode groups
and of DDP in bf16 (half the bytes of float32; DDP's
``bf16_compress_hook``): each gradient is rounded to bf16 before the sum,
the sum rounds once more, and the result is cast back to float32 for the
optimizer. Kernel-mode shards have no sum to send. The default, 32, keeps
the exact sum.

``--memory-format channels_last`` stores 4-D activations and conv weights
as (N, H, W, C) in memory, which many conv kernels run faster on; shapes
and results do not change.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.distributed as dist

from .errors import ConfigError
from .parallel import wire

PRECISIONS: tuple[str, ...] = ("32", "bf16", "fp16")
MEMORY_FORMATS: tuple[str, ...] = ("contiguous", "channels_last")  # and "auto": the profile's faster one
GRAD_PRECISIONS: tuple[str, ...] = ("32", "bf16")  # the dtype gradient sums travel in
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def compute_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of ``precision``; None for 32 (the model's own dtype)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    return _DTYPES.get(precision)


def grad_dtype(grad_precision: str) -> torch.dtype | None:
    """The dtype gradient sums travel in (``--grad-precision``); None for 32 (the gradients' own)."""
    if grad_precision not in GRAD_PRECISIONS:
        raise ConfigError(f"gradient precision {grad_precision!r} is not one of {', '.join(GRAD_PRECISIONS)}")
    return _DTYPES.get(grad_precision)


def activation_bytes(precision: str, model_dtype: torch.dtype = torch.float32) -> int:
    """Bytes per activation element, as stored and sent: 2 in bf16 and fp16, else the model's."""
    dtype = compute_dtype(precision)
    return (dtype or model_dtype).itemsize


def autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """The context the forward runs in: autocast to the precision's dtype (nothing at 32)."""
    dtype = compute_dtype(precision)
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def for_compute(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """``tensors`` cast to autocast's dtype when autocast is on for their
    device (as autocast would cast them inside a conv), else as they are.
    A custom autograd Function calls this outside its forward, so that its
    backward sees one dtype; the casts carry gradients back in each input's own dtype."""
    first = next(t for t in tensors if t is not None)
    kind = first.device.type
    if not torch.is_autocast_enabled(kind):
        return tensors
    dtype = torch.get_autocast_dtype(kind)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)


def memory_format(name: str) -> torch.memory_format:
    """The torch memory format of ``--memory-format`` (resolved: not auto)."""
    if name not in MEMORY_FORMATS:
        raise ConfigError(f"memory format {name!r} is not one of {', '.join(MEMORY_FORMATS)}")
    return torch.channels_last if name == "channels_last" else torch.contiguous_format


def fast_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 in hardware (CPU: AVX512-BF16 or AMX;
    CUDA: compute capability 8.0 or later). Elsewhere bf16 is emulated, slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 0)
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def check(precision: str, kinds: Sequence[str]) -> None:
    """Refuse a precision the job's devices (their kinds, ``cpu`` or ``cuda``) cannot share:
    fp16 runs on CUDA only (CPUs have no fp16 arithmetic worth running)."""
    compute_dtype(precision)
    if precision == "fp16" and any(kind != "cuda" for kind in kinds):
        raise ConfigError("--precision fp16 needs every device to be CUDA; "
                          "CPU workers compute in --precision bf16 (or 32)")


class LossScaler:
    """Dynamic loss scaling (fp16), as ``torch.amp.GradScaler`` does it, agreed by every rank.

    The loss is multiplied by S before backward, so gradients are S times
    too large in fp16 and do not underflow; ``unscale`` divides the
    (float32) weight gradients by S and says whether the step may be taken.
    When any gradient on any rank is inf or NaN, every rank skips the step
    and S halves; after ``growth_interval`` good steps in a row S doubles.
    Disabled (precision 32, bf16): S = 1 and every step is taken.
    """

    def __init__(self, enabled: bool, *, init_scale: float = 2.0**16, growth_interval: int = 2000) -> None:
        self.enabled, self.scale, self.good_steps = enabled, init_scale if enabled else 1.0, 0
        self.growth_interval = growth_interval

    def unscale(self, params: Iterable[torch.nn.Parameter], group: dist.ProcessGroup | None) -> bool:
        """Divide the gradients by S; True when the step may be taken (on every rank alike)."""
        if not self.enabled:
            return True
        grads = [p.grad for p in params if p.grad is not None]
        found = torch.zeros(1)
        by_device: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for g in grads:
            by_device.setdefault((g.device, g.dtype), []).append(g)
        for (device, _), same in by_device.items():
            flag = torch.zeros(1, device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(same, flag, torch.full((1,), 1 / self.scale,
                                                                                     device=device))
            found += flag.cpu()
        ok = wire.reduce_scalar(found.item(), op="max", group=group) == 0
        self.good_steps = self.good_steps + 1 if ok else 0
        if not ok:
            self.scale /= 2
        elif self.good_steps % self.growth_interval == 0:
            self.scale *= 2
        return ok

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict) -> None:
        if self.enabled and state:
            self.scale, self.good_steps = float(state["scale"]), int(state["good_steps"])
