"""A cluster file (``convshard.plan.cluster``): read into a profile, collectives priced on its topology, bad files refused."""

from __future__ import annotations

import json

import helpers
import pytest

from convshard.cli import main
from convshard import plan
from convshard.errors import ConfigError
from convshard.plan import cluster, memory, ring, search


def write_cluster(tmp_path, text):
    path = tmp_path / "cluster.toml"
    path.write_text(text)
    return path


TWO_HOSTS = """
batch_size = 128
[links]
between_hosts = { bandwidth = "1 Gbit/s", latency = "100 us" }
[[hosts]]
name = "a"
devices = [{ name = "cpu", profile = "two.json", device = "cpu@1", count = 2, memory = "4 GiB" }]
[[hosts]]
name = "b"
between = { bandwidth = "100 Mbit/s", latency = "1 ms" }
devices = [{ name = "old", profile = "two.json", device = "cpu@0", speed = 0.5 }]
"""


def test_cluster_file_builds_the_profile_the_cost_model_reads(tmp_path):
    measured = helpers.write_profile(tmp_path / "two.json", speeds=(1.0, 2.0))
    built = cluster.load(write_cluster(tmp_path, TWO_HOSTS))
    assert built["devices"] == ["a/cpu.0", "a/cpu.1", "b/old"]
    assert built["batch_size"] == 128 and built["topology"]["hosts"] == [0, 0, 1]
    first = measured["layers"][0]
    # cpu@1 measured at batch 64, planned at 128: twice the time; the old device at half speed: four times
    assert built["layers"][0]["b"] == pytest.approx([2 * first["b"][1], 2 * first["b"][1], 4 * first["b"][0]])
    assert built["layers"][0]["outputs"][0]["bytes"] == 2 * first["outputs"][0]["bytes"]
    assert built["device_memory"][:2] == [4 * 2 ** 30] * 2 and built["device_memory"][2] == cluster.UNBOUNDED
    # the ring crosses the 100 Mbit/s link: 12.5 MB/s, 2 hops of 1.1 ms between hosts
    gather = built["links"]["all_gather"]
    assert gather["bandwidth"] == pytest.approx(12.5e6 * 3 / 2)
    assert gather["latency"] == pytest.approx(2 * 1.1e-3)


def test_a_cluster_plans_for_the_optimizer_its_profiles_measured(tmp_path):
    """The cluster's profile names the optimizer its devices' profiles timed, and
    the memory model counts that one's state; planning it for another optimizer
    is refused in one line, as are profiles that measured different ones."""
    measured = helpers.write_profile(tmp_path / "two.json", speeds=(1.0, 2.0))
    path = write_cluster(tmp_path, TWO_HOSTS)
    assert memory.optimizer_of(cluster.load(path, optimizer=("sgd", 0.9))) == ("sgd", 0.9)  # named by none: sgd
    with pytest.raises(ConfigError, match=r"measured optimizer sgd \(momentum 0.9\), not adamw \(momentum 0.9\)"):
        cluster.load(path, optimizer=("adamw", 0.9))
    adamw = {**measured, "optimizer": "adamw", "key": {**measured["key"], "optimizer": "adamw", "momentum": 0.9}}
    (tmp_path / "two.json").write_text(json.dumps(adamw))
    built = cluster.load(path, optimizer=("adamw", 0.9))
    job = plan.kernel_split(built["devices"], search.groups_of(built), 128)  # 64 kernels: 22, 21, 21; 128: 43, 43, 42
    group = built["layers"][0]["param_bytes"]  # each group's, the rest's 10,000 bytes replicated
    held = [10_000 + group * (c0 / 64 + c1 / 128) for c0, c1 in ((22, 43), (21, 43), (21, 42))]
    sgd = memory.peak_bytes({**built, "optimizer": "sgd"}, job)  # one state tensor less than adamw
    assert [a - b for a, b in zip(memory.peak_bytes(built, job), sgd)] == pytest.approx(held)
    (tmp_path / "old.json").write_text(json.dumps(measured))  # sgd beside adamw
    with pytest.raises(ConfigError, match="measured another optimizer"):
        cluster.load(write_cluster(tmp_path, TWO_HOSTS.replace('profile = "two.json", device = "cpu@0"',
                                                               'profile = "old.json", device = "cpu@0"')))


