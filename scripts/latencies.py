"""How fast the planner and the launcher respond, as figures rather than test bounds.

    python scripts/latencies.py --out runs/latencies.json

- ``choose_counts_ms``: ``splits.choose_counts`` splitting 1500 kernels over 8
  ranks (best of ``--repeats``);
- ``failure_seconds``: ``launch_local`` of 3 workers, one of which raises once
  joined: from the call to ``WorkerFailed`` (spawn and join included);
- ``hang_limit_seconds``: 2 workers that never return under a 3 s limit:
  from the call to ``WorkerFailed`` (each of ``--repeats`` runs);
- ``meeting_us``: 2 workers on cores 0 and 1, mean microseconds over 200
  calls of gloo's barrier, of a small all-gather through shared memory
  (``comm.all_gather_uneven`` of 128 floats: what a batch-mode BatchNorm
  sends) and of gloo's own all-reduce of 128 floats.

The seconds from a SIGKILLed worker to the command's exit are recorded by
``pytest tests/test_launch.py -k sigkill --junitxml=r.xml``
(``sigkill_to_exit_seconds``). Writes one JSON file and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch.distributed as dist

from convshard.plan.splits import choose_counts
from convshard.run.launch import WorkerFailed, init_from_env, launch_local


def _fail_on_rank_1() -> None:
    rank, _, _ = init_from_env("gloo", timeout=60)
    if rank == 1:
        raise RuntimeError("boom on rank 1")
    dist.barrier()  # waits for the peer that failed


def _hang() -> None:
    time.sleep(600)


def _meetings() -> dict:
    import torch

    from convshard.parallel import comm

    rank, _, _ = init_from_env("gloo", timeout=60)
    os.sched_setaffinity(0, {rank % os.cpu_count()})
    calls = {"gloo_barrier": lambda: dist.barrier(),
             "shared_memory_all_gather": lambda: comm.all_gather_uneven(torch.zeros(1, 2, 64), (1, 1), dim=0),
             "gloo_all_reduce": lambda: dist.all_reduce(torch.zeros(128))}
    out = {}
    for name, call in calls.items():
        for _ in range(20):
            call()
        start = time.perf_counter()
        for _ in range(200):
            call()
        out[name] = 1e6 * (time.perf_counter() - start) / 200
    return out


def _seconds_to_failure(fn, world_size: int, limit: float) -> float:
    start = time.monotonic()
    try:
        launch_local(fn, world_size, timeout=limit, env={"OMP_NUM_THREADS": "1"})
    except WorkerFailed:
        return time.monotonic() - start
    raise RuntimeError(f"{fn.__name__} did not fail")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="runs/latencies.json")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"
    a, b = [1e-3 * (r + 1) for r in range(8)], [1e-5 * (r + 1) for r in range(8)]
    split = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        choose_counts(1500, a, b)
        split.append(1000 * (time.perf_counter() - start))
    report = {
        "choose_counts_ms": min(split),
        "failure_seconds": [_seconds_to_failure(_fail_on_rank_1, 3, 60) for _ in range(args.repeats)],
        "hang_limit_seconds": [_seconds_to_failure(_hang, 2, 3) for _ in range(args.repeats)],
        "meeting_us": launch_local(_meetings, 2, timeout=120, env={"OMP_NUM_THREADS": "1"})[0],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
