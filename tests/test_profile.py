"""Profiling: the fits, the measured profile's contents, its schema check, and its cache."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable

import pytest
import torch

from convshard import profile
from convshard.errors import ConfigError
from convshard.models import build_model
from convshard.profile import timings
from convshard.run.launch import init_from_env, launch_local

SHAPE = (1, 16, 16)
TINY_JOB = ["--dataset", "synthetic", "--synthetic-shape", "1,16,16", "--synthetic-size", "64",
            "--kernels", "4,8", "--batch-size", "16", "--threads", "1"]


def test_fit_line_recovers_a_line_and_clamps():
    assert timings._fit_line([1, 2, 4], [0.3, 0.5, 0.9]) == pytest.approx((0.1, 0.2))
    a, b = timings._fit_line([2, 4], [0.5, 0.4])  # noise made it fall: b stays positive, a >= 0
    assert b > 0 and a >= 0


def test_fit_layer_grows_k_until_runs_are_long_enough():
    asked = []

    def time_k(k: int) -> float:
        asked.append(k)
        return 0.001 + 0.004 * k

    a, b = timings._fit_layer(time_k, total=400, world=2, group=None)
    assert asked == [25, 50]  # 0.101 s at k = 25 is long enough: two sizes
    assert (a, b) == pytest.approx((0.001, 0.004))
    asked.clear()
    timings._fit_layer(lambda k: (asked.append(k), 1e-4 * k)[1], total=64, world=2, group=None)
    assert asked == [4, 8, 16, 32]  # short runs: double up to the equal share


def _measure_worker() -> dict:
    torch.set_num_threads(1)
    init_from_env("gloo", timeout=120)
    torch.manual_seed(0)
    model = build_model("paper", SHAPE, 10, (4, 8))
    key = profile.job_key(model, device_spec="cpu", input_shape=SHAPE, batch_size=8)
    return profile.measure(model, key=key, input_shape=SHAPE, classes=10, batch_size=8)


@pytest.fixture(scope="module")
def measured() -> tuple[dict, dict]:
    """The paper CNN's profile as each of two CPU ranks returns it (measured once for the module)."""
    return tuple(launch_local(_measure_worker, 2, timeout=120))


def test_measure_two_ranks_gives_one_profile_the_planner_reads(measured):
    first, second = copy.deepcopy(measured)
    assert first == second  # every rank plans from the same figures
    assert profile.check(first, "profile") is first
    assert first["batchnorm"] is False  # the paper CNN has none
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
    text = profile.format_profile(first)
    assert "features.3 (8 kernels)" in text and "all_gather: latency" in text
    # each worker's device memory (CPU: the host's RAM), which the planner keeps every plan within
    assert len(first["device_memory"]) == 2 and min(first["device_memory"]) > 0 and "memory (GiB)" in text
    from convshard.plan import search

    assert {c.name for c in search.candidates(first)} == {"single", "kernel", "layers", "ddp", "ddp sized"}


def test_measure_says_whether_the_model_has_batchnorm():
    model = build_model("vgg11", (3, 16, 16), 10, (4,))
    key = profile.job_key(model, device_spec="cpu", input_shape=(3, 16, 16), batch_size=4)
    measured = profile.measure(model, key=key, input_shape=(3, 16, 16), classes=10, batch_size=4, repeats=1)
    assert measured["batchnorm"] is True
    assert "batch_seconds" not in measured["layers"][0] and measured["links"] == {}  # one device: neither


def _drop(*path: str | int) -> Callable[[dict], None]:
    """An edit that deletes the field at ``path``."""
    def edit(p: dict) -> None:
        for step in path[:-1]:
            p = p[step]
        del p[path[-1]]
    return edit


def _put(value: object, *path: str | int) -> Callable[[dict], None]:
    """An edit that sets the field at ``path`` to ``value``."""
    def edit(p: dict) -> None:
        for step in path[:-1]:
            p = p[step]
        p[path[-1]] = value
    return edit


