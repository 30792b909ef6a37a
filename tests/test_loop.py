"""Every kind of plan, trained through the real loop, trains the model one device trains.

Each job runs ``convshard``'s own loop (``local.launch_job``: one process per
device, gloo) for 3 steps in float64 from the same seed, and saves a
checkpoint: the unsharded weights, BatchNorm statistics and optimizer
state, which are compared with those of the same job on one device.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from helpers import random_profile

from convshard import plan
from convshard.plan import search
from convshard.run.config import TrainConfig, load_data, model_groups
from convshard.run.local import launch_job, prepare

DEVICES = ("cpu@0", "cpu@1")


def _config(tmp, name: str, model: str, kernels: tuple[int, ...], optimizer: str, job: plan.Plan) -> TrainConfig:
    return TrainConfig(devices=",".join(job.devices), model=model, kernels=kernels, dataset="synthetic",
                       synthetic_shape=(3, 16, 16), synthetic_size=48, batch_size=12, max_steps=3, quiet=True,
                       optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 1e-3, dtype="float64",
                       checkpoint_dir=str(tmp / name), threads=1, job=job)


def _train(config: TrainConfig) -> dict:
    dataset = load_data(config)
    metrics = launch_job(prepare(config, dataset), dataset)
    assert metrics["steps"] == 3
    return torch.load(f"{config.checkpoint_dir}/checkpoint.pt", weights_only=True)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / (b.abs().max() + 1e-3)).item() if b.numel() else 0.0


def _assert_same_training(got: dict, ref: dict, what: str) -> None:
    """Weights and buffers (BatchNorm statistics) and every optimizer state tensor within 1e-9 of the reference."""
    assert got["model"].keys() == ref["model"].keys()
    worst = max(_relative(got["model"][k].double(), v.double()) for k, v in ref["model"].items())
    assert worst < 1e-9, f"{what}: weights off by {worst:.2e}"
    for index, state in ref["optimizer"]["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.is_floating_point():
                err = _relative(got["optimizer"]["state"][index][key].double(), value.double())
                assert err < 1e-9, f"{what}: optimizer state {index}.{key} off by {err:.2e}"


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict:
    """One device's training of each model and optimizer."""
    tmp = tmp_path_factory.mktemp("single")
    out = {}
    for model, kernels in (("vgg", (8, 12, 16)), ("paper", (6, 10))):
        groups = model_groups(_config(tmp, "x", model, kernels, "sgd", plan.single("cpu@0", {}, 12)),
                              load_data(_config(tmp, "x", model, kernels, "sgd", plan.single("cpu@0", {}, 12))))
        for optimizer in ("sgd", "adam"):
            config = _config(tmp, f"{model}-{optimizer}", model, kernels, optimizer, plan.single("cpu@0", groups, 12))
            out[model, optimizer] = (groups, _train(config))
    return out


KINDS = {
    "kernel, shares 3,1": lambda g: plan.kernel_split(DEVICES, g, 12, shares=[3, 1]),
    "layers, uneven rows and kernels": lambda g: plan.kernel_split(
        DEVICES, g, 12, modes={next(iter(g)): "batch"}, rows=(7, 5),
        counts={name: (k - 3, 3) for name, k in list(g.items())[1:]}),
    "all-batch, rows 4,8": lambda g: plan.kernel_split(DEVICES, g, 12, modes=dict.fromkeys(g, "batch"), rows=(4, 8)),
}


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_every_kind_of_sharded_plan_trains_the_one_device_model(tmp_path, references, kind, optimizer):
    groups, ref = references["vgg", optimizer]
    job = KINDS[kind](groups)
    _assert_same_training(_train(_config(tmp_path, "job", "vgg", (8, 12, 16), optimizer, job)), ref, kind)


def test_ddp_with_sized_rows_trains_the_one_device_model_without_batchnorm(tmp_path, references):
    """PyTorch's DDP on rows 9,3 of every batch: the same model as one device for a
    network without BatchNorm (with BatchNorm it normalises each rank's rows alone)."""
    groups, ref = references["paper", "sgd"]
    job = plan.ddp(DEVICES, groups, 12, shares=[3, 1])
    assert job.rows == (9, 3)
    _assert_same_training(_train(_config(tmp_path, "ddp", "paper", (6, 10), "sgd", job)), ref, "ddp 3,1")


def test_every_plan_auto_can_choose_trains_the_one_device_model(tmp_path, references):
    """The candidates of profiles drawn at random for the BatchNorm model (no
    ddp: auto leaves it out there), each trained and compared."""
    groups, ref = references["vgg", "sgd"]
    seen = set()
    for seed in range(3):
        profile = random_profile(random.Random(seed), groups=len(groups), world=2)
        for layer, (name, kernels) in zip(profile["layers"], groups.items()):
            layer["name"], layer["kernels"] = name, kernels
        for i, layer in enumerate(profile["layers"]):  # readers renamed alike
            for value in layer["outputs"]:
                value["convs"] = [list(groups)[int(r[1:])] for r in value["convs"]]
        profile["batch_size"], profile["batchnorm"] = 12, True
        for candidate in search.auto_candidates(search.candidates(profile, threads=1), profile):
            job = candidate.plan
            key = json.dumps(job.to_json(), sort_keys=True)
            if key in seen:
                continue
            seen.add(key)
            job = plan.Plan(job.engine, tuple(DEVICES[: job.world]), job.groups, job.rows, job.batch_size, 1)
            got = _train(_config(tmp_path, f"auto{len(seen)}", "vgg", (8, 12, 16), "sgd", job))
            _assert_same_training(got, ref, f"{candidate.name} {job.to_json()}")
    assert len(seen) >= 3


def test_a_saved_plan_replays_the_same_job(tmp_path, references):
    """``--plan FILE`` of a run's metrics: the same plan, the same weights."""
    from convshard.cli import main

    groups, _ = references["vgg", "sgd"]
    job = KINDS["layers, uneven rows and kernels"](groups)
    first = tmp_path / "first.json"
    (tmp_path / "plan.json").write_text(json.dumps({"job_plan": job.to_json()}))
    common = ["--model", "vgg", "--kernels", "8,12,16", "--dataset", "synthetic", "--synthetic-shape", "3,16,16",
              "--synthetic-size", "48", "--max-steps", "3", "--quiet", "--seed", "0"]
    assert main(["train", *common, "--plan", str(tmp_path / "plan.json"), "--metrics-out", str(first),
                 "--checkpoint-dir", str(tmp_path / "a")]) == 0
    again = tmp_path / "again.json"
    assert main(["train", *common, "--plan", str(first), "--metrics-out", str(again),
                 "--checkpoint-dir", str(tmp_path / "b")]) == 0
    a, b = (json.loads(p.read_text()) for p in (first, again))
    assert a["job_plan"] == b["job_plan"] == job.to_json()
    wa, wb = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True)["model"] for d in "ab")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
