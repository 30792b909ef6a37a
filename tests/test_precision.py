"""Mixed precision: bf16 and fp16 on the wire, sharded convs under autocast, loss scaling, training in bf16.

Float32 keeps every exactness test of the suite. In bf16 a sharded job
cannot match one device bit for bit (each rank rounds its own partial sums
to 8 mantissa bits), so it is held to bounds derived from bf16 itself:

- a sharded conv's output channel is the unsharded conv's within one bf16
  rounding of that channel's largest value (2^-8 of it);
- after a few training steps, the sharded bf16 weights are no farther from
  one device's bf16 weights than those are from one device's float32
  weights: sharding adds no more error than bf16 itself makes;
- over 200 steps the running mean of the training loss stays within 2% of
  one device's in bf16.
"""

from __future__ import annotations

import csv
import math
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import join_gloo

from convshard import plan, precision
from convshard.errors import ConfigError
from convshard.parallel import comm
from convshard.parallel.batch import GradientSum
from convshard.run.config import TrainConfig, load_data, model_groups
from convshard.run.launch import launch_local
from convshard.run.local import launch_job, prepare

HALF = (torch.bfloat16, torch.float16)


def _ulp(dtype: torch.dtype) -> float:
    """The relative spacing of ``dtype`` near 1 (2^-7 for bf16, 2^-10 for fp16)."""
    return torch.finfo(dtype).eps


# --- collectives on bf16 and fp16 -------------------------------------------


def _collectives_worker() -> dict:
    """Every comm helper on bf16 and fp16 tensors, against the float32 result
    rounded once to the dtype: worst error in units of the dtype's spacing."""
    rank, world = join_gloo(timeout=60)
    group = dist.group.WORLD
    counts = tuple(range(1, world + 1))  # uneven: rank r holds r + 1 rows
    errors = {}
    for dtype in HALF:
        torch.manual_seed(0)
        full = [torch.randn(sum(counts), 5) for _ in range(world)]  # rank s's tensor, the same everywhere
        mine = full[rank].to(dtype)
        start = sum(counts[:rank])

        def err(got: torch.Tensor, want: torch.Tensor) -> float:
            assert got.dtype == dtype
            return ((got.float() - want.to(dtype).float()).abs().max() / (want.abs().max().clamp(min=1) * _ulp(dtype))).item()

        gathered = comm.all_gather_uneven(mine.narrow(0, start, counts[rank]), counts, dim=0, group=group)
        pieces = [full[s].narrow(0, sum(counts[:s]), c) for s, c in enumerate(counts)]
        errors[f"{dtype} all_gather"] = err(gathered, torch.cat(pieces))
        total = torch.stack(full).sum(0)
        errors[f"{dtype} reduce_scatter"] = err(comm.reduce_scatter_uneven(mine, counts, dim=0, group=group),
                                                total.narrow(0, start, counts[rank]))
        errors[f"{dtype} all_reduce"] = err(comm.all_reduce_sum_(mine.clone(), group=group), total)
        sizes = [[2 * (s + t + 1) for t in range(world)] for s in range(world)]
        send = torch.cat([torch.full((sizes[rank][t],), float(rank + t), dtype=dtype) for t in range(world)])
        received = comm.all_to_all_uneven(send, sizes, group=group)
        errors[f"{dtype} all_to_all"] = max(err(piece, torch.full((sizes[s][rank],), float(s + rank)))
                                            for s, piece in enumerate(received))
        shared = mine.clone()
        comm.broadcast_([shared], group=group)
        errors[f"{dtype} broadcast"] = err(shared, full[0])
    return errors


@pytest.mark.parametrize("world,shm", [(2, "0"), (3, "1")], ids=["gloo", "shared-memory"])
def test_collectives_carry_bf16_and_fp16(world, shm):
    """Moves are exact; a sum over the ranks rounds as one rounding of the float32 sum would, within
    one spacing per rank (gloo sums in the dtype, shared memory in float32)."""
    env = {"OMP_NUM_THREADS": "1", "CONVSHARD_SHM": shm}
    for rank, errors in enumerate(launch_local(_collectives_worker, world, timeout=120, env=env)):
        for name, error in errors.items():
            bound = world if any(k in name for k in ("reduce_scatter", "all_reduce")) else 0.0
            assert error <= bound, f"rank {rank}: {name} off by {error:.2f} spacings"


