"""Synthetic profiles for the cost model and the planner: no processes, no torch.

``make_profile`` builds one from per-rank speeds: rank r's costs are the base
costs divided by speeds[r]. ``random_profile`` draws a small model whose values
skip ahead to several readers, as a ResNet's do.
"""

from __future__ import annotations

import random

LINKS = ("all_gather", "all_reduce", "reduce_scatter", "broadcast", "all_to_all", "ddp_all_reduce")


def make_profile(speeds=(1.0, 1.0, 1.0), *, kernels=(512, 1024), a=1e-3, per_kernel=1e-4, gather_bytes=1000,
                 input_grad_bytes=10_000, rest=1e-3, param_bytes=100_000_000, replicated_param_bytes=10_000,
                 bandwidth=1e9, latency=1e-5, batchnorms=0, update=0.0) -> dict:
    """A chain of len(kernels) groups on len(speeds) ranks; the first group's input needs no gradient."""
    world = len(speeds)
    layers = [
        {
            "name": f"conv{i}",
            "kernels": k,
            "gather_bytes_per_kernel": gather_bytes,
            "input_grad_bytes": input_grad_bytes if i else 0,
            "input_grad_scatter_bytes": 0,
            "a": [a / s for s in speeds],
            "b": [per_kernel / s for s in speeds],
            # batch mode: the group's whole work on ceil(64 / W) rows
            "batch_rows": -(-64 // world),
            "batch_seconds": [(a + per_kernel * k) / s * -(-64 // world) / 64 for s in speeds],
            "param_bytes": (param_bytes - replicated_param_bytes) // len(kernels),
            "batchnorms": batchnorms,
            "inputs": [{"bytes": input_grad_bytes, "grad": bool(i)}],
            "outputs": [{"bytes": gather_bytes * k, "elements": 1,
                         "convs": [f"conv{i + 1}"] if i + 1 < len(kernels) else [], "whole": i + 1 == len(kernels)}],
        }
        for i, k in enumerate(kernels)
    ]
    link = {"latency": latency, "bandwidth": bandwidth}
    return {
        "version": 2,
        "batch_size": 64,
        "devices": [f"cpu@{r}" for r in range(world)],
        "layers": layers,
        "rest_seconds": [rest / s for s in speeds],
        "update_seconds_per_byte": [update / s for s in speeds],
        "param_bytes": param_bytes,
        "replicated_param_bytes": replicated_param_bytes,
        "links": {kind: dict(link) for kind in LINKS} if world > 1 else {},
    }


def random_profile(rng: random.Random, *, groups: int, world: int) -> dict:
    """``groups`` groups in graph order; each value is read by one to three later
    groups (skips included), or by the classifier; costs, bytes and links drawn at random."""
    speeds = [rng.uniform(0.2, 1.0) for _ in range(world)]
    names = [f"g{i}" for i in range(groups)]
    layers = []
    for i, name in enumerate(names):
        later = names[i + 1:]
        readers = rng.sample(later, min(len(later), rng.randint(1, 3))) if later else []
        k = rng.randint(world, 64)
        work = rng.uniform(1e-3, 5e-2)
        layers.append({
            "name": name, "kernels": k, "gather_bytes_per_kernel": 0, "input_grad_bytes": 0,
            "input_grad_scatter_bytes": 0,
            "a": [rng.uniform(0, 1e-3) / s for s in speeds], "b": [work / k / s for s in speeds],
            "batch_rows": -(-64 // world), "batch_seconds": [work * rng.uniform(0.3, 0.8) / s for s in speeds],
            "param_bytes": rng.choice([1e3, 1e5, 1e7]), "batchnorms": rng.randint(0, 2),
            "inputs": [{"bytes": rng.choice([1e4, 1e6]), "grad": i > 0 and rng.random() < 0.3}],
            "outputs": [{"bytes": rng.choice([1e4, 1e6, 1e8]), "elements": 1, "convs": readers,
                         "whole": not readers or rng.random() < 0.2}],
        })
    bandwidth = 10 ** rng.uniform(7, 10)
    return {"version": 2, "batch_size": 64, "devices": [f"cpu@{r}" for r in range(world)], "layers": layers,
            "rest_seconds": [rng.uniform(1e-3, 1e-2) / s for s in speeds],
            "update_seconds_per_byte": [1e-10 / s for s in speeds],
            "param_bytes": sum(layer["param_bytes"] for layer in layers) + 1e4, "replicated_param_bytes": 1e4,
            "links": {kind: {"latency": rng.uniform(0, 1e-3), "bandwidth": bandwidth} for kind in LINKS}}
