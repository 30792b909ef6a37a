"""Layouts through real CNNs: BatchNorm, activations, residual adds, gates and depthwise convs on the shard.

Every distributed check runs in real processes on gloo (``launch_local``),
one per rank, world sizes passed explicitly. Each worker trains the sharded
model and the unsharded reference built from the same seed side by side, in
float64 (BatchNorm amplifies float32 rounding), and returns its errors.
"""

from __future__ import annotations

import copy

import pytest
import torch
from factory_models import se_depthwise_net
from helpers import join_gloo, worst_state_error
from torch import nn

import convshard
from convshard.errors import ConfigError
from convshard.models import build_model
from convshard.parallel import comm, formats, layouts
from convshard.parallel.shard import shard
from convshard.plan import BatchSplit, search
from convshard.plan.splits import split_counts
from convshard.profile.nominal import nominal
from convshard.parallel.sharded import (
    ShardedBatchNorm2d,
    ShardedChannelwiseConv2d,
    ShardedConv2d,
    layer_counts,
    sharded_state,
)
from convshard.run import checkpoint
from convshard.run.launch import launch_local

SHARES = {1: [1.0], 2: [0.6, 0.4], 3: [0.5, 0.3, 0.2], 4: [0.4, 0.3, 0.2, 0.1]}
STEPS = 3
SHAPE = (3, 8, 8)


