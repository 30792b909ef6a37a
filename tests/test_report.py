"""``convshard report`` (compute, transfer and wait per device; the timeline PNG) and ``convshard bench``."""

from __future__ import annotations

import json

import pytest

from convshard import bench, report
from convshard.cli import main
from convshard.errors import ConfigError
from test_cli import _main_exit_code

TINY = ["--dataset", "synthetic", "--synthetic-shape", "1,16,16", "--synthetic-size", "64",
        "--kernels", "4,8", "--batch-size", "16", "--threads", "1", "--quiet"]


def _metrics(step_seconds, collective_seconds, warmup=0) -> dict:
    return {"devices": [f"cpu@{r}" for r in range(len(step_seconds))], "strategy": "kernel", "steps": 2,
            "mean_step_seconds": 0.01, "shares": {"c": [2, 2]}, "rebalances": [],
            "config": {"warmup_steps": warmup},
            "timeline": {"first_step": 1, "step_seconds": step_seconds, "collective_seconds": collective_seconds}}


def test_transfer_is_the_least_collective_time_and_the_rest_is_waiting():
    metrics = _metrics([[0.010, 0.020], [0.010, 0.020]], [[0.004, 0.002], [0.001, 0.012]])
    rank0, rank1 = report.summarize(metrics)
    assert rank0["transfer_ms"] == rank1["transfer_ms"] == pytest.approx(1.5)  # mean of min(4, 1), min(2, 12)
    assert rank0["wait_ms"] == pytest.approx(1.5) and rank1["wait_ms"] == pytest.approx(5.0)
    assert rank0["compute_ms"] == pytest.approx(12.0) and rank1["compute_ms"] == pytest.approx(8.5)
    assert rank0["step_ms"] == pytest.approx(15.0)


def test_warmup_steps_are_left_out():
    metrics = _metrics([[1.0, 0.010]], [[0.0, 0.0]], warmup=1)
    (only,) = report.summarize(metrics)
    assert only["compute_ms"] == pytest.approx(10.0)


def test_metrics_without_steps_are_refused():
    with pytest.raises(ConfigError, match="no step timings"):
        report.summarize(_metrics([[]], [[]]))


def test_report_command_on_a_real_run(tmp_path, capsys):
    out = tmp_path / "run.json"
    assert main(["train", *TINY, "--devices", "cpu@0,cpu@1", "--max-steps", "4", "--metrics-out", str(out)]) == 0
    timeline = json.loads(out.read_text())["timeline"]
    assert [len(t) for t in timeline["step_seconds"]] == [4, 4] and timeline["first_step"] == 1
    assert all(0 <= c <= s for ss, cs in zip(timeline["step_seconds"], timeline["collective_seconds"])
               for s, c in zip(ss, cs))
    assert main(["report", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "cpu@0" in printed and "cpu@1" in printed and "transfer ms" in printed
    assert (tmp_path / "run.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_of_a_missing_file_exits_2(tmp_path, capsys):
    assert main(["report", str(tmp_path / "none.json")]) == 2
    assert "none.json" in capsys.readouterr().err


def test_bench_smoke_writes_json_plots_and_commands(tmp_path):
    """The smoke-sized bench: every configuration ran, and each figure names its command."""
    assert main(["bench", "--size", "smoke", "--sweeps", "batch", "--out-dir", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "bench.json").read_text())["results"]
    (point,) = results["batch"]
    assert set(point) >= {"x", "one device", "all cores", "kernel", "ddp"}
    for key in ("one device", "all cores", "kernel", "ddp"):
        assert point[key]["ms"] > 0 and point[key]["peak_rss_mib"] > 0
        assert point[key]["command"] in (tmp_path / "bench.md").read_text()
    assert point["kernel"]["speedup"] == pytest.approx(point["one device"]["ms"] / point["kernel"]["ms"])
    assert point["kernel"]["shares"] == {"features.0": [2, 2], "features.3": [4, 4]}
    assert (tmp_path / "batch.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args, named", [(["--sweeps", "colour"], "'colour'"), (["--rounds", "0"], "--rounds")])
def test_bench_refuses_bad_input(tmp_path, capsys, args, named):
    """Refused in one line with code 2, whether by argparse (SystemExit) or by the bench."""
    code = _main_exit_code(["bench", *args, "--out-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and named in err and len(err.strip().splitlines()) == 1


def test_bench_table_keeps_a_job_missing_from_the_first_point():
    """The workers sweep has no ddp at 1 worker: the column still shows from 2 on."""
    def job(ms, command):
        return {"ms": ms, "speedup": 100 / ms, "peak_rss_mib": 1.0, "command": command}

    points = [{"x": 1, "one device": job(100, "a"), "kernel": job(100, "b")},
              {"x": 2, "one device": job(100, "a"), "kernel": job(50, "c"), "ddp": job(60, "d")}]
    table = bench._markdown({"workers": points}, [0, 1]).splitlines()
    assert "| x | one device | kernel | ddp |" in table[4]
    assert table[6].startswith("| 1 | 100 (1.00x) | 100 (1.00x) |  |")
    assert table[7].startswith("| 2 | 100 (1.00x) | 50 (2.00x) | 60 (1.67x) |")


def test_bench_rounds_interleave_jobs_and_report_the_median(tmp_path, monkeypatch):
    """With 3 rounds the jobs run a, b, a, b, a, b; a job's figure is its median
    round, whose shares and strategy it reports."""
    times = {"a": [30.0, 10.0, 20.0], "b": [5.0, 6.0, 4.0]}
    order = []

    def once(self, args, r, hosts, rate):
        name = args[0]
        order.append(name)
        self.cache[self._key(args, hosts, rate), r] = {"ms": times[name][r], "peak_rss_mib": 10.0 + r,
                                                       "strategy": f"{name}{r}"}

    monkeypatch.setattr(bench._Runner, "_once", once)
    result = bench._Runner(tmp_path, steps=4, rounds=3).measure({"a": ["a"], "b": ["b"]})
    assert order == ["a", "b"] * 3
    assert result["a"]["ms"] == 20.0 and result["a"]["strategy"] == "a2"
    assert result["b"]["ms"] == 5.0 and result["b"]["strategy"] == "b0"
    assert result["a"]["rounds_ms"] == [30.0, 10.0, 20.0] and result["a"]["peak_rss_mib"] == 12.0
