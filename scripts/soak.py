"""Soak benchmark: a long run that loses a worker twice and resumes, against one that does not.

    python scripts/soak.py --minutes 30 --out runs/soak.json

Trains the paper's CNN on MNIST across two workers (``cpu@0,cpu@1``) with a
checkpoint every ``--checkpoint-every`` steps, for about ``--minutes``. At a
third and two thirds of the time it SIGKILLs rank 1, measures how long the
launcher takes to exit, and starts the job again with ``--resume``. Then it
trains the same job without interruption and compares: final test accuracy,
weights (bitwise: same devices and seed), and each worker's resident memory
sampled every second (growth per 1000 steps). Writes one JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

JOB = ["train", "--devices", "cpu@0,cpu@1", "--threads", "1", "--kernels", "32,64", "--batch-size", "64",
       "--weight-decay", "0", "--label-smoothing", "0", "-v"]  # plain SGD, as the README's soak figures ran
STEPS_PER_EPOCH = 63  # 4000 MNIST training images in batches of 64
PID_LINE = re.compile(r"worker rank (\d+) \((\S+)\) pid (\d+)")


def _rss_mib(pid: int) -> float | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(r"VmRSS:\s+(\d+) kB", text)  # absent while the process is a zombie
    return int(match.group(1)) / 1024 if match else None


def _segment(args: list[str], kill_after: float | None, samples: list) -> dict:
    """Run ``convshard`` once; SIGKILL rank 1 after ``kill_after`` s if given."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "convshard", *args], env=env, stdin=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    pids: dict[int, int] = {}
    started, killed_at = time.monotonic(), None
    while proc.poll() is None:
        for line in list(lines):
            if match := PID_LINE.search(line):
                pids[int(match.group(1))] = int(match.group(3))
        now = time.monotonic() - started
        samples.append({"t": round(now, 1), **{f"rank{r}_mib": _rss_mib(p) for r, p in pids.items()}})
        if kill_after is not None and killed_at is None and now >= kill_after and 1 in pids:
            os.kill(pids[1], signal.SIGKILL)
            killed_at = time.monotonic()
        time.sleep(0.02 if killed_at else 1.0)  # after the kill, time the exit closely
    reader.join(timeout=10)
    buffer = "".join(lines)
    exit_seconds = time.monotonic() - killed_at if killed_at else None
    last_error = [line[line.index("convshard: error"):] for line in buffer.splitlines() if "convshard: error" in line]
    return {"returncode": proc.returncode, "seconds": time.monotonic() - started,
            "kill_to_exit_seconds": exit_seconds, "error": last_error[-1] if last_error else None}


def _growth_per_1000_steps(samples: list, steps: int, seconds: float) -> dict:
    """Least-squares slope of each rank's RSS against steps, in MiB per 1000 steps."""
    out = {}
    for key in ("rank0_mib", "rank1_mib"):
        points = [(s["t"], s[key]) for s in samples if s.get(key)]
        points = points[len(points) // 5 :]  # past start-up
        if len(points) < 3:
            continue
        n = len(points)
        mt, mr = sum(t for t, _ in points) / n, sum(r for _, r in points) / n
        slope = sum((t - mt) * (r - mr) for t, r in points) / sum((t - mt) ** 2 for t, _ in points)
        out[key.replace("_mib", "")] = slope * seconds / steps * 1000  # MiB/s -> MiB per 1000 steps
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0, help="training time per run (default: 30)")
    parser.add_argument("--step-seconds", type=float, default=0.03,
                        help="expected seconds per step, to size the run (default: 0.03)")
    parser.add_argument("--checkpoint-every", type=int, default=50)
    parser.add_argument("--work-dir", default="runs/soak")
    parser.add_argument("--out", default="runs/soak.json")
    args = parser.parse_args()

    work = Path(args.work_dir)
    epochs = max(3, round(args.minutes * 60 / args.step_seconds / STEPS_PER_EPOCH))
    common = [*JOB, "--epochs", str(epochs), "--checkpoint-every", str(args.checkpoint_every)]
    report: dict = {"command": " ".join(sys.argv), "epochs": epochs, "steps": epochs * STEPS_PER_EPOCH}

    interrupted, samples, segments = work / "interrupted", [], []
    third = args.minutes * 60 / 3
    for i, kill_after in enumerate((third, third, None)):
        extra = ["--resume"] if i else []
        segments.append(_segment([*common, *extra, "--checkpoint-dir", str(interrupted),
                                  "--metrics-out", str(work / "interrupted.json")], kill_after, samples))
    report["interrupted"] = {"segments": segments, "metrics": json.loads((work / "interrupted.json").read_text())}

    straight, straight_samples = work / "straight", []
    segment = _segment([*common, "--checkpoint-dir", str(straight), "--metrics-out", str(work / "straight.json")],
                       None, straight_samples)
    report["straight"] = {"segments": [segment], "metrics": json.loads((work / "straight.json").read_text())}

    a = torch.load(interrupted / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(straight / "checkpoint.pt", weights_only=True)["model"]
    report["weights_bitwise_equal"] = all(torch.equal(a[k], b[k]) for k in b)
    report["accuracy"] = {"interrupted": report["interrupted"]["metrics"]["test_accuracy"],
                          "straight": report["straight"]["metrics"]["test_accuracy"]}
    report["rss_growth_mib_per_1000_steps"] = _growth_per_1000_steps(
        straight_samples, report["steps"], segment["seconds"])
    report["rss_samples"] = {"interrupted": samples, "straight": straight_samples}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    summary = {k: report[k] for k in ("epochs", "steps", "weights_bitwise_equal", "accuracy",
                                      "rss_growth_mib_per_1000_steps")}
    summary["kill_to_exit_seconds"] = [s["kill_to_exit_seconds"] for s in segments if s["kill_to_exit_seconds"]]
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
