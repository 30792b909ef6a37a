"""The plain PyTorch loop: the baseline a user would write, with no convshard code in its step.

``python -m convshard.tools.plain --model resnet18 --batch-size 64
--precision bf16 --threads 2 --steps 6 --metrics-out m.json`` trains the
built-in model (the same constructor and seed as ``convshard train``) on
random CIFAR-shaped images in one process:

    with torch.autocast("cpu", dtype=torch.bfloat16):   # bf16; nothing at 32
        out = model(x)
    loss = F.cross_entropy(out.float(), y)
    optimizer.zero_grad(); loss.backward(); optimizer.step()

SGD with momentum, as convshard's default. ``--memory-format auto`` runs
the steps in contiguous and in channels_last format and reports the faster format's
mean: the plain loop at its best. The metrics JSON carries the fields
``convshard bench`` reads: ``mean_step_seconds`` (after ``--warmup``
steps), ``train_loss``, the peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from .. import atomic, precision
from ..models import build_model


def _steps(model: torch.nn.Module, fmt: str, args: argparse.Namespace) -> tuple[list[float], float]:
    """Seconds of each step of ``model`` in memory format ``fmt``, and the last loss."""
    memory = precision.memory_format(fmt)
    model = model.to(memory_format=memory)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    generator = torch.Generator().manual_seed(args.seed)
    times, loss = [], float("nan")
    for _ in range(args.steps):
        x = torch.randn(args.batch_size, *args.shape, generator=generator).contiguous(memory_format=memory)
        y = torch.randint(args.classes, (args.batch_size,), generator=generator)
        t0 = time.perf_counter()
        with precision.autocast(x.device, args.precision):
            out = model(x)
        loss_t = F.cross_entropy(out.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss_t.backward()
        optimizer.step()
        loss = loss_t.item()
        times.append(time.perf_counter() - t0)
    return times[args.warmup :], loss


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m convshard.tools.plain", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="paper")
    p.add_argument("--kernels", type=lambda s: tuple(int(k) for k in s.split(",")))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--shape", type=lambda s: tuple(int(k) for k in s.split(",")), default=(3, 32, 32))
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--precision", choices=precision.PRECISIONS, default="32")
    p.add_argument("--memory-format", choices=(*precision.MEMORY_FORMATS, "auto"), default="auto")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--metrics-out", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    formats = precision.MEMORY_FORMATS if args.memory_format == "auto" else (args.memory_format,)
    seconds: dict[str, list[float]] = {fmt: [] for fmt in formats}
    loss = float("nan")
    for fmt in formats:  # the same initial model in every format
        torch.manual_seed(args.seed)
        times, loss = _steps(build_model(args.model, args.shape, args.classes, args.kernels), fmt, args)
        seconds[fmt] = times
    means = {fmt: statistics.fmean(t) for fmt, t in seconds.items()}
    best = min(means, key=means.get)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    atomic.write_text(args.metrics_out, json.dumps({
        "mean_step_seconds": means[best], "format_seconds": means, "memory_format": best, "train_loss": loss,
        "strategy": "plain loop", "devices": [f"{args.threads} thread(s)"], "shares": {},
        "precision": args.precision, "timeline": {"peak_rss_mib": [peak_mib]},
    }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
