"""Weight decay, AdamW, gradient clipping, label smoothing and warm-up keep the exactness guarantee.

Each option trains through the real loop (``local.launch_job``) for 3 steps
in float64 on a per-layer plan (uneven kernels, a batch-mode group, uneven
rows) and, for clipping, on PyTorch's DDP; the checkpoint's weights,
BatchNorm statistics and optimizer state are compared with one device's.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import main_exit_code

from convshard import plan
from convshard.models import build_model
from convshard.run.config import TrainConfig, load_data, model_groups
from convshard.run.local import launch_job, prepare
from convshard.run.optim import clip_gradients, learning_rate, param_groups

DEVICES = ("cpu@0", "cpu@1")
OPTIONS = {
    "sgd, weight decay": {"weight_decay": 0.05},
    "adamw, weight decay": {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.1},
    "sgd, clipped": {"clip_grad_norm": 0.05},
    "label smoothing, warm-up": {"label_smoothing": 0.1, "lr_warmup_epochs": 1.0},
}


def _config(tmp, name: str, model: str, kernels: tuple[int, ...], job: plan.Plan | None, **options) -> TrainConfig:
    return TrainConfig(devices=",".join(job.devices) if job else "cpu@0", model=model, kernels=kernels,
                       dataset="synthetic", synthetic_shape=(3, 16, 16), synthetic_size=48, batch_size=12,
                       max_steps=3, quiet=True, dtype="float64", checkpoint_dir=str(tmp / name), threads=1, job=job,
                       **options)


def _train(config: TrainConfig) -> dict:
    dataset = load_data(config)
    assert launch_job(prepare(config, dataset), dataset)["steps"] == 3
    return torch.load(f"{config.checkpoint_dir}/checkpoint.pt", weights_only=True)


def _groups(tmp, model: str, kernels: tuple[int, ...]) -> dict[str, int]:
    config = _config(tmp, "x", model, kernels, None)
    return model_groups(config, load_data(config))


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / (b.abs().max() + 1e-3)).item() if b.numel() else 0.0


def _worst(got: dict, ref: dict) -> float:
    """The largest relative difference over weights, buffers and optimizer state tensors."""
    assert got["model"].keys() == ref["model"].keys()
    worst = max(_relative(got["model"][k].double(), v.double()) for k, v in ref["model"].items())
    for index, state in ref["optimizer"]["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.is_floating_point():
                worst = max(worst, _relative(got["optimizer"]["state"][index][key].double(), value.double()))
    return worst


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> dict:
    """One device, plain SGD: what every option must change."""
    tmp = tmp_path_factory.mktemp("plain")
    groups = _groups(tmp, "vgg", (8, 12, 16))
    return _train(_config(tmp, "plain", "vgg", (8, 12, 16), plan.single("cpu@0", groups, 12)))


@pytest.mark.parametrize("option", list(OPTIONS))
def test_option_trains_the_one_device_model_on_a_per_layer_plan(tmp_path, plain, option):
    groups = _groups(tmp_path, "vgg", (8, 12, 16))
    names = list(groups)
    job = plan.kernel_split(DEVICES, groups, 12, modes={names[0]: "batch"}, rows=(7, 5),
                            counts={name: (k - 3, 3) for name, k in list(groups.items())[1:]}, threads=1)
    options = OPTIONS[option]
    ref = _train(_config(tmp_path, "one", "vgg", (8, 12, 16), plan.single("cpu@0", groups, 12, threads=1),
                         **options))
    got = _train(_config(tmp_path, "two", "vgg", (8, 12, 16), job, **options))
    assert _worst(got, ref) < 1e-9, option
    changed = max(_relative(ref["model"][k].double(), v.double()) for k, v in plain["model"].items())
    assert changed > 1e-6, f"{option} trained the same weights as plain SGD"


def test_clipping_under_ddp_trains_the_one_device_model(tmp_path):
    """DDP's gradients are averaged and whole on every rank: each clips by its own norm, the global one."""
    groups = _groups(tmp_path, "paper", (6, 10))
    options = {"clip_grad_norm": 0.05, "weight_decay": 0.01}
    ref = _train(_config(tmp_path, "one", "paper", (6, 10), plan.single("cpu@0", groups, 12, threads=1), **options))
    got = _train(_config(tmp_path, "ddp", "paper", (6, 10), plan.ddp(DEVICES, groups, 12, shares=[3, 1], threads=1),
                         **options))
    assert _worst(got, ref) < 1e-9


def test_weight_decay_skips_biases_and_batchnorm_unless_asked():
    model = build_model("vgg", (3, 16, 16), 10, (8, 12, 16))
    decayed, kept = param_groups(model.parameters(), weight_decay=0.1)
    assert decayed["weight_decay"] == 0.1 and kept["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.dim() > 1 for p in decayed["params"])
    kept_names = {names[id(p)] for p in kept["params"]}
    batchnorms = {f"{n}.{k}" for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)
                  for k in ("weight", "bias")}
    assert batchnorms and batchnorms <= kept_names
    assert all(n.endswith(".bias") or n in batchnorms for n in kept_names)
    (everything,) = param_groups(model.parameters(), weight_decay=0.1, decay_all=True)
    assert len(everything["params"]) == len(list(model.parameters())) and everything["weight_decay"] == 0.1


def test_clipping_on_one_device_is_torchs_clip_grad_norm():
    torch.manual_seed(0)
    a, b = (build_model("paper", (1, 16, 16), 10, (4, 8)).double() for _ in range(2))
    b.load_state_dict(a.state_dict())
    x, y = torch.randn(8, 1, 16, 16, dtype=torch.float64), torch.randint(0, 10, (8,))
    for model in (a, b):
        torch.nn.functional.cross_entropy(model(x), y).backward()
    expected = torch.nn.utils.clip_grad_norm_(a.parameters(), 0.1).item()
    norm = clip_gradients(b, 0.1, sharded=(), group=None)
    assert norm == pytest.approx(expected, rel=1e-12) and norm > 0.1
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-12, atol=0)


def test_warmup_rises_linearly_then_follows_the_cosine():
    config = TrainConfig(lr=0.1, epochs=4, lr_warmup_epochs=1)  # 40 steps, the first 10 warming up
    rates = [learning_rate(config, s, 40) for s in range(41)]
    assert rates[:10] == pytest.approx([0.1 * (s + 1) / 10 for s in range(10)])
    assert rates[10] == pytest.approx(0.1) and rates[40] == pytest.approx(0.0, abs=1e-12)
    assert rates[25] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 15 / 30)))
    constant = TrainConfig(lr=0.1, epochs=4, lr_warmup_epochs=0.5, schedule="constant")
    assert [learning_rate(constant, s, 40) for s in (0, 4, 5, 39)] == pytest.approx([0.02, 0.1, 0.1, 0.1])


@pytest.mark.parametrize("args, named", [
    (["--weight-decay", "-0.1"], "--weight-decay"),
    (["--label-smoothing", "1"], "--label-smoothing"),
    (["--clip-grad-norm", "0"], "--clip-grad-norm"),
    (["--warmup-epochs", "8"], "--warmup-epochs 8"),
    (["--keep-last", "2"], "--keep-last needs --checkpoint-dir"),
    (["--keep-best"], "--keep-best needs --checkpoint-dir"),
    (["--optimizer", "lamb"], "'lamb'"),
])
def test_bad_training_options_exit_2_naming_the_value(capsys, args, named):
    assert main_exit_code(["train", "--dataset", "synthetic", "--devices", "cpu@0", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and named in err[0], err
