"""``convshard report`` (compute, transfer and wait per device; the timeline PNG) and ``convshard bench``."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import main_exit_code

from convshard.cli import main
from convshard.errors import ConfigError
from convshard.tools import bench, report

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


def test_data_wait_is_its_own_part_of_the_step():
    metrics = _metrics([[0.010, 0.020]], [[0.002, 0.004]])
    metrics["timeline"]["data_seconds"] = [[0.003, 0.001]]
    (only,) = report.summarize(metrics)
    assert only["data_ms"] == pytest.approx(2.0) and only["compute_ms"] == pytest.approx(10.0)
    assert only["step_ms"] == pytest.approx(15.0) and "data ms" in report.format_report(metrics)


def test_warmup_steps_are_left_out():
    metrics = _metrics([[1.0, 0.010]], [[0.0, 0.0]], warmup=1)
    (only,) = report.summarize(metrics)
    assert only["compute_ms"] == pytest.approx(10.0)


def test_metrics_without_steps_are_refused():
    with pytest.raises(ConfigError, match="no step timings"):
        report.summarize(_metrics([[]], [[]]))


def test_the_accuracy_panel_is_scaled_to_the_data():
    """0.938 to 0.963 must not look flat on a 0-1 axis: the panel spans the data with
    a margin (a quarter of the span, at least 0.01 a side), kept within [0, 1]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, accuracy_ax) = plt.subplots(1, 2)
    history = [{"steps": 100 * i, "test_accuracy": a} for i, a in enumerate((0.938, 0.951, 0.963), 1)]
    report._draw_curves({"history": history, "step_loss": [1.0, 0.9]}, loss_ax, accuracy_ax)
    low, high = accuracy_ax.get_ylim()
    plt.close(fig)
    assert (low, high) == pytest.approx((0.928, 0.973))  # a span of 0.025: the least margin, 0.01
    assert report.accuracy_range([0.5]) == pytest.approx((0.49, 0.51))
    assert report.accuracy_range([0.0, 1.0]) == (0.0, 1.0)


