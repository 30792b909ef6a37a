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

import pytest
import torch
from helpers import join_gloo
from test_layouts import SHAPE, SHARES, SqueezeDepthwise, TinyResNet, mixed_worker, side_by_side

from convshard.models import build_model
from convshard.parallel.batch import SyncBatchNorm2d
from convshard.parallel.sharded import ShardedConv2d
from convshard.run.launch import launch_local

ROWS = {1: [1.0], 2: [0.3, 0.7], 3: [0.2, 0.5, 0.3], 4: [0.1, 0.2, 0.3, 0.4]}
PAPER_SHAPE = (3, 16, 16)  # the paper's CNN needs 16x16 inputs
MODELS = {  # name -> (factory, input shape)
    "resnet": (TinyResNet, SHAPE), "squeeze": (SqueezeDepthwise, SHAPE),
    "resnet18": (lambda: build_model("resnet18", SHAPE, 10, (4,)), SHAPE),
    "vgg11": (lambda: build_model("vgg11", SHAPE, 10, (4,)), SHAPE),
    "paper": (lambda: build_model("paper", PAPER_SHAPE, 10, (6, 8)), PAPER_SHAPE),
}


def _worker(shares: list[float], rows: list[float]) -> dict:
    """Every model under both plans, SGD and Adam, in float64: the worst errors
    and, per plan, how many BatchNorms sync and how many convs split kernels."""
    join_gloo()
    torch.set_default_dtype(torch.float64)
    report = {}
    for model_name, (factory, shape) in MODELS.items():
        for plan in ("batch", "alternate"):
            for opt_name in ("sgd", "adam"):
                report[f"{model_name}/{plan}/{opt_name}"], model = side_by_side(
                    factory, shape, shares, opt_name, rows=rows, plan=plan, batch=10)
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_and_cuda_ranks_train_a_per_layer_plan_like_one_device():
    assert max(launch_local(mixed_worker, 2, args=("alternate",), timeout=240)) < 1e-9
