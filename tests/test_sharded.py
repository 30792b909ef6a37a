"""Exactness of kernel sharding against an unsharded reference from the same seed.

Every distributed check runs in real processes on gloo (``launch_local``),
one per rank, with world sizes passed explicitly: it never depends on a GPU
count. Each worker builds the reference and the sharded model from one seed,
feeds both the same batches and returns its measured errors; the assertions
run here, in the test process.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from helpers import join_gloo, worst_state_error
from torch import nn

import convshard
from convshard.models import build_model
from convshard.parallel import comm
from convshard.parallel.sharded import ShardedConv2d, ShardSplit, sharded_parameters, sharded_state
from convshard.plan.splits import split_counts
from convshard.run.launch import WorkerFailed, launch_local

# Uneven shares per world size; world 4 also puts a rank at 10%.
SHARES = {1: [1.0], 2: [0.7, 0.3], 3: [0.5, 0.3, 0.2], 4: [0.4, 0.3, 0.2, 0.1]}
MODELS = {"paper": ((3, 32, 32), (10, 14)), "vgg": ((3, 16, 16), (8, 12, 10))}
STEPS = 3
GRAD_RTOL = 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the relative error of a against reference b."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _exactness_worker(shares: list[float]) -> dict:
    """Train reference and sharded copies side by side; report the worst errors."""
    rank, world = join_gloo()
    report: dict = {}
    for model_name, (shape, kernels) in MODELS.items():
        for opt_name in ("sgd", "adam"):
            torch.manual_seed(0)
            reference = build_model(model_name, shape, 10, kernels)
            model = convshard.shard_model(copy.deepcopy(reference), shares)
            make = (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)) if opt_name == "sgd" else (
                lambda p: torch.optim.Adam(p, lr=1e-3))
            opt_ref, opt = make(reference.parameters()), make(model.parameters())
            splits = sharded_parameters(model)
            errors = {"forward": 0.0, "grad": 0.0, "weights": 0.0}
            gen = torch.Generator().manual_seed(1)
            for _ in range(STEPS):
                x, y = torch.randn(6, *shape, generator=gen), torch.randint(0, 10, (6,), generator=gen)
                outs = []
                for net, o in ((reference, opt_ref), (model, opt)):
                    o.zero_grad()
                    outs.append(net(x))
                    nn.functional.cross_entropy(outs[-1], y).backward()
                convshard.sync_replicas(model)
                errors["forward"] = max(errors["forward"], _rel(outs[1].detach(), outs[0].detach()))
                ref_grads = dict(reference.named_parameters())
                for name, p in model.named_parameters():
                    g = splits[name].gather(p.grad) if name in splits else p.grad
                    errors["grad"] = max(errors["grad"], _rel(g, ref_grads[name].grad))
                opt_ref.step()
                opt.step()
            errors["weights"] = worst_state_error(convshard.full_state_dict(model), reference.state_dict(),
                                                  lambda a, b: (a - b).abs().max().item())
            report[f"{model_name}/{opt_name}"] = errors
            report[f"{model_name}/{opt_name}/replicas"] = _replicas_identical(model, sharded_state(model), world)
            report[f"{model_name}/counts"] = {n: list(c) for n, c in convshard.parallel.sharded.layer_counts(model).items()}
    return report


def _replicas_identical(model: nn.Module, splits: dict, world: int) -> bool:
    """Whether every replicated tensor is bitwise the same on all ranks."""
    mine = torch.cat([v.reshape(-1).float() for k, v in model.state_dict().items() if k not in splits])
    everyone = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine) if world > 1 else everyone.__setitem__(0, mine)
    return all(torch.equal(mine, other) for other in everyone)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_sharded_training_matches_one_device(world):
    """Forward, every gradient, and weights after SGD/Adam steps equal the unsharded model's."""
    reports = launch_local(_exactness_worker, world, args=(SHARES[world],), timeout=240)
    for rank, report in enumerate(reports):
        for key, errors in report.items():
            if key.endswith("/replicas"):
                assert errors, f"rank {rank}: replicated parameters differ across ranks ({key})"
            elif key.endswith("/counts"):
                for layer, counts in errors.items():
                    assert len(counts) == world and sum(counts) > 0, (layer, counts)
            else:
                assert errors["forward"] < 1e-5, (rank, key, errors)
                assert errors["grad"] < GRAD_RTOL, (rank, key, errors)
                assert errors["weights"] < 1e-5, (rank, key, errors)
    # Uneven shares give uneven kernel counts: 10 kernels at 0.4/0.3/0.2/0.1.
    if world == 4:
        assert reports[0]["paper/counts"]["features.0"] == [4, 3, 2, 1]