@pytest.mark.parametrize("edit, message", [
    pytest.param(_drop("layers", 0, "kernels"), "layers[0].kernels is missing", id="missing-layer-field"),
    pytest.param(_drop("links"), "links is missing", id="missing-top-field"),
    pytest.param(_drop("layers", 1, "outputs", 0, "whole"), "layers[1].outputs[0].whole is missing",
                 id="missing-output-field"),
    pytest.param(_put([1e-3], "layers", 1, "b"), "layers[1].b has 1 entries, expected 2 (one per device)",
                 id="per-device-b"),
    pytest.param(_put([0.1, 0.1, 0.1], "rest_seconds"), "rest_seconds has 3 entries, expected 2 (one per device)",
                 id="per-device-rest"),
    pytest.param(_put([0.1], "layers", 0, "batch_seconds"),
                 "layers[0].batch_seconds has 1 entries, expected 2 (one per device)", id="per-device-batch"),
    pytest.param(_put(float("nan"), "rest_seconds", 1), "rest_seconds[1] is nan, expected a finite number",
                 id="nan"),
    pytest.param(_put(float("inf"), "layers", 0, "a", 0), "layers[0].a[0] is inf, expected a finite number",
                 id="inf"),
    pytest.param(_put(-1.0, "layers", 0, "b", 1), "layers[0].b[1] is -1.0, expected >= 0", id="negative"),
    pytest.param(_put(0, "layers", 0, "kernels"), "layers[0].kernels is 0, expected >= 1", id="no-kernels"),
    pytest.param(_put(["features.9"], "layers", 0, "outputs", 0, "convs"),
                 "layers[0].outputs[0].convs[0] 'features.9' names no layer", id="unknown-reader"),
    pytest.param(_put(0, "links", "all_gather", "bandwidth"), "links.all_gather.bandwidth is 0, expected > 0",
                 id="bandwidth-0"),
    pytest.param(_put("4", "layers", 0, "kernels"), "layers[0].kernels is a string '4', expected an integer",
                 id="wrong-type"),
    pytest.param(_put(1, "batchnorm"), "batchnorm is an integer 1, expected true or false", id="not-a-bool"),
    pytest.param(_put("features.0", "layers", 1, "name"), "layers[1].name 'features.0' repeats layers[0].name",
                 id="duplicate-name"),
    pytest.param(_put([], "devices"), "devices is empty, expected at least one device", id="no-devices"),
    pytest.param(_put(3, "version"), "version is an integer 3, expected 2", id="version"),
    pytest.param(_put(["cpu"], "key", "hosts"), "key.hosts has 1 entries, expected 2 (one per device)",
                 id="key-per-device"),
])
def test_check_names_the_broken_field(measured, edit, message):
    broken = copy.deepcopy(measured[0])
    edit(broken)
    with pytest.raises(ConfigError) as raised:
        profile.check(broken, "profile")
    assert str(raised.value) == f"profile: {message}"


def test_check_refuses_what_is_not_a_profile():
    with pytest.raises(ConfigError, match=r"^measured profile is a list, expected an object$"):
        profile.check([1, 2], "measured profile")


def test_load_names_the_file_of_a_corrupt_cache(tmp_path, measured):
    path = tmp_path / "p.json"
    broken = copy.deepcopy(measured[0])
    broken["layers"][1]["b"] = broken["layers"][1]["b"][:1]
    profile.save(path, broken)
    with pytest.raises(ConfigError) as raised:
        profile.load(path, broken["key"])
    assert str(raised.value) == f"profile {path}: layers[1].b has 1 entries, expected 2 (one per device)"
    # for another job's key too: a broken cache is refused, not silently measured over
    with pytest.raises(ConfigError, match=r"layers\[1\]\.b has 1 entries"):
        profile.load(path, _key())


def _key(**changes) -> dict:
    torch.manual_seed(0)
    args = dict(devices=["cpu@0", "cpu@1"], threads=[1, 1], hosts=["h", "h"],
                model=build_model("paper", SHAPE, 10, (4, 8)), input_shape=SHAPE, batch_size=16)
    return profile.profile_key(**{**args, **changes})


def test_a_job_on_fewer_of_the_cached_devices_reuses_their_entries(tmp_path, measured):
    """A job that lost a host: the cache of the larger job gives the profile
    of the devices left (each one's own timings), and only when the rest of
    the key, and each device's threads and host, are the same."""
    path = tmp_path / "profile.json"
    saved = {**copy.deepcopy(measured[0]), "key": _key(), "devices": _key()["devices"]}
    profile.save(path, saved)
    left = _key(devices=["cpu@1"], threads=[1], hosts=["h"])
    reused = profile.load(path, left)
    assert reused["key"] == left and reused["devices"] == ["cpu@1"]
    assert reused["rest_seconds"] == [saved["rest_seconds"][1]]
    assert [layer["b"] for layer in reused["layers"]] == [[layer["b"][1]] for layer in saved["layers"]]
    profile.check(reused, "reused profile")
    for other in (_key(devices=["cpu@2"], threads=[1], hosts=["h"]),  # a device never measured
                  _key(devices=["cpu@1"], threads=[2], hosts=["h"]),  # measured with other threads
                  _key(devices=["cpu@1"], threads=[1], hosts=["g"]),  # on another host
                  _key(devices=["cpu@1", "cpu@1"], threads=[1, 1], hosts=["h", "h"]),  # one entry, two ranks
                  _key(devices=["cpu@1"], threads=[1], hosts=["h"], batch_size=64)):
        assert profile.load(path, other) is None, other


def test_cache_is_reused_only_for_the_same_job(tmp_path, measured):
    path = tmp_path / "profile.json"
    assert profile.load(path, _key()) is None  # nothing cached yet
    saved = {**copy.deepcopy(measured[0]), "key": _key(), "devices": _key()["devices"]}
    profile.save(path, saved)
    assert profile.load(path, _key()) == saved
    del saved["batchnorm"]  # a profile cached before the field was added: still version 2
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


