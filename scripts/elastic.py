"""Elastic runs across two hosts (network namespaces): lose one, gain one, pre-empt a worker.

    python scripts/elastic.py --out runs/elastic.json

Two namespace hosts on a bridge (``convshard.tools.netns``), one torchrun
agent each with one worker (``cpu@0`` and ``cpu@1``), elastic rendezvous
(``--nnodes 1:2``, c10d served by the first host), the paper's CNN on
synthetic 3x32x32 images, 200 steps of batch 64, a checkpoint every 20
steps. Four runs, one after the other:

- ``reference``: both hosts, never interrupted.
- ``lose``: both hosts; the second host's agent and worker are killed at
  step ~110. The survivor restarts, resumes from the last checkpoint on its
  own device and finishes. Reported: the steps and seconds since that
  checkpoint at the kill, the restart (kill to training again), the whole
  run's wall time and the time it lost (beyond the reference's, less what
  the steps after the restart cost more on one host than on two), and the
  final weights against the reference's.
- ``join``: the first host alone with ``--strategy auto``; the second joins
  at step ~110. torchrun stops the worker (SIGTERM: it saves the step in
  progress) and restarts the job on both; auto plans anew for two devices.
  Reported: the step stopped at and resumed at, the plans the metrics keep,
  the final weights against the reference's.
- ``sigterm``: both hosts; the second host's worker gets a SIGTERM at step
  ~110: every worker saves and exits 143, torchrun restarts the job, which
  resumes at the step it stopped at.

Weights are compared as max |w - w_ref| / max |w_ref| over the tensors.
Needs root and iproute2. Writes one JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from convshard.tools import netns  # noqa: E402

STEPS = 200
JOB = ["train", "--model", "paper", "--dataset", "synthetic", "--synthetic-shape", "3,32,32",
       "--synthetic-size", str(64 * STEPS), "--batch-size", "64", "--epochs", "1", "--threads", "1",
       "--checkpoint-every", "20", "--log-every", "10"]
AT = 110  # the step after which a host goes, comes or is pre-empted
ELASTIC = ["--max-restarts", "2", "--monitor-interval", "0.1"]
# a re-formed job waits 2 s for more hosts once it has enough; a host silent for 3 heartbeats of 1 s is gone
RDZV = "last_call_timeout=2,keep_alive_interval=1,keep_alive_max_attempt=3"


class Agent:
    """One host's torchrun agent; each line of its output is kept with the time it arrived."""

    def __init__(self, host: netns.Host, rendezvous: netns.Host, args: list[str], run_id: str, device: str) -> None:
        self.proc = netns.torchrun(host, nnodes="1:2", rendezvous=rendezvous, args=[*args, "--devices", device],
                                   run_id=run_id,
                                   options=ELASTIC, rdzv_conf=RDZV)
        self.lines: list[tuple[float, str]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line))

    def find(self, pattern: str, after: float = 0.0) -> tuple[float, re.Match] | None:
        """The first line after ``after`` matching ``pattern``: (its time, the match)."""
        for at, line in list(self.lines):
            if at >= after and (m := re.search(pattern, line)):
                return at, m
        return None

    def wait_for(self, pattern: str, timeout: float = 300) -> tuple[float, re.Match]:
        deadline = time.monotonic() + timeout
        while (found := self.find(pattern)) is None:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"no line matching {pattern!r}:\n{self.text()[-3000:]}")
            time.sleep(0.02)
        return found

    def worker(self) -> int:
        """The agent's worker process."""
        for pid in netns.descendants(self.proc.pid):
            try:
                if b"LOCAL_RANK=0" in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                    return pid
            except OSError:
                continue
        raise RuntimeError("the agent has no worker")

    def finish(self, timeout: float = 600) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(f"torchrun did not finish:\n{self.text()[-3000:]}") from None
        self._reader.join(10)
        if code != 0:
            print(f"torchrun exited {code}:\n{self.text()[-3000:]}", file=sys.stderr)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def text(self) -> str:
        return "".join(line for _, line in self.lines)


def _difference(directory: Path, reference: dict) -> float:
    weights = torch.load(directory / "checkpoint.pt", weights_only=True)["model"]
    return max(((weights[k] - v).abs().max() / v.abs().max()).item()
               for k, v in reference.items() if v.is_floating_point())


def _start(hosts: list[netns.Host], directory: Path, name: str, extra: list[str] = (), both: bool = True
           ) -> list[Agent]:
    args = [*JOB, *extra, "--checkpoint-dir", str(directory / name), "--metrics-out",
            str(directory / f"{name}.json")]
    agents = [Agent(hosts[0], hosts[0], args, f"elastic-{name}", "cpu@0")]
    if both:
        time.sleep(0.5)  # the first host serves the store
        agents.append(Agent(hosts[1], hosts[0], args, f"elastic-{name}", "cpu@1"))
    return agents


