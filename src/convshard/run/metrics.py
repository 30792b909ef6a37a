"""What a run measures: step timings per rank, and the metrics JSON rank 0 writes.

``StepClock`` keeps running sums (for the means) and the last
TIMELINE_STEPS steps in full (for ``convshard report``), so memory stays
flat over a long run. Throughput counts the images the steps processed,
not the configured batch size.
"""

from __future__ import annotations

import resource
import time
from collections import deque
from dataclasses import dataclass, field

from ..parallel import comm

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

    def add(self, seconds: float, in_collectives: float, images: int) -> None:
        self.count += 1
        self.total += seconds
        self.all_images += images
        if self.count > self.warmup:
            self.timed += seconds
            self.timed_images += images
        self.seconds.append(seconds)
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


def timeline(clock: StepClock, *, group: comm.Group) -> dict:
    """Every rank's step and in-collective seconds of its last steps and its
    peak resident memory (a collective)."""
    mine = {"step_seconds": list(clock.seconds), "collective_seconds": list(clock.collective),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux: KiB
    everyone = comm.gather_objects(mine, group=group)
    first = clock.count - len(mine["step_seconds"]) + 1
    return {"first_step": first, **{key: [e[key] for e in everyone] for key in mine}}


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
        "config": config_json,
    }
