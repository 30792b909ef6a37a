"""``convshard bench --sweeps predict,scale``: clusters described in files, predicted, and measured where they can be.

Both sweeps first measure their profiles once (``convshard profile
--threads 1``, cached under ``OUT/profiles``): ``predict`` one of two
workers on this host's first two cores, and one of each link rate it uses
(two namespace hosts, ``link_profile``); ``scale`` one per model and width
on one core. Every configuration is then written as a cluster file
(``OUT/clusters``, ``convshard.plan.cluster``) from those profiles alone.

``predict`` builds each configuration of PREDICT as network-namespace
hosts (``netns``, one worker each, each host's link shaped with ``tc``),
plans it with ``search.candidates`` on the cluster file, and runs every
candidate's plan (``convshard train --plan``, one torchrun per host it
uses; a one-device plan as one local process). Every job keeps the
prediction beside the measurement (``predicted_ms``, ``ms``). Two workers
on one core run at half speed each: the cluster file says so with
``speed = 0.5``. Needs root; skipped with the reason otherwise.

``scale`` trains nothing: for the paper's CNN, ResNet-18 and VGG-11 it
predicts the step of every candidate, and auto's speedup over the best
single device and its efficiency (speedup / (sum of speeds / fastest
speed)), against the number of devices (1-64, alike and mixed), the link
bandwidth, the batch size and the width, and for the paper's setting: four
devices alike on one host. Run in one command with ``predict``
(``--sweeps predict,scale``), its plots also mark the measured runs that
fall on their axes, beside their prediction.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from .. import atomic
from ..errors import ConfigError
from ..plan import cluster, ring, search
from . import netns

log = logging.getLogger(__name__)

# label, per host (its worker's core: an index into the usable cores, speed factor), each host's link rate (tc)
PREDICT = (
    ("2 hosts, 10 Gbit/s", ((0, 1.0), (1, 1.0)), ("10gbit", "10gbit")),
    ("2 hosts, 1 Gbit/s", ((0, 1.0), (1, 1.0)), ("1gbit", "1gbit")),
    ("2 hosts, 100 Mbit/s", ((0, 1.0), (1, 1.0)), ("100mbit", "100mbit")),
    ("3 hosts, speeds 1, 1/2, 1/2", ((0, 1.0), (1, 0.5), (1, 0.5)), ("10gbit",) * 3),
    ("3 hosts, one link 10x slower", ((0, 1.0), (1, 0.5), (1, 0.5)), ("1gbit", "1gbit", "100mbit")),
)
# the scale sweep's latency of each host's link: half a gloo meeting over TCP, which took
# 279-296 us on the 2-core test machine (docs/architecture.md, scripts/latencies.py)
SCALE_LATENCY = "150 us"
SCALE_MODELS = {"paper CNN": "paper", "ResNet-18": "resnet18", "VGG-11": "vgg11"}
SCALE_DEVICES = (1, 2, 4, 8, 16, 32, 64)
SCALE_RATES = ("100mbit", "1gbit", "10gbit", "100gbit")
RATE_BYTES = {"100mbit": 12.5e6, "1gbit": 125e6, "10gbit": 1.25e9, "100gbit": 12.5e9}  # bytes per second
SCALE_BATCHES = (16, 32, 64, 128, 256)
MIXED = (1.0, 0.5, 0.25)  # device i of a mixed cluster runs at MIXED[i % 3] of the fastest
PAPER = {"4 CPUs": 3.28, "3 GPUs": 2.45}  # the paper's speedups (kernels 500,1500, CIFAR-10)


def base_profile(out_dir: Path, name: str, model_args: Sequence[str], batch: int, device: str) -> Path:
    """The profile of ``model_args`` on ``device`` (one or more, one worker
    each) at ``batch``, measured once: its file is named for the command."""
    args = ["--devices", device, "--threads", "1", "--dataset", "synthetic", "--synthetic-shape", "3,32,32",
            "--synthetic-size", "512", "--batch-size", str(batch), *model_args]
    path = out_dir / "profiles" / f"{name}-{hashlib.sha256(' '.join(args).encode()).hexdigest()[:8]}.json"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "convshard", "profile", *args, "--profile", str(path)]
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise ConfigError(f"profiling {name} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return path


def cluster_toml(batch: int, hosts: Sequence[dict]) -> str:
    """A cluster file: ``hosts`` of {name, between: {bandwidth, latency} or {profile},
    devices: [{name, profile, device, speed, count}]}."""
    lines = [f"batch_size = {batch}"]
    for host in hosts:
        link = ", ".join(f"{k} = {json.dumps(v)}" for k, v in host["between"].items())
        lines += ["", "[[hosts]]", f"name = {json.dumps(host['name'])}", f"between = {{ {link} }}", "devices = ["]
        for d in host["devices"]:
            fields = ", ".join(f"{k} = {json.dumps(v)}" for k, v in d.items())
            lines.append(f"  {{ {fields} }},")
        lines.append("]")
    return "\n".join(lines) + "\n"


def _write_cluster(path: Path, batch: int, hosts: Sequence[dict]) -> dict:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(path, cluster_toml(batch, hosts))
    return cluster.load(path)


def predict_sweep(run, size: dict, cores: list[int]) -> list[dict]:
    """Every configuration of PREDICT (``size["predict_configs"]`` of them):
    each candidate's predicted step beside its measured one. ``run`` is
    bench's job runner."""
    reason = netns.unavailable()
    if reason:
        log.warning("predict sweep skipped: %s", reason)
        return []
    model_args = [*size["model"], *(["--kernels", ",".join(map(str, size["kernels"]))] if size["kernels"] else [])]
    # two workers, one per core, as the hosts run them: each core's cost per kernel at a working
    # share and its batch-mode time at half the batch, measured together on this host before any run
    profile = base_profile(run.out_dir, "predict", model_args, size["batch"],
                           ",".join(f"cpu@{c}" for c in cores[:2]))
    configs = PREDICT[: size["predict_configs"]]
    links = {rate: link_profile(run.out_dir, rate, cores) for rate in sorted({r for *_, rates in configs for r in rates})}
    points = []
    for i, (label, layout, rates) in enumerate(configs):
        specs = [f"cpu@{cores[core % len(cores)]}" for core, _ in layout]
        hosts = [{"name": f"h{h}", "between": {"profile": str(links[rate].resolve())},
                  "devices": [{"name": spec, "profile": str(profile.resolve()), "device": spec, "speed": speed}]}
                 for h, (spec, (_, speed), rate) in enumerate(zip(specs, layout, rates))]
        described = _write_cluster(run.out_dir / "clusters" / f"predict-{i}.toml", size["batch"], hosts)
        found = search.candidates(described)
        auto = search.fastest(search.auto_candidates(found, described)).name
        point: dict = {"x": label, "hosts": len(hosts), "rates": list(rates),
                       "speeds": [speed for _, speed in layout], "auto_plan": auto}
        with netns.hosts(len(hosts), rate=list(rates)) as built:
            for c in found:
                used = [described["devices"].index(d) for d in c.plan.devices]
                real = tuple(specs[r] for r in used)
                plan_path = run.out_dir / "plans" / f"predict-{i}-{c.name.replace(' ', '-')}.json"
                plan_path.parent.mkdir(parents=True, exist_ok=True)
                atomic.write_text(plan_path, json.dumps(replace(c.plan, devices=real).to_json(), indent=1) + "\n")
                args = [*model_args, "--plan", str(plan_path), "--devices", ",".join(real)]
                on = [built[r] for r in used] if len(used) > 1 else None
                measured = run.measure({c.name: args}, hosts=on, rate=label)[c.name]
                point[c.name] = {**measured, "predicted_ms": 1e3 * c.prediction.step}
        for job in (v for v in point.values() if isinstance(v, dict)):
            job["speedup"] = point["single"]["ms"] / job["ms"]
        points.append(point)
    return points


