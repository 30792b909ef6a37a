"""``convshard bench``: the paper's analyses on this machine, each point against the baselines.

Every point of a sweep runs four jobs on CIFAR-shaped synthetic input, each a
real ``convshard train`` in its own process:

- ``one device``: ``--strategy single --devices cpu@C0 --threads 1``;
- ``all cores``: ``--strategy single --devices cpu@C0-Cn --threads n``, one
  process on every usable core (the practical ceiling on one host);
- ``kernel``: the method, one single-thread worker per device;
- ``ddp``: DistributedDataParallel on the same workers.

Sweeps: ``workers`` (1-4 kernel workers; beyond the core count they share
cores, and the table says so), ``batch`` (and ``--strategy auto``),
``kernels`` (network size), ``mixes`` (uneven devices: equal shares,
``--shares auto``, ddp with an even batch split and with one sized to the
devices, ``--strategy auto``), ``models`` (the paper's CNN, VGG-11 and
ResNet-18 at each batch size, ignoring ``--model``: the four jobs, ddp sized
to the devices and ``--strategy auto``) and ``bandwidth`` (two hosts as
network namespaces, one worker each, joined by links shaped with ``tc`` to
10 Gbit/s, 1 Gbit/s and 100 Mbit/s, at each batch size of ``--batches``;
kernel, ddp and ``--strategy auto``; needs root, skipped with the reason
otherwise), ``predict`` (clusters of namespace hosts written as cluster
files from one profile, every candidate plan's predicted step beside its
measured one) and ``scale`` (predicted speedup and efficiency of the
paper's CNN, ResNet-18 and VGG-11 up to 64 devices, over link bandwidth,
batch size and width; nothing trained): ``convshard.tools.clusters``; ``data``
(streamed image folders of N and 4N JPEGs against the same images held in
memory: memory, data wait, throughput, decodes per image):
``convshard.tools.databench``. The speedup of a job is t(one device) / t(job), from
``mean_step_seconds`` (after the warm-up steps); with ``--rounds N`` each
point's jobs run N times in turn and t is a job's median. A job that planned
(``auto``) also keeps the plan's predicted step and the strategy it chose.
``--precision 32,bf16`` runs every job (but ``one device``, the reference)
in each precision, a job beyond float32 named "JOB bf16"; the batch and models sweeps
also runs the plain PyTorch loop (``plain loop``: one process on all cores,
autocast in the job's precision, no convshard code in its step,
``convshard.tools.plain``) at its faster memory format. ``--jobs`` keeps
only the named jobs of each point, ``--rates`` the bandwidth sweep's links.
Writes ``bench.json``, one PNG per sweep and ``bench.md`` (tables with the
command of every figure, predicted against measured steps, peak memory per
worker) into ``--out-dir``.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from .. import atomic, devices
from ..errors import ConfigError
from ..plan import cluster as cluster_file
from . import clusters, databench, netns

log = logging.getLogger(__name__)

PLAIN = "plain"  # a job's first argument: the plain PyTorch loop (``convshard.tools.plain``)
SWEEPS = ("workers", "batch", "kernels", "mixes", "models", "bandwidth", "predict", "scale", "data")
MODELS = ("paper", "vgg11", "resnet18")  # the models sweep's networks
RATES = ("10gbit", "1gbit", "100mbit")  # the bandwidth sweep's links
SIZES = {
    "paper": {"kernels": (500, 1500), "batch": 64, "batches": (16, 32, 64, 128, 256),
              "networks": ((100, 300), (250, 750), (500, 1500)), "model_batches": (16, 64), "steps": 6,
              "predict_configs": len(clusters.PREDICT)},
    "smoke": {"kernels": (4, 8), "batch": 16, "batches": (8,), "networks": ((4, 8), (8, 12)), "model_batches": (8,),
              "steps": 4, "predict_configs": 1},
}
WIDTHS = {"paper": (None, (16, 32, 64)), "smoke": ((4,), ((4,), (8,)))}  # built-in CNNs' --kernels: default, sweep


def model_size(model: str, size: str) -> dict:
    """The sweeps' settings for ``model`` at ``size``: the paper's CNN takes
    the size's kernels; the ResNets and VGGs a base width (their default at
    ``paper``, a tiny one at ``smoke``; the kernels sweep varies it); any
    other model (``vgg``, a factory) runs as it is built, without a kernels sweep."""
    chosen = {**SIZES[size], "size": size}
    if model == "paper":
        return {**chosen, "model": [], "networks": [("/".join(map(str, n)), n) for n in chosen["networks"]]}
    width, sweep = WIDTHS[size]
    if not (model.startswith("resnet") or model.startswith("vgg1")):
        width, sweep = None, ()
    return {**chosen, "model": ["--model", model], "kernels": width,
            "networks": [(str(w[0] if isinstance(w, tuple) else w), (w,) if isinstance(w, int) else w) for w in sweep]}


def _kernels(kernels) -> list[str]:
    return ["--kernels", ",".join(map(str, kernels))] if kernels else []


class _Runner:
    """Runs ``convshard train`` jobs and keeps their metrics.

    ``measure`` runs the jobs of one point ``rounds`` times, in turn within each
    round, so that the machine's drift over minutes falls on every job alike; a
    job's figure is the median of its rounds."""

    def __init__(self, out_dir: Path, steps: int, rounds: int = 1, precisions: Sequence[str] = ("32",),
                 only: Sequence[str] | None = None, grad_precision: str = "32") -> None:
        self.out_dir, self.steps, self.rounds, self.cache = out_dir, steps, rounds, {}
        self.precisions, self.only, self.grad_precision = tuple(precisions), only, grad_precision

    def in_precisions(self, jobs: dict[str, Sequence[str]]) -> dict[str, list[str]]:
        """Each job in every precision of ``--precision`` (named "NAME bf16"
        beyond float32), but ``one device``, the reference of every speedup,
        in the first only and under its own name; with ``--jobs`` only the
        named jobs (and ``one device``); every convshard job summing its
        gradients in ``--grad-precision``."""
        out = {}
        for name, args in jobs.items():
            if self.only is not None and name not in self.only and name != "one device":
                continue
            for p in self.precisions[:1] if name == "one device" else self.precisions:
                key = name if p == "32" or name == "one device" else f"{name} {p}"
                plain = bool(args) and args[0] == PLAIN
                summed = ["--grad-precision", self.grad_precision] if self.grad_precision != "32" and not plain else []
                out[key] = [*args, *(["--precision", p] if p != "32" else []), *summed]
        return out

    def measure(self, jobs: dict[str, Sequence[str]], *, hosts: list[netns.Host] | None = None,
                rate: str = "") -> dict[str, dict]:
        """Metrics of ``convshard train ARGS`` for each named job (a job whose
        first argument is ``PLAIN``: the plain PyTorch loop), in every precision:
        with ``hosts`` one torchrun per host, the i-th host's worker on the
        i-th device of ``--devices``."""
        jobs = self.in_precisions(jobs)
        for r in range(self.rounds):
            for args in jobs.values():
                self._once(args, r, hosts, rate)
        return {name: self._combined(args, hosts, rate) for name, args in jobs.items()}

    def _command(self, args: Sequence[str]) -> list[str]:
        if args and args[0] == PLAIN:
            return ["python", "-m", "convshard.tools.plain", "--steps", str(self.steps), *args[1:]]
        return ["convshard", "train", "--dataset", "synthetic", "--synthetic-shape", "3,32,32",
                "--synthetic-size", "512", "--max-steps", str(self.steps), "--quiet", *args]

    def _key(self, args: Sequence[str], hosts: list[netns.Host] | None, rate: str) -> str:
        """The job's command as the tables print it."""
        suffix = f"  # torchrun on {len(hosts)} hosts, links {rate}" if hosts else ""
        return shlex.join(self._command(args)) + suffix

    def _combined(self, args: Sequence[str], hosts: list[netns.Host] | None, rate: str) -> dict:
        """The rounds of one job: ms/step is their median; the other fields
        (shares, strategy) are those of the median round."""
        key = self._key(args, hosts, rate)
        runs = sorted((self.cache[key, r] for r in range(self.rounds)), key=lambda m: m["ms"])
        return {**runs[(len(runs) - 1) // 2], "ms": statistics.median(m["ms"] for m in runs),
                "rounds_ms": [self.cache[key, r]["ms"] for r in range(self.rounds)],
                "peak_rss_mib": max(m["peak_rss_mib"] for m in runs)}

    def _once(self, args: Sequence[str], r: int, hosts: list[netns.Host] | None, rate: str) -> None:
        key = self._key(args, hosts, rate)
        if (key, r) in self.cache:
            return
        out = self.out_dir / "runs" / f"{len(self.cache):03d}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        command = self._command(args)
        if hosts:
            self._across(hosts, command[1:], out, key)
        else:
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            module = ["-m", "convshard"] if command[0] == "convshard" else []
            proc = subprocess.run([sys.executable, *module, *command[1:], "--metrics-out", str(out)],
                                  env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
            if proc.returncode != 0:
                raise ConfigError(f"bench job failed ({key}): {proc.stderr.strip().splitlines()[-1:]}")
        metrics = json.loads(out.read_text())
        self.cache[key, r] = {"command": key, "ms": 1000 * metrics["mean_step_seconds"],
                              "peak_rss_mib": max(metrics["timeline"]["peak_rss_mib"]),
                              "train_loss": metrics["train_loss"], "shares": metrics["shares"],
                              "devices": metrics["devices"], "strategy": metrics["strategy"],
                              "predicted_ms": predicted_ms(metrics)}
        log.info("%8.1f ms/step  %s%s", self.cache[key, r]["ms"], key,
                 f"  (round {r + 1}/{self.rounds})" if self.rounds > 1 else "")

    @staticmethod
    def _across(hosts: list[netns.Host], args: list[str], out: Path, key: str) -> None:
        spec = args[args.index("--devices") + 1].split(",")
        procs = []
        for i, host in enumerate(hosts):
            host_args = list(args)
            host_args[host_args.index("--devices") + 1] = spec[i]
            procs.append(netns.torchrun(host, nnodes=len(hosts), rendezvous=hosts[0], run_id="convshard-bench",
                                        args=[*host_args, "--metrics-out", str(out)]))
        results = [netns.finish(p, timeout=1800) for p in procs]
        for code, output in results:
            if code != 0:
                raise ConfigError(f"bench job failed ({key}): {output.strip().splitlines()[-1:]}")


def predicted_ms(metrics: dict) -> float | None:
    """The cost model's ms/step for the plan the run took (``cost.predict``,
    recorded when the run's plan was searched); None for a plan built from
    flags and for one process on all cores, which is measured in its trial."""
    seconds = metrics.get("predicted_seconds")
    return None if seconds is None else 1000 * seconds


def _bandwidth(run: _Runner, size: dict, cores: list[int]) -> list[dict]:
    """Two hosts (namespaces), one worker each, joined by links of each rate in
    RATES; a set of points per batch size of ``--batches``, else the size's batch."""
    reason = netns.unavailable()
    if reason:
        log.warning("bandwidth sweep skipped: %s", reason)
        return []
    spec = ",".join(f"cpu@{c}" for c in cores[:2])
    jobs = {b: [*size["model"], *_kernels(size["kernels"]), "--batch-size", str(b), "--threads", "1"]
            for b in size["given_batches"] or (size["batch"],)}
    ones = {b: run.measure({"one device": ["--strategy", "single", "--devices", f"cpu@{cores[0]}", *job]})["one device"]
            for b, job in jobs.items()}
    points = []
    for rate in size["rates"] or RATES:
        with netns.hosts(2, rate=rate) as hosts:
            for b, job in jobs.items():
                point = {"x": f"{rate} b{b}" if size["given_batches"] else rate, "one device": ones[b], **run.measure(
                    {name: ["--devices", spec, *extra, *job] for name, extra in
                     (("kernel", []), ("ddp", ["--strategy", "ddp"]), ("auto", ["--strategy", "auto"]))},
                    hosts=hosts, rate=rate)}
                points.append(_add_speedups(point))
    return points


def _point(run: _Runner, cores: list[int], workers: list[str], job: list[str], *, auto: bool = False,
           sized: bool = False, plain: bool = False) -> dict:
    """The four jobs of one point, with ``sized`` also ddp with its batch split
    sized to the devices, with ``auto`` ``--strategy auto``, on the same
    workers (``workers`` are the kernel/ddp devices), and with ``plain`` the
    plain PyTorch loop on all cores, at its faster memory format."""
    spec = ",".join(workers)
    jobs = {"one device": ["--strategy", "single", "--devices", f"cpu@{cores[0]}", "--threads", "1", *job],
            "all cores": ["--strategy", "single", "--devices", f"cpu@{devices.format_cores(cores)}",
                          "--threads", str(len(cores)), *job],
            "kernel": ["--devices", spec, "--threads", "1", *job]}
    if len(workers) > 1:
        jobs["ddp"] = ["--strategy", "ddp", "--devices", spec, "--threads", "1", *job]
    if sized and len(workers) > 1:
        jobs["ddp sized"] = ["--strategy", "ddp", "--shares", "auto", "--devices", spec, "--threads", "1", *job]
    if auto and len(workers) > 1:
        jobs["auto"] = ["--strategy", "auto", "--devices", spec, "--threads", "1", *job]
    if plain:
        jobs["plain loop"] = [PLAIN, "--threads", str(len(cores)), *job]
    return _add_speedups(run.measure(jobs))


def _add_speedups(point: dict) -> dict:
    """Set each job's speedup, t(one device) / t(job); returns ``point``."""
    for result in point.values():
        if isinstance(result, dict):
            result["speedup"] = point["one device"]["ms"] / result["ms"]
    return point


def _sweep(name: str, run: _Runner, size: dict, cores: list[int]) -> list[dict]:
    model = size["model"]
    base = [*model, *_kernels(size["kernels"]), "--batch-size", str(size["batch"])]
    two = [f"cpu@{c}" for c in cores[:2]]
    points = []
    if name == "workers":
        for n in range(1, 5):
            workers = [f"cpu@{cores[i % len(cores)]}" for i in range(n)]
            shared = n > len(cores)
            points.append({"x": n, "note": "workers share cores" if shared else "", **_point(run, cores, workers, base)})
    elif name == "batch":
        for batch in size["given_batches"] or size["batches"]:
            job = [*model, *_kernels(size["kernels"]), "--batch-size", str(batch)]
            points.append({"x": batch, **_point(run, cores, two, job, auto=True, plain=True)})
    elif name == "kernels":
        for label, net in size["networks"]:
            job = [*model, *_kernels(net), "--batch-size", str(size["batch"])]
            points.append({"x": label, **_point(run, cores, two, job)})
    elif name == "mixes":
        mix = [f"cpu@{cores[0]}", *[f"cpu@{cores[-1]}"] * 2]
        spec = ",".join(mix)
        point = run.measure({
            "one device": ["--strategy", "single", "--devices", f"cpu@{cores[0]}", "--threads", "1", *base],
            "equal shares": ["--devices", spec, "--threads", "1", *base],
            "auto shares": ["--devices", spec, "--threads", "1", "--shares", "auto", *base],
            "ddp": ["--strategy", "ddp", "--devices", spec, "--threads", "1", *base],
            "ddp sized": ["--strategy", "ddp", "--shares", "auto", "--devices", spec, "--threads", "1", *base],
            "auto": ["--strategy", "auto", "--devices", spec, "--threads", "1", *base]})
        points.append({"x": spec, **_add_speedups(point)})
    elif name == "models":
        for net in MODELS:
            chosen = model_size(net, size["size"])
            for batch in size["given_batches"] or size["model_batches"]:
                job = [*chosen["model"], *_kernels(chosen["kernels"]), "--batch-size", str(batch)]
                points.append({"x": f"{net} b{batch}",
                               **_point(run, cores, two, job, auto=True, sized=True, plain=True)})
    elif name == "bandwidth":
        points = _bandwidth(run, size, cores)
    elif name == "predict":
        points = clusters.predict_sweep(run, size, cores)
    elif name == "scale":
        models = {label: model_size(net, size["size"]) for label, net in clusters.SCALE_MODELS.items()}
        points = clusters.scale_sweep(run.out_dir, size, models, cores, given=size["cluster"])
    elif name == "data":
        points = databench.data_sweep(run.out_dir, size["size"], size["model"], cores, run.precisions,
                                      size["given_steps"])
    return points


def _plot(name: str, points: list[dict], path: Path, cores: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [str(p["x"]) for p in points]
    series = [k for k in dict.fromkeys(k for p in points for k in p) if isinstance(points[-1].get(k), dict)
              and k != "one device"]
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for key in series:
        xs = [i for i, p in enumerate(points) if key in p]
        ax.plot(xs, [points[i][key]["speedup"] for i in xs], marker="o", label=key)
    ax.set_xticks(range(len(points)), labels)
    ax.axhline(cores, color="gray", linestyle="--", linewidth=0.8, label=f"{cores} cores")
    ax.axhline(1, color="black", linewidth=0.5)
    ax.set_xlabel({"workers": "workers", "batch": "batch size", "kernels": "kernels per layer",
                   "mixes": "devices", "models": "model", "bandwidth": "link between the two hosts"}[name])
    ax.set_ylabel("speedup over one device")
    ax.set_title(f"convshard bench: {name}")
    ax.legend(frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _chosen(job: dict) -> str:
    """The strategy an auto job ran, with its device when it ran as one process."""
    return f"{job['strategy']} on {','.join(job['devices'])}" if job["strategy"] == "single" else job["strategy"]


def _markdown(results: dict, cores: list[int], rounds: int = 1) -> str:
    figure = "mean after the warm-up" + (f"; median of {rounds} interleaved rounds" if rounds > 1 else "")
    lines = [f"Machine: {len(cores)} usable cores ({', '.join(map(str, cores))}). "
             f"Milliseconds per step ({figure}), speedup over one device in brackets.", ""]
    for name, points in results.items():
        if name == "scale":
            lines += ["### scale (predicted from one profile per model; nothing trained)", "",
                      *clusters.scale_markdown(points), ""]
            continue
        if name == "data":
            lines += ["### data (streamed image folders against the same images held in memory)", "",
                      *databench.markdown(points)]
            continue
        keys = list(dict.fromkeys(k for p in points for k in p if isinstance(p[k], dict)))
        lines += [f"### {name}", "", "| x | " + " | ".join(keys) + " | peak MiB per worker, same order |",
                  "|" + " --- |" * (len(keys) + 2)]
        for p in points:
            cells = [f"{p[k]['ms']:.0f} ({p[k]['speedup']:.2f}x)" if k in p else "" for k in keys]
            notes = [p.get("note"), f"(auto chose {_chosen(p['auto'])})" if "auto" in p else ""]
            note = "".join(f" {n}" for n in notes if n)
            memory = " / ".join(f"{p[k]['peak_rss_mib']:.0f}" if k in p else "-" for k in keys)
            lines.append(f"| {p['x']}{note} | " + " | ".join(cells) + f" | {memory} |")
        predictions = [f"- {p['x']}, {k}{' (chose ' + _chosen(p[k]) + ')' if k == 'auto' else ''}: "
                       f"predicted {p[k]['predicted_ms']:.0f} ms, measured {p[k]['ms']:.0f} ms "
                       f"({100 * (p[k]['predicted_ms'] / p[k]['ms'] - 1):+.0f}% off)"
                       for p in points for k in keys if p.get(k, {}).get("predicted_ms") is not None]
        if predictions:
            lines += ["", "Planned jobs, the plan's predicted step against the measured one "
                      "(off: predicted / measured - 1):", "", *predictions]
        lines += ["", "Commands:", "", "```sh", *sorted({p[k]["command"] for p in points for k in keys if k in p}), "```", ""]
    return "\n".join(lines)


def run_bench(*, sweeps: Sequence[str], size: str, out_dir: str | Path, steps: int | None = None,
              batches: Sequence[int] | None = None, rounds: int = 1, model: str = "paper",
              cluster: str | Path | None = None, precisions: Sequence[str] = ("32",),
              jobs: Sequence[str] | None = None, rates: Sequence[str] | None = None,
              grad_precision: str = "32") -> dict:
    """Run the sweeps on ``model``; write bench.json, <sweep>.png and bench.md into ``out_dir``;
    return the results. ``batches`` replaces the size's batch sizes of the batch
    and models sweeps and gives the bandwidth sweep a set of points per batch;
    every job of a point runs ``rounds`` times, interleaved, and reports its median."""
    unknown = [s for s in sweeps if s not in SWEEPS]
    if unknown:
        raise ConfigError(f"unknown sweep {unknown[0]!r}: choose from {', '.join(SWEEPS)}")
    if size not in SIZES:
        raise ConfigError(f"unknown size {size!r}: choose from {', '.join(SIZES)}")
    cores = sorted(devices.usable_cores())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run = _Runner(out, steps or SIZES[size]["steps"], rounds, precisions, jobs, grad_precision)
    if cluster is not None:
        if "scale" not in sweeps:
            raise ConfigError("--cluster adds the described cluster to the scale sweep: add scale to --sweeps")
        cluster_file.load(cluster)  # a bad file fails now, before any sweep runs
    chosen = {**model_size(model, size), "given_batches": tuple(batches or ()), "rates": tuple(rates or ()),
              "cluster": Path(cluster) if cluster is not None else None, "given_steps": steps}
    results = {name: points for name in sweeps if (points := _sweep(name, run, chosen, cores))}
    for name, points in results.items():
        if name == "predict":
            clusters.plot_predict(points, out / "predict.png")
        elif name == "scale":
            clusters.plot_scale(points, out, measured=results.get("predict", ()))
        elif name != "data":  # a table of five figures: bench.md
            _plot(name, points, out / f"{name}.png", len(cores))
    atomic.write_text(out / "bench.json", json.dumps({"cores": cores, "model": model, "size": size, "rounds": rounds,
                                                      "results": results}, indent=1) + "\n")
    atomic.write_text(out / "bench.md", _markdown(results, cores, rounds))
    return results
