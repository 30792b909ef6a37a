"""Online rebalancing: a new plan when ranks have slowed, priced by the cost model.

Every step each rank records its busy time: the step's wall time minus the
time it spent inside collectives (``comm.seconds_in_collectives``), which
includes waiting for slower peers. Every ``window`` steps the ranks gather
their mean busy times T_r (a collective, so every rank decides alike).

The job's profile (the one it was planned on, or ``profile.nominal`` for a
plan that was given) predicts each rank's busy time under the current plan,
P_r (``cost.predict(profile, plan).busy``), and f_r = T_r / P_r says how
much slower than the profile rank r runs now. ``search.scaled`` multiplies
each rank's times by f_r, and ``search.resized`` re-splits the plan on that
profile, modes kept: kernel counts and rows sized to the ranks as they run,
within each device's memory; a rank given no work keeps none (the plan or
the user left it out, possibly for a cost, its link, that busy times do not
show). Rows are planned at the plan's batch size, so an epoch's short last
batch changes nothing (it is split in proportion, ``Plan.rows_of``).

Mode ``auto`` takes the new plan when ``cost.predict`` on the scaled
profile says it cuts the step by at least ``min_gain`` (3%: smaller
predicted gains are within the noise of the timings); mode N takes it every
N steps when it differs. The engine applies it (``Sharded.apply``: kernel
slices move with their optimizer state), so training stays exact up to the
float rounding of the new split. The first step of a run, which carries
one-time costs (allocations, lazy initialisation), is not counted. The
imbalance reported with each move is max_r T_r / mean_r T_r - 1.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from ..parallel import comm
from ..plan import Plan, cost, idle_ranks, search

log = logging.getLogger(__name__)


def parse_mode(text: str) -> str | int:
    """``off``, ``auto`` or a positive step count N."""
    if text in ("off", "auto"):
        return text
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise ValueError(f"--rebalance takes off, auto or a positive number of steps, got {text!r}")


class Rebalancer:
    """Decides, identically on every rank, when and how to re-split a plan."""

    def __init__(self, profile: Mapping, mode: str | int, *, group: comm.Group = None, min_gain: float = 0.03,
                 window: int = 5) -> None:
        self.profile, self.mode, self.group, self.min_gain = profile, mode, group, min_gain
        self.window = mode if isinstance(mode, int) else window
        self.busy: list[float] = []
        self.events: list[dict] = []

    def observe(self, step: int, busy_seconds: float, job: Plan) -> Plan | None:
        """Record this rank's busy time of optimizer step ``step`` (1-based)
        under plan ``job``; every ``window`` steps compare the ranks (a
        collective). Returns the plan to run from now on, or None to keep ``job``."""
        if self.mode == "off" or comm.world_size(self.group) == 1:
            return None
        if step > 1:
            self.busy.append(busy_seconds)
        if step % self.window or not self.busy:
            return None
        busy = comm.gather_objects(sum(self.busy) / len(self.busy), group=self.group)
        self.busy.clear()
        decision = self.decide(busy, job)
        if decision is None:
            return None
        new, reason = decision
        event = {"step": step, "reason": reason, "busy_seconds": busy,
                 "old": {k: list(v) for k, v in job.kernel_counts().items()},
                 "new": {k: list(v) for k, v in new.kernel_counts().items()}}
        if job.batch_groups():
            event["old_rows"], event["new_rows"] = list(job.rows), list(new.rows)
        self.events.append(event)
        log.info("step %d: rebalanced (%s): %s%s", step, reason, event["new"],
                 f", rows {event['new_rows']}" if "new_rows" in event else "")
        return new

    def decide(self, busy: Sequence[float], job: Plan) -> tuple[Plan, str] | None:
        """The plan to take given every rank's mean busy seconds under
        ``job``, and the reason; None to keep ``job``."""
        imbalance = max(busy) / (sum(busy) / len(busy)) - 1
        predicted = cost.predict(self.profile, job).busy
        active = [r for r in range(job.world) if r not in idle_ranks(job)]
        factors = [busy[r] / predicted[r] if r in active and predicted[r] > 0 and busy[r] > 0 else 1.0
                   for r in range(job.world)]
        now = search.scaled(self.profile, factors)
        new = search.resized(now, job, active)
        if new == job:
            return None
        gain = cost.predict(now, job).step / cost.predict(now, new).step - 1
        if self.mode == "auto":
            return (new, f"imbalance {imbalance:.0%}, predicted gain {gain:.0%}") if gain >= self.min_gain else None
        return new, f"imbalance {imbalance:.0%} (every {self.window} steps)"