def link_profile(out_dir: Path, rate: str, cores: list[int]) -> Path:
    """A profile of one worker on each of two namespace hosts joined by links
    of ``rate``, whose links a cluster file names (``between = { profile }``):
    measured once, before any run it predicts, on a tiny model (the links'
    figures do not depend on it)."""
    path = out_dir / "profiles" / f"link-{rate}.json"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with netns.hosts(2, rate=rate) as hosts:
        procs = [netns.torchrun(host, nnodes=2, rendezvous=hosts[0], run_id="convshard-link", args=[
            "train", "--strategy", "layers", "--devices", f"cpu@{cores[i % len(cores)]}", "--threads", "1",
            "--dataset", "synthetic", "--synthetic-shape", "3,32,32", "--synthetic-size", "64", "--kernels", "4,8",
            "--batch-size", "16", "--max-steps", "1", "--quiet", "--profile", str(path)]) for i, host in enumerate(hosts)]
        finished = [netns.finish(proc, timeout=900) for proc in procs]
    for code, output in finished:
        if code != 0:
            raise ConfigError(f"profiling the {rate} link failed: {output.strip().splitlines()[-1:]}")
    return path


def plot_predict(points: list[dict], path: Path) -> None:
    """Predicted against measured ms per step, one marker per strategy, with the 15% band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 5))
    names = list(dict.fromkeys(k for p in points for k, v in p.items() if isinstance(v, dict)))
    top = max(max(v["ms"], v["predicted_ms"]) for p in points for v in p.values() if isinstance(v, dict))
    for name in names:
        jobs = [p[name] for p in points if name in p]
        ax.scatter([j["ms"] for j in jobs], [j["predicted_ms"] for j in jobs], label=name)
    line = [0, 1.05 * top]
    ax.plot(line, line, color="black", linewidth=0.7)
    for k in (0.85, 1.15):
        ax.plot(line, [k * v for v in line], color="gray", linestyle="--", linewidth=0.7)
    ax.set_xlabel("measured ms per step")
    ax.set_ylabel("predicted ms per step (cluster file)")
    ax.set_title("convshard bench: predict (dashed: 15%)")
    ax.legend(frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def scale_sweep(out_dir: Path, size: dict, models: dict[str, dict], cores: list[int],
                given: Path | None = None) -> list[dict]:
    """Predicted speedup and efficiency of every model along every axis
    (module docstring); ``models`` maps each of SCALE_MODELS to its bench
    settings (``bench.model_size``). A ``given`` cluster file adds its own
    points against bandwidth (every host's link to the switch) and batch size."""
    points = []
    for label, model in SCALE_MODELS.items():
        chosen = models[label]
        networks = chosen["networks"] or [("default", chosen["kernels"])]
        profiles = {}
        for width, kernels in networks:
            args = [*chosen["model"], *(["--kernels", ",".join(map(str, kernels))] if kernels else [])]
            profiles[width] = base_profile(out_dir, f"scale-{model}-{width.replace('/', '-')}", args,
                                           SCALE_BATCHES[0], f"cpu@{cores[0]}")
        for axis, x, speeds, setting in _axes(size["batch"], [w for w, _ in networks]):
            profile = profiles[setting.get("width", networks[-1][0])]  # default: the model at full width
            devices = [{"name": f"d{i}", "profile": str(profile.resolve()), "speed": s} for i, s in enumerate(speeds)]
            rate = setting.get("rate", "10gbit")
            link = {"bandwidth": rate, "latency": SCALE_LATENCY}
            hosts = ([{"name": "h0", "between": link, "devices": devices}] if setting.get("one_host") else
                     [{"name": f"h{i}", "between": link, "devices": [d]} for i, d in enumerate(devices)])
            tag = f"{model}-{axis}-{x}".replace("/", "-").replace(" ", "-")
            described = _write_cluster(out_dir / "clusters" / "scale" / f"{tag}.toml",
                                       setting.get("batch", size["batch"]), hosts)
            points.append({"model": label, "axis": axis, "x": x, **predicted_speedup(described, speeds)})
    if given is not None:
        points += _given_points(given)
    return points


def _axes(batch: int, widths: Sequence[str]) -> list[tuple[str, object, list[float], dict]]:
    """(axis, x, device speeds, setting) of every scale point of one model; 4 hosts at 10 Gbit/s unless said."""
    axes = []
    for n in SCALE_DEVICES:
        axes += [("devices alike", n, [1.0] * n, {}),
                 ("devices mixed", n, [MIXED[i % len(MIXED)] for i in range(n)], {})]
    axes += [("bandwidth", rate, [1.0] * 4, {"rate": rate}) for rate in SCALE_RATES]
    axes += [("batch", b, [1.0] * 4, {"batch": b}) for b in SCALE_BATCHES]
    axes += [("width", w, [1.0] * 4, {"width": w}) for w in widths]
    axes.append(("paper setting", "4 alike, one host", [1.0] * 4, {"one_host": True, "batch": batch}))
    return axes


def _given_points(path: Path) -> list[dict]:
    """The scale points of a user's cluster file: against every host's link and against the batch size."""
    described = cluster.load(path)
    speeds = [1 / search.single_step(described, r) for r in range(len(described["devices"]))]
    points = []
    for rate in SCALE_RATES:
        between = [{**link, "bandwidth": RATE_BYTES[rate]} for link in described["topology"]["between"]]
        topology = {**described["topology"], "between": between}
        relinked = {**described, "topology": topology, "links": ring.ring_links(topology, range(len(speeds)))}
        points.append({"model": f"cluster {path.name}", "axis": "bandwidth", "x": rate,
                       **predicted_speedup(relinked, speeds)})
    for b in SCALE_BATCHES:
        points.append({"model": f"cluster {path.name}", "axis": "batch", "x": b,
                       **predicted_speedup(cluster.load(path, batch_size=b), speeds)})
    return points


def predicted_speedup(described: dict, speeds: Sequence[float]) -> dict:
    """Every candidate's predicted ms, auto's choice, its speedup over the best single device and its efficiency."""
    found = search.candidates(described)
    best = search.fastest(search.auto_candidates(found, described))
    single = next(c for c in found if c.name == "single").prediction.step
    speedup = single / best.prediction.step
    return {"predicted_ms": {c.name: 1e3 * c.prediction.step for c in found}, "chosen": best.name,
            "devices_used": best.plan.world, "speedup": speedup, "efficiency": speedup * max(speeds) / sum(speeds)}


def _measured_on(name: str, measured: Sequence[dict]) -> list[tuple[int, float, float, str]]:
    """The predict sweep's runs that fall on scale plot ``name``, as (x index,
    measured speedup, predicted speedup, label) of the plan auto would run:
    two hosts alike on the bandwidth axis; on the devices axis two hosts
    alike at 10 Gbit/s and the three hosts of speeds 1, 1/2, 1/2."""
    marks = []
    for p in measured:
        job, single = p[p["auto_plan"]], p["single"]
        alike, rate = len(set(p["speeds"])) == 1, p["rates"][0] if len(set(p["rates"])) == 1 else None
        speedup, predicted = single["ms"] / job["ms"], single["predicted_ms"] / job["predicted_ms"]
        if name == "bandwidth" and alike and rate in SCALE_RATES:
            marks.append((SCALE_RATES.index(rate), speedup, predicted, f"{p['hosts']} namespace hosts"))
        elif name == "devices" and rate == "10gbit" and p["hosts"] in SCALE_DEVICES:
            marks.append((SCALE_DEVICES.index(p["hosts"]), speedup, predicted, p["x"]))
    return marks


def plot_scale(points: list[dict], out_dir: Path, measured: Sequence[dict] = ()) -> list[Path]:
    """One PNG per axis: speedup (solid) and efficiency (dotted) per model;
    with ``measured`` (the predict sweep's points, the paper CNN) its runs on
    the same axes: measured (x) beside predicted (+) speedup of auto's plan."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = []
    axes = {"devices": ("devices alike", "devices mixed"), "bandwidth": ("bandwidth",), "batch": ("batch",),
            "width": ("width",)}
    for name, series in axes.items():
        fig, ax = plt.subplots(figsize=(6.4, 4))
        for axis in series:
            for model in dict.fromkeys(p["model"] for p in points):
                chosen = [p for p in points if p["axis"] == axis and p["model"] == model]
                if not chosen:
                    continue
                xs = range(len(chosen))
                tag = f"{model}{', mixed' if axis.endswith('mixed') else ''}"
                line, = ax.plot(xs, [p["speedup"] for p in chosen], marker="o", label=f"{tag}: speedup")
                ax.plot(xs, [p["efficiency"] for p in chosen], linestyle=":", color=line.get_color(),
                        label=f"{tag}: efficiency")
                ax.set_xticks(list(xs), [str(p["x"]) for p in chosen])
        for i, (x, speedup, predicted, label) in enumerate(_measured_on(name, measured)):
            ax.scatter([x], [speedup], marker="x", color="black", zorder=3,
                       label="paper CNN, measured on namespace hosts" if i == 0 else None)
            ax.scatter([x], [predicted], marker="+", s=80, color="red", zorder=3,
                       label="paper CNN, predicted for those hosts" if i == 0 else None)
            ax.annotate(label, (x, speedup), textcoords="offset points", xytext=(4, -10), fontsize=6)
        ax.axhline(1, color="black", linewidth=0.5)
        ax.set_xlabel({"devices": "devices (mixed: speeds 1, 1/2, 1/4, ...)", "bandwidth": "link per host (4 hosts)",
                       "batch": "batch size (4 hosts, 10 Gbit/s)", "width": "width (4 hosts, 10 Gbit/s)"}[name])
        ax.set_ylabel("predicted speedup / efficiency")
        ax.set_title(f"convshard bench: scale, {name} (predicted)")
        ax.legend(frameon=False, fontsize=7)
        fig.tight_layout()
        path = out_dir / f"scale-{name}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        drawn.append(path)
    return drawn


def scale_markdown(points: list[dict]) -> list[str]:
    """The scale sweep's table, and the paper's setting beside the paper's figures."""
    lines = ["| model | axis | x | predicted speedup | efficiency | auto's plan (devices) | ms per plan |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for p in points:
        per_plan = ", ".join(f"{k} {v:.0f}" for k, v in p["predicted_ms"].items())
        lines.append(f"| {p['model']} | {p['axis']} | {p['x']} | {p['speedup']:.2f}x | {p['efficiency']:.2f} | "
                     f"{p['chosen']} ({p['devices_used']}) | {per_plan} |")
    paper = next((p for p in points if p["axis"] == "paper setting" and p["model"] == "paper CNN"), None)
    if paper:
        lines += ["", (f"Paper CNN, four devices alike on one host: predicted {paper['speedup']:.2f}x; the paper "
                       f"measured {PAPER['4 CPUs']}x on four CPUs and {PAPER['3 GPUs']}x on three GPUs.")]
    return lines