class Block(nn.Module):
    """A ResNet basic block: two 3x3 convs with BatchNorm, a shortcut (1x1 conv + BN when the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class TinyResNet(nn.Module):
    """Stem conv + BN + ReLU, two blocks (the second strided, with a downsample), pool, linear."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = Block(8, 8)
        self.layer2 = Block(8, 12, stride=2)
        self.fc = nn.Linear(12, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class SqueezeDepthwise(nn.Module):
    """A conv with bias, a depthwise conv, a squeeze-excite gate and dropout in the head."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 10, 3, padding=1)
        self.bn = nn.BatchNorm2d(10)
        self.dw = nn.Conv2d(10, 10, 3, padding=1, groups=10, bias=False)
        self.bn_dw = nn.BatchNorm2d(10)
        self.squeeze = nn.Conv2d(10, 4, 1)
        self.excite = nn.Conv2d(4, 10, 1)
        self.project = nn.Conv2d(10, 6, 1)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(6 * 4 * 4, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.silu(self.bn(self.conv(x)))
        x = nn.functional.hardswish(self.bn_dw(self.dw(x)))
        gate = torch.sigmoid(self.excite(torch.relu(self.squeeze(x.mean((2, 3), keepdim=True)))))
        x = x * gate
        return self.head(nn.functional.max_pool2d(self.project(x), 2))


def vgg_bn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(12 * 2 * 2, 10))


MODELS = {
    "resnet": TinyResNet, "squeeze": SqueezeDepthwise, "vgg_bn": vgg_bn,
    "resnet18": lambda: build_model("resnet18", SHAPE, 10, (4,)),
    "vgg11": lambda: build_model("vgg11", SHAPE, 10, (4,)),
    "se_depthwise_net": lambda: se_depthwise_net(SHAPE, 10),
}


def _error(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-3) -> float:
    """max |a - b| / (max |b| + floor): relative, with a floor for entries that are zero in theory."""
    return ((a - b).abs().max() / (b.abs().max() + floor)).item()


def plan_modes(model: nn.Module, plan: str) -> dict[str, str] | None:
    """A per-layer plan's modes by group name: "kernel" (none in batch mode),
    "batch" (all of them) or "alternate" (batch and kernel in turn, graph order)."""
    if plan == "kernel":
        return None
    names = list(layouts.analyse(layouts.trace(copy.deepcopy(model))).group_names().values())
    return {name: "batch" if plan == "batch" or i % 2 == 0 else "kernel" for i, name in enumerate(names)}


def side_by_side(factory, shape, shares, opt_name: str, *, rows=None, plan: str = "kernel",
                 batch: int = 6, chunks: int = 1) -> tuple[dict, nn.Module]:
    """Train the unsharded reference and the planned model from the same seed
    for STEPS steps, in the default dtype; the worst errors and the model."""
    torch.manual_seed(0)
    reference = factory()
    model = convshard.shard_model(copy.deepcopy(reference), shares, rows=rows, modes=plan_modes(reference, plan),
                                  chunks=chunks)
    make = (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)) if opt_name == "sgd" else (
        lambda p: torch.optim.Adam(p, lr=1e-2))
    opt_ref, opt = make(reference.parameters()), make(model.parameters())
    gen = torch.Generator().manual_seed(1)
    worst = {"forward": 0.0, "state": 0.0, "optimizer": 0.0}
    for _ in range(STEPS):
        x, y = torch.randn(batch, *shape, generator=gen), torch.randint(0, 10, (batch,), generator=gen)
        torch.manual_seed(2)  # the same dropout masks on both
        out_ref = reference(x)
        torch.manual_seed(2)
        out = model(x)
        worst["forward"] = max(worst["forward"], _error(out, out_ref))
        for o, loss_out in ((opt_ref, out_ref), (opt, out)):
            o.zero_grad()
            nn.functional.cross_entropy(loss_out, y).backward()
        convshard.sync_replicas(model)
        opt_ref.step()
        opt.step()
    worst["state"] = worst_state_error(convshard.full_state_dict(model), reference.state_dict(), _error)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in reference.named_parameters()]
    full_opt = checkpoint.full_optimizer_state_dict(model, opt)["state"]
    for i, state in opt_ref.state_dict()["state"].items():
        for k, v in state.items():
            if torch.is_tensor(v) and v.dim() > 0:
                worst["optimizer"] = max(worst["optimizer"], _error(full_opt[i][k], v))
    model.eval()
    reference.eval()
    x = torch.randn(4, *shape, generator=gen)
    worst["eval"] = _error(model(x), reference(x))
    return worst, model


def _exactness_worker(shares: list[float]) -> dict:
    """Train reference and sharded copies side by side in float64; report the worst errors."""
    join_gloo()
    torch.set_default_dtype(torch.float64)
    report = {}
    for model_name, factory in MODELS.items():
        for opt_name in ("sgd", "adam"):
            report[f"{model_name}/{opt_name}"], model = side_by_side(factory, SHAPE, shares, opt_name)
            report[f"{model_name}/counts"] = {n: list(c) for n, c in layer_counts(model).items()}
    return report


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_real_cnns_train_like_one_device(world):
    """Weights, BatchNorm running statistics, optimizer state and the eval
    forward equal the unsharded model's after 3 steps, SGD+momentum and Adam."""
    for rank, report in enumerate(launch_local(_exactness_worker, world, args=(SHARES[world],), timeout=300)):
        for key, errors in report.items():
            if key.endswith("/counts"):
                assert all(len(c) == world for c in errors.values()), (key, errors)
                continue
            for what, error in errors.items():
                assert error < 1e-7, (rank, key, what, error)
    # residual adds tie the convs whose outputs meet: the stem and layer1's conv2,
    # layer2's downsample and conv2 are split alike, under the first one's name.
    assert set(report["resnet/counts"]) == {"conv1", "layer1.conv1", "layer2.conv1", "layer2.downsample.0"}


def _chunked_worker(shares: list[float]) -> dict:
    """Every model under kernel and alternating plans, its gathers into
    sharded convs in 2, 4 and 8 chunks of rows (batch 6: uneven chunks, and
    more chunks than rows), float64, against the unsharded reference; and
    the all-gathers one forward issues with 1 and with 3 chunks."""
    join_gloo()
    torch.set_default_dtype(torch.float64)
    report = {}
    for model_name, factory in MODELS.items():
        for plan, chunks in (("kernel", 2), ("alternate", 4), ("kernel", 8)):
            report[f"{model_name}/{plan}/{chunks}"], _ = side_by_side(factory, SHAPE, shares, "sgd", plan=plan,
                                                                      chunks=chunks)
    for chunks in (1, 3):
        torch.manual_seed(0)
        model = convshard.shard_model(TinyResNet(), shares, chunks=chunks)
        with comm.record_wire() as sent:
            model(torch.randn(6, *SHAPE))
        report[f"all_gathers/{chunks}"] = sum(1 for s in sent if s.op == "all_gather")
    return report


@pytest.mark.parametrize("world, shm", [(2, "0"), (3, "1")])
def test_gathers_in_chunks_of_rows_train_like_one_device(world, shm, monkeypatch):
    """A value gathered into sharded convs in chunks of rows (each chunk's
    transfer overlapping the convs of the chunk before) trains the model
    one device trains: weights, running statistics, momentum, the eval
    forward; through gloo's own transfers (which run beside the compute)
    and through shared memory."""
    monkeypatch.setenv("CONVSHARD_SHM", shm)
    for rank, report in enumerate(launch_local(_chunked_worker, world, args=(SHARES[world],), timeout=300)):
        for key, errors in report.items():
            if key.startswith("all_gathers/"):
                continue
            for what, error in errors.items():
                assert error < 1e-7, (rank, key, what, error)
        # TinyResNet's values gathered into convs: the stem's, layer1.conv1's, layer1's output, layer2.conv1's;
        # in 3 chunks each sends 3 all-gathers instead of 1
        assert report["all_gathers/3"] - report["all_gathers/1"] == 4 * 2, report


def _channels_last_worker(shares: list[float]) -> dict:
    """Every model in channels_last under kernel (2 chunks), alternating (3
    chunks) and all-batch plans, float64, against the same model unsharded;
    the gathered activation's format and its gradient's. resnet18 at 4
    kernels over shares (0.5, 0.3, 0.2) leaves ranks one channel, whose
    shard is laid out alike in both formats."""
    join_gloo()
    torch.set_default_dtype(torch.float64)
    report = {}
    for model_name, factory in MODELS.items():
        def channels_last(factory=factory) -> nn.Module:
            return factory().to(memory_format=torch.channels_last)
        for plan, chunks in (("kernel", 2), ("alternate", 3), ("batch", 1)):
            report[f"{model_name}/{plan}/{chunks}"], _ = side_by_side(channels_last, SHAPE, shares, "sgd", plan=plan,
                                                                      chunks=chunks)
    torch.manual_seed(0)
    convshard.shard_model(vgg_bn().to(memory_format=torch.channels_last), shares)  # the group's transfers go NHWC
    counts = tuple(split_counts(8, shares))
    mine = torch.randn(4, counts[comm.rank()], 6, 6).contiguous(memory_format=torch.channels_last)
    grads = []  # the gradient as the gather hands it back (a leaf's .grad takes the leaf's strides)
    mine.requires_grad_().register_hook(grads.append)
    whole = comm.gather_from_shards(mine, counts, partial=True)
    (whole * torch.arange(8.0).view(1, 8, 1, 1)).sum().backward()
    report["formats"] = {"wire": formats.to_wire(mine, 1, None)[2],  # permuted to (B, H, W, C)
                         "gathered": formats.format_of(whole) == torch.channels_last,
                         "gradient": formats.format_of(grads[0]) == formats.format_of(mine)}
    return report


@pytest.mark.parametrize("world, shm", [(2, "0"), (3, "1")])
def test_channels_last_models_train_like_one_device(world, shm, monkeypatch):
    """A channels_last model's transfers travel in its own layout (no
    layout changes on the wire) and train the model one device trains, in
    every plan kind, through gloo's own transfers and shared memory."""
    monkeypatch.setenv("CONVSHARD_SHM", shm)
    for rank, report in enumerate(launch_local(_channels_last_worker, world, args=(SHARES[world],), timeout=300)):
        assert report.pop("formats") == {"wire": True, "gathered": True, "gradient": True}, rank
        for key, errors in report.items():
            for what, error in errors.items():
                assert error < 1e-7, (rank, key, what, error)


def test_residual_block_layouts():
    """The stem's output stays split through layer1 (tied with layer1.conv2);
    BatchNorms are sharded; a conv input is gathered once, shared by two convs."""
    torch.manual_seed(0)
    model = convshard.shard_model(TinyResNet())
    modules = dict(model.named_modules())
    assert isinstance(modules["layer1.conv2"], ShardedConv2d) and not modules["layer1.conv2"].gather
    assert isinstance(modules["layer2.bn2"], ShardedBatchNorm2d)
    assert modules["layer1.conv2"].group is modules["conv1"].group
    assert modules["layer2.downsample.0"].group is modules["layer2.conv2"].group
    gathers = [n for n in model.graph.nodes if n.op == "call_module" and n.target.startswith("_convshard.gather")]
    # conv1's input is the data; layer1.conv1, layer1.conv2, layer2.conv1 (with the downsample), layer2.conv2,
    # and the pooled output before flatten: 5 gathers.
    assert len(gathers) == 5
    assert list(convshard.full_state_dict(model)) == list(TinyResNet().state_dict())


def test_gate_and_depthwise_stay_split():
    """The depthwise conv and its BatchNorm run on the shard; the gate is
    tied to the features it scales; dropout sees the gathered tensor."""
    model = convshard.shard_model(SqueezeDepthwise())
    modules = dict(model.named_modules())
    assert isinstance(modules["dw"], ShardedChannelwiseConv2d)
    assert modules["excite"].group is modules["conv"].group
    analysis = layouts.analyse(layouts.trace(SqueezeDepthwise()))
    split = {n.name for n, s in analysis.layout.items() if s is not None}
    assert {"dw", "bn_dw", "excite", "mul", "max_pool2d"} <= split
    assert "head_1" not in split and "head_0" not in split


def test_untraceable_model_falls_back(caplog):
    """Data-dependent control flow cannot be traced: each conv gathers its own
    output, with the channel-wise layers after it in a Sequential on the shard."""

    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4))

        def forward(self, x):
            y = self.features(x)
            return y if y.sum() > 0 else -y

    with caplog.at_level("WARNING"):
        model = convshard.shard_model(Branchy())
    assert "cannot trace Branchy" in caplog.text
    assert isinstance(model, Branchy) and model.features[0].gather and len(model.features[0].local_ops) == 1
    assert not sharded_state(model).keys() - {"features.0.weight", "features.0.bias"}