def _gradcheck_worker() -> bool:
    """float64 gradcheck of ShardedConv2d with respect to its input, uneven split."""
    rank, world = join_gloo()
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1, dilation=1).double()
    layer = ShardedConv2d(conv, ShardSplit(split_counts(5, [0.6, 0.4][:world] if world == 2 else [1.0]), rank))
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    # Every rank perturbs the same input element at the same time, so the
    # collectives line up; weights differ per rank and are checked at world 1.
    return torch.autograd.gradcheck(lambda inp: layer(inp), (x,), eps=1e-6, atol=1e-7)


def test_gradcheck_world_1_input_and_weights():
    torch.manual_seed(0)
    for conv in (nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 2, (2, 3), padding="same"),
                 nn.Conv2d(2, 3, (3, 2), stride=(2, 1), dilation=2, bias=False, padding=2, padding_mode="circular")):
        layer = ShardedConv2d(conv.double(), ShardSplit((conv.out_channels,), 0))
        x = torch.randn(2, conv.in_channels, 7, 7, dtype=torch.float64, requires_grad=True)
        params = {k: v.detach().clone().requires_grad_() for k, v in layer.named_parameters()}

        def f(inp, *ps):
            return torch.func.functional_call(layer, dict(zip(params, ps)), (inp,))

        assert torch.autograd.gradcheck(f, (x, *params.values()), eps=1e-6, atol=1e-7)


def test_gradcheck_world_2_input():
    assert launch_local(_gradcheck_worker, 2, timeout=120) == [True, True]


