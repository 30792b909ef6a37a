"""Heterogeneous-devices benchmark: planned shares, the planner's accuracy, online rebalancing.

    python scripts/bench_hetero.py --out runs/hetero.json

On the paper's CNN (kernels 500,1500, CIFAR-shaped synthetic input) with
three single-thread workers ``cpu@0,cpu@1,cpu@1`` (speeds about 1, 1/2, 1/2):

1. shares: per-step time at batch 64 of ``--shares equal``, ``--shares auto``
   (the planned split, corrected online from step 5 on: ``--rebalance`` is
   ``auto`` for a planned split), ``--strategy ddp`` on the same three
   workers, and the two-worker run
   ``cpu@0,cpu@1`` (the same two cores of compute, evenly split), in
   ``--rounds`` interleaved rounds, each job's median reported;
2. plan: the planner's predicted step against the measured one at batch
   16, 64 and 128 (``--shares auto --rebalance off``, the profile measured at
   that batch);
3. load: at batch 16 with ``--rebalance auto``, a busy loop pinned to core 0
   (a separate process) starts mid-run; the steps after it are compared with
   the new ideal: a run planned (``--shares auto``) with that load running
   from the start. A run with ``--rebalance off`` shows the cost of not
   adapting.

Every run is a real ``convshard train`` in its own process; each result names
its command. Writes one JSON file and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

JOB = ["--dataset", "synthetic", "--synthetic-shape", "3,32,32", "--kernels", "500,1500", "--threads", "1",
       "--quiet"]
THREE = ["--devices", "cpu@0,cpu@1,cpu@1"]
BUSY_LOOP = "while True: pass"


def _train(work: Path, name: str, *args: str, steps: int, batch: int, load_after: float | None = None,
           load: bool = False) -> dict:
    """Run ``convshard train`` with ``args``; returns its metrics and command.
    ``load``: a busy loop on core 0 for the whole run; ``load_after``: started
    that many seconds after the run."""
    out = work / f"{name}.json"
    cmd = [sys.executable, "-m", "convshard", "train", *JOB, "--batch-size", str(batch),
           "--max-steps", str(steps), "--metrics-out", str(out), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    hog = _busy_core0() if load else None
    load_started = time.time() if load else None
    try:
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)
        if load_after is not None:
            try:
                proc.wait(timeout=load_after)
            except subprocess.TimeoutExpired:
                hog, load_started = _busy_core0(), time.time()
        if proc.wait(timeout=1800) != 0:
            raise SystemExit(f"{name} failed: {' '.join(cmd)}")
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    metrics = json.loads(out.read_text())
    metrics["command"] = " ".join(["convshard", *cmd[3:]])
    metrics["load_started"] = load_started
    print(f"{name}: {1000 * metrics['mean_step_seconds']:.0f} ms/step  shares {metrics['shares']}", flush=True)
    return metrics


def _busy_core0() -> subprocess.Popen:
    return subprocess.Popen(["taskset", "-c", "0", sys.executable, "-c", BUSY_LOOP])


def _shares(work: Path, steps: int, rounds: int) -> dict:
    """The four jobs, run in turn ``rounds`` times (the machine's speed drifts:
    interleaving spreads the drift over all four); each job's median counts."""
    jobs = {
        "equal": [*THREE, "--shares", "equal"],
        "auto": [*THREE, "--shares", "auto", "--profile", str(work / "profile64.json")],
        "ddp": [*THREE, "--strategy", "ddp"],
        "two_workers": ["--devices", "cpu@0,cpu@1"],
    }
    runs: dict[str, list[dict]] = {k: [] for k in jobs}
    for i in range(rounds):
        for name, args in jobs.items():
            runs[name].append(_train(work, f"{name}{i}", *args, steps=steps, batch=64))
    ms = {k: 1000 * statistics.median(r["mean_step_seconds"] for r in v) for k, v in runs.items()}
    moves = [[(e["step"], e["reason"], e["new"]) for e in run["rebalances"]] for run in runs["auto"]]
    return {"runs": runs, "rounds": rounds, "ms_per_step": ms, "auto_rebalances": moves,
            "auto_speedup_over_equal": ms["equal"] / ms["auto"],
            "auto_over_two_workers": ms["auto"] / ms["two_workers"],
            "auto_speedup_over_ddp": ms["ddp"] / ms["auto"]}