def _gradient_sum_worker() -> dict:
    """Batch mode's gradient sum (``GradientSum``) with ``dtype`` bf16, fed by a real
    backward: what travels, and the sum it writes back against the exact one."""
    rank, world = join_gloo(timeout=60)
    torch.manual_seed(0)
    grads = [[torch.randn(70, 3), torch.randn(40)] for _ in range(world)]  # rank s's gradients, known to all
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads[rank]]
    summed = GradientSum(params, dist.group.WORLD, bucket_bytes=64, dtype=torch.bfloat16)  # one bucket each
    sent = []
    start = comm.start_all_reduce_sum

    def recording(tensor, *, group=None):
        sent.append(str(tensor.dtype))
        return start(tensor, group=group)

    comm.start_all_reduce_sum = recording
    sum((p * g).sum() for p, g in zip(params, grads[rank])).backward()  # each hook starts its bucket
    summed.wait()
    exact = [torch.stack([grads[s][i].double() for s in range(world)]).sum(0) for i in range(len(params))]
    error = max(((p.grad.double() - e).abs().max() / (e.abs().max() * _ulp(torch.bfloat16))).item()
                for p, e in zip(params, exact))
    return {"sent": sent, "dtypes": [str(p.grad.dtype) for p in params], "error": error}


@pytest.mark.parametrize("world,shm", [(2, "0"), (3, "1")], ids=["gloo", "shared-memory"])
def test_batch_mode_gradient_sums_travel_in_bf16_and_come_back_float32(world, shm):
    """Each rank rounds its gradient to bf16 (half a spacing) and the sum rounds
    once per rank at most: within ``world`` spacings of the exact sum, and not
    exact (it did round)."""
    env = {"OMP_NUM_THREADS": "1", "CONVSHARD_SHM": shm}
    for rank, got in enumerate(launch_local(_gradient_sum_worker, world, timeout=120, env=env)):
        assert got["sent"] == ["torch.bfloat16"] * 2, rank  # both buckets, half the bytes
        assert got["dtypes"] == ["torch.float32"] * 2, rank  # the optimizer sees float32
        assert 0 < got["error"] <= world, f"rank {rank}: {got['error']:.2f} spacings"


# --- a sharded conv under autocast --------------------------------------------


def _conv_worker(memory_format: str) -> dict:
    """A conv's kernels split (3, 2) under bf16 autocast, forward and backward,
    against the unsharded conv under the same autocast."""
    rank, _ = join_gloo(timeout=60)
    torch.manual_seed(0)
    fmt = precision.memory_format(memory_format)
    conv = torch.nn.Conv2d(4, 5, 3, padding=1).to(memory_format=fmt)
    x = torch.randn(6, 4, 8, 8).contiguous(memory_format=fmt)
    counts = (3, 2)
    start = sum(counts[:rank])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = conv(x)
        xs = x.clone().requires_grad_()
        mine = comm.conv2d_on_shards(xs, conv.weight[start : start + counts[rank]],
                                     conv.bias[start : start + counts[rank]], stride=(1, 1), padding=(1, 1),
                                     dilation=(1, 1), group=dist.group.WORLD)
        gathered = comm.gather_from_shards(mine, counts, group=dist.group.WORLD)
    gathered.float().square().sum().backward()
    per_channel = [((gathered[:, c].float() - want[:, c].float()).abs().max()
                    / (want[:, c].float().abs().max() * 2.0**-8)).item() for c in range(5)]
    return {"dtype": str(gathered.dtype), "channels_last": gathered.is_contiguous(memory_format=torch.channels_last),
            "per_channel": per_channel, "grad_dtype": str(xs.grad.dtype), "finite": bool(xs.grad.isfinite().all())}


@pytest.mark.parametrize("memory_format", precision.MEMORY_FORMATS)
def test_sharded_conv_in_bf16_matches_the_unsharded_conv_per_channel(memory_format):
    for rank, got in enumerate(launch_local(_conv_worker, 2, args=(memory_format,), timeout=120,
                                            env={"OMP_NUM_THREADS": "1"})):
        assert got["dtype"] == "torch.bfloat16", rank  # half the bytes on the wire
        assert got["channels_last"] == (memory_format == "channels_last"), rank  # the format is kept
        assert max(got["per_channel"]) <= 1.0, f"rank {rank}: {got['per_channel']}"
        assert got["grad_dtype"] == "torch.float32" and got["finite"], rank  # the input's own dtype


