"""Per-layer plans: channel groups in batch mode beside groups that split kernels.

Every check runs real processes on gloo, one per rank, world sizes passed
explicitly, and trains the planned model beside the unsharded reference
built from the same seed, in float64, with uneven batch rows and uneven
kernels. Two plans per model: every group in batch mode (data parallelism
through the layouts) and groups alternating between batch and kernel mode,
which takes every transition (rows <-> replicated, channels -> rows,
rows -> a sharded conv's input).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import convshard
from convshard import checkpoint, layouts
from convshard.batch import SyncBatchNorm2d
from convshard.launch import init_from_env, launch_local
from convshard.models import build_model
from convshard.sharded import ShardedConv2d
from test_layouts import SHARES, SHAPE, SqueezeDepthwise, TinyResNet, _error

ROWS = {1: [1.0], 2: [0.3, 0.7], 3: [0.2, 0.5, 0.3], 4: [0.1, 0.2, 0.3, 0.4]}
PAPER_SHAPE = (3, 16, 16)  # the paper's CNN needs 16x16 inputs
MODELS = {  # name -> (factory, input shape)
    "resnet": (TinyResNet, SHAPE), "squeeze": (SqueezeDepthwise, SHAPE),
    "resnet18": (lambda: build_model("resnet18", SHAPE, 10, (4,)), SHAPE),
    "vgg11": (lambda: build_model("vgg11", SHAPE, 10, (4,)), SHAPE),
    "paper": (lambda: build_model("paper", PAPER_SHAPE, 10, (6, 8)), PAPER_SHAPE),
}


def plan_modes(model: nn.Module, plan: str) -> dict[str, str]:
    """The modes of a plan by group name: all batch, or alternating batch / kernel in graph order."""
    names = list(layouts.analyse(layouts.trace(copy.deepcopy(model))).group_names().values())
    return {name: "batch" if plan == "batch" or i % 2 == 0 else "kernel" for i, name in enumerate(names)}


def _worker(shares: list[float], rows: list[float]) -> dict:
    torch.set_num_threads(1)
    init_from_env("gloo", timeout=120)
    torch.set_default_dtype(torch.float64)
    report = {}
    for model_name, (factory, shape) in MODELS.items():
        for plan in ("batch", "alternate"):
            for opt_name in ("sgd", "adam"):
                torch.manual_seed(0)
                reference = factory()
                model = convshard.shard_model(copy.deepcopy(reference), shares, rows=rows,
                                              modes=plan_modes(reference, plan))
                make = (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)) if opt_name == "sgd" else (
                    lambda p: torch.optim.Adam(p, lr=1e-2))
                opt_ref, opt = make(reference.parameters()), make(model.parameters())
                gen = torch.Generator().manual_seed(1)
                worst = {"forward": 0.0, "state": 0.0, "optimizer": 0.0}
                for _ in range(3):
                    x, y = torch.randn(10, *shape, generator=gen), torch.randint(0, 10, (10,), generator=gen)
                    torch.manual_seed(2)
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
                full = convshard.full_state_dict(model)
                for key, value in reference.state_dict().items():
                    assert full[key].shape == value.shape, key
                    if value.is_floating_point():
                        worst["state"] = max(worst["state"], _error(full[key], value))
                full_opt = checkpoint.full_optimizer_state_dict(model, opt)["state"]
                for i, state in opt_ref.state_dict()["state"].items():
                    for k, v in state.items():
                        if torch.is_tensor(v) and v.dim() > 0:
                            worst["optimizer"] = max(worst["optimizer"], _error(full_opt[i][k], v))
                model.eval()
                reference.eval()
                x = torch.randn(4, *shape, generator=gen)
                worst["eval"] = _error(model(x), reference(x))
                report[f"{model_name}/{plan}/{opt_name}"] = worst
                modules = list(model.modules())
                report[f"{model_name}/{plan}/kinds"] = (sum(isinstance(m, SyncBatchNorm2d) for m in modules),
                                                       sum(isinstance(m, ShardedConv2d) for m in modules))
    return report


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_per_layer_plans_train_like_one_device(world):
    """Weights, running statistics (over the global batch), optimizer state
    and the eval forward equal the unsharded model's after 3 steps."""
    for rank, report in enumerate(launch_local(_worker, world, args=(SHARES[world], ROWS[world]), timeout=600)):
        for key, errors in report.items():
            if key.endswith("/kinds"):
                continue
            for what, error in errors.items():
                assert error < 1e-7, (rank, key, what, error)
    assert report["resnet18/batch/kinds"][1] == 0 and report["resnet18/batch/kinds"][0] > 0
    assert report["resnet18/alternate/kinds"][0] > 0 and report["resnet18/alternate/kinds"][1] > 0


def _mixed_worker() -> float:
    """Rank 0 on the GPU, rank 1 on the CPU (gloo, CUDA tensors staged through
    host memory): a ResNet with alternating batch and kernel groups trains two
    steps like the CPU reference."""
    torch.set_num_threads(1)
    rank, _, _ = init_from_env("gloo", timeout=120)
    device = torch.device("cuda" if rank == 0 else "cpu")
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    reference = TinyResNet()
    model = convshard.shard_model(copy.deepcopy(reference).to(device), [0.6, 0.4], rows=[0.7, 0.3],
                                  modes=plan_modes(reference, "alternate"))
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
    full = convshard.full_state_dict(model)
    return max(_error(full[k], v) for k, v in reference.state_dict().items() if v.is_floating_point())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_and_cuda_ranks_train_a_per_layer_plan_like_one_device():
    assert max(launch_local(_mixed_worker, 2, timeout=240)) < 1e-9