def test_a_ring_without_the_slow_host_runs_at_the_fast_links(tmp_path):
    """``search.restrict`` prices a subset's collectives on its own ring: leaving host b out leaves its link out."""
    helpers.write_profile(tmp_path / "two.json", speeds=(1.0, 2.0))
    built = cluster.load(write_cluster(tmp_path, TWO_HOSTS))
    alone_on_a = search.restrict(built, [0, 1])["links"]["all_reduce"]
    within = cluster.DEFAULT_LINKS["within_host"]
    assert alone_on_a == pytest.approx({"latency": 2 * within["latency"], "bandwidth": within["bandwidth"]})
    three = ring.ring_links(built["topology"], [0, 1, 2])["all_reduce"]
    assert three["bandwidth"] == pytest.approx(12.5e6 * 3 / 4)


def test_plan_cluster_prints_every_strategy_and_the_devices_memory(tmp_path, capsys):
    helpers.write_profile(tmp_path / "two.json", speeds=(1.0, 2.0))
    assert main(["plan", "--cluster", str(write_cluster(tmp_path, TWO_HOSTS))]) == 0
    out = capsys.readouterr().out
    for name in ("single", "kernel", "layers", "ddp", "ddp sized"):
        assert f"\n  {name} " in out
    assert "over the best single device" in out and "peak memory" in out and "cluster: 3 device(s) on 2 host(s)" in out


