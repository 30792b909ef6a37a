"""Where a run's time went, per device: ``convshard report RUN.json``.

The metrics JSON of a run holds, for every rank and each of its last steps,
the step's wall time S_{r,i}, the time D_{r,i} it waited for its batch
(the loader had not prepared it yet) and the time C_{r,i} it spent inside
convshard's collectives. All ranks take part in every collective, so the
least of them, min_r C_{r,i}, is what the transfers themselves took; a rank
spent the rest of its collective time waiting for slower ranks:

    data_{r,i}    = D_{r,i}
    compute_{r,i} = S_{r,i} - D_{r,i} - C_{r,i}
    transfer_i    = min_r C_{r,i}
    wait_{r,i}    = C_{r,i} - transfer_i

DDP's gradient all-reduce runs inside its backward, bucket by bucket, in
step with the compute; C_{r,i} holds the part the step waits for, from the
last bucket's launch to the last bucket's end (``run.engines.AllReduceClock``).
``summarize`` averages these per device; ``draw_timeline`` draws the last
steps as one bar per device, segments in step order, beside the loss and
accuracy curves.

Each rank also logs its last step's collectives: when each started, when
its result was there, and how long the rank was blocked in it
(``comm.transfers_since``). A transfer started and waited on later (the
chunked gathers of ``convshard.parallel.pipeline``, the input-gradient
sums, the batch-mode gradient buckets) travels while the rank computes:
its span minus its blocked time is hidden. ``hidden`` sums them per rank
and ``draw_transfers`` draws them, per rank, as bars beside the step.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..errors import ConfigError


PARTS = ("data", "compute", "transfer", "wait")  # a step's parts, in the order the step meets them


def _parts(metrics: Mapping) -> tuple[list[str], list[list[tuple[float, float, float, float]]]]:
    """Devices and, per rank and step, (data, compute, transfer, wait) seconds."""
    timeline = metrics.get("timeline")
    if not timeline or not timeline["step_seconds"] or not timeline["step_seconds"][0]:
        raise ConfigError("the metrics hold no step timings (a run of at least one step writes them)")
    steps, colls = timeline["step_seconds"], timeline["collective_seconds"]
    data = timeline.get("data_seconds") or [[0.0] * len(ss) for ss in steps]  # runs before the loader timed it
    transfer = [min(rank[i] for rank in colls) for i in range(len(colls[0]))]
    parts = [[(d, s - d - c, transfer[i], c - transfer[i]) for i, (s, c, d) in enumerate(zip(ss, cs, ds))]
             for ss, cs, ds in zip(steps, colls, data)]
    return list(metrics["devices"]), parts


def summarize(metrics: Mapping) -> list[dict]:
    """Per device: mean data, compute, transfer and wait milliseconds per step, after the warm-up steps."""
    devices, parts = _parts(metrics)
    skip = metrics.get("config", {}).get("warmup_steps", 0)
    rows = []
    for rank, (device, steps) in enumerate(zip(devices, parts)):
        timed = steps[skip:] if len(steps) > skip else steps
        mean = [1000 * statistics.fmean(p[k] for p in timed) for k in range(len(PARTS))]
        rows.append({"rank": rank, "device": device, **{f"{part}_ms": m for part, m in zip(PARTS, mean)},
                     "step_ms": sum(mean)})
    return rows


def hidden(metrics: Mapping) -> list[dict]:
    """Per rank, of its last step's collectives: how many, the milliseconds
    they were in flight (the union of their spans), those the rank was
    blocked in them, and the share of the in-flight time that compute hid."""
    rows = []
    for rank, transfers in enumerate(metrics.get("timeline", {}).get("transfers") or []):
        spans = sorted((start, end) for _, start, end, _ in transfers)
        flight, reach = 0.0, float("-inf")
        for start, end in spans:  # the union of the spans
            flight += max(0.0, end - max(start, reach))
            reach = max(reach, end)
        blocked = sum(b for *_, b in transfers)
        rows.append({"rank": rank, "transfers": len(transfers), "in_flight_ms": 1000 * flight,
                     "blocked_ms": 1000 * blocked, "hidden": 1 - min(blocked, flight) / flight if flight else 0.0})
    return rows


def format_report(metrics: Mapping) -> str:
    """The summary as a table, with the run's strategy and shares."""
    rows = summarize(metrics)
    width = max(len("device"), *(len(r["device"]) for r in rows))
    lines = [f"strategy {metrics['strategy']}, {metrics['steps']} steps, "
             f"{1000 * (metrics['mean_step_seconds'] or 0):.1f} ms/step; mean per step after warm-up:",
             f"rank  {'device':<{width}}  {'data ms':>8}  {'compute ms':>10}  {'transfer ms':>11}  {'wait ms':>8}  "
             f"{'busy':>5}"]
    for r in rows:
        busy = r["compute_ms"] / r["step_ms"] if r["step_ms"] else 0.0
        lines.append(f"{r['rank']:>4}  {r['device']:<{width}}  {r['data_ms']:>8.1f}  {r['compute_ms']:>10.1f}  "
                     f"{r['transfer_ms']:>11.1f}  {r['wait_ms']:>8.1f}  {busy:>5.0%}")
    if metrics.get("shares"):
        lines.append("kernels per device: " + ", ".join(f"{k} {v}" for k, v in metrics["shares"].items()))
    for event in metrics.get("rebalances", []):
        lines.append(f"step {event['step']}: rebalanced ({event['reason']}) to {event['new']}")
    for r in hidden(metrics):
        lines.append(f"last step, rank {r['rank']}: {r['transfers']} collectives in flight {r['in_flight_ms']:.1f} "
                     f"ms, blocked {r['blocked_ms']:.1f} ms, {r['hidden']:.0%} hidden by compute")
    return "\n".join(lines)


