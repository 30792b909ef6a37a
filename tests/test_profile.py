"""Profiling: the fits, the measured profile's contents, and its cache."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from convshard import plan, profile
from convshard.cli import main
from convshard.errors import ConfigError
from convshard.launch import init_from_env, launch_local
from convshard.models import build_model

SHAPE = (1, 16, 16)
TINY_JOB = ["--dataset", "synthetic", "--synthetic-shape", "1,16,16", "--synthetic-size", "64",
            "--kernels", "4,8", "--batch-size", "16", "--threads", "1"]


def test_fit_line_recovers_a_line_and_clamps():
    assert profile._fit_line([1, 2, 4], [0.3, 0.5, 0.9]) == pytest.approx((0.1, 0.2))
    a, b = profile._fit_line([2, 4], [0.5, 0.4])  # noise made it fall: b stays positive, a >= 0
    assert b > 0 and a >= 0


def test_fit_layer_grows_k_until_runs_are_long_enough():
    asked = []

    def time_k(k: int) -> float:
        asked.append(k)
        return 0.001 + 0.004 * k

    a, b = profile._fit_layer(time_k, total=400, world=2, group=None)
    assert asked == [25, 50]  # 0.101 s at k = 25 is long enough: two sizes
    assert (a, b) == pytest.approx((0.001, 0.004))
    asked.clear()
    profile._fit_layer(lambda k: (asked.append(k), 1e-4 * k)[1], total=64, world=2, group=None)
    assert asked == [4, 8, 16, 32]  # short runs: double up to the equal share


def _measure_worker() -> dict:
    torch.set_num_threads(1)
    init_from_env("gloo", timeout=120)
    torch.manual_seed(0)
    model = build_model("paper", SHAPE, 10, (4, 8))
    key = profile.job_key(model, device_spec="cpu", input_shape=SHAPE, batch_size=8)
    return profile.measure(model, key=key, input_shape=SHAPE, classes=10, batch_size=8)


def test_measure_two_ranks_gives_one_profile_the_planner_reads():
    first, second = launch_local(_measure_worker, 2, timeout=120)
    assert first == second  # every rank plans from the same figures
    assert [layer["name"] for layer in first["layers"]] == ["features.0", "features.3"]
    first_layer, second_layer = first["layers"]
    assert first_layer["input_grad_bytes"] == first_layer["input_grad_scatter_bytes"] == 0  # the data needs none
    # the second conv's input is gathered from the first's pooled shards, (B, 4, 6, 6) float32:
    # its gradient is reduce-scattered back to them, not all-reduced
    assert second_layer["input_grad_bytes"] == 0
    assert second_layer["input_grad_scatter_bytes"] == 8 * 4 * 6 * 6 * 4
    assert set(first["links"]) == {"all_gather", "all_reduce", "reduce_scatter", "broadcast", "all_to_all",
                                   "ddp_all_reduce"}
    assert first_layer["gather_bytes_per_kernel"] == 8 * 6 * 6 * 4  # 12x12 conv output pooled to 6x6
    for layer in first["layers"]:  # one fit per rank (its clamps: test_fit_line_recovers_a_line_and_clamps)
        assert len(layer["a"]) == len(layer["b"]) == 2
    assert len(first["rest_seconds"]) == 2 and min(first["rest_seconds"]) > 0
    assert {name: set(link) for name, link in first["links"].items()} == {
        name: {"latency", "bandwidth"} for name in ("all_gather", "all_reduce", "reduce_scatter", "broadcast",
                                                    "all_to_all", "ddp_all_reduce")}
    # batch mode: each group timed with all its kernels on 4 of the 8 rows; the first group's
    # pooled output is read by the second group's conv, the second's pooled output by the classifier
    assert [layer["batch_rows"] for layer in first["layers"]] == [4, 4]
    assert all(len(layer["batch_seconds"]) == 2 and min(layer["batch_seconds"]) > 0 for layer in first["layers"])
    assert first_layer["outputs"] == [{"elements": 4 * 6 * 6, "convs": ["features.3"], "whole": False,
                                       "bytes": 8 * 4 * 6 * 6 * 4}]
    assert second_layer["outputs"][0]["convs"] == [] and second_layer["outputs"][0]["whole"]
    assert first_layer["param_bytes"] == (4 * SHAPE[0] * 5 * 5 + 4) * 4  # weights and bias, float32
    assert first["param_bytes"] > first["replicated_param_bytes"] > 0
    assert plan.make_plan(first).strategy in plan.STRATEGIES
    text = profile.format_profile(first)
    assert "features.3 (8 kernels)" in text and "all_gather: latency" in text


def _key(**changes) -> dict:
    torch.manual_seed(0)
    args = dict(devices=["cpu@0", "cpu@1"], threads=[1, 1], hosts=["h", "h"],
                model=build_model("paper", SHAPE, 10, (4, 8)), input_shape=SHAPE, batch_size=16)
    return profile.profile_key(**{**args, **changes})


def test_cache_is_reused_only_for_the_same_job(tmp_path):
    path = tmp_path / "profile.json"
    assert profile.load(path, _key()) is None  # nothing cached yet
    saved = {"version": profile.VERSION, "key": _key(), "layers": []}
    profile.save(path, saved)
    assert profile.load(path, _key()) == saved
    assert [p.name for p in tmp_path.iterdir()] == ["profile.json"]  # no temporary file left
    assert profile.load(path, _key(devices=["cpu@0", "cpu@0"])) is None
    assert profile.load(path, _key(batch_size=64)) is None
    assert profile.load(path, _key(model=build_model("paper", SHAPE, 10, (4, 9)))) is None
    path.write_text(json.dumps({"version": 1, "key": _key()}))  # an older profile: measured anew
    assert profile.load(path, _key()) is None
    path.write_text(json.dumps([1, 2]))
    with pytest.raises(ConfigError, match="not a convshard profile"):
        profile.load(path, _key())


def test_profile_command_writes_the_cache_and_plan_reuses_it(tmp_path, capsys, caplog):
    path = tmp_path / "profile.json"
    assert main(["profile", *TINY_JOB, "--devices", "cpu@0,cpu@1", "--profile", str(path)]) == 0
    assert "features.0 (4 kernels)" in capsys.readouterr().out
    measured = json.loads(path.read_text())
    assert measured["devices"] == ["cpu@0", "cpu@1"] and measured["batch_size"] == 16
    with caplog.at_level(logging.INFO):
        assert main(["plan", *TINY_JOB, "--devices", "cpu@0,cpu@1", "--profile", str(path)]) == 0
    assert f"reusing {path}" in caplog.text
    out = capsys.readouterr().out
    assert "predicted step: kernel" in out and "strategy:" in out
    assert json.loads(path.read_text()) == measured  # reused, not measured again