@pytest.mark.parametrize("text, named", [
    ("[[hosts]]\ndevices = []\n", "hosts[0].devices"),
    ("hosts = 3\n", "hosts"),
    ('colour = 1\n[[hosts]]\ndevices = [{ profile = "two.json", device = "cpu@0" }]\n', "colour"),
    ('[[hosts]]\ndevices = [{ profile = "two.json" }]\n', "hosts[0].devices[0].device"),
    ('[[hosts]]\ndevices = [{ profile = "two.json", device = "cuda:7" }]\n', "'cuda:7'"),
    ('[[hosts]]\ndevices = [{ profile = "none.json", device = "cpu@0" }]\n', "hosts[0].devices[0].profile"),
    # a missing file is said to be missing, not to be a profile of another version
    ('[[hosts]]\ndevices = [{ profile = "none.json", device = "cpu@0" }]\n', "'none.json': no such file"),
    ('[[hosts]]\nbetween = { profile = "gone.json" }\ndevices = [{ profile = "two.json", device = "cpu@0" }]\n',
     "'gone.json': no such file"),
    ('[[hosts]]\ndevices = [{ profile = "two.json", device = "cpu@0", speed = -1 }]\n', "speed is -1"),
    ('[[hosts]]\ndevices = [{ profile = "two.json", device = "cpu@0", memory = "4 parsecs" }]\n', "memory"),
    ('[[hosts]]\nbetween = { bandwidth = "fast" }\ndevices = [{ profile = "two.json", device = "cpu@0" }]\n',
     "hosts[0].between.bandwidth"),
    ('[[hosts]]\ndevices = [{ profile = "two.json", device = "cpu@0" }, { profile = "other.json" }]\n',
     "another model"),
    ("[[hosts\n", "not TOML"),
])
def test_bad_cluster_files_get_one_line_naming_the_key(tmp_path, capsys, text, named):
    helpers.write_profile(tmp_path / "two.json", speeds=(1.0, 2.0))
    helpers.write_profile(tmp_path / "other.json", model="m2")
    assert main(["plan", "--cluster", str(write_cluster(tmp_path, text))]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err, err


def test_profiles_of_another_model_are_named_by_model_and_devices_not_by_hash(tmp_path, capsys):
    """Two profiles of different models: the error says what each measured (its conv
    groups, input and devices), and not the key's hashes, which a user cannot place."""
    helpers.write_profile(tmp_path / "two.json", speeds=(1.0, 2.0), model="0badbd03c0c05efd")
    other = helpers.make_profile((1.0,), kernels=(8, 16, 32, 64, 128))
    other["key"] = {"devices": ["cuda:0"], "threads": [1], "hosts": ["x"], "model": "fee1dead00000000",
                    "input_shape": [1, 28, 28], "batch_size": 64, "torch": "2"}
    other["devices"] = ["cuda:0"]
    (tmp_path / "gpu.json").write_text(json.dumps(other))
    text = '[[hosts]]\ndevices = [{ profile = "two.json", device = "cpu@0" }, { profile = "gpu.json" }]\n'
    assert main(["plan", "--cluster", str(write_cluster(tmp_path, text))]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "0badbd03c0c05efd" not in err and "fee1dead" not in err, err
    assert ("'gpu.json' measured another model (conv groups conv0 8, conv1 16, ... conv4 128 (5 groups) kernels "
            "on 1x28x28 inputs, measured on cuda:0) than the first device's two.json (conv groups conv0 64, "
            "conv1 128 kernels on 3x32x32 inputs, measured on cpu@0, cpu@1)") in err, err


def test_a_link_named_by_a_profile_reproduces_the_all_gather_it_measured(tmp_path):
    """Two hosts whose link is a profile of two hosts, and one host whose link within is a profile of one host:
    the ring of the two devices prices the all-gather as the profile measured it, and the reduce-scatter
    at the rate the profile measured for it (here 0.6 of the all-gather's)."""
    helpers.write_profile(tmp_path / "cpu.json")
    for name, hosts in (("across.json", ["x", "y"]), ("within.json", ["x", "x"])):
        measured = helpers.write_profile(tmp_path / name, speeds=(1.0, 1.0))
        measured["key"]["hosts"] = hosts
        measured["links"]["all_gather"] = {"latency": 1e-3, "bandwidth": 2e8}
        measured["links"]["reduce_scatter"] = {"latency": 1e-3, "bandwidth": 1.2e8}
        (tmp_path / name).write_text(json.dumps(measured))
    device = '{ profile = "cpu.json" }'
    across = cluster.load(write_cluster(tmp_path, f"""
[links]
between_hosts = {{ profile = "across.json" }}
[[hosts]]
devices = [{device}]
[[hosts]]
devices = [{device}]
"""))
    within = cluster.load(write_cluster(tmp_path, f"""
[[hosts]]
within = {{ profile = "within.json" }}
devices = [{device}, {device}]
"""))
    for built in (across, within):
        assert built["links"]["all_gather"] == pytest.approx({"latency": 1e-3, "bandwidth": 2e8})
        assert built["links"]["reduce_scatter"] == pytest.approx({"latency": 1e-3, "bandwidth": 1.2e8})
        assert built["links"]["all_to_all"]["bandwidth"] == pytest.approx(2e8)  # the ring's, as before
    with pytest.raises(ConfigError, match="no profile of one device on each of two hosts"):
        cluster.load(write_cluster(tmp_path, f'[[hosts]]\nbetween = {{ profile = "cpu.json" }}\ndevices = [{device}]\n'))


def test_a_cluster_plan_says_how_it_runs(tmp_path, capsys):
    """``plan --cluster --plan-out``: the plan names the torchrun recipe for its
    hosts and the command that tries its split on this machine."""
    helpers.write_profile(tmp_path / "two.json", speeds=(1.0, 2.0))
    out_file = tmp_path / "plan.json"
    assert main(["plan", "--cluster", str(write_cluster(tmp_path, TWO_HOSTS)), "--plan-out", str(out_file)]) == 0
    out = capsys.readouterr().out
    planned = json.loads(out_file.read_text())["job_plan"]["devices"]
    assert "it runs under torchrun, one node per host" in out and "docs/cluster.md, section 4" in out
    assert f"convshard train --plan {out_file} --devices " in out
    tried = out.split(f"convshard train --plan {out_file} --devices ")[1].split()[0]
    assert len(tried.split(",")) == len(planned)  # as many local devices as the plan runs on


def _cluster_plan_file(tmp_path, devices=("gpubox/gpu.0", "gpubox/gpu.1")):
    """A plan for two cluster devices, of the model ``TINY_TRAIN`` builds."""
    from convshard import plan

    job = plan.kernel_split(list(devices), {"features.0": 4, "features.3": 8}, 16, counts={
        "features.0": (3, 1), "features.3": (2, 6)})
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"job_plan": job.to_json()}))
    return path, job