def draw_timeline(metrics: Mapping, path: str | Path, *, steps: int = 10) -> Path:
    """A PNG: the last ``steps`` steps per device (data, compute, transfer and
    wait in step order, a tick at each step's end) and, beside it, the
    training loss per step and the test accuracy at each evaluation (when
    the metrics hold them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    devices, parts = _parts(metrics)
    first = metrics["timeline"]["first_step"] + max(0, len(parts[0]) - steps)
    colors = {"data": "tab:green", "compute": "tab:blue", "transfer": "tab:orange", "wait": "tab:gray"}
    curves = bool(metrics.get("step_loss") or metrics.get("history"))
    fig = plt.figure(figsize=(15 if curves else 10, max(0.6 * len(devices) + 1.6, 4.0 if curves else 0)))
    grid = fig.add_gridspec(2, 3 if curves else 1, width_ratios=[2, 1, 1] if curves else [1])
    ax = fig.add_subplot(grid[:, 0])
    for rank, rank_parts in enumerate(parts):
        t = 0.0
        for i, step in enumerate(rank_parts[-steps:]):
            for kind, seconds in zip(colors, step):
                ax.barh(rank, 1000 * seconds, left=1000 * t, color=colors[kind], edgecolor="none",
                        label=kind if rank == 0 and i == 0 else None)
                t += seconds
            ax.vlines(1000 * t, rank - 0.45, rank + 0.45, color="black", linewidth=0.8,
                      label="step end" if rank == 0 and i == 0 else None)
    ax.set_yticks(range(len(devices)), [f"{r}: {d}" for r, d in enumerate(devices)])
    ax.invert_yaxis()
    ax.set_xlabel(f"milliseconds (steps {first}-{first + min(steps, len(parts[0])) - 1})")
    ax.set_title(f"{metrics['strategy']}: where each device's time goes")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=5, frameon=False)
    if curves:
        _draw_curves(metrics, fig.add_subplot(grid[:, 1]), fig.add_subplot(grid[:, 2]))
    return _save(fig, path)


def draw_transfers(metrics: Mapping, path: str | Path) -> Path | None:
    """A PNG of the last step per rank: the step as a bar, each collective
    below it as a bar from its start to its result (lanes so that none
    overlap, coloured by kind), its blocked part dark on the step's bar, so
    that what compute hid shows as transfer bars under light step. None
    when the metrics hold no collectives."""
    transfers = metrics.get("timeline", {}).get("transfers") or []
    if not any(transfers):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [ss[-1] for ss in metrics["timeline"]["step_seconds"]]
    kinds = sorted({op for rank in transfers for op, *_ in rank})
    colors = dict(zip(kinds, plt.get_cmap("tab10").colors))
    lanes = [_lanes(rank) for rank in transfers]
    fig, ax = plt.subplots(figsize=(12, 1.2 + 0.35 * sum(1 + max(ls, default=0) + 1 for ls in lanes)))
    y, ticks = 0.0, []
    for rank, (rank_transfers, rank_lanes) in enumerate(zip(transfers, lanes)):
        ticks.append((y, f"{rank}: {metrics['devices'][rank]}"))
        ax.barh(y, 1000 * steps[rank], color="tab:blue", alpha=0.25, height=0.8, label="step" if rank == 0 else None)
        for (op, start, end, blocked), lane in zip(rank_transfers, rank_lanes):
            exposed = min(blocked, end - start)  # the end of its span, where the rank waited for it
            ax.barh(y, 1000 * exposed, left=1000 * (end - exposed), height=0.8, color="black")
            ax.barh(y + 1 + lane, 1000 * (end - start), left=1000 * start, height=0.8, color=colors[op])
        y += 2 + max(rank_lanes, default=0) + 1
    ax.barh(0, 0, color="black", label="blocked")
    for op in kinds:
        ax.barh(0, 0, color=colors[op], label=op)
    ax.set_yticks([t for t, _ in ticks], [label for _, label in ticks])
    ax.invert_yaxis()
    ax.set_xlabel("milliseconds from the step's start (the last step)")
    ax.set_title(f"{metrics['strategy']}: collectives in flight beside the compute, per rank")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=min(len(kinds) + 2, 6), frameon=False)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` as a PNG (making its folder) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _lanes(transfers: Sequence[Sequence]) -> list[int]:
    """Each transfer's lane: the first whose last span ended before it starts."""
    ends: list[float] = []
    out = []
    for _, start, end, _ in transfers:
        lane = next((i for i, e in enumerate(ends) if e <= start), len(ends))
        if lane == len(ends):
            ends.append(end)
        else:
            ends[lane] = end
        out.append(lane)
    return out