def test_report_command_on_a_real_run(tmp_path, capsys):
    out = tmp_path / "run.json"
    assert main(["train", *TINY, "--devices", "cpu@0,cpu@1", "--max-steps", "4", "--metrics-out", str(out)]) == 0
    timeline = json.loads(out.read_text())["timeline"]
    assert [len(t) for t in timeline["step_seconds"]] == [4, 4] and timeline["first_step"] == 1
    assert all(0 <= c <= s for ss, cs in zip(timeline["step_seconds"], timeline["collective_seconds"])
               for s, c in zip(ss, cs))
    for transfers, steps in zip(timeline["transfers"], timeline["step_seconds"]):
        assert transfers and {op for op, *_ in transfers} >= {"all_gather"}  # the kernel split's gathers
        assert all(0 <= start <= end <= steps[-1] and 0 <= blocked <= end - start + 1e-6
                   for _, start, end, blocked in transfers)
    assert main(["report", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "cpu@0" in printed and "cpu@1" in printed and "transfer ms" in printed and "data ms" in printed
    assert "last step, rank 1:" in printed and "hidden by compute" in printed
    for name in ("run.png", "run-transfers.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_hidden_counts_the_union_of_spans_and_the_blocked_time():
    """Two collectives in flight together count their union once; what the
    rank was blocked in them is the part compute did not hide."""
    metrics = {"timeline": {"transfers": [
        [["all_gather", 0.000, 0.010, 0.002], ["all_gather", 0.005, 0.020, 0.003], ["all_reduce", 0.030, 0.040,
                                                                                     0.010]],
        []]}}
    first, second = report.hidden(metrics)
    # in flight: [0, 20] and [30, 40] ms = 30 ms; blocked 2 + 3 + 10 = 15 ms; hidden 1 - 15 / 30
    assert first["transfers"] == 3 and first["in_flight_ms"] == pytest.approx(30.0)
    assert first["blocked_ms"] == pytest.approx(15.0) and first["hidden"] == pytest.approx(0.5)
    assert second == {"rank": 1, "transfers": 0, "in_flight_ms": 0.0, "blocked_ms": 0.0, "hidden": 0.0}


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
    code = main_exit_code(["bench", *args, "--out-dir", str(tmp_path)])
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
    assert table[6] == "| 1 | 100 (1.00x) | 100 (1.00x) |  | 1 / 1 / - |"  # peak MiB of each job, same order
    assert table[7] == "| 2 | 100 (1.00x) | 50 (2.00x) | 60 (1.67x) | 1 / 1 / 1 |"


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


PREDICTED = {"kernel": 0.09, "ddp": 0.125, "ddp sized": 0.08}  # seconds the made-up plans predict


def test_predicted_ms_is_the_run_plans_predicted_step():
    assert bench.predicted_ms({"predicted_seconds": 0.09}) == pytest.approx(90.0)
    assert bench.predicted_ms({"predicted_seconds": None}) is None  # built from flags: nothing predicted
    assert bench.predicted_ms({}) is None


@pytest.fixture
def fake_train(monkeypatch):
    """Every bench job, local or across namespace hosts, writes made-up metrics
    instead of training (100 ms/step; a plan where the job plans: auto picks ddp
    for resnet18, else kernel); returns the jobs' arguments in the order they ran."""
    ran = []

    def write(args, out):
        ran.append(args)
        strategy = args[args.index("--strategy") + 1] if "--strategy" in args else "kernel"
        sized = "--shares" in args  # the bench's only shares are auto
        planned = strategy == "auto" or sized
        if strategy == "auto":
            strategy = "ddp" if "resnet18" in args else "kernel"
        devices = args[args.index("--devices") + 1].split(",") if "--devices" in args else ["plain loop"]
        out.write_text(json.dumps({
            "mean_step_seconds": 0.1, "timeline": {"peak_rss_mib": [100.0]}, "train_loss": 1.0, "shares": {},
            "devices": devices, "strategy": strategy,
            "predicted_seconds": PREDICTED["ddp sized" if sized else strategy] if planned else None}))

    def run(command, **_):
        write(command[4:-2], Path(command[-1]))
        return SimpleNamespace(returncode=0, stderr="")

    monkeypatch.setattr(bench, "subprocess", SimpleNamespace(run=run, DEVNULL=None))
    monkeypatch.setattr(bench._Runner, "_across", staticmethod(lambda hosts, args, out, key: write(args[1:], out)))
    monkeypatch.setattr(bench.devices, "usable_cores", lambda: {0, 1})
    return ran


def test_bench_models_sweep_runs_each_model_against_every_strategy(tmp_path, fake_train):
    results = bench.run_bench(sweeps=["models"], size="smoke", out_dir=tmp_path)["models"]
    assert [p["x"] for p in results] == ["paper b8", "vgg11 b8", "resnet18 b8"]
    assert len(fake_train) == 21
    two = ["--devices", "cpu@0,cpu@1", "--threads", "1"]
    for point, model in zip(results, (["--kernels", "4,8"], ["--model", "vgg11", "--kernels", "4"],
                                      ["--model", "resnet18", "--kernels", "4"])):
        job = [*model, "--batch-size", "8"]
        expected = {"one device": ["--strategy", "single", "--devices", "cpu@0", "--threads", "1", *job],
                    "all cores": ["--strategy", "single", "--devices", "cpu@0-1", "--threads", "2", *job],
                    "kernel": [*two, *job], "ddp": ["--strategy", "ddp", *two, *job],
                    "ddp sized": ["--strategy", "ddp", "--shares", "auto", *two, *job],
                    "auto": ["--strategy", "auto", *two, *job]}
        assert {k: v for k, v in point.items() if isinstance(v, dict)}.keys() == {*expected, "plain loop"}
        for name, args in expected.items():
            assert point[name]["command"].endswith(" --quiet " + " ".join(args))
        assert point["plain loop"]["command"] == "python -m convshard.tools.plain --steps 4 --threads 2 " + " ".join(job)
        assert point["kernel"]["predicted_ms"] is None and point["ddp"]["predicted_ms"] is None
        assert point["ddp sized"]["predicted_ms"] == pytest.approx(80.0)
    assert [p["auto"]["strategy"] for p in results] == ["kernel", "kernel", "ddp"]
    md = (tmp_path / "bench.md").read_text()
    assert "| resnet18 b8 (auto chose ddp) |" in md and "| vgg11 b8 (auto chose kernel) |" in md
    assert "- paper b8, auto (chose kernel): predicted 90 ms, measured 100 ms (-10% off)" in md
    assert "- resnet18 b8, auto (chose ddp): predicted 125 ms, measured 100 ms (+25% off)" in md
    assert "- vgg11 b8, ddp sized: predicted 80 ms, measured 100 ms (-20% off)" in md
    assert (tmp_path / "models.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_batches_choose_the_models_points_and_mixes_runs_auto(tmp_path, fake_train):
    results = bench.run_bench(sweeps=["models", "mixes"], size="smoke", out_dir=tmp_path, batches=[16, 64])
    assert [p["x"] for p in results["models"]] == [f"{m} b{b}" for m in bench.MODELS for b in (16, 64)]
    assert all(p["one device"]["command"].endswith(f"--batch-size {b}")
               for p, b in zip(results["models"], [16, 64] * 3))
    (mix,) = results["mixes"]
    assert mix["auto"]["command"].endswith("--strategy auto --devices cpu@0,cpu@1,cpu@1 --threads 1 "
                                           "--kernels 4,8 --batch-size 16")
    assert "| cpu@0,cpu@1,cpu@1 (auto chose kernel) |" in (tmp_path / "bench.md").read_text()


def test_bench_bandwidth_runs_a_set_of_links_per_batch(tmp_path, fake_train, monkeypatch):
    links = []

    @contextlib.contextmanager
    def hosts(n, rate):
        links.append(rate)
        yield [None] * n

    monkeypatch.setattr(bench, "netns", SimpleNamespace(unavailable=lambda: None, hosts=hosts))
    points = bench.run_bench(sweeps=["bandwidth"], size="smoke", out_dir=tmp_path, batches=[8, 32])["bandwidth"]
    assert links == list(bench.RATES)
    assert [p["x"] for p in points] == [f"{r} b{b}" for r in bench.RATES for b in (8, 32)]
    for p, b in zip(points, [8, 32] * 3):
        assert all(p[k]["command"].split("  #")[0].endswith(f"--batch-size {b} --threads 1")
                   for k in ("one device", "kernel", "ddp", "auto"))
    assert sum("--strategy single" in " ".join(args) for args in fake_train) == 2  # one device once per batch
    assert [p["x"] for p in bench.run_bench(sweeps=["bandwidth"], size="smoke", out_dir=tmp_path / "one")
            ["bandwidth"]] == list(bench.RATES)


def test_bench_in_bf16_names_its_jobs_and_keeps_one_device_as_the_reference(tmp_path, fake_train):
    results = bench.run_bench(sweeps=["batch"], size="smoke", out_dir=tmp_path, precisions=("bf16",),
                              jobs=("auto", "plain loop"))
    (point,) = results["batch"]
    assert {k for k, v in point.items() if isinstance(v, dict)} == {"one device", "auto bf16", "plain loop bf16"}
    assert all(point[k]["command"].endswith("--precision bf16") for k in ("one device", "auto bf16", "plain loop bf16"))
    assert point["auto bf16"]["speedup"] == pytest.approx(point["one device"]["ms"] / point["auto bf16"]["ms"])
    both = bench.run_bench(sweeps=["batch"], size="smoke", out_dir=tmp_path / "both", precisions=("32", "bf16"),
                           jobs=("auto",))["batch"][0]
    assert {k for k, v in both.items() if isinstance(v, dict)} == {"one device", "auto", "auto bf16"}
    assert not both["one device"]["command"].endswith("bf16")  # the reference runs in the first precision