def _count_collectives_worker() -> dict:
    """Count torch.distributed calls in one training step of the paper's CNN."""
    rank, world = join_gloo()
    counts = {"all_gather": 0, "all_reduce": 0, "reduce_scatter": 0, "broadcast": 0}
    gathered: list[tuple[int, ...]] = []
    for name in counts:
        if name == "reduce_scatter":  # the name comm calls: newer torch's, or the one before it
            name = "reduce_scatter_single" if hasattr(dist, "reduce_scatter_single") else "reduce_scatter_tensor"
        original = getattr(dist, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            counts[_name if _name in counts else "reduce_scatter"] += 1
            if _name == "all_gather":
                gathered.append(tuple(args[1].shape))
            return _original(*args, **kwargs)

        setattr(dist, name, counted)
    torch.manual_seed(0)
    # check_batch=False: the first forward's one-time batch check (one more
    # all-gather) is counted in test_ranks_feeding_different_batches_are_refused
    model = convshard.shard_model(build_model("paper", (1, 28, 28), 10, (6, 8)), [2, 1], check_batch=False)
    setup = dict(counts)
    x = torch.randn(4, 1, 28, 28)
    out = model(x)
    forward = dict(counts)
    out.square().sum().backward()
    backward = dict(counts)
    convshard.sync_replicas(model)
    return {"setup": setup, "forward": forward, "backward": backward, "sync": dict(counts), "gathered": gathered}


def test_collectives_per_step():
    """Forward: one all-gather per conv layer. Backward: one reduce-scatter,
    of the second layer's input gradient, back to the first layer's shards
    (the first layer's input, the data, needs no gradient). sync_replicas:
    one broadcast. Nothing else."""
    seen = launch_local(_count_collectives_worker, 2, timeout=120, env={"CONVSHARD_SHM": "0"})[0]  # gloo's own path
    assert seen["setup"] == {"all_gather": 0, "all_reduce": 0, "reduce_scatter": 0, "broadcast": 1}
    assert seen["forward"] == {"all_gather": 2, "all_reduce": 0, "reduce_scatter": 0, "broadcast": 1}
    assert seen["backward"] == {"all_gather": 2, "all_reduce": 0, "reduce_scatter": 1, "broadcast": 1}
    assert seen["sync"] == {"all_gather": 2, "all_reduce": 0, "reduce_scatter": 1, "broadcast": 2}
    # ReLU and the 2x2 pool run on the shard: each rank sends pooled maps,
    # padded to the larger shard (6 kernels at 2:1 are 4+2; 8 are 5+3).
    assert seen["gathered"] == [(4, 4, 12, 12), (4, 5, 4, 4)]


def _zero_kernel_worker() -> tuple[float, float, dict]:
    """A rank whose share is 0 holds no kernels and still trains the same model;
    ``layer_shares`` gives the second layer a split of its own."""
    rank, world = join_gloo()
    torch.manual_seed(0)
    reference = build_model("paper", (1, 28, 28), 10, (6, 8))
    model = convshard.shard_model(copy.deepcopy(reference), [0.6, 0.4, 0.0], layer_shares={"features.3": [1, 1, 1]})
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    out, ref_out = model(x), reference(x)
    nn.functional.cross_entropy(out, y).backward()
    nn.functional.cross_entropy(ref_out, y).backward()
    splits = sharded_parameters(model)
    grads = dict(reference.named_parameters())
    worst = max(_rel(splits[n].gather(p.grad) if n in splits else p.grad, grads[n].grad)
                for n, p in model.named_parameters())
    return _rel(out, ref_out), worst, convshard.parallel.sharded.layer_counts(model)


def test_rank_with_zero_kernels():
    for forward, grad, counts in launch_local(_zero_kernel_worker, 3, timeout=120):
        assert forward < 1e-6 and grad < GRAD_RTOL, (forward, grad)
        assert counts == {"features.0": (4, 2, 0), "features.3": (3, 3, 2)}


def _state_roundtrip_worker(shares: list[float]) -> dict:
    """full_state_dict is identical on every rank and load_full_state_dict inverts it."""
    rank, world = join_gloo()
    torch.manual_seed(rank)  # different local inits: shard_model must take rank 0's
    model = build_model("vgg", (3, 16, 16), 10, (8, 12, 10))
    original = {k: v.clone() for k, v in model.state_dict().items()}
    sharded = convshard.shard_model(model, shares)
    full = convshard.full_state_dict(sharded)
    flat = torch.cat([v.reshape(-1).float() for v in full.values()])
    everyone = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(everyone, flat)
    perturbed = {k: v + 1 if v.is_floating_point() else v for k, v in full.items()}
    convshard.load_full_state_dict(sharded, perturbed)
    again = convshard.full_state_dict(sharded)
    return {
        "same_keys": list(full) == list(original),
        "same_shapes": all(full[k].shape == original[k].shape for k in full),
        "identical_on_ranks": all(torch.equal(flat, e) for e in everyone),
        "roundtrip": all(torch.equal(again[k], perturbed[k]) for k in full),
    }


def test_full_state_dict_roundtrip():
    for report in launch_local(_state_roundtrip_worker, 3, args=([0.5, 0.3, 0.2],), timeout=120):
        assert all(report.values()), report


def test_split_counts():
    assert split_counts(10, [0.4, 0.3, 0.2, 0.1]) == (4, 3, 2, 1)
    assert split_counts(7, [1, 1, 1]) == (3, 2, 2)  # remainder to the lower rank on ties
    assert split_counts(5, [1, 0, 1]) == (3, 0, 2)
    assert split_counts(500, [0.5, 0.3, 0.2]) == (250, 150, 100)
    for total in range(1, 40):
        for shares in ([1, 2, 3], [0.9, 0.05, 0.05], [3, 1]):
            counts = split_counts(total, shares)
            assert sum(counts) == total
            exact = [total * s / sum(shares) for s in shares]
            assert all(abs(c - e) < 1 for c, e in zip(counts, exact))
    for bad in ([], [0, 0], [1, -1], [float("nan")], [float("inf"), 1]):
        with pytest.raises(convshard.ConfigError):
            split_counts(4, bad)


def test_world_1_needs_no_process_group():
    """Without torch.distributed, shard_model holds every kernel and communicates nothing."""
    torch.manual_seed(0)
    reference = build_model("paper", (1, 28, 28), 10, (4, 6))
    model = convshard.shard_model(copy.deepcopy(reference))
    assert not dist.is_initialized()
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(model(x), reference(x))
    assert all(isinstance(model.features[i], ShardedConv2d) for i in (0, 3))


def test_unshardable_convs_left_replicated(caplog):
    """groups > 1 and parametrized convs stay plain nn.Conv2d, with a warning naming them."""
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.Conv2d(8, 8, 1))
    nn.utils.parametrizations.weight_norm(model[1])
    with caplog.at_level("WARNING"):
        convshard.shard_model(model)
    assert type(model[0]) is nn.Conv2d and not isinstance(model[1], ShardedConv2d)
    assert "0" in caplog.text and "1" in caplog.text and "replicated" in caplog.text
    with pytest.raises(convshard.ConfigError, match="groups=2"):
        ShardedConv2d(nn.Conv2d(4, 8, 3, groups=2), ShardSplit((8,), 0))


