"""``convshard bench --sweeps predict`` in its small form (2 namespace hosts, a few steps) and ``--sweeps scale``.

The predict sweep writes a cluster file from profiles (the devices', the link's), plans it, runs
every candidate plan on namespace hosts and keeps each job's predicted step
beside the measured one. No time bound is asserted here: the figures are
the bench's to show. Needs root and iproute2 (skips, or fails under CI=true).
"""

from __future__ import annotations

import json
from pathlib import Path

import helpers
import tomllib

from convshard.cli import main
from convshard.plan import cluster
from convshard.tools import clusters


def test_predict_sweep_runs_every_candidate_and_keeps_predicted_beside_measured(tmp_path):
    helpers.require_namespaces()
    assert main(["bench", "--size", "smoke", "--sweeps", "predict", "--steps", "4", "--out-dir", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "bench.json").read_text())["results"]["predict"]
    assert [p["x"] for p in results] == [clusters.PREDICT[0][0]]
    jobs = {name: job for name, job in results[0].items() if isinstance(job, dict)}
    assert {"single", "kernel"} <= set(jobs)
    for name, job in jobs.items():
        assert job["predicted_ms"] > 0 and job["ms"] > 0, name
    described = tomllib.loads((tmp_path / "clusters" / "predict-0.toml").read_text())
    named = {d["profile"] for host in described["hosts"] for d in host["devices"]}
    links = {host["between"]["profile"] for host in described["hosts"]}
    profiles = (tmp_path / "profiles").resolve()
    assert len(named) == 1 and Path(named.pop()).parent == profiles  # profiles alone, never a run
    assert links == {str(profiles / "link-10gbit.json")}
    assert (tmp_path / "predict.png").stat().st_size > 0
    assert "predicted" in (tmp_path / "bench.md").read_text()


def test_scale_predicts_speedup_and_efficiency_from_a_cluster_file(tmp_path):
    """One device is the baseline (1x, efficiency 1); four alike on fast links are predicted faster than one."""
    helpers.write_profile(tmp_path / "cpu.json")
    points = {}
    for n, rate in ((1, "10gbit"), (4, "100gbit")):
        hosts = [{"name": f"h{i}", "between": {"bandwidth": rate, "latency": "50 us"},
                  "devices": [{"name": "d", "profile": "cpu.json", "speed": 1.0}]} for i in range(n)]
        path = tmp_path / f"c{n}.toml"
        path.write_text(clusters.cluster_toml(64, hosts))
        points[n] = clusters.predicted_speedup(cluster.load(path), [1.0] * n)
    assert points[1]["speedup"] == 1.0 and points[1]["efficiency"] == 1.0 and points[1]["chosen"] == "single"
    assert points[4]["speedup"] > 1 and 0 < points[4]["efficiency"] <= 1
    assert set(points[4]["predicted_ms"]) >= {"single", "kernel", "ddp"}


def test_measured_runs_are_marked_on_the_scale_axes_they_fall_on():
    """Two hosts alike land on the bandwidth axis at their rate (and at 10 Gbit/s on the devices
    axis at 2); mixed speeds or mixed links land on neither. Speedups are those of auto's plan."""
    def point(label, rates, speeds, single, kernel):
        return {"x": label, "hosts": len(rates), "rates": list(rates), "speeds": list(speeds), "auto_plan": "kernel",
                "single": {"ms": single[0], "predicted_ms": single[1]}, "kernel": {"ms": kernel[0],
                                                                                   "predicted_ms": kernel[1]}}
    measured = [point("a", ("10gbit",) * 2, (1, 1), (800, 840), (400, 420)),
                point("b", ("100mbit",) * 2, (1, 1), (800, 840), (1000, 700)),
                point("c", ("10gbit",) * 3, (1, 0.5, 0.5), (800, 840), (450, 420)),
                point("d", ("1gbit", "1gbit", "100mbit"), (1, 0.5, 0.5), (800, 840), (600, 600))]
    bandwidth = clusters._measured_on("bandwidth", measured)
    assert [(x, s, p) for x, s, p, _ in bandwidth] == [(clusters.SCALE_RATES.index("10gbit"), 2.0, 2.0),
                                                      (clusters.SCALE_RATES.index("100mbit"), 0.8, 1.2)]
    devices = clusters._measured_on("devices", measured)
    assert [(x, s) for x, s, _, _ in devices] == [(clusters.SCALE_DEVICES.index(2), 2.0)]
