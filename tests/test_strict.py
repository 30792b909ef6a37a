"""Strict devices: every collective's tensors on the rank's device, checked on gloo as NCCL would refuse them.

With ``CONVSHARD_STRICT_DEVICES=1`` each collective convshard issues goes
through ``wire.issue``, which raises ``WrongDevice`` for a tensor off the
rank's device, or for any collective before the rank set its device. No GPU
runs here, so the CUDA cases declare the rank's device CUDA
(``set_rank_device``) and test the comparison alone: a tensor made on a
hard-coded CPU is refused before any byte moves, and the fixed call sites
ask for the rank's device (the allocation then fails for want of CUDA, or
runs on a machine with one, never ``WrongDevice``). Then every kind of plan
trains through the real loop with the check on.
"""

from __future__ import annotations

import pytest
import torch
from helpers import join_gloo

from convshard import plan
from convshard.parallel import comm, wire
from convshard.run.config import TrainConfig, load_data, model_groups
from convshard.run.launch import launch_local
from convshard.run.local import launch_job, prepare

STRICT = {"CONVSHARD_STRICT_DEVICES": "1", "OMP_NUM_THREADS": "1"}
DEVICES = ("cpu@0", "cpu@1")


def _sum_on_a_cuda_rank() -> str:
    """A CPU tensor summed by a rank whose device is declared CUDA: the sum, or what was raised."""
    join_gloo(timeout=60)
    comm.set_rank_device(torch.device("cuda"))
    try:
        return str(comm.all_reduce_sum_(torch.ones(1)).item())
    except wire.WrongDevice as exc:
        return str(exc)


def test_a_cpu_tensor_from_a_cuda_rank_is_refused_before_it_is_sent():
    """Strict mode refuses it; without strict mode gloo sums it (so the check, not gloo, refused it)."""
    for said in launch_local(_sum_on_a_cuda_rank, 2, timeout=120, env=STRICT):
        assert "a tensor on cpu sent by a rank whose device is cuda" in said
    assert launch_local(_sum_on_a_cuda_rank, 2, timeout=120, env={"OMP_NUM_THREADS": "1"}) == ["2.0", "2.0"]


def _scalar_agreements_on_a_cuda_rank() -> dict[str, str]:
    """Each place that agrees on a scalar over the ranks, run by a rank whose
    device is declared CUDA: the exception each raised ("none" if it ran)."""
    from convshard.precision import LossScaler
    from convshard.profile import timings

    join_gloo(timeout=60)
    comm.set_rank_device(torch.device("cuda"))
    calls = {
        "profile's slowest rank agrees": lambda: timings._slowest_agrees(True, None),
        "trial times": lambda: comm.reduce_scalar(1.0, op="max", group=None),
        "loss scaler": lambda: LossScaler(True).unscale([], None),
    }
    raised = {}
    for name, call in calls.items():
        try:
            call()
            raised[name] = "none"
        except Exception as exc:  # noqa: BLE001 - which one is what the test checks
            raised[name] = f"{type(exc).__name__}: {exc}"
    return raised


def test_scalar_agreements_ask_for_the_rank_device():
    """The profile's and the trials' agreements and fp16's overflow flag make
    their tensor on the rank's device: on a CUDA rank none is refused by the
    check (without a GPU here, making the tensor on CUDA fails instead)."""
    for raised in launch_local(_scalar_agreements_on_a_cuda_rank, 2, timeout=120, env=STRICT):
        for name, what in raised.items():
            assert not what.startswith("WrongDevice"), f"{name}: {what}"
            assert what == "none" or "CUDA" in what or "NVIDIA" in what, f"{name}: {what}"


def _before_the_device_is_set() -> str:
    join_gloo(timeout=60)
    try:
        comm.gather_objects("x")
        said = "nothing"
    except wire.WrongDevice as exc:
        said = str(exc)
    comm.set_rank_device(torch.device("cpu"))  # for the launcher's closing barrier
    return said


def test_a_collective_before_the_rank_set_its_device_is_refused():
    """On NCCL an object collective runs on the current CUDA device, cuda:0
    until the rank pins itself: strict mode refuses one issued before."""
    for said in launch_local(_before_the_device_is_set, 2, timeout=120, env=STRICT):
        assert "before this rank set its device" in said


# --- every plan kind through the loop, the check on --------------------------


def _config(tmp, name: str, job: plan.Plan | None, **extra) -> TrainConfig:
    return TrainConfig(devices=",".join(DEVICES), model="vgg", kernels=(4, 6, 8), dataset="synthetic",
                       synthetic_shape=(3, 16, 16), synthetic_size=24, batch_size=8, max_steps=2, quiet=True,
                       checkpoint_dir=str(tmp / name), threads=1, clip_grad_norm=1.0, job=job, **extra)


def _groups(tmp) -> dict[str, int]:
    config = _config(tmp, "g", plan.single("cpu@0", {}, 8))
    return model_groups(config, load_data(config))


KINDS = {
    "single": lambda g: plan.single("cpu@0", g, 8),
    "kernel": lambda g: plan.kernel_split(DEVICES, g, 8, shares=[3, 1]),
    "layers": lambda g: plan.kernel_split(DEVICES, g, 8, modes={next(iter(g)): "batch"}, rows=(5, 3)),
    "all-batch": lambda g: plan.kernel_split(DEVICES, g, 8, modes=dict.fromkeys(g, "batch"), rows=(3, 5)),
    "ddp": lambda g: plan.ddp(DEVICES, g, 8, shares=[1, 1]),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_plan_kind_trains_under_strict_devices(tmp_path, monkeypatch, kind):
    """Each kind trains two steps (a checkpoint, a rebalance check, gradient
    clipping's sum: every collective of a step) with every collective checked
    in the workers, which read the variable when they start."""
    for name, value in STRICT.items():
        monkeypatch.setenv(name, value)
    job = KINDS[kind](_groups(tmp_path))
    config = _config(tmp_path, kind, job, rebalance="1" if job.engine != plan.DDP else "off")
    dataset = load_data(config)
    metrics = launch_job(prepare(config, dataset), dataset)
    assert metrics["steps"] == 2 and metrics["strategy"] == job.name


def _auto_worker(config: TrainConfig) -> dict | None:
    """One rank of a job resolving auto's plan in the workers, as under torchrun, trying every candidate."""
    from convshard.plan import search
    from convshard.run.train import torchrun_worker

    search.TRIAL_MARGIN = 100.0  # every candidate is worth a trial: each one's collectives are checked
    return torchrun_worker(config)


def test_auto_resolved_by_the_workers_trains_under_strict_devices(tmp_path):
    """Without a plan (as under torchrun) the workers profile the job, try
    the candidates (one device alone included) and train the fastest, every
    collective checked."""
    config = _config(tmp_path, "auto", None, strategy="auto", profile=str(tmp_path / "profile.json"))
    results = launch_local(_auto_worker, 2, args=(config,), timeout=400, env=STRICT)
    metrics = next(m for m in results if m is not None)  # one device alone may win: its rank speaks
    tried = metrics["plan"]["trials"]
    assert metrics["steps"] == 2 and "single" in tried and len(tried) >= 3, tried