def _draw_curves(metrics: Mapping, loss_ax, accuracy_ax) -> None:
    """The training loss of the last steps the metrics hold, and the test
    accuracy at each epoch's end and every ``--eval-every`` steps."""
    losses = metrics.get("step_loss") or []
    first = metrics.get("steps", len(losses)) - len(losses) + 1
    loss_ax.plot(range(first, first + len(losses)), losses, color="tab:blue", linewidth=1)
    loss_ax.set_xlabel("step")
    loss_ax.set_title("training loss")
    points = sorted({**{e["step"]: e["test_accuracy"] for e in metrics.get("evals") or []},
                     **{h["steps"]: h["test_accuracy"] for h in metrics.get("history") or []}}.items())
    accuracy_ax.plot([step for step, _ in points], [a for _, a in points], marker="o", color="tab:green")
    accuracy_ax.set_xlabel("step")
    if points:
        accuracy_ax.set_ylim(*accuracy_range([a for _, a in points]))
    accuracy_ax.set_title("test accuracy")


def accuracy_range(accuracies: Sequence[float]) -> tuple[float, float]:
    """The accuracy panel's y range: the data's, widened by a quarter of its
    span on each side (at least 0.01, so that one value or a flat run shows),
    within [0, 1]; 0.938 to 0.963 gives 0.928 to 0.973, not 0 to 1."""
    low, high = min(accuracies), max(accuracies)
    margin = max(0.25 * (high - low), 0.01)
    return max(0.0, low - margin), min(1.0, high + margin)