# --- loss scaling -----------------------------------------------------------


def test_loss_scaler_skips_overflowed_steps_and_grows_after_good_ones():
    scaler = precision.LossScaler(True, init_scale=8.0, growth_interval=2)
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([8.0, 16.0, -4.0])
    assert scaler.unscale([p], None)
    assert p.grad.tolist() == [1.0, 2.0, -0.5] and scaler.scale == 8.0
    p.grad = torch.tensor([8.0, math.inf, 0.0])
    assert not scaler.unscale([p], None)  # overflow: the step is skipped, the scale halves
    assert scaler.scale == 4.0
    for _ in range(2):
        p.grad = torch.ones(3)
        assert scaler.unscale([p], None)
    assert scaler.scale == 8.0  # two good steps in a row: doubled
    assert scaler.state_dict() == {"scale": 8.0, "good_steps": 2}
    off = precision.LossScaler(False)
    p.grad = torch.tensor([math.nan, 1.0, 1.0])
    assert off.unscale([p], None) and off.scale == 1.0  # bf16 and 32 take every step as it is


def _overflow_worker() -> bool:
    """Only rank 1's gradient overflows: both ranks must skip."""
    rank, _ = join_gloo(timeout=60)
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([1.0, math.inf if rank == 1 else 1.0])
    return precision.LossScaler(True).unscale([p], dist.group.WORLD)


def test_every_rank_skips_a_step_that_overflowed_on_one():
    assert launch_local(_overflow_worker, 2, timeout=60, env={"OMP_NUM_THREADS": "1"}) == [False, False]


def test_fp16_needs_cuda_devices_and_precisions_are_named():
    precision.check("fp16", ["cuda", "cuda"])
    precision.check("bf16", ["cpu", "cuda"])
    with pytest.raises(ConfigError, match="fp16 needs every device to be CUDA"):
        precision.check("fp16", ["cuda", "cpu"])
    with pytest.raises(ConfigError, match="'fp8'"):
        precision.compute_dtype("fp8")
    assert precision.activation_bytes("bf16") == 2 and precision.activation_bytes("32") == 4


def test_a_plan_carries_its_precision_and_memory_format():
    groups = {"features.0": 4}
    job = plan.kernel_split(("cpu@0", "cpu@1"), groups, 8)
    half = plan.Plan(**{**job.__dict__, "precision": "bf16", "memory_format": "channels_last"})
    assert plan.from_json(half.to_json(), groups=groups, batch_size=8) == half
    assert "precision bf16, channels_last" in plan.describe(half)
    wire = plan.Plan(**{**job.__dict__, "grad_precision": "bf16"})
    assert plan.from_json(wire.to_json(), groups=groups, batch_size=8) == wire
    assert "gradient sums in bf16" in plan.describe(wire)
    assert plan.from_json({k: v for k, v in job.to_json().items()
                           if k not in ("precision", "memory_format", "grad_precision")},
                          groups=groups, batch_size=8) == job  # a plan written before precision: float32
    with pytest.raises(ConfigError, match="precision"):
        plan.Plan(**{**job.__dict__, "precision": "16"})
    with pytest.raises(ConfigError, match="gradient precision"):
        plan.Plan(**{**job.__dict__, "grad_precision": "fp16"})


# --- training in bf16 through the loop ----------------------------------------

DEVICES = ("cpu@0", "cpu@1")


def _config(tmp, name: str, model: str, kernels, job: plan.Plan, *, steps: int, size: int = 48) -> TrainConfig:
    return TrainConfig(devices=",".join(job.devices), model=model, kernels=kernels, dataset="synthetic",
                       synthetic_shape=(3, 16, 16), synthetic_size=size, batch_size=12, max_steps=steps, quiet=True,
                       epochs=steps * 12 // size + 1, lr=0.05, checkpoint_dir=str(tmp / name), threads=1, job=job,
                       precision=job.precision, memory_format=job.memory_format, rebalance="off")


def _weights(config: TrainConfig) -> tuple[dict, dict]:
    dataset = load_data(config)
    metrics = launch_job(prepare(config, dataset), dataset)
    return torch.load(f"{config.checkpoint_dir}/checkpoint.pt", weights_only=True)["model"], metrics


def _distance(a: dict, b: dict) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in b if b[k].is_floating_point())


