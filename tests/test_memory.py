"""The memory model (``convshard.plan.memory``) and the planner keeping every plan within each device's memory."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import helpers
import pytest

from convshard import plan
from convshard.errors import ConfigError
from convshard.plan import memory, search, splits


def small_profile(**extra):
    """Two equal devices, two groups; every byte count below is chosen to be read off the formula by hand."""
    profile = helpers.make_profile((1.0, 1.0), kernels=(8, 16), gather_bytes=100, input_grad_bytes=1000,
                                   param_bytes=10_000 + 4000, replicated_param_bytes=4000)
    return {**profile, **extra}


def test_peak_bytes_follow_the_docstring_formula():
    profile = small_profile()
    job = plan.kernel_split(profile["devices"], search.groups_of(profile), 64, counts={"conv0": (6, 2),
                                                                                       "conv1": (8, 8)})
    # per group: P_g = 5000, I_g = 1000, O_g = 100 K; held (2 + 1) per parameter byte
    conv0 = [3 * 5000 * c / 8 + 1000 + 4 * 800 * c / 8 + 800 * 2 * 6 / 8 for c in (6, 2)]
    conv1 = [3 * 5000 * c / 16 + 1000 + 4 * 1600 * c / 16 + 1600 * 2 * 8 / 16 for c in (8, 8)]
    expected = [3 * 4000 + a + b for a, b in zip(conv0, conv1)]
    assert memory.peak_bytes(profile, job) == pytest.approx(expected)
    ddp = plan.ddp(profile["devices"], search.groups_of(profile), 64, shares=[3, 1])
    acts = (1000 + 4 * 800) + (1000 + 4 * 1600)
    assert memory.peak_bytes(profile, ddp) == pytest.approx([4 * 14_000 + acts * 48 / 64, 4 * 14_000 + acts * 16 / 64])


def test_caps_bound_a_split_within_the_limit():
    assert splits.choose_counts(10, [0, 0], [1, 1], caps=[10, 3]) == (7, 3)
    with pytest.raises(ConfigError, match="fewer than the 10"):
        splits.choose_counts(10, [0, 0], [1, 1], caps=[5, 3])


def test_a_device_with_too_little_memory_gets_a_smaller_share():
    """Device 1's limit is below what the even split needs there: the kernel
    candidate gives it fewer than the even 4 and 8 kernels. That every
    candidate needs no more than each device's limit, by its own estimate,
    is a property of the planner (it offers no plan its memory model says
    does not fit), not a value: the model itself is pinned by hand in
    ``test_peak_bytes_follow_the_docstring_formula``."""
    roomy = small_profile()
    even = next(c for c in search.candidates(roomy) if c.name == "kernel")
    assert even.plan.kernel_counts() == {"conv0": (4, 4), "conv1": (8, 8)}
    limit = 0.9 * even.memory[1]  # device 1 cannot hold the even split
    tight = small_profile(device_memory=[1e12, limit])
    found = search.candidates(tight)
    kernel = next(c for c in found if c.name == "kernel")
    assert kernel.plan.kernel_counts()["conv1"][1] < 8 and kernel.plan.kernel_counts()["conv0"][1] < 4
    for c in found:
        ranks = [tight["devices"].index(d) for d in c.plan.devices]
        assert all(need <= tight["device_memory"][r] for need, r in zip(c.memory, ranks)), c.name


def test_a_plan_that_fits_nowhere_is_refused_naming_the_device_and_the_bytes():
    tight = small_profile(device_memory=[5000, 6000])  # less than the replicated part's 3 * 4000 bytes
    with pytest.raises(ConfigError) as caught:
        search.candidates(tight)
    message = str(caught.value)
    assert "no plan fits the devices' memory" in message and "bytes) on cpu@" in message
    assert "\n" not in message


def test_each_process_own_bytes_count_in_its_peak_and_its_caps():
    """R_r, what a worker holds before it trains, adds to every plan's peak on its
    device and leaves that much less for the share."""
    job = plan.kernel_split(("cpu@0", "cpu@1"), {"conv0": 8, "conv1": 16}, 64)
    bare = memory.peak_bytes(small_profile(), job)
    held = small_profile(runtime_bytes=[300, 7000])
    assert memory.peak_bytes(held, job) == pytest.approx([bare[0] + 300, bare[1] + 7000])
    limit = [bare[0] + 7000, bare[1] + 7000]
    shares, rows = memory.caps(small_profile(device_memory=limit, runtime_bytes=[0, 7000]))
    roomy, _ = memory.caps(small_profile(device_memory=limit))
    assert shares[1] < roomy[1] and shares[0] == roomy[0]


# A profile of Conv2d(3, 8, 5) -> Conv2d(8, 16, 5) -> Linear(16 * 5 * 5, 10), float32: each kernel of
# conv0 holds 3 * 5 * 5 weights and a bias, each of conv1 8 * 5 * 5 and a bias; the Linear is replicated.
PER_KERNEL = {"conv0": 4 * (3 * 25 + 1), "conv1": 4 * (8 * 25 + 1)}  # bytes of one kernel's parameters
REPLICATED = 4 * (16 * 5 * 5 * 10 + 10)


def shaped_profile(optimizer: str, momentum: float) -> dict:
    """``small_profile`` with the parameter bytes of the CNN above, planned for ``optimizer``."""
    profile = small_profile(optimizer=optimizer, momentum=momentum, replicated_param_bytes=REPLICATED)
    for layer in profile["layers"]:
        layer["param_bytes"] = PER_KERNEL[layer["name"]] * layer["kernels"]
    profile["param_bytes"] = REPLICATED + sum(layer["param_bytes"] for layer in profile["layers"])
    return profile


def test_each_optimizer_state_tensor_adds_the_parameter_bytes_each_rank_holds():
    """AdamW keeps two state tensors per parameter (its moments), SGD with
    momentum one, plain SGD none: between any two of them each rank's peak
    differs by exactly its parameter bytes times the difference in tensors.
    A rank holds the replicated Linear whole, c_r of a kernel group's K
    kernels, all of a batch group, and under DDP the whole model."""
    groups = {"conv0": 8, "conv1": 16}
    kernel = plan.kernel_split(("cpu@0", "cpu@1"), groups, 64, counts={"conv0": (6, 2), "conv1": (4, 12)})
    mixed = plan.kernel_split(("cpu@0", "cpu@1"), groups, 64, counts={"conv0": (6, 2), "conv1": (8, 8)},
                              modes={"conv1": plan.BATCH}, rows=(40, 24))
    ddp = plan.ddp(("cpu@0", "cpu@1"), groups, 64, shares=[3, 1])
    whole = REPLICATED + 8 * PER_KERNEL["conv0"] + 16 * PER_KERNEL["conv1"]
    held = {  # per plan, the parameter bytes each rank holds, from the shapes and the kernel counts
        kernel: [REPLICATED + 6 * PER_KERNEL["conv0"] + 4 * PER_KERNEL["conv1"],
                 REPLICATED + 2 * PER_KERNEL["conv0"] + 12 * PER_KERNEL["conv1"]],
        mixed: [REPLICATED + 6 * PER_KERNEL["conv0"] + 16 * PER_KERNEL["conv1"],
                REPLICATED + 2 * PER_KERNEL["conv0"] + 16 * PER_KERNEL["conv1"]],
        ddp: [whole, whole],
    }
    for job, params in held.items():
        adamw = memory.peak_bytes(shaped_profile("adamw", 0.9), job)
        momentum = memory.peak_bytes(shaped_profile("sgd", 0.9), job)
        plain = memory.peak_bytes(shaped_profile("sgd", 0.0), job)
        assert [a - m for a, m in zip(adamw, momentum)] == pytest.approx(params), job.name
        assert [m - p for m, p in zip(momentum, plain)] == pytest.approx(params), job.name
        assert memory.peak_bytes(shaped_profile("adam", 0.0), job) == pytest.approx(adamw)


def test_a_profile_that_names_no_optimizer_is_planned_for_sgd_with_momentum():
    """Every profile written before it named its optimizer measured SGD with momentum 0.9."""
    job = plan.kernel_split(("cpu@0", "cpu@1"), {"conv0": 8, "conv1": 16}, 64)
    unnamed = shaped_profile("sgd", 0.9)
    del unnamed["optimizer"], unnamed["momentum"]
    assert memory.peak_bytes(unnamed, job) == memory.peak_bytes(shaped_profile("sgd", 0.9), job)
    with pytest.raises(ConfigError, match="optimizer 'lbfgs': expected sgd, adam or adamw"):
        memory.peak_bytes(shaped_profile("lbfgs", 0.0), job)


def test_an_optimizer_with_more_state_gets_less_of_a_tight_device():
    """Under a limit that holds the even split with plain SGD's state but not
    with AdamW's (half of AdamW's extra state bytes over it), the planner gives
    cpu@1 the even split under SGD and less under AdamW; ``caps`` shrink
    with each state tensor."""
    even_params = REPLICATED + 4 * PER_KERNEL["conv0"] + 8 * PER_KERNEL["conv1"]  # cpu@1's, even split
    job = plan.kernel_split(("cpu@0", "cpu@1"), {"conv0": 8, "conv1": 16}, 64)
    plain_peak = memory.peak_bytes(shaped_profile("sgd", 0.0), job)[1]
    limit = [1e12, plain_peak + even_params]  # room for one state tensor of its share, not two

    def kernel_counts(optimizer: str, momentum: float) -> dict:
        found = search.candidates({**shaped_profile(optimizer, momentum), "device_memory": limit})
        return next(c for c in found if c.name == "kernel").plan.kernel_counts()

    assert kernel_counts("sgd", 0.0) == {"conv0": (4, 4), "conv1": (8, 8)}
    assert kernel_counts("sgd", 0.9) == {"conv0": (4, 4), "conv1": (8, 8)}
    tight = kernel_counts("adamw", 0.9)
    assert tight["conv0"][1] + tight["conv1"][1] < 12
    shares = [memory.caps({**shaped_profile(*o), "device_memory": limit})[0][1]
              for o in (("sgd", 0.0), ("sgd", 0.9), ("adamw", 0.9))]
    assert shares[0] > shares[1] > shares[2]


def test_device_memory_limits_replace_what_was_read():
    profile = small_profile(device_memory=[2 ** 40, 2 ** 40])
    assert memory.with_limits(profile, None) is profile
    assert memory.with_limits(profile, (5e8,))["device_memory"] == [5e8, 5e8]  # one size for every device
    assert memory.with_limits(profile, (5e8, 3e8))["device_memory"] == [5e8, 3e8]
    with pytest.raises(ConfigError, match="3 sizes for 2 devices"):
        memory.with_limits(profile, (1e9, 1e9, 1e9))


def test_bad_device_memory_is_one_line_and_exit_2(capsys):
    assert helpers.main_exit_code(["plan", "--device-memory", "2 parsecs"]) == 2
    assert "bad size '2 parsecs'" in capsys.readouterr().err
    assert helpers.main_exit_code(["train", "--device-memory", "1GiB", "--strategy", "kernel"]) == 2
    assert "--device-memory limits a planned split" in capsys.readouterr().err


HELD = 512 * 2 ** 20  # R: what the test says each worker holds before a step, above what one measures
SCALE = 3.0  # sigma: a step's bytes over the model's count, above what one measures (2.5 on this job)


def test_a_worker_given_too_little_memory_trains_a_smaller_share_within_it(tmp_path):
    """A real run: cpu@1 is limited (``--device-memory``) to 80% of the way from
    what its process holds to what the even all-batch split needs. The profile's
    byte counts are the job's (measured once, from the model's shapes), its
    times and memory figures fixed here (equal devices, kernel mode far slower
    than batch mode, R = HELD, sigma = SCALE), so the plan depends on nothing
    measured: all batch, cpu@1 given the most rows the memory model's formula
    (module docstring, by hand below) lets it hold, fewer than half; and the
    peak resident memory the worker reports stays under the limit."""
    job = ["--devices", "cpu@0,cpu@1", "--threads", "1", "--dataset", "synthetic", "--synthetic-shape", "3,32,32",
           "--synthetic-size", "128", "--kernels", "1024,128", "--batch-size", "64", "--memory-format", "contiguous"]
    path = tmp_path / "profile.json"
    env = helpers.child_env(OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "convshard", "profile", *job, "--profile", str(path)], env=env, check=True,
                   stdin=subprocess.DEVNULL, capture_output=True, timeout=300)
    profile = json.loads(path.read_text())
    assert max(profile["runtime_bytes"]) < HELD and max(profile["activation_scale"]) < SCALE
    for layer in profile["layers"]:
        layer.update(a=[0.0, 0.0], b=[1.0, 1.0], batch_seconds=[1e-3 * layer["batch_rows"]] * 2)
    profile.update(rest_seconds=[1e-3, 1e-3], update_seconds_per_byte=[0.0, 0.0], runtime_bytes=[HELD, HELD],
                   activation_scale=[SCALE, SCALE],
                   links={kind: {"latency": 1e-4, "bandwidth": 1e9} for kind in profile["links"]})
    path.write_text(json.dumps(profile))
    # by hand: P the parameters (weight, gradient, SGD momentum: 3 P), per group its inputs held whole I,
    # its output O; all batch, rank r of b rows holds R + 3 P + sigma sum_g ((I + 4 O) b / 64 + O)
    inputs = [sum(v["bytes"] for v in g["inputs"]) + g["input_grad_scatter_bytes"] for g in profile["layers"]]
    outputs = [max(g["kernels"] * g["gather_bytes_per_kernel"], sum(v["bytes"] for v in g["outputs"]))
               for g in profile["layers"]]
    fixed = HELD + 3 * profile["param_bytes"] + SCALE * sum(outputs)
    per_row = SCALE * sum(i + 4 * o for i, o in zip(inputs, outputs)) / 64
    limit = HELD + 0.8 * (fixed + 32 * per_row - HELD)
    most = math.floor((limit - fixed) / per_row)
    assert 0 < most < 32
    metrics_path = tmp_path / "metrics.json"
    subprocess.run([sys.executable, "-m", "convshard", "train", *job, "--profile", str(path), "--strategy", "layers",
                    "--device-memory", f"64GiB,{limit:.0f}B", "--max-steps", "3", "--epochs", "1", "--quiet",
                    "--metrics-out", str(metrics_path)], env=env, check=True, stdin=subprocess.DEVNULL,
                   capture_output=True, timeout=300)
    metrics = json.loads(metrics_path.read_text())
    ran = plan.from_json(metrics["job_plan"], groups=search.groups_of(profile), batch_size=64)
    assert ran.devices == ("cpu@0", "cpu@1") and all(g.mode == plan.BATCH for g in ran.groups)
    assert ran.rows == (64 - most, most)
    peak = metrics["timeline"]["peak_rss_mib"][1] * 2 ** 20
    assert peak < limit, f"cpu@1 peaked at {peak / 2 ** 20:.0f} MiB, limit {limit / 2 ** 20:.0f} MiB"