def test_the_cache_key_names_the_optimizer_whose_step_the_profile_measured(tmp_path, measured):
    """The profile times and measures a step of the job's optimizer (its state is
    memory): another optimizer, or SGD with another momentum, is another key, and
    the profile records the optimizer it measured."""
    assert measured[0]["optimizer"] == "sgd" and measured[0]["momentum"] == 0.9
    assert measured[0]["key"]["optimizer"] == "sgd" and measured[0]["key"]["momentum"] == 0.9
    path = tmp_path / "profile.json"
    profile.save(path, {**copy.deepcopy(measured[0]), "key": _key(), "devices": _key()["devices"]})
    assert profile.load(path, _key()) is not None
    assert profile.load(path, _key(optimizer="adamw")) is None
    assert profile.load(path, _key(optimizer="adam")) is None
    assert profile.load(path, _key(momentum=0.0)) is None
    assert profile.load(path, _key(model=build_model("paper", SHAPE, 10, (4, 8)).double())) is None  # 8-byte weights
    with pytest.raises(ConfigError, match="optimizer 'rmsprop'"):
        _key(optimizer="rmsprop")


def test_every_step_the_profile_takes_is_the_job_optimizer():
    """The optimizer the profile steps (its update time, the rest's step, the
    step whose bytes it measures) is the one the key names, state and all."""
    for name, momentum, kind, state in (("sgd", 0.9, torch.optim.SGD, {"momentum_buffer"}),
                                        ("sgd", 0.0, torch.optim.SGD, set()),
                                        ("adam", 0.9, torch.optim.Adam, {"step", "exp_avg", "exp_avg_sq"}),
                                        ("adamw", 0.9, torch.optim.AdamW, {"step", "exp_avg", "exp_avg_sq"})):
        weight = torch.nn.Parameter(torch.ones(3))
        weight.grad = torch.ones(3)
        step = timings._Compute(optimizer=name, momentum=momentum).step([weight])
        step.step()
        assert type(step) is kind and set(step.state[weight]) == state, name
        assert torch.equal(weight, torch.ones(3)), name  # learning rate 0: timing changes no weight


def test_profile_command_writes_the_cache_and_plan_reuses_it(tmp_path, capfd):
    from convshard.cli import main

    path = tmp_path / "profile.json"
    assert main(["profile", *TINY_JOB, "--devices", "cpu@0,cpu@1", "--profile", str(path)]) == 0
    assert "features.0 (4 kernels)" in capfd.readouterr().out
    measured = json.loads(path.read_text())
    assert measured["devices"] == ["cpu@0", "cpu@1"] and measured["batch_size"] == 16
    assert main(["plan", *TINY_JOB, "--devices", "cpu@0,cpu@1", "--profile", str(path)]) == 0
    out, err = capfd.readouterr()
    assert f"profile: reusing {path}" in err  # rank 0 of the profiling workers read it
    assert out.startswith("chosen: ") and "\npredicted step per plan:" in out  # the choice first, its detail after
    assert out.index("predicted step per plan:") < out.index("\nplan: ")
    assert json.loads(path.read_text()) == measured  # reused, not measured again


def _sharing_worker() -> float:
    """Ranks 1 and 2 share core 1: rank 1's run takes 0.3 s, rank 2's nothing."""
    init_from_env("gloo", timeout=120)
    key = {"devices": ["cpu@0", "cpu@1", "cpu@1"], "hosts": ["h", "h", "h"]}
    together, _ = timings._sharing_group(key, None)
    rank = torch.distributed.get_rank()
    return timings._median_seconds(lambda: time.sleep(0.3 if rank == 1 else 0.0), torch.device("cpu"),
                                   repeats=1, group=None, together=together)


def test_workers_that_share_a_core_are_timed_together():
    """A run of two workers on one core ends when both are done, as their
    training steps do: rank 2, whose own work is nothing, is timed for rank
    1's 0.3 s. (Timed alone, it would look free, and take the most kernels.)"""
    seconds = launch_local(_sharing_worker, 3, timeout=120, env={"OMP_NUM_THREADS": "1"})
    assert seconds[1] >= 0.3 and seconds[2] >= 0.3


def test_a_local_profile_counts_what_starting_its_workers_cost():
    """``profile_job``'s ``startup``, what auto prices each trial's start at:
    the job's time less the time its workers spent measuring (spawning,
    joining, loading the data, leaving), more than nothing and less than
    the whole."""
    from convshard.run.config import TrainConfig, load_data
    from convshard.run.local import profile_job

    config = TrainConfig(devices="cpu@0,cpu@1", threads=1, dataset="synthetic", synthetic_shape=(1, 16, 16),
                         synthetic_size=32, kernels=(4, 8), batch_size=8, quiet=True)
    timing: dict[str, float] = {}
    started = time.perf_counter()
    measured = profile_job(config, load_data(config), timing)
    assert measured["devices"] == ["cpu@0", "cpu@1"]
    assert 0 < timing["startup"] < time.perf_counter() - started
