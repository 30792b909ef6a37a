"""Options that change the compute, checked where they act: inside the training loop's workers.

A run's plan and metrics say what was asked; these tests look at what ran.
One launch (``jobs``, two processes) runs several short jobs through
convshard's own loop (``train.train_worker``) one after the other, and
``_jobs_worker`` records in each worker what the loop did:

- every conv's forward (``nn.Conv2d``, or its kernel-split
  ``ShardedConv2d``), from a forward hook on every module: the dtype it
  computed in and whether its input and weight were channels_last;
- every call of the fp16 loss scaler: whether the step was taken and the
  scale after it;
- every collective a training step issued (``comm.record_wire`` around
  ``train._step``): its op, the dtype that crossed the wire and its size.

The references are one device's runs in this process. Each test says
which of its checks fails if the option it covers were silently ignored.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.module import register_module_forward_hook

from convshard import plan, precision
from convshard.parallel import comm
from convshard.parallel.sharded import ShardedConv2d
from convshard.run import launch, train
from convshard.run.config import Job, TrainConfig, load_data, model_groups
from convshard.run.local import launch_job, prepare
from convshard.run.rebalance import Rebalancer
from convshard.run.train import train_worker

DEVICES = ("cpu@0", "cpu@1")
KERNELS = (8, 12, 16)
OVERFLOW_STEP = 2  # the fp16 job's step whose gradient overflows on rank 1 alone
BUSY = (1.0, 0.2)  # the busy seconds each rank reports to the rebalancer: rank 0 looks 5x slower per kernel


def _config(tmp, name: str, job: plan.Plan, **options) -> TrainConfig:
    """The small VGG (BatchNorm) on 12 synthetic 3x16x16 images, batch 12, ``job`` as planned."""
    settings = {"devices": ",".join(job.devices), "model": "vgg", "kernels": KERNELS, "dataset": "synthetic",
                "synthetic_shape": (3, 16, 16), "synthetic_size": 12, "batch_size": 12, "max_steps": 1,
                "epochs": 4, "quiet": True, "checkpoint_dir": str(tmp / name), "threads": 1, "job": job,
                "precision": job.precision, "memory_format": job.memory_format, "rebalance": "off", **options}
    return TrainConfig(**settings)


def _in(job: plan.Plan, **fields) -> plan.Plan:
    return plan.Plan(**{**job.__dict__, **fields})


def _saved(config: TrainConfig) -> dict:
    return torch.load(f"{config.checkpoint_dir}/checkpoint.pt", weights_only=True)


def _distance(a: dict, b: dict) -> float:
    """The largest absolute difference over ``b``'s floating-point tensors."""
    return max((a[k].double() - b[k].double()).abs().max().item() for k in b if b[k].is_floating_point())


def _relative(a: dict, b: dict) -> float:
    """The largest difference over ``b``'s floating-point tensors, relative to each tensor's largest value."""
    return max(((a[k].double() - b[k].double()).abs().max() / (b[k].double().abs().max() + 1e-3)).item()
               for k in b if b[k].is_floating_point())


def _job(config: TrainConfig) -> Job:
    return prepare(config, load_data(config))


def _one_device(config: TrainConfig) -> dict:
    """``config`` run on one device in this process: its checkpoint."""
    launch_job(_job(config), load_data(config))
    return _saved(config)


# --- the workers: one launch, every job, what ran recorded -----------------------------------


