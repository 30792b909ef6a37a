"""Per-layer plans: each channel group splits its kernels or splits the batch, whichever costs less there.

A kernel split sends activations; a batch split sends weight gradients. A
CNN's early layers have large activations and few weights, its late layers
the reverse, so the cheapest split changes along the network. A per-layer
plan gives every channel group (``convshard.layouts``) a mode, and sizes
both splits to the devices: kernels per rank for each kernel-mode group,
rows per rank of the global batch B (one split, shared by every batch-mode
group: the rows stay put from one batch-mode group to the next).

The cost model reads the profile (schema in ``convshard.plan`` and
``convshard.profile``). For group g on rank r with c_{r,g} kernels or b_r rows:

    compute_g = max_r a_{r,g} + b_{r,g} max(c_{r,g}, 1)          kernel mode
              = max_r T_{r,g} b_r / n_g                          batch mode

with T_{r,g} the group's measured seconds in batch mode at n_g rows. Every
value that leaves a group's layout (n bytes over the global batch) costs,
per kind of reader:

    from kernel mode: whole    t_ag(n m max_r c_r / K)      (channels padded to the largest share)
                      kernel   t_ag(...) + t_rs(n)          (the readers' input gradients summed back)
                      batch    2 t_a2a(n / W)               (all-to-all each way)
    from batch mode:  whole    t_ag(n)
                      kernel   t_ag(n) + t_rs(n)
                      batch    0

A replicated input of a group's convs (the data) that needs a gradient
costs an all-reduce beyond a third of the group's compute in kernel mode
(``convshard.plan``), an all-gather of rows in batch mode; each batch-mode
BatchNorm meets the other ranks twice (its statistics forward, its sums
backward). Then

    step = sum_g (compute_g + transitions_g) + max_r rest_r + t_ar(P_batch) + t_bc(P_rep)
           + max_r u_r (P_batch + sum_{g kernel} P_g c_{r,g} / K_g)

with P_batch the bytes of the batch-mode groups' weights (their gradients
are summed), P_rep those of the replicated rest (broadcast), and u_r the
optimizer step's seconds per byte on rank r (a rank updates the whole
weights of batch-mode groups, its own kernels' of the others).

The search: every cut in graph order (the first j groups in batch mode,
the rest in kernel mode, j = 0..G: all-kernel and all-batch included),
then flips of single groups while one lowers the predicted step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .plan import _greedy_counts, _transfer, _update, choose_counts

KERNEL, BATCH = "kernel", "batch"


@dataclass(frozen=True)
class GroupPlan:
    """One channel group under a per-layer plan."""

    name: str
    mode: str  # "kernel" | "batch"
    counts: tuple[int, ...]  # kernels per rank (kernel mode) or rows per rank (batch mode)
    compute: tuple[float, ...]  # predicted fwd+bwd seconds per rank
    comm: float  # seconds of the transitions out of the group, and into it from replicated inputs
    seconds: float  # slowest rank's compute + comm


@dataclass(frozen=True)
class LayersPlan:
    """A per-layer plan and its predicted step."""

    groups: tuple[GroupPlan, ...]
    rows: tuple[int, ...]  # rows per rank of the global batch for the batch-mode groups
    rest: float
    sync: float  # the batch-mode weights' gradient sum and the replicated gradients' broadcast, seconds
    update: float  # the slowest rank's optimizer step over the groups' weights it holds, seconds
    step: float

    @property
    def modes(self) -> dict[str, str]:
        return {g.name: g.mode for g in self.groups}

    def kernel_counts(self) -> dict[str, tuple[int, ...]]:
        """Kernels per rank of the kernel-mode groups."""
        return {g.name: g.counts for g in self.groups if g.mode == KERNEL}

    def describe(self) -> str:
        """'kernel', 'batch' when every group has that mode, else 'mixed'."""
        modes = set(self.modes.values())
        return modes.pop() if len(modes) == 1 else "mixed"


def can_plan(profile: Mapping) -> bool:
    """Whether the profile times batch mode (it does for more than one device)."""
    return len(profile["devices"]) > 1 and all("batch_seconds" in layer for layer in profile["layers"])


def evaluate(profile: Mapping, modes: Mapping[str, str], kernels: Mapping[str, Sequence[int]] | None = None,
             rows: Sequence[int] | None = None) -> LayersPlan:
    """The predicted step of a plan. ``kernels`` (per kernel-mode group) and
    ``rows`` default to the splits sized to the devices (``choose_counts``)."""
    layers = profile["layers"]
    world = len(profile["devices"])
    kernels = kernels or _greedy_counts(profile, tuple(range(world)))
    rows = tuple(rows) if rows is not None else sized_rows(profile, modes)
    mode_of = {layer["name"]: modes.get(layer["name"], KERNEL) for layer in layers}
    groups = []
    for layer in layers:
        name, mode = layer["name"], mode_of[layer["name"]]
        if mode == BATCH:
            counts = rows
            compute = tuple(t * b / layer["batch_rows"] for t, b in zip(layer["batch_seconds"], rows))
            comm = 2 * layer["batchnorms"] * _transfer(profile, "all_gather", 0)
        else:
            counts = tuple(kernels[name])
            compute = tuple(a + b * max(c, 1) for a, b, c in zip(layer["a"], layer["b"], counts))
            comm = 0.0
        for value in layer["inputs"]:
            if value["grad"] and mode == BATCH:
                comm += _transfer(profile, "all_gather", value["bytes"])
            elif value["grad"]:
                comm += max(_transfer(profile, "all_reduce", value["bytes"]) - max(compute) / 3, 0.0)
        for value in layer["outputs"]:
            readers = {mode_of[reader] for reader in value["convs"]}
            gathered = value["bytes"] * (world * max(counts) / layer["kernels"] if mode == KERNEL else 1)
            if value["whole"]:
                comm += _transfer(profile, "all_gather", gathered)
            if KERNEL in readers:
                comm += _transfer(profile, "all_gather", gathered) + _transfer(profile, "reduce_scatter",
                                                                                value["bytes"])
            if BATCH in readers and mode == KERNEL:
                comm += 2 * _transfer(profile, "all_to_all", value["bytes"] / world)
        groups.append(GroupPlan(name, mode, counts, compute, comm, max(compute) + comm))
    summed = sum(layer["param_bytes"] for layer in layers if mode_of[layer["name"]] == BATCH)
    sync = (_transfer(profile, "all_reduce", summed) if summed else 0.0) + _transfer(
        profile, "broadcast", profile["replicated_param_bytes"])
    rest = max(profile["rest_seconds"])  # every rank runs it on the whole batch
    held = [[layer["param_bytes"] * (1 if g.mode == BATCH else g.counts[r] / layer["kernels"])
             for g, layer in zip(groups, layers)] for r in range(world)]  # weight bytes each rank updates
    update = max(_update(profile, r, sum(held[r])) for r in range(world))
    return LayersPlan(tuple(groups), rows, rest, sync, update, sum(g.seconds for g in groups) + rest + sync + update)


def sized_rows(profile: Mapping, modes: Mapping[str, str]) -> tuple[int, ...]:
    """Rows per rank that make the batch-mode groups end together: b_r in
    proportion to 1 / sum_g T_{r,g} (an even split when no group is in batch mode)."""
    world = len(profile["devices"])
    layers = [layer for layer in profile["layers"] if modes.get(layer["name"]) == BATCH]
    if not layers:
        return choose_counts(profile["batch_size"], [0.0] * world, [1.0] * world)
    per_row = [sum(layer["batch_seconds"][r] / layer["batch_rows"] for layer in layers) for r in range(world)]
    return choose_counts(profile["batch_size"], [0.0] * world, per_row)


def search(profile: Mapping) -> LayersPlan:
    """The per-layer plan with the smallest predicted step among every cut in
    graph order, improved by flipping single groups (see the module docstring)."""
    names = [layer["name"] for layer in profile["layers"]]
    kernels = _greedy_counts(profile, tuple(range(len(profile["devices"]))))

    def cost(modes: dict[str, str]) -> LayersPlan:
        return evaluate(profile, modes, kernels)

    cuts = [cost({n: BATCH if i < j else KERNEL for i, n in enumerate(names)}) for j in range(len(names) + 1)]
    best = min(cuts, key=lambda p: p.step)
    improved = True
    while improved:
        improved = False
        for name in names:
            modes = best.modes
            modes[name] = KERNEL if modes[name] == BATCH else BATCH
            candidate = cost(modes)
            if candidate.step < best.step * (1 - 1e-9):
                best, improved = candidate, True
    return best


def format_layers(plan: LayersPlan, devices: Sequence[str]) -> str:
    """The per-layer plan as a table: per group its mode, counts per rank and predicted time."""
    width = max(len(g.name) for g in plan.groups)
    lines = [f"per-layer plan ({plan.describe()}), rows per rank of the batch: {list(plan.rows)}",
             f"  {'group':<{width}}  {'mode':<6}  {'kernels or rows per rank':<24}  {'compute ms':>10}  "
             f"{'comm ms':>8}  {'time ms':>8}"]
    for g in plan.groups:
        lines.append(f"  {g.name:<{width}}  {g.mode:<6}  {str(list(g.counts)):<24}  {1e3 * max(g.compute):>10.2f}  "
                     f"{1e3 * g.comm:>8.2f}  {1e3 * g.seconds:>8.2f}")
    lines.append(f"  rest {1e3 * plan.rest:.2f} ms  gradient sum and broadcast {1e3 * plan.sync:.2f} ms  "
                 f"optimizer {1e3 * plan.update:.2f} ms  step {1e3 * plan.step:.2f} ms on {', '.join(devices)}")
    return "\n".join(lines)
