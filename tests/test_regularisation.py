"""Weight decay, AdamW, gradient clipping, label smoothing and warm-up keep the exactness guarantee.

Each option trains through the real loop (``local.launch_job``) for 3 steps
in float64 on a per-layer plan (uneven kernels, a batch-mode group, uneven
rows) and, for clipping, on PyTorch's DDP; the checkpoint's weights,
BatchNorm statistics and optimizer state are compared with one device's.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_same_weights, main_exit_code

from convshard import data, plan
from convshard.models import build_model
from convshard.run.config import TrainConfig, load_data, model_groups
from convshard.run.local import launch_job, prepare
from convshard.run.optim import clip_gradients, learning_rate, param_groups

DEVICES = ("cpu@0", "cpu@1")
OPTIONS = {
    "sgd, weight decay": {"weight_decay": 0.05},
    "adamw, weight decay": {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.1},
    "sgd, clipped": {"clip_grad_norm": 0.05},
    "label smoothing, warm-up": {"label_smoothing": 0.3, "lr_warmup_epochs": 1.0},  # not the default 0.1
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


def _first_step(tmp, name: str, **options) -> tuple[dict, dict]:
    """One step of the loop on one device in float64 with ``options``: its
    metrics and checkpoint; and the seed's model with the first batch, for a reference."""
    groups = _groups(tmp, "vgg", (8, 12, 16))
    config = replace(_config(tmp, name, "vgg", (8, 12, 16), plan.single("cpu@0", groups, 12), **options), max_steps=1)
    dataset = load_data(config)
    metrics = launch_job(prepare(config, dataset), dataset)
    torch.manual_seed(config.seed)  # the model every run starts from
    model = build_model("vgg", dataset.input_shape, dataset.classes, (8, 12, 16)).double()
    first = data.epoch_permutation(len(dataset.train_y), seed=config.seed, epoch=0)[: config.batch_size]
    reference = {"model": model, "x": dataset.train_x[first].double(), "y": dataset.train_y[first]}
    return {"metrics": metrics, "saved": torch.load(f"{config.checkpoint_dir}/checkpoint.pt", weights_only=True)}, \
        reference


def test_label_smoothing_is_torchs_cross_entropy_on_the_first_step(tmp_path):
    """The loop's first-step loss at s = 0.3 equals ``F.cross_entropy(...,
    label_smoothing=0.3)`` of the seed's model on the first batch, computed
    here; the losses at s = 0 and at the default 0.1 are other numbers, so a
    loop that ignored the option, or took the default, fails."""
    run, ref = _first_step(tmp_path, "smoothed", label_smoothing=0.3)
    logits = ref["model"](ref["x"])
    expected = {s: F.cross_entropy(logits, ref["y"], label_smoothing=s).item() for s in (0.3, 0.0, 0.1)}
    assert run["metrics"]["step_loss"][0] == pytest.approx(expected[0.3], rel=1e-12, abs=0)
    assert min(abs(expected[0.3] - expected[s]) for s in (0.0, 0.1)) > 1e-3 * expected[0.3], expected


@pytest.mark.parametrize("decay_all", [False, True], ids=["weights decay", "everything decays"])
def test_adamw_takes_torchs_adamw_step(tmp_path, decay_all):
    """The weights after the loop's first AdamW step equal ``torch.optim.AdamW``'s
    (lr 0.01, torch's default betas (0.9, 0.999) and eps 1e-8, decoupled weight
    decay 0.1 on the parameters of 2 or more dimensions, or on all with
    --decay-all) from the seed's model on the first batch. Adam with the same
    decay as L2, and AdamW decaying the other set, step elsewhere: the test tells them apart."""
    options = {"optimizer": "adamw", "lr": 0.01, "weight_decay": 0.1, "decay_all": decay_all,
               "label_smoothing": 0.0, "schedule": "constant"}
    run, ref = _first_step(tmp_path, "adamw", **options)
    model = ref["model"]
    F.cross_entropy(model(ref["x"]), ref["y"]).backward()
    start = {k: v.clone() for k, v in model.state_dict().items()}

    def stepped(optimizer: type[torch.optim.Optimizer], decays_all: bool) -> dict[str, torch.Tensor]:
        model.load_state_dict(start)
        decayed = [p for p in model.parameters() if decays_all or p.dim() >= 2]
        kept = [p for p in model.parameters() if not (decays_all or p.dim() >= 2)]
        optimizer([{"params": decayed, "weight_decay": 0.1}, {"params": kept, "weight_decay": 0.0}], lr=0.01).step()
        return {k: v.clone() for k, v in model.state_dict().items()}

    expected = stepped(torch.optim.AdamW, decay_all)
    assert_same_weights(run["saved"]["model"], expected, rtol=1e-9, atol=1e-12)
    for other in (stepped(torch.optim.Adam, decay_all), stepped(torch.optim.AdamW, not decay_all)):
        assert max((other[k] - v).abs().max().item() for k, v in expected.items()) > 1e-6


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
    (["--checkpoint-every-seconds", "60"], "--checkpoint-every-seconds needs --checkpoint-dir"),
    (["--checkpoint-every-seconds", "0", "--checkpoint-dir", "x"], "--checkpoint-every-seconds"),
    (["--optimizer", "lamb"], "'lamb'"),
    (["--precision", "16"], "argument --precision: invalid choice: '16'"),
    (["--grad-precision", "fp16"], "argument --grad-precision: invalid choice: 'fp16'"),
    (["--memory-format", "nhwc"], "argument --memory-format: invalid choice: 'nhwc'"),
    (["--device-memory", "1.2.3GiB"], "argument --device-memory: bad size '1.2.3GiB'"),
    (["--device-memory", "2GiB,-1MiB"], "bad size '-1MiB'"),
])
def test_bad_training_options_exit_2_naming_the_value(capsys, args, named):
    assert main_exit_code(["train", "--dataset", "synthetic", "--devices", "cpu@0", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and named in err[0], err