def test_shard_a_bare_conv_and_wrong_share_count():
    conv = nn.Conv2d(2, 3, 3)
    assert isinstance(convshard.shard_model(conv), ShardedConv2d)
    with pytest.raises(convshard.ConfigError, match="2 entries for 1 ranks"):
        convshard.shard_model(nn.Conv2d(2, 3, 3), [1, 1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_layer_matches_cpu():
    """CUDA twin of the world-1 check: the sharded layer on a GPU equals the CPU reference."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 6, 3, padding=1)
    x = torch.randn(2, 3, 8, 8)
    layer = ShardedConv2d(copy.deepcopy(conv).cuda(), ShardSplit((6,), 0))
    assert _rel(layer(x.cuda()).cpu(), conv(x)) < 1e-5


def _mixed_worker() -> float:
    """Rank 0 on the GPU, rank 1 on the CPU, gloo staging CUDA tensors through host memory."""
    rank, world = join_gloo()
    device = torch.device("cuda" if rank == 0 else "cpu")
    torch.manual_seed(0)
    reference = build_model("paper", (1, 28, 28), 10, (6, 8))
    model = convshard.shard_model(copy.deepcopy(reference).to(device), [2, 1])
    x = torch.randn(4, 1, 28, 28)
    out = model(x.to(device))
    out.square().sum().backward()
    reference(x).square().sum().backward()
    assert comm.world_size() == 2
    return _rel(out.cpu(), reference(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_and_cuda_ranks_in_one_job():
    assert max(launch_local(_mixed_worker, 2, timeout=120)) < 1e-4


def _different_models_worker() -> None:
    join_gloo()
    kernels = (4, 6) if comm.rank() == 0 else (4, 8)
    convshard.shard_model(build_model("paper", (1, 28, 28), 10, kernels))


def test_ranks_with_different_models_are_refused():
    """shard_model compares the model's structure across ranks before it shards."""
    with pytest.raises(WorkerFailed, match="model differs between ranks .*features.3"):
        launch_local(_different_models_worker, 2, timeout=120)


def _different_formats_worker() -> None:
    join_gloo()
    model = build_model("paper", (1, 28, 28), 10, (4, 6))
    convshard.shard_model(model.to(memory_format=torch.channels_last) if comm.rank() == 1 else model)


def test_ranks_with_models_in_different_memory_formats_are_refused():
    """The memory format lays out every transfer, so all ranks must share it."""
    with pytest.raises(WorkerFailed, match="model differs between ranks .*memory format.*channels_last"):
        launch_local(_different_formats_worker, 2, timeout=120)


def test_channelwise_layers_on_the_shard_are_exact_and_optional():
    """Traced (ReLU and pool run on the shard, the conv output gathered after
    them) and unfused (each conv gathers its own output) models compute the
    same function as the original, with the same state-dict keys."""
    torch.manual_seed(0)
    reference = build_model("paper", (1, 28, 28), 10, (6, 8))
    traced = convshard.shard_model(copy.deepcopy(reference))
    plain = convshard.shard_model(copy.deepcopy(reference), fuse_channelwise=False)
    assert not traced.features[0].gather and isinstance(traced.features[1], nn.ReLU)
    assert plain.features[0].gather and len(plain.features[0].local_ops) == 0
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(traced(x), reference(x)) and torch.equal(plain(x), reference(x))
    assert list(convshard.full_state_dict(traced)) == list(reference.state_dict())


def _batch_check_worker() -> dict:
    """Rank 1 feeds the same batch, then a different one, then the same rows
    in another order; with the check and without it (the keyword).
    Returns each case's error message (None when the forward ran) and the
    all-gathers of the first and second forward of the same batch."""
    rank, _ = join_gloo()
    torch.manual_seed(0)
    reference = build_model("paper", (1, 28, 28), 10, (6, 8))
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    batches = {"same": x, "different": x + rank, "reordered": x.flip(0) if rank else x}
    gathers = []
    original = dist.all_gather

    def counted(*args, **kwargs):
        gathers.append(tuple(args[1].shape))
        return original(*args, **kwargs)

    def forward(case: str, **options) -> str | None:
        model = convshard.shard_model(copy.deepcopy(reference), [2, 1], **options)
        try:
            model(batches[case])
        except ValueError as exc:
            return str(exc)
        return None

    report: dict = {"gathers": []}
    dist.all_gather = counted
    try:
        model = convshard.shard_model(copy.deepcopy(reference), [2, 1])
        for _ in range(2):
            gathers.clear()
            model(x)
            report["gathers"].append(list(gathers))
    finally:
        dist.all_gather = original
    for case in ("same", "different", "reordered"):
        report[case] = forward(case)
    report["not traced"] = forward("different", fuse_channelwise=False)  # the model itself, not a GraphModule
    report["keyword off"] = forward("different", check_batch=False)
    return report


def _batch_check_off_worker() -> str | None:
    """Rank 1 feeds another batch than rank 0, in a job whose rank 0 joined
    with CONVSHARD_CHECK_BATCH=0: the forward's error message, or None."""
    rank, _ = join_gloo()
    torch.manual_seed(0)
    model = convshard.shard_model(build_model("paper", (1, 28, 28), 10, (6, 8)), [2, 1])
    try:
        model(torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1)) + rank)
    except ValueError as exc:
        return str(exc)
    return None


