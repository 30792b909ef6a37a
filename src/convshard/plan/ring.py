"""Links of a cluster's collectives: ``ring_links``, each collective priced on the ring of the devices it runs on."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

RING_STEPS = {  # kind -> (latency steps per W - 1, bytes through the slowest hop per n (W - 1) / W)
    "all_gather": (1, 1), "reduce_scatter": (1, 1), "all_to_all": (1, 1),
    "all_reduce": (2, 2), "ddp_all_reduce": (2, 2), "broadcast": (1, None)}


def ring_links(topology: Mapping, ranks: Sequence[int]) -> dict[str, dict[str, float]]:
    """The link of every collective over devices ``ranks`` of a cluster
    (``convshard.plan.cluster``), as ``transfer`` reads it: t(n) = latency + n / bandwidth.

    The collective runs on a ring in rank order, hop i from ranks[i] to
    ranks[i+1 mod W]. A hop within host h runs on its link within
    (``topology["within"][h]``); a hop between hosts h and g crosses both
    hosts' links to the switch: bandwidth min(beta_h, beta_g), latency
    alpha_h + alpha_g. The ring moves at its slowest hop: beta = min over
    hops of the bandwidth, alpha = max over hops of the latency (every step
    waits for the slowest hop). A reduce-scatter moves at min over hops of
    rho beta_hop instead, rho the rate a link's profile measured for
    convshard's reduce-scatter (gloo's, on slices padded to the largest)
    over its all-gather's (1 for a link given by numbers). With n bytes as the profile counts them
    (all-gather, reduce-scatter: the whole result; all-reduce, broadcast:
    the tensor; all-to-all: what each rank sends):

        all-gather, reduce-scatter, all-to-all:  (W-1) alpha + (W-1)/W n / beta
        all-reduce (also DDP's):               2 (W-1) alpha + 2 (W-1)/W n / beta
        broadcast (pipelined along the ring):    (W-1) alpha + n / beta

    None of them on one device.
    """
    world = len(ranks)
    if world < 2:
        return {}
    hosts, within, between = topology["hosts"], topology["within"], topology["between"]
    hops = []
    for i, r in enumerate(ranks):
        h, g = hosts[r], hosts[ranks[(i + 1) % world]]
        ends = [within[h]] if h == g else [between[h], between[g]]
        hops.append((min(end["bandwidth"] for end in ends), sum(end["latency"] for end in ends),
                     min(end.get("reduce_scatter", 1.0) for end in ends)))
    beta, alpha = min(b for b, _, _ in hops), max(a for _, a, _ in hops)
    links = {}
    for kind, (steps, volume) in RING_STEPS.items():
        slowest = min(b * rho for b, _, rho in hops) if kind == "reduce_scatter" else beta
        bandwidth = slowest if volume is None else slowest * world / (volume * (world - 1))
        links[kind] = {"latency": steps * (world - 1) * alpha, "bandwidth": bandwidth}
    return links
