"""Does the shared-memory path pay end to end? Training steps with it on and off, side by side.

    python scripts/shm_step.py --out runs/shm_step.json

Each job is ``convshard train --strategy kernel`` (or ``--strategy
layers``) on ``cpu@0,cpu@1 --threads 1``, synthetic CIFAR-shaped data,
``--steps`` steps (3 of them warm-up), once as it runs by default (ranks
on one host move a collective's bytes through shared memory and meet at a
shared-memory barrier, ``convshard.parallel.shm``) and once with
``CONVSHARD_SHM=0`` (gloo's own TCP path over loopback). The two run in
turn, ``--rounds`` times, and each job's figure is its median
``mean_step_seconds``. Writes one JSON file and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

JOBS = {  # name -> convshard train arguments
    "resnet18 b16 kernel": ["--model", "resnet18", "--batch-size", "16", "--strategy", "kernel"],
    "vgg11 b16 kernel": ["--model", "vgg11", "--batch-size", "16", "--strategy", "kernel"],
}


def _step_ms(args: list[str], shm: bool, steps: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **({} if shm else {"CONVSHARD_SHM": "0"})}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "m.json"
        cmd = [sys.executable, "-m", "convshard", "train", "--dataset", "synthetic", "--devices", "cpu@0,cpu@1",
               "--threads", "1", "--max-steps", str(steps), "--quiet", "--metrics-out", str(out), *args]
        subprocess.run(cmd, env=env, check=True, stdin=subprocess.DEVNULL, timeout=1800)
        return 1000 * json.loads(out.read_text())["mean_step_seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/shm_step.json")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    opts = parser.parse_args()
    rounds = {name: {"shm": [], "gloo": []} for name in JOBS}
    for _ in range(opts.rounds):
        for name, args in JOBS.items():
            rounds[name]["shm"].append(_step_ms(args, True, opts.steps))
            rounds[name]["gloo"].append(_step_ms(args, False, opts.steps))
    result = {name: {"shm_ms": statistics.median(r["shm"]), "gloo_ms": statistics.median(r["gloo"]),
                     "rounds": r} for name, r in rounds.items()}
    for r in result.values():
        r["gloo_over_shm"] = r["gloo_ms"] / r["shm_ms"]
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'job':<22} {'shared memory ms':>17} {'gloo only ms':>13} {'ratio':>6}")
    for name, r in result.items():
        print(f"{name:<22} {r['shm_ms']:>17.1f} {r['gloo_ms']:>13.1f} {r['gloo_over_shm']:>6.2f}")


if __name__ == "__main__":
    main()