def test_ranks_feeding_different_batches_are_refused():
    """The first forward at world size 2 all-gathers one fingerprint of the
    input (once): the same batch passes, a different or reordered one
    raises on every rank naming rank 1, traced or not; check_batch=False and
    CONVSHARD_CHECK_BATCH=0 turn the check off. The environment is rank 0's
    when the job starts: every rank takes it, so none waits in a check the
    others skip."""
    reports = launch_local(_batch_check_worker, 2, timeout=120, env={"CONVSHARD_SHM": "0"})  # gloo's own path
    for report in reports:
        first, second = report["gathers"]
        assert len(first) == len(second) + 1 and first[1:] == second, report["gathers"]
        assert report["same"] is None
        for case in ("different", "reordered", "not traced"):
            assert report[case] is not None and "\n" not in report[case], report[case]
            assert "every rank must feed the same global batch to a sharded model" in report[case]
            assert "rank 1's batch differs from rank 0's" in report[case]
        assert "shape (4, 1, 28, 28)" in report["different"]
        assert report["keyword off"] is None
    assert launch_local(_batch_check_off_worker, 2, timeout=120, env={"CONVSHARD_SHM": "0",
                                                                   "CONVSHARD_CHECK_BATCH": "0"}) == [None, None]


def test_kernels_per_rank_line_says_what_a_plan_does_in_a_line(caplog):
    """ResNet-18's twelve kernel groups are summarised by distinct split within
    about 100 characters (listed whole they take 400); an all-batch plan says
    that its convs run whole on each rank's rows instead of ``{}``."""
    from convshard.parallel.shard import shard
    from convshard.plan import BatchSplit, KernelSplit

    caplog.set_level("INFO", logger="convshard.parallel.shard")
    shard(build_model("resnet18", (3, 32, 32), 10, None), lambda name, k: KernelSplit((k,)))
    shard(build_model("resnet18", (3, 32, 32), 10, None), lambda name, k: BatchSplit((1.0,)))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("kernels per rank: ")]
    assert lines[0] == "kernels per rank: 12 groups: [64] x3, [128] x3, [256] x3, [512] x3"
    assert lines[1] == ("kernels per rank: none split: 20 conv(s) whole on every rank, each rank on its rows "
                        "(batch mode)")
    assert "{}" not in lines[1] and all(len(line) <= 120 for line in lines)
    from convshard.parallel.shard import _shown_counts

    uneven = _shown_counts({f"layer{i}": (100 + i, 100 - i) for i in range(20)})  # twenty distinct splits
    assert uneven.startswith("20 groups: [100, 100] x1, [101, 99] x1, ") and uneven.endswith(", ...")
    assert len(uneven) <= 100
