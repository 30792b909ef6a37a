"""The planner's choice in words: the candidates, the plan chosen, and every device it leaves out and why.

``format_candidates`` is what ``convshard plan`` prints and a searched
run's metrics keep (``plan.text``): the chosen plan with its predicted step,
every candidate's, the chosen plan's groups and each device's busy and
waiting time. ``left_out`` gives one line for each profiled device the
chosen plan does not use; ``left_out_of_auto`` says why a candidate cannot
be ``--strategy auto``'s.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

from .. import plan
from . import memory, search
from .search import Candidate


def left_out(profile: Mapping, chosen: Candidate, found: Sequence[Candidate],
             rejected: Sequence[Candidate] = ()) -> list[str]:
    """One line for every profiled device ``chosen`` does not use, and why:
    every plan with it overflows a device's memory (the closest named, with
    the bytes it needs and the bytes there are), or the fastest plan with it
    is predicted slower than ``chosen`` (it is too slow to pay its
    transfers; a cluster's device also names its host's link)."""
    lines = []
    limits = dict(zip(profile["devices"], profile.get("device_memory", ())))
    unused = Counter(profile["devices"]) - Counter(chosen.plan.devices)  # a device may be listed twice
    for r, device in enumerate(profile["devices"]):
        if not unused[device]:
            continue
        unused[device] -= 1
        fitting = [c for c in found if device in c.plan.devices]
        if not fitting and (overflowing := [c for c in rejected if device in c.plan.devices]):
            def overflow(c: Candidate) -> tuple[float, str, float]:
                return max((need / limits[d], d, need) for d, need in zip(c.plan.devices, c.memory))
            closest = min(overflowing, key=overflow)
            _, where, need = overflow(closest)
            lines.append(f"{device}: not used: every plan with it overflows a device's memory; the closest, "
                         f"{closest.name} on {', '.join(closest.plan.devices)}, needs {memory.format_bytes(need)} "
                         f"on {where}, which holds {memory.format_bytes(limits[where])}")
        elif fitting:
            best = search.fastest(fitting)
            link = _host_link(profile, r)
            lines.append(f"{device}: not used: too slow to pay its transfers: the fastest plan with it, "
                         f"{best.name} on {', '.join(best.plan.devices)}, is predicted "
                         f"{1e3 * best.prediction.step:.1f} ms against {1e3 * chosen.prediction.step:.1f} ms "
                         f"without it{link}")
        else:
            lines.append(f"{device}: not used: no plan the planner considers runs on it")
    return lines


def _host_link(profile: Mapping, rank: int) -> str:
    """``; its host's link: B/s, latency`` for a cluster's device; '' for measured devices."""
    topology = profile.get("topology")
    if topology is None or len(topology["names"]) < 2:
        return ""
    h = topology["hosts"][rank]
    link = topology["between"][h]
    return (f"; its host {topology['names'][h]} joins the others at {8 * link['bandwidth'] / 1e9:.2g} Gbit/s, "
            f"{1e6 * link['latency']:.0f} us")


def left_out_of_auto(found: Sequence[Candidate], profile: Mapping) -> dict[str, str]:
    """Why ``auto_candidates`` leaves each candidate it leaves out, by name,
    for ``format_candidates`` to say beside its prediction."""
    pool = search.auto_candidates(found, profile)
    return {c.name: "not chosen: BatchNorm over each rank's rows is another model's maths"
            for c in found if c not in pool}


def format_candidates(found: Sequence[Candidate], chosen: Candidate, *, trials: Mapping[str, float] | None = None,
                      baseline: Candidate | None = None, left_out: Mapping[str, str] | None = None) -> str:
    """The chosen plan, its predicted step and, for a plan of several devices,
    its speedup over the best single device; then every candidate's
    predicted step (and measured trial; a search whose plan is of another
    kind, e.g. layers finding all groups in batch mode, names that kind;
    ``left_out``: why a candidate was not eligible, beside it); then the
    chosen plan's groups, each device's busy and waiting time (a device given
    no work: not used) and the step's breakdown. The chosen plan is named by
    its kind (``Plan.name``), as the table below it names it."""
    trials, left_out = trials or {}, left_out or {}
    single = next((c for c in found if c.name == "single"), None)
    chosen_line = f"chosen: {chosen.plan.name}, predicted {1e3 * chosen.prediction.step:.2f} ms"
    if single is not None and chosen.plan.world > 1:
        chosen_line += f", {single.prediction.step / chosen.prediction.step:.2f}x over the best single " \
                       f"device ({single.plan.devices[0]})"
    lines = [chosen_line, "predicted step per plan:"]
    for c in found:
        tried = f", measured {1e3 * trials[c.name]:.1f} ms in its trial" if c.name in trials else ""
        kind = f" (a {c.plan.name} plan)" if c.plan.name != c.name.split()[0] else ""
        why = f"; {left_out[c.name]}" if c.name in left_out else ""
        lines.append(f"  {c.name:<10} {1e3 * c.prediction.step:9.2f} ms on {', '.join(c.plan.devices)}{kind}{tried}"
                     f"{why}")
    for name, seconds in trials.items():
        if name not in {c.name for c in found}:
            lines.append(f"  {name:<10} {'':>9}    measured {1e3 * seconds:.1f} ms in its trial")
    lines.append(plan.describe(chosen.plan))
    p = chosen.prediction
    peaks = chosen.memory or (None,) * len(p.busy)
    idle = plan.idle_ranks(chosen.plan)
    lines.append("  per device: " + ", ".join(
        f"{d} not used" if r in idle else f"{d} busy {1e3 * b:.1f} ms, waiting {1e3 * w:.1f} ms"
        + (f", peak memory {memory.format_bytes(m)}" if m is not None else "")
        for r, (d, b, w, m) in enumerate(zip(chosen.plan.devices, p.busy, p.wait, peaks))))
    breakdown = {"rest": p.rest, "gradient sum": p.gradient_sum, "broadcast": p.broadcast, "optimizer": p.update,
                 **p.collectives}
    lines.append("  breakdown: " + ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in breakdown.items() if v))
    return "\n".join(lines)