TINY_TRAIN = ["--dataset", "synthetic", "--synthetic-shape", "1,16,16", "--synthetic-size", "32", "--kernels", "4,8",
              "--max-steps", "2", "--quiet"]


def test_a_cluster_plan_runs_here_on_the_devices_given_in_order(tmp_path, caplog):
    """``train --plan`` of a cluster's plan with ``--devices`` of as many local
    devices: its split runs on them in order, said in one line."""
    path, job = _cluster_plan_file(tmp_path)
    metrics = tmp_path / "m.json"
    assert main(["train", *TINY_TRAIN, "--plan", str(path), "--devices", "cpu@0,cpu@1",
                 "--metrics-out", str(metrics)]) == 0
    ran = json.loads(metrics.read_text())
    assert ran["devices"] == ["cpu@0", "cpu@1"] and ran["shares"] == {"features.0": [3, 1], "features.3": [2, 6]}
    assert "its devices gpubox/gpu.0, gpubox/gpu.1 run as cpu@0, cpu@1, in order" in caplog.text


@pytest.mark.parametrize("devices, needles", [
    (None, ("runs on a cluster's devices (gpubox/gpu.0, gpubox/gpu.1)", "torchrun", "--devices naming 2")),
    ("cpu@0", ("--devices cpu@0 lists 1 devices", "runs on 2", "list 2")),
])
def test_a_cluster_plan_without_its_devices_says_how_to_run_it(tmp_path, capsys, devices, needles):
    path, _ = _cluster_plan_file(tmp_path)
    assert main(["train", *TINY_TRAIN, "--plan", str(path), *(["--devices", devices] if devices else [])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and all(n in err[0] for n in needles), err


def test_every_device_a_plan_leaves_out_says_why(tmp_path, capsys):
    """A device with too little memory is named with the bytes a plan needs
    there; a device behind a slow link with the fastest plan it is in."""
    helpers.write_profile(tmp_path / "two.json", speeds=(1.0, 2.0))
    small = TWO_HOSTS.replace('speed = 0.5 }', 'speed = 0.5, memory = "1 KiB" }')
    assert main(["plan", "--cluster", str(write_cluster(tmp_path, small))]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("b/old: not used")]
    assert len(lines) == 1 and "overflows a device's memory" in lines[0] and "which holds 1.0 KiB" in lines[0]
    assert main(["plan", "--cluster", str(write_cluster(tmp_path, TWO_HOSTS))]) == 0
    out = capsys.readouterr().out
    chosen = out.split("chosen: ")[1].split(",")[0]
    lines = [line for line in out.splitlines() if ": not used: " in line]
    if "b/old" not in out.split("per device: ")[1].split("\n")[0]:  # the plan leaves b out
        (line,) = [line for line in lines if line.startswith("b/old")]
        assert "too slow to pay its transfers" in line and "its host b joins the others at 0.1 Gbit/s" in line
    assert chosen and all(not line.startswith("a/") for line in lines if "overflows" in line)
