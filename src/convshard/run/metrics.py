"""What a run measures: step timings per rank, and the metrics JSON rank 0 writes.

``StepClock`` keeps running sums (for the means) and the last
TIMELINE_STEPS steps in full (for ``convshard report``), so memory stays
flat over a long run. Throughput counts the images the steps processed,
not the configured batch size.
"""

from __future__ import annotations

import logging
import resource
import time
from collections import deque
from dataclasses import dataclass, field

from .. import devices
from ..parallel import comm
from ..plan import Plan

log = logging.getLogger(__name__)

TIMELINE_STEPS = 2000  # the metrics keep every rank's timings of the last this many steps


@dataclass
class StepClock:
    """This process's step timings."""

    warmup: int = 3
    count: int = 0
    total: float = 0.0  # seconds of all steps
    timed: float = 0.0  # seconds of the steps after the warm-up
    timed_images: int = 0  # global-batch images of the steps after the warm-up
    all_images: int = 0
    seconds: deque = field(default_factory=lambda: deque(maxlen=TIMELINE_STEPS))  # each step's wall time
    ends: deque = field(default_factory=lambda: deque(maxlen=TIMELINE_STEPS))  # unix time at each step's end
    collective: deque = field(default_factory=lambda: deque(maxlen=TIMELINE_STEPS))  # its seconds in collectives
    data: deque = field(default_factory=lambda: deque(maxlen=TIMELINE_STEPS))  # its seconds waiting for its batch
    waited: float = 0.0  # seconds waiting for batches, over the steps after the warm-up
    all_waited: float = 0.0  # ... over every step
    transfers: list = field(default_factory=list)  # the last step's collectives (``comm.transfers_since``)

    def add(self, seconds: float, in_collectives: float, images: int, waited: float = 0.0,
            started: float | None = None) -> None:
        """One step of ``seconds``; with ``started`` (its ``time.perf_counter()``
        at the start) its collectives are kept as the last step's."""
        if started is not None:
            self.transfers = comm.transfers_since(started)
        self.count += 1
        self.total += seconds
        self.all_images += images
        self.all_waited += waited
        if self.count > self.warmup:
            self.timed += seconds
            self.timed_images += images
            self.waited += waited
        self.seconds.append(seconds)
        self.data.append(waited)
        self.ends.append(time.time())
        self.collective.append(in_collectives)

    def mean(self) -> float | None:
        """Mean step seconds after the warm-up (of every step when there were no more)."""
        if self.count > self.warmup:
            return self.timed / (self.count - self.warmup)
        return self.total / self.count if self.count else None

    def images_per_second(self) -> float | None:
        """Images processed per second, over the same steps as ``mean``."""
        if self.count > self.warmup:
            return self.timed_images / self.timed if self.timed else None
        return self.all_images / self.total if self.total else None


def timeline(clock: StepClock, *, group: comm.Group, decoded: int = 0) -> dict:
    """Every rank's step, in-collective and data-wait seconds of its last
    steps, its last step's collectives (op, start, end, blocked: seconds from
    the step's start), its peak resident memory, its host and the training images it
    decoded (a collective)."""
    mine = {"step_seconds": list(clock.seconds), "collective_seconds": list(clock.collective),
            "data_seconds": list(clock.data), "transfers": [list(t) for t in clock.transfers],
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
            "host": devices.host_name(), "decoded_images": decoded}
    everyone = comm.gather_objects(mine, group=group)
    first = clock.count - len(mine["step_seconds"]) + 1
    return {"first_step": first, **{key: [e[key] for e in everyone] for key in mine}}


def data_summary(clock: StepClock, timeline: dict, *, images: int) -> dict:
    """How the data kept up: rank 0's mean wait for a batch and its share of
    the step (after the warm-up; over every step when there were no more), and the training images decoded per
    training image on each host (1.0: once per host; 0 for data held in memory)."""
    hosts: dict[str, int] = {}
    for host, decoded in zip(timeline["host"], timeline["decoded_images"]):
        hosts[host] = hosts.get(host, 0) + decoded
    timed = clock.count > clock.warmup
    waited, seconds = (clock.waited, clock.timed) if timed else (clock.all_waited, clock.total)
    steps = clock.count - clock.warmup if timed else clock.count
    return {
        "wait_seconds": waited / steps if steps else None,
        "wait_share": waited / seconds if seconds else None,
        "decoded_per_image": {host: n / images if images else None for host, n in hosts.items()},
    }


def record_plan(progress: dict, plan: Plan, all_devices: list[str]) -> None:
    """Keep the plan a stretch of a run trains with in its ``progress``
    (``plans``: step, devices, strategy, plan) when it differs from the last one kept:
    a run that torchrun re-formed on other devices re-planned."""
    plans = progress.setdefault("plans", [])
    entry = {"step": progress["step"], "devices": all_devices, "strategy": plan.name, "plan": plan.to_json()}
    if plans and (plans[-1]["devices"], plans[-1]["plan"]) == (entry["devices"], entry["plan"]):
        return
    if plans:
        log.info("re-planned at step %d for %d worker(s) on %s: %s", entry["step"], plan.world,
                 ", ".join(all_devices), plan.name)
    plans.append(entry)


def summary(*, config_json: dict, job: dict, final_job: dict | None, planning: dict | None, strategy: str,
            progress: dict, clock: StepClock, world: int, all_devices: list[str], shares: dict,
            rebalances: list, seconds: float) -> dict:
    """The run's metrics JSON; timings are None when this run took no step.
    ``epochs`` counts the epochs trained, a last partial one included, as
    ``history`` does."""
    last = progress["history"][-1] if progress["history"] else {}
    return {
        "test_accuracy": last.get("test_accuracy"),
        "train_loss": last.get("train_loss"),
        "epochs": last.get("epoch", 0),
        "steps": progress["step"],
        "mean_step_seconds": clock.mean(),
        "images_per_second": clock.images_per_second(),
        "world_size": world,
        "devices": all_devices,
        "strategy": strategy,
        "shares": shares,
        "plan": planning,
        "predicted_seconds": planning["breakdown"]["step"] if planning and planning.get("breakdown") else None,
        "job_plan": job,
        **({"rebalanced_plan": final_job} if final_job is not None and final_job != job else {}),
        "rebalances": rebalances,
        "step_seconds": list(clock.seconds),  # the last TIMELINE_STEPS steps
        "step_ends": list(clock.ends),
        "wall_seconds": seconds,
        "history": progress["history"],
        "evals": progress.get("evals", []),  # --eval-every's test accuracies: step, test_accuracy
        "plans": progress.get("plans", []),  # each stretch of the run: step, devices, strategy, plan
        "config": config_json,
    }