class _Branchy(nn.Module):
    """Data-dependent control flow: fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4))
        self.head = nn.Linear(4 * 14 * 14, 10)

    def forward(self, x):
        y = self.features(x)
        return self.head((y if y.sum() > 0 else -y).flatten(1))


def test_an_untraceable_model_gets_no_batch_mode():
    """Batch mode rewrites the traced graph: for a model fx cannot trace, the
    plan's batch-mode group is refused in one line (not run as a kernel split
    while the plan says batch), and the planner offers it no batch mode."""
    with pytest.raises(ConfigError, match="cannot be traced, and batch mode .*'features.0'.*--strategy kernel"):
        shard(_Branchy(), {"features.0": BatchSplit((1.0,))})
    profile = nominal(_Branchy(), devices=["cpu@0", "cpu@1"], input_shape=(3, 16, 16), batch_size=8)
    assert profile["traced"] is False and "batch_seconds" in profile["layers"][0]
    names = {c.name for c in search.candidates(profile)}
    assert "layers" not in names and "kernel" in names
    traced = nominal(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 14 * 14, 10)),
                     devices=["cpu@0", "cpu@1"], input_shape=(3, 16, 16), batch_size=8)
    assert "layers" in {c.name for c in search.candidates(traced)}  # the same plan kinds with a trace


def mixed_worker(plan: str = "kernel") -> float:
    """Rank 0 on the GPU, rank 1 on the CPU (gloo, CUDA tensors staged through
    host memory): a ResNet under ``plan`` (``plan_modes``) trains two steps
    like the CPU reference."""
    rank, _ = join_gloo()
    device = torch.device("cuda" if rank == 0 else "cpu")
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    reference = TinyResNet()
    model = convshard.shard_model(copy.deepcopy(reference).to(device), [0.6, 0.4], rows=[0.7, 0.3],
                                  modes=plan_modes(reference, plan))
    opt_ref = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        x, y = torch.randn(6, *SHAPE, generator=gen), torch.randint(0, 10, (6,), generator=gen)
        for net, o, inp, target in ((reference, opt_ref, x, y), (model, opt, x.to(device), y.to(device))):
            o.zero_grad()
            nn.functional.cross_entropy(net(inp), target).backward()
        convshard.sync_replicas(model)
        opt_ref.step()
        opt.step()
    return worst_state_error(convshard.full_state_dict(model), reference.state_dict(), _error)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_and_cuda_ranks_train_a_resnet_like_one_device():
    assert max(launch_local(mixed_worker, 2, timeout=240)) < 1e-9