def _plan(work: Path, steps: int) -> dict:
    """The cost model's step for the plan that ran against the measured step,
    held fixed (``--rebalance off``)."""
    out = {}
    for batch in (16, 64, 128):
        run = _train(work, f"auto_b{batch}", *THREE, "--shares", "auto", "--rebalance", "off",
                     "--profile", str(work / f"profile{batch}.json"), steps=steps, batch=batch)
        predicted, measured = run["predicted_seconds"], run["mean_step_seconds"]  # the plan that ran
        out[str(batch)] = {"predicted_ms": 1000 * predicted, "measured_ms": 1000 * measured,
                           "error": abs(predicted - measured) / measured, "command": run["command"]}
    return out


def _recovery(run: dict, ideal_seconds: float, tolerance: float = 0.15) -> dict:
    """Steps from the load's start until the step time stays within tolerance of the ideal
    (the median of every 3 consecutive steps from then on)."""
    ends, seconds = run["step_ends"], run["step_seconds"]
    onset = next(i for i, end in enumerate(ends) if end > run["load_started"])
    limit = (1 + tolerance) * ideal_seconds
    recovered = next((i for i in range(onset, len(seconds) - 2)
                      if all(statistics.median(seconds[j:j + 3]) <= limit for j in range(i, len(seconds) - 2))), None)
    after = seconds[recovered:] if recovered is not None else seconds[-5:]
    return {"load_onset_step": onset + 1, "recovered_at_step": None if recovered is None else recovered + 1,
            "steps_to_recover": None if recovered is None else recovered - onset,
            "mean_ms_after_recovery": 1000 * statistics.fmean(after), "rebalances": run["rebalances"]}


def _load(work: Path, steps: int, load_after: float) -> dict:
    ideal = _train(work, "load_ideal", *THREE, "--shares", "auto", steps=12, batch=16, load=True)
    common = [*THREE, "--shares", "auto", "--profile", str(work / "profile16.json")]
    adapting = _train(work, "load_rebalance", *common, "--rebalance", "auto", steps=steps, batch=16,
                      load_after=load_after)
    fixed = _train(work, "load_fixed", *common, "--rebalance", "off", steps=steps, batch=16, load_after=load_after)
    ideal_s = ideal["mean_step_seconds"]
    return {"ideal_ms": 1000 * ideal_s, "ideal_command": ideal["command"] + "  (busy loop on core 0 throughout)",
            "rebalance": {**_recovery(adapting, ideal_s), "command": adapting["command"],
                          "step_seconds": adapting["step_seconds"]},
            "no_rebalance": {**_recovery(fixed, ideal_s), "command": fixed["command"],
                             "step_seconds": fixed["step_seconds"]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12, help="steps per timed run (3 warm-up) (default: 12)")
    parser.add_argument("--parts", default="shares,plan,load", help="which parts to run (default: all three)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the four batch-64 jobs (default: 3)")
    parser.add_argument("--load-steps", type=int, default=45, help="steps of the load runs (default: 45)")
    parser.add_argument("--load-after", type=float, default=30.0,
                        help="seconds after launch when the busy loop starts (default: 30)")
    parser.add_argument("--work-dir", default="runs/hetero")
    parser.add_argument("--out", default="runs/hetero.json")
    args = parser.parse_args()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    for stale in work.glob("profile*.json"):
        stale.unlink()  # profile this machine now
    report: dict = {"command": " ".join(["python", *sys.argv])}
    parts = args.parts.split(",")
    if "shares" in parts:
        report["shares"] = _shares(work, args.steps, args.rounds)
    if "plan" in parts:
        report["plan"] = _plan(work, args.steps)
    if "load" in parts:
        report["load"] = _load(work, args.load_steps, args.load_after)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    summary = {k: v for k, v in report.get("shares", {}).items() if k != "runs"}
    if "plan" in report:
        summary["plan_error"] = {b: round(v["error"], 3) for b, v in report["plan"].items()}
    if "load" in report:
        summary["load"] = {"ideal_ms": report["load"]["ideal_ms"],
                           **{k: {m: report["load"][k][m] for m in ("steps_to_recover", "mean_ms_after_recovery")}
                              for k in ("rebalance", "no_rebalance")}}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