def _in(job: plan.Plan, precision_: str, memory_format: str = "contiguous") -> plan.Plan:
    return plan.Plan(**{**job.__dict__, "precision": precision_, "memory_format": memory_format})


PLANS = {
    "kernel": lambda g: plan.kernel_split(DEVICES, g, 12, shares=[3, 2]),
    "layers": lambda g: plan.kernel_split(DEVICES, g, 12, modes={next(iter(g)): "batch"}, rows=(7, 5)),
}


BIG_PLANS = {  # at batch 24
    "kernel": lambda g: plan.kernel_split(DEVICES, g, 24, shares=[3, 2]),
    "layers": lambda g: plan.kernel_split(DEVICES, g, 24, modes={next(iter(g)): "batch"}, rows=(13, 11)),
}


@pytest.mark.parametrize("model,kernels", [("vgg", (8, 12, 16)), ("paper", (6, 10))], ids=["vgg-sharded", "paper-ddp"])
def test_sharded_bf16_weights_stay_within_the_error_bf16_itself_makes(tmp_path, model, kernels):
    """VGG (BatchNorm) under every kind of sharded plan; the paper's CNN (no BatchNorm) under ddp."""
    probe = _config(tmp_path, "probe", model, kernels, plan.single("cpu@0", {}, 12), steps=3)
    groups = model_groups(probe, load_data(probe))
    single = plan.single("cpu@0", groups, 12)
    fp32, _ = _weights(_config(tmp_path, "fp32", model, kernels, single, steps=3))
    bf16, _ = _weights(_config(tmp_path, "bf16", model, kernels, _in(single, "bf16"), steps=3))
    bound = _distance(bf16, fp32)
    assert bound > 0  # bf16 did round
    if model == "vgg":  # kernel mode, and a per-layer plan with a batch-mode group (global-batch BatchNorm)
        jobs = {name: _in(make(groups), "bf16") for name, make in PLANS.items()}
        jobs["kernel, channels_last"] = _in(PLANS["kernel"](groups), "bf16", "channels_last")
        jobs["layers, bf16 gradient sums"] = replace(jobs["layers"], grad_precision="bf16")
    else:  # no BatchNorm: ddp trains the same model
        jobs = {"ddp": _in(plan.ddp(DEVICES, groups, 12, shares=[2, 1]), "bf16")}
        jobs["ddp, bf16 gradient sums"] = replace(jobs["ddp"], grad_precision="bf16")  # bf16_compress_hook
    for name, job in jobs.items():
        folder = name.replace(", ", "-").replace(" ", "-")
        got, metrics = _weights(_config(tmp_path, folder, model, kernels, job, steps=3))
        assert metrics["job_plan"]["precision"] == "bf16"
        assert metrics["job_plan"]["grad_precision"] == job.grad_precision
        assert _distance(got, bf16) <= bound, f"{name}: {_distance(got, bf16):.2e} > bf16's own {bound:.2e}"
        assert all(v.dtype == torch.float32 for v in got.values() if v.is_floating_point())  # float32 masters


def test_bf16_loss_curve_over_200_steps_follows_one_device(tmp_path):
    """The paper's CNN on MNIST, 200 steps: the running mean of the training
    loss (the epoch's loss as the trainer reports it), read every 20 steps,
    of a sharded bf16 job within 2% of one device's in bf16. (A single
    batch's loss swings by 20% from one step to the next, and a bf16 job's
    trajectory, like a float32 one's, moves off one device's by rounding.)"""
    curves = {}
    for name in ("single", "kernel", "layers"):
        config = replace(_config(tmp_path, name, "paper", (6, 10), plan.single("cpu@0", {}, 24), steps=200),
                         dataset="mnist", batch_size=24, lr=0.02, epochs=2, log_dir=str(tmp_path / name / "log"))
        groups = model_groups(config, load_data(config))
        job = plan.single("cpu@0", groups, 24) if name == "single" else BIG_PLANS[name](groups)
        _weights(replace(config, devices=",".join(job.devices), job=_in(job, "bf16"), precision="bf16"))
        with open(tmp_path / name / "log" / "steps.csv") as f:
            losses = [float(row["loss"]) for row in csv.DictReader(f)]
        assert len(losses) == 200
        curves[name] = [sum(losses[:t]) / t for t in range(20, 201, 20)]
    assert curves["single"][-1] < 0.5 * curves["single"][0]  # it learns
    for name in ("kernel", "layers"):
        worst = max(abs(a - b) / b for a, b in zip(curves[name], curves["single"]))
        assert worst <= 0.02, f"{name}: running mean loss {curves[name]} against {curves['single']}"