def _plans(directory: Path, name: str) -> list[dict]:
    metrics = json.loads((directory / f"{name}.json").read_text())
    return [{"step": p["step"], "devices": p["devices"], "strategy": p["strategy"],
             "modes": {g["name"]: g["mode"] for g in p["plan"]["groups"]}} for p in metrics["plans"]]


def reference(hosts: list[netns.Host], directory: Path) -> dict:
    started = time.monotonic()
    agents = _start(hosts, directory, "reference")
    codes = [a.finish() for a in agents]
    return {"exit_codes": codes, "wall_seconds": time.monotonic() - started, "plans": _plans(directory, "reference"),
            "step_seconds": _step_seconds(directory, "reference")}


def _step_seconds(directory: Path, name: str) -> float:
    """The mean step of the run's last stretch, as its metrics give it."""
    return json.loads((directory / f"{name}.json").read_text())["mean_step_seconds"]


def lose(hosts: list[netns.Host], directory: Path, baseline: dict, weights: dict) -> dict:
    started = time.monotonic()
    first, second = _start(hosts, directory, "lose")
    first.wait_for(rf"step {AT}/{STEPS}")
    killed = time.monotonic()
    second.kill()
    code = first.finish()
    saves = [(at, int(m[1])) for at, line in first.lines if at < killed
             and (m := re.search(r"checkpoint saved to .* at step (\d+)", line))]
    saved_at, saved_step = saves[-1]
    resumed_at, resumed = first.wait_for(r"re-planned at step (\d+)")
    wall, alone = time.monotonic() - started, _step_seconds(directory, "lose")
    # the wall time lost: beyond the reference's, less what the steps after the restart cost more on one host
    slower = (STEPS - int(resumed[1])) * (alone - baseline["step_seconds"])
    return {"exit_code": code, "wall_seconds": wall, "killed_after_step": AT,
            "last_checkpoint_step": saved_step, "seconds_since_checkpoint_at_kill": killed - saved_at,
            "resumed_at_step": int(resumed[1]), "restart_seconds": resumed_at - killed, "step_seconds": alone,
            "lost_seconds": wall - baseline["wall_seconds"] - slower,
            "plans": _plans(directory, "lose"), "weights_vs_reference": _difference(directory / "lose", weights)}


def join(hosts: list[netns.Host], directory: Path, weights: dict) -> dict:
    started = time.monotonic()
    [first] = _start(hosts, directory, "join", ["--strategy", "auto", "--profile", str(directory / "profile.json")],
                     both=False)
    first.wait_for(rf"step {AT}/{STEPS}")
    joined = time.monotonic()
    second = Agent(hosts[1], hosts[0], [*JOB, "--strategy", "auto", "--profile", str(directory / "profile.json"),
                                        "--checkpoint-dir", str(directory / "join"), "--metrics-out",
                                        str(directory / "join.json")], "elastic-join", "cpu@1")
    codes = [first.finish(), second.finish()]
    _, stopped = first.wait_for(r"stopped by SIGTERM at step (\d+)")
    resumed_at, resumed = first.wait_for(r"re-planned at step (\d+)")
    return {"exit_codes": codes, "wall_seconds": time.monotonic() - started, "joined_after_step": AT,
            "stopped_at_step": int(stopped[1]), "resumed_at_step": int(resumed[1]),
            "join_to_training_seconds": resumed_at - joined, "plans": _plans(directory, "join"),
            "weights_vs_reference": _difference(directory / "join", weights)}


def sigterm(hosts: list[netns.Host], directory: Path, weights: dict) -> dict:
    started = time.monotonic()
    first, second = _start(hosts, directory, "sigterm")
    first.wait_for(rf"step {AT}/{STEPS}")
    os.kill(second.worker(), signal.SIGTERM)
    codes = [first.finish(), second.finish()]
    _, stopped = first.wait_for(r"stopped by SIGTERM at step (\d+)")
    _, resumed = first.wait_for(r"resuming from .* at step (\d+)")
    return {"exit_codes": codes, "wall_seconds": time.monotonic() - started, "sigterm_after_step": AT,
            "stopped_at_step": int(stopped[1]), "resumed_at_step": int(resumed[1]),
            "worker_exit_143_seen_by_torchrun": "exitcode: 143" in first.text() + second.text(),
            "plans": _plans(directory, "sigterm"), "weights_vs_reference": _difference(directory / "sigterm", weights)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="elastic.json", help="the JSON file to write (default: %(default)s)")
    args = parser.parse_args()
    if why := netns.unavailable():
        sys.exit(f"elastic.py: {why}")
    result = {}
    with tempfile.TemporaryDirectory(prefix="convshard-elastic-") as tmp, netns.hosts(2) as hosts:
        directory = Path(tmp)
        result["reference"] = reference(hosts, directory)
        weights = torch.load(directory / "reference" / "checkpoint.pt", weights_only=True)["model"]
        result["lose"] = lose(hosts, directory, result["reference"], weights)
        print("lose", json.dumps(result["lose"]), flush=True)
        for name, scenario in (("join", join), ("sigterm", sigterm)):
            result[name] = scenario(hosts, directory, weights)
            print(name, json.dumps(result[name]), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