def _recording_convs(seen: list) -> torch.utils.hooks.RemovableHandle:
    """A forward hook on every module that appends each conv's output dtype and input and weight formats."""
    def record(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        if isinstance(module, nn.Conv2d | ShardedConv2d):
            seen.append({"conv": type(module).__name__, "dtype": str(out.dtype),
                         "input_channels_last": args[0].is_contiguous(memory_format=torch.channels_last),
                         "weight_channels_last": module.weight.is_contiguous(memory_format=torch.channels_last)})
    return register_module_forward_hook(record)


def _overflowing_on_rank_1(scaled: list, original):
    """``LossScaler.unscale`` that makes one gradient inf on rank 1 at ``OVERFLOW_STEP``
    (rank 0's stay finite) and records (step taken, scale after) of every call."""
    def unscale(self, params, group):
        params = list(params)
        if dist.get_rank() == 1 and len(scaled) + 1 == OVERFLOW_STEP:
            params[0].grad.view(-1)[0] = float("inf")
        taken = original(self, params, group)
        scaled.append((taken, self.scale))
        return taken
    return unscale


def _recording_steps(sent: list, original):
    """``train._step`` that appends (op, dtype, elements) of every collective the step issued."""
    def step(run, *batch):
        with comm.record_wire() as seen:
            out = original(run, *batch)
        sent.extend((s.op, str(s.dtype).removeprefix("torch."), s.numel) for s in seen)
        return out
    return step


def _reporting_busy(original):
    """``Rebalancer.observe`` fed ``BUSY``'s seconds for this rank instead of the clock's: the split it
    moves to is then the same on every run, whatever the load of the machine."""
    def observe(self, step, busy_seconds, job):
        return original(self, step, BUSY[dist.get_rank()], job)
    return observe


def _jobs_worker(jobs: dict[str, Job]) -> dict[str, dict]:
    """Each job through ``train_worker`` in turn, in one process group
    (kept between jobs); per job: rank 0's metrics, the convs and the scaler calls seen."""
    unscale, observe, shutdown = precision.LossScaler.unscale, Rebalancer.observe, launch.shutdown
    launch.shutdown = dist.barrier  # the group stays for the next job
    sent: list = []
    train._step = _recording_steps(sent, train._step)
    out = {}
    try:
        for name, job in jobs.items():
            convs, scaled = [], []
            sent.clear()
            if job.plan.precision == "fp16":
                precision.LossScaler.unscale = _overflowing_on_rank_1(scaled, unscale)
            if job.rebalance != "off":
                Rebalancer.observe = _reporting_busy(observe)
            handle = _recording_convs(convs)
            try:
                metrics = train_worker(job)
            finally:
                handle.remove()
                precision.LossScaler.unscale, Rebalancer.observe = unscale, observe
            out[name] = {"metrics": metrics, "convs": convs, "scaled": scaled, "wire": list(sent)}
    finally:
        launch.shutdown = shutdown
    return out


COMPUTE_PLANS = {
    "kernel": lambda g: plan.kernel_split(DEVICES, g, 12, shares=[3, 2]),
    "layers": lambda g: plan.kernel_split(DEVICES, g, 12, modes={next(iter(g)): "batch"}, rows=(7, 5)),
    "all-batch": lambda g: plan.kernel_split(DEVICES, g, 12, modes=dict.fromkeys(g, "batch"), rows=(4, 8)),
    "ddp": lambda g: plan.ddp(DEVICES, g, 12, shares=[2, 1]),
}


def _layers(groups: dict[str, int]) -> plan.Plan:
    """The per-layer plan: the first group batch-split by rows 7,5, the others kernel-split k-3,3."""
    return plan.kernel_split(DEVICES, groups, 12, modes={next(iter(groups)): "batch"}, rows=(7, 5),
                             counts={name: (k - 3, 3) for name, k in list(groups.items())[1:]})


@pytest.fixture(scope="module")
def jobs(tmp_path_factory) -> dict:
    """Every job of this module on two ranks, in one launch: its configs,
    rank 0's and rank 1's records, and the model's groups."""
    tmp = tmp_path_factory.mktemp("jobs")
    probe = _config(tmp, "probe", plan.single("cpu@0", {}, 12))
    groups = model_groups(probe, load_data(probe))
    configs = {f"bf16 {kind}": _config(tmp, f"bf16-{kind}", _in(make(groups), precision="bf16"))
               for kind, make in COMPUTE_PLANS.items()}
    for kind in ("layers", "ddp"):  # the gradient sums in bf16 too
        configs[f"bf16 {kind}, bf16 sums"] = _config(
            tmp, f"bf16-{kind}-sums", _in(COMPUTE_PLANS[kind](groups), precision="bf16", grad_precision="bf16"),
            grad_precision="bf16")
    configs["channels_last"] = _config(tmp, "channels-last", _in(_layers(groups), memory_format="channels_last"),
                                       dtype="float64", max_steps=3, synthetic_size=48)
    configs["bf16 rebalanced"] = _config(tmp, "rebalanced", _in(_layers(groups), precision="bf16"), max_steps=3,
                                         synthetic_size=48, rebalance="2")
    configs["fp16"] = _config(tmp, "fp16", _in(_layers(groups), precision="fp16"), max_steps=3,
                              synthetic_size=48, optimizer="adam", lr=1e-3)
    prepared = {name: _job(config) for name, config in configs.items()}
    ranks = launch.launch_local(_jobs_worker, 2, args=(prepared,), labels=list(DEVICES), timeout=240,
                                env={"OMP_NUM_THREADS": "1"})
    return {"configs": configs, "ranks": ranks, "groups": groups, "tmp": tmp}


# --- bf16: the convs compute in bf16 under every kind of plan --------------------------------


@pytest.mark.parametrize("kind", list(COMPUTE_PLANS))
def test_a_bf16_plan_computes_its_convs_in_bf16(jobs, kind):
    """Every conv forward on every rank, kernel-split or whole, returns bf16:
    with the plan's precision ignored each would return float32."""
    for rank, got in enumerate(jobs["ranks"]):
        convs = got[f"bf16 {kind}"]["convs"]
        assert convs, f"rank {rank} ran no conv"
        assert {c["dtype"] for c in convs} == {"torch.bfloat16"}, f"{kind}, rank {rank}: {convs}"
        if kind == "kernel":
            assert {c["conv"] for c in convs} == {"ShardedConv2d"}, rank  # the split convs themselves



# --- bf16 on the wire: what the training steps sent -------------------------------------------


ACTIVATIONS = ("all_gather", "reduce_scatter", "all_to_all")  # the ops that carry activations and their gradients


@pytest.mark.parametrize("kind", ["kernel", "layers", "all-batch"])
def test_a_bf16_split_sends_its_activations_in_bf16(jobs, kind):
    """A sharded plan in bf16 sends its activations and their gradients in
    bf16 (2 bytes each): every reduce-scatter and all-to-all a step issued,
    and bf16 all-gathers; the float64 run of the same kind of plan sends none
    in bf16. With the precision ignored the bf16 run would send float32."""
    for rank, got in enumerate(jobs["ranks"]):
        wire = got[f"bf16 {kind}"]["wire"]
        moved = [(op, dtype) for op, dtype, n in wire if op in ACTIVATIONS and n]
        assert ("all_gather", "bfloat16") in moved or ("all_to_all", "bfloat16") in moved, (rank, wire)
        assert all(dtype == "bfloat16" for op, dtype in moved if op != "all_gather"), (rank, wire)
        assert not any(dtype == "bfloat16" for _, dtype, _ in got["channels_last"]["wire"]), rank


@pytest.mark.parametrize("kind", ["layers", "ddp"])
def test_gradient_sums_travel_in_the_plans_gradient_precision(jobs, kind):
    """The weights' gradient sum of a batch-mode group (the layers plan) and
    DDP's bucket all-reduce (its largest all-reduce) travel in float32 with
    --grad-precision 32 and in bf16 with bf16, whatever the compute."""
    for rank, got in enumerate(jobs["ranks"]):
        for name, dtype in ((f"bf16 {kind}", "float32"), (f"bf16 {kind}, bf16 sums", "bfloat16")):
            sums = [(n, d) for op, d, n in got[name]["wire"] if op == "all_reduce"]
            assert sums, (rank, name)
            assert max(sums)[1] == dtype, (rank, name, sums)


# --- channels_last: the convs run in it, and train the contiguous model exactly ----------------


def test_channels_last_reaches_every_conv_and_trains_the_contiguous_model(jobs):
    """The per-layer plan (a batch-split group, kernel-split groups) in float64
    and channels_last: every conv's input and weight on both ranks are
    channels_last (with the format ignored they would be contiguous, as in the
    contiguous bf16 job, which the recorder tells apart), and after 3 steps
    the weights, BatchNorm statistics and momentum equal one device's
    contiguous run within 1e-9."""
    config = jobs["configs"]["channels_last"]
    for rank, got in enumerate(jobs["ranks"]):
        convs = got["channels_last"]["convs"]
        assert {c["conv"] for c in convs} == {"Conv2d", "ShardedConv2d"}, rank  # both kinds of conv ran
        assert all(c["input_channels_last"] and c["weight_channels_last"] for c in convs), f"rank {rank}: {convs}"
        assert not any(c["input_channels_last"] for c in got["bf16 layers"]["convs"]), rank
    single = plan.single("cpu@0", jobs["groups"], 12)
    ref = _one_device(replace(config, devices="cpu@0", job=single, memory_format="contiguous",
                              checkpoint_dir=str(jobs["tmp"] / "contiguous")))
    got = _saved(config)
    assert _relative(got["model"], ref["model"]) < 1e-9
    for index, state in ref["optimizer"]["state"].items():
        assert _relative(got["optimizer"]["state"][index], state) < 1e-9, index


# --- rebalancing in bf16 --------------------------------------------------------------------


def test_a_rebalance_in_bf16_moves_kernels_and_rows_and_trains_the_same_model(jobs):
    """The per-layer plan in bf16 with ``--rebalance 2`` over 3 steps, rank 0
    reporting itself 5x slower per unit of work: at step 2 kernels and rows
    move to rank 1 (the event in the metrics, and the model split as it
    says: with the rebalance ignored, neither), and the weights stay within
    the error bf16 itself makes of one device's bf16 run (one device's bf16
    against its float32): a rebalance that lost or misplaced a slice, its
    momentum or its BatchNorm statistics would move them much farther."""
    config = jobs["configs"]["bf16 rebalanced"]
    metrics = jobs["ranks"][0]["bf16 rebalanced"]["metrics"]
    events = metrics["rebalances"]
    assert [e["step"] for e in events] == [2], events
    (first,) = events
    moved = [name for name, counts in first["new"].items() if counts[1] > first["old"][name][1]]
    assert moved and all(counts[1] >= first["old"][name][1] for name, counts in first["new"].items()), first
    assert first["new_rows"][1] > first["old_rows"][1], first
    assert metrics["shares"] == first["new"]  # step 3 trained, and the checkpoint was gathered, on the new split
    assert metrics["rebalanced_plan"]["rows"] == first["new_rows"]
    single = plan.single("cpu@0", jobs["groups"], 12)
    alone = {name: replace(config, devices="cpu@0", job=_in(single, precision=name), precision=name, rebalance="off",
                           checkpoint_dir=str(jobs["tmp"] / f"alone-{name}")) for name in ("32", "bf16")}
    fp32, bf16 = (_one_device(c)["model"] for c in alone.values())
    bound = _distance(bf16, fp32)
    assert bound > 0  # bf16 did round
    got = _saved(config)["model"]
    assert _distance(got, bf16) <= bound, f"{_distance(got, bf16):.2e} > bf16's own {bound:.2e}"


# --- fp16 loss scaling: an overflow on one rank --------------------------------------------------


def test_an_fp16_overflow_on_one_rank_skips_the_step_on_every_rank(jobs):
    """fp16 on the per-layer plan (CPU autocast computes fp16 too), 3 steps of
    Adam, one gradient made inf on rank 1 alone at step 2: both ranks skip
    that step and halve the scale alike (with the flag not agreed over the
    ranks, rank 0 would take it), the checkpoint keeps the scale, and Adam
    counts only the steps taken."""
    config = jobs["configs"]["fp16"]
    for rank, got in enumerate(jobs["ranks"]):
        assert {c["dtype"] for c in got["fp16"]["convs"]} == {"torch.float16"}, rank  # it computed in fp16
    rank0, rank1 = (got["fp16"]["scaled"] for got in jobs["ranks"])
    assert rank0 == rank1  # (taken, scale after) of every step, the same on both ranks
    assert len(rank0) == 3
    before = rank0[OVERFLOW_STEP - 2][1] if OVERFLOW_STEP > 1 else 2.0**16
    taken, scale = rank0[OVERFLOW_STEP - 1]
    assert not taken and scale == before / 2, rank0
    saved = _saved(config)
    assert saved["loss_scale"]["scale"] == rank0[-1][1]
    steps = {int(state["step"]) for state in saved["optimizer"]["state"].values()}
    assert steps == {sum(t for t, _ in rank0)} and steps != {3}, steps