def test_float32_compute_is_unchanged_by_autocast_code():
    """At precision 32 the forward runs with no autocast and the conv's output is float32."""
    x = torch.randn(2, 3, 5, 5)
    conv = torch.nn.Conv2d(3, 4, 3)
    with precision.autocast(x.device, "32"):
        y = conv(x)
        assert precision.for_compute(x)[0] is x
    assert y.dtype == torch.float32
    assert torch.equal(y, F.conv2d(x, conv.weight, conv.bias))


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@CUDA
def test_fp16_on_cuda_scales_the_loss_and_follows_bf16(tmp_path):
    """One GPU in fp16 (loss scaling on) and in bf16 trains within the error
    bf16 itself makes of float32; the loss scale is kept in the checkpoint."""
    probe = _config(tmp_path, "probe", "paper", (6, 10), plan.single("cuda:0", {}, 12), steps=3)
    groups = model_groups(probe, load_data(probe))
    single = plan.single("cuda:0", groups, 12)
    fp32, _ = _weights(_config(tmp_path, "fp32", "paper", (6, 10), single, steps=3))
    bf16, _ = _weights(_config(tmp_path, "bf16", "paper", (6, 10), _in(single, "bf16"), steps=3))
    fp16, metrics = _weights(_config(tmp_path, "fp16", "paper", (6, 10), _in(single, "fp16"), steps=3))
    assert metrics["job_plan"]["precision"] == "fp16"
    assert _distance(fp16, fp32) <= _distance(bf16, fp32)  # fp16 has 3 more mantissa bits than bf16
    saved = torch.load(tmp_path / "fp16" / "checkpoint.pt", weights_only=True)
    assert saved["loss_scale"]["scale"] == 2.0**16  # no overflow in 3 steps: the scale stands


@CUDA
def test_a_cpu_and_a_gpu_share_bf16_in_one_job(tmp_path):
    probe = _config(tmp_path, "probe", "vgg", (8, 12, 16), plan.single("cpu@0", {}, 12), steps=3)
    groups = model_groups(probe, load_data(probe))
    single = plan.single("cpu@0", groups, 12)
    fp32, _ = _weights(_config(tmp_path, "fp32", "vgg", (8, 12, 16), single, steps=3))
    bf16, _ = _weights(_config(tmp_path, "bf16", "vgg", (8, 12, 16), _in(single, "bf16"), steps=3))
    mixed = _in(plan.kernel_split(("cpu@0", "cuda:0"), groups, 12, modes={next(iter(groups)): "batch"}), "bf16")
    got, _ = _weights(_config(tmp_path, "mixed", "vgg", (8, 12, 16), mixed, steps=3))
    assert _distance(got, bf16) <= 2 * _distance(bf16, fp32)  # two kinds of hardware, each rounding its own way


def test_plan_says_when_a_device_has_no_fast_bf16(monkeypatch, capsys):
    from helpers import main_exit_code

    monkeypatch.setattr(precision, "fast_bf16", lambda device: False)
    argv = ["plan", "--devices", "cpu", "--precision", "bf16", "--dataset", "synthetic", "--synthetic-shape",
            "3,16,16", "--synthetic-size", "16", "--kernels", "4,4", "--batch-size", "4"]
    assert main_exit_code(argv) == 0
    assert "cpu: no fast bf16" in capsys.readouterr().out


def test_a_checkpoint_resumes_across_precisions(tmp_path):
    """Two float32 steps, then two more in bf16 from the checkpoint: the
    checkpoint holds float32 weights either way, and the resumed job records bf16."""
    first = _config(tmp_path, "run", "paper", (6, 10), plan.single("cpu@0", {}, 12), steps=2)
    groups = model_groups(first, load_data(first))
    _weights(replace(first, job=plan.single("cpu@0", groups, 12)))
    resumed = replace(first, job=_in(plan.single("cpu@0", groups, 12), "bf16"), precision="bf16", max_steps=4,
                      resume=True)
    weights, metrics = _weights(resumed)
    assert metrics["steps"] == 4 and metrics["job_plan"]["precision"] == "bf16"
    assert all(v.dtype == torch.float32 for v in weights.values() if v.is_floating_point())
