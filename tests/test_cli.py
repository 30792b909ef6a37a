"""The ``convshard`` command: bad input, ``--help``, and one tiny run per strategy.

Bad input must exit with code 2 and print exactly one stderr line that names
the bad value, never a traceback. Those checks run in-process through
``convshard.cli.main(argv)`` (argparse errors surface as ``SystemExit(2)``),
with training stubbed out so that a value that wrongly passes validation
fails the test instead of training inside pytest. A few cases run the real
command in a subprocess, end to end. Every multi-worker run names its world
size through ``--devices`` and runs with ``OMP_NUM_THREADS=1``.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image

from convshard import cli
from convshard.cli import main
from convshard.run import launch, local

TINY = ["--dataset", "synthetic", "--synthetic-shape", "1,16,16", "--synthetic-size", "64",
        "--kernels", "4,8", "--batch-size", "16", "--max-steps", "2", "--quiet"]
TWO_CPUS = ["--devices", "cpu@0,cpu@1"]
SUBPROCESS_TIMEOUT = 120  # seconds; a tiny run takes under 10
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error when CUDA is missing")
GARBAGE = bytes(range(256)) * 8


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _convshard_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "convshard", *args]


def _run_convshard(*args: str) -> subprocess.CompletedProcess:
    """The real command in a subprocess, bounded by SUBPROCESS_TIMEOUT."""
    return subprocess.run(_convshard_cmd(*args), capture_output=True, text=True, env=_env(),
                          timeout=SUBPROCESS_TIMEOUT)


def _main_exit_code(argv: list[str]) -> int:
    """``main(argv)``'s exit code, whether returned or raised by argparse."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def _assert_one_line_error(stderr: str, *needles: str) -> None:
    """stderr is one non-empty line, no traceback, containing every needle."""
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), f"expected one stderr line, got {stderr!r}"
    assert "Traceback" not in stderr
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


def _corrupt_cifar(data_dir: Path) -> None:
    folder = data_dir / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(GARBAGE)


def _image_folder(root: Path, *, corrupt: str | None = None) -> None:
    """Two classes of five 20x20 RGB images under ``root``; ``corrupt`` names one of class 'one' to garble."""
    for label, name in enumerate(("one", "two")):
        (root / name).mkdir()
        for i in range(5):
            Image.new("RGB", (20, 20), (50 * i, 100 * label, 30)).save(root / name / f"img_{i}.png")
    if corrupt:
        (root / "one" / corrupt).write_bytes(GARBAGE)


def _nonpositive(option: str, value: str):
    return pytest.param([option, value], (option, f"'{value}'"), None, id=f"{option}={value}")


# (extra argv after TINY, needles the error line must contain, prepare(tmp_path) or None).
# "{tmp}" in argv and needles stands for the test's tmp_path.
BAD_INPUT = [
    pytest.param(["--devices", "cpu@x"], ("'cpu@x'",), None, id="devices-cpu@x"),
    pytest.param(["--devices", "gpu"], ("'gpu'",), None, id="devices-gpu"),
    # one worker on two cores or two workers? refused, with both spellings (it once ran ddp on 1 worker)
    pytest.param(["--strategy", "ddp", "--devices", "cpu@0,1"],
                 ("'cpu@0,1'", "cpu@0,cpu@1 for two workers", "cpu@0-1 or cpu@0+1 for one worker"), None,
                 id="devices-comma-inside-a-device"),
    pytest.param(["--devices", "cpu@3-1"], ("'cpu@3-1'",), None, id="devices-backwards-range"),
    pytest.param(["--devices", ","], ("--devices ','",), None, id="devices-empty-element"),
    pytest.param(["--devices", "cuda:x"], ("'cuda:x'",), None, id="devices-cuda:x"),
    pytest.param(["--devices", "cpu@999"], ("cpu@999", "core 999"), None, id="devices-core-outside-mask"),
    pytest.param(["--devices", "cuda"], ("cuda requested",), None, marks=NO_CUDA, id="devices-cuda-missing"),
    pytest.param(["--devices", "cuda:1"], ("cuda:1",), None, marks=NO_CUDA, id="devices-cuda:1-missing"),
    pytest.param(["--kernels", "1,8", *TWO_CPUS], ("1 kernels for 2 workers",), None,
                 id="more-devices-than-kernels"),
    pytest.param(["--model", "resnet"], ("'resnet'",), None, id="unknown-model"),
    pytest.param(["--model", "resnet18"], ("--kernels 4,8",), None, id="resnet-takes-one-width"),
    pytest.param(["--model", "no_such_module_q:net"], ("'no_such_module_q:net'",), None, id="factory-import"),
    pytest.param(["--model", "factory_models:missing"], ("'factory_models:missing'",), None,
                 id="factory-missing-attribute"),
    pytest.param(["--dataset", "folder", "--data-dir", "{tmp}/nowhere"], ("{tmp}/nowhere",), None,
                 id="folder-missing"),
    pytest.param(["--dataset", "folder", "--data-dir", "{tmp}"], ("{tmp}", "no class sub-folders"), None,
                 id="folder-no-classes"),
    pytest.param(["--dataset", "folder", "--data-dir", "{tmp}"], ("{tmp}/one/img_2.png",),
                 lambda tmp: _image_folder(tmp, corrupt="img_2.png"), id="folder-corrupt-image"),
    _nonpositive("--image-size", "0"),
    pytest.param(["--dataset", "imagenet"], ("'imagenet'",), None, id="unknown-dataset"),
    pytest.param(["--kernels", "4,8,16"], ("--kernels 4,8,16",), None, id="kernels-count"),
    pytest.param(["--synthetic-shape", "1,8,8"], ("8x8",), None, id="input-too-small"),
    _nonpositive("--batch-size", "0"),
    _nonpositive("--epochs", "-1"),
    _nonpositive("--lr", "0"),
    _nonpositive("--threads", "0"),
    _nonpositive("--max-steps", "0"),
    _nonpositive("--synthetic-size", "0"),
    _nonpositive("--kernels", "0,4"),
    pytest.param(["--shares", "1,1,1", *TWO_CPUS], ("--shares 1,1,1", "2 workers"), None, id="shares-count"),
    # --memory-format auto profiles the job before its plan is built: these are refused before that profile
    pytest.param(["--shares", "1,1,1", "--memory-format", "auto", *TWO_CPUS], ("--shares 1,1,1", "2 workers"), None,
                 id="shares-count-before-profile"),
    pytest.param(["--shares", "a,b"], ("--shares", "'a,b'"), None, id="shares-not-numbers"),
    pytest.param(["--shares=-1,1"], ("--shares", "'-1,1'"), None, id="shares-negative-attached"),
    pytest.param(["--shares", "-1,1"], ("--shares", "-1,1"), None, id="shares-negative-separate"),
    pytest.param(["--dataset", "cifar10", "--data-dir", "{tmp}"], ("{tmp}",), None, id="cifar-missing"),
    pytest.param(["--dataset", "cifar10", "--data-dir", "{tmp}"],
                 ("{tmp}/cifar-10-batches-py/data_batch_1",), _corrupt_cifar, id="cifar-corrupt"),
    pytest.param(["--resume"], ("--resume", "--checkpoint-dir"), None, id="resume-without-dir"),
    pytest.param(["--shares", "auto", "--strategy", "single"], ("--shares auto", "single"), None,
                 id="shares-auto-single"),
    pytest.param(["--shares", "1,0", "--strategy", "ddp", *TWO_CPUS], ("--shares 1,0", "above 0"), None,
                 id="shares-ddp-zero"),
    pytest.param(["--shares", "1,0", "--strategy", "ddp", "--memory-format", "auto", *TWO_CPUS],
                 ("--shares 1,0", "above 0"), None, id="shares-ddp-zero-before-profile"),
    pytest.param(["--strategy", "auto", "--shares", "2,1"], ("--strategy auto",), None, id="auto-with-weights"),
    pytest.param(["--rebalance", "sometimes"], ("--rebalance", "'sometimes'"), None, id="rebalance-mode"),
    pytest.param(["--rebalance", "auto", "--strategy", "ddp"], ("--rebalance auto", "ddp"), None,
                 id="rebalance-ddp"),
    pytest.param(["--shares", "auto", "--profile", "{tmp}/profile.json"], ("{tmp}/profile.json",),
                 lambda tmp: (tmp / "profile.json").write_text("{not json"), id="profile-corrupt"),
]


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a config gets past validation: training must not start."""
    def refuse(*args, **kwargs):
        pytest.fail("the bad input passed validation and training started")
    monkeypatch.setattr(cli.job, "torchrun_worker", refuse)
    monkeypatch.setattr(local, "train_worker", refuse)
    monkeypatch.setattr(launch, "launch_local", refuse)


@pytest.fixture
def restore_process_state():
    """Undo what an in-process ``train_worker`` changes: root logging and torch threads."""
    root = logging.getLogger()
    handlers, level, threads = root.handlers[:], root.level, torch.get_num_threads()
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    torch.set_num_threads(threads)


@pytest.mark.parametrize(("args", "needles", "prepare"), BAD_INPUT)
def test_bad_input_exits_2_with_one_line(
    args: list[str], needles: tuple[str, ...], prepare: Callable[[Path], None] | None,
    tmp_path: Path, capsys: pytest.CaptureFixture, no_training: None,
) -> None:
    """Each bad value is refused before any worker starts: code 2, one line naming it."""
    if prepare is not None:
        prepare(tmp_path)
    fill = lambda text: text.replace("{tmp}", str(tmp_path))  # noqa: E731
    code = _main_exit_code(["train", *TINY, *map(fill, args)])
    assert code == 2
    _assert_one_line_error(capsys.readouterr().err, *map(fill, needles))


def test_corrupt_checkpoint_exits_2_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture, restore_process_state: None,
) -> None:
    """A garbage checkpoint.pt with --resume is read by the worker: code 2, one line naming it.

    One unpinned worker (``--devices cpu``) runs in this process, so the real
    loading path is exercised without spawning or pinning pytest to a core.
    """
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(GARBAGE)
    code = _main_exit_code(["train", *TINY, "--devices", "cpu", "--checkpoint-dir", str(tmp_path), "--resume"])
    assert code == 2
    _assert_one_line_error(capsys.readouterr().err, str(path), "choose another --checkpoint-dir")


def test_ctrl_c_names_the_last_checkpoint_and_the_command_that_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Interrupted with a checkpoint in --checkpoint-dir: exit 130, and one line giving the
    checkpoint's path and this command line with --resume; without one, only 'interrupted'."""
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli.train, "run", interrupt)
    argv = ["train", *TINY, "--devices", "cpu", "--checkpoint-dir", str(tmp_path / "my run")]
    assert _main_exit_code(argv) == 130
    assert capsys.readouterr().err == "convshard: interrupted\n"
    (tmp_path / "my run").mkdir()
    (tmp_path / "my run" / "checkpoint.pt").write_bytes(b"saved")
    assert _main_exit_code(argv) == 130
    again = " ".join(argv).replace(str(tmp_path / "my run"), f"'{tmp_path / 'my run'}'")
    _assert_one_line_error(capsys.readouterr().err, f"the last checkpoint is {tmp_path / 'my run' / 'checkpoint.pt'}",
                           f"resume with: convshard {again} --resume")


@pytest.mark.parametrize("command", [["evaluate"], ["predict", "x.png"]])
def test_corrupt_checkpoint_read_by_evaluate_or_predict_names_their_flag(
    command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture,
) -> None:
    """evaluate and predict take --checkpoint, not --checkpoint-dir: the remedy names the flag they have."""
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(GARBAGE)
    assert _main_exit_code([command[0], "--checkpoint", str(tmp_path), *command[1:]]) == 2
    err = capsys.readouterr().err
    _assert_one_line_error(err, str(path), "choose another --checkpoint")
    assert "--checkpoint-dir" not in err


def test_bad_devices_end_to_end() -> None:
    """The real command: a bad --devices exits 2 with one stderr line and no traceback."""
    result = _run_convshard("train", *TINY, "--devices", "cpu@x")
    assert result.returncode == 2
    _assert_one_line_error(result.stderr, "'cpu@x'")


def test_validation_error_end_to_end_is_one_line_without_quiet() -> None:
    """The real command without --quiet: an error found after validate() loaded the
    dataset is still one line (loading logs nothing at INFO level)."""
    loud = [arg for arg in TINY if arg != "--quiet"]
    result = _run_convshard("train", *loud, "--kernels", "1,8", *TWO_CPUS)
    assert result.returncode == 2
    _assert_one_line_error(result.stderr, "1 kernels for 2 workers")


def test_help_mentions_torchrun_and_device_grammar() -> None:
    """``convshard train --help`` exits 0 and documents torchrun and the --devices grammar."""
    result = _run_convshard("train", "--help")
    assert result.returncode == 0, result.stderr
    for needle in ("torchrun", "--devices", "cpu@N", "cpu@N-M", "cuda:N"):
        assert needle in result.stdout


# strategy -> (world size, devices in the metrics); all run TINY on TWO_CPUS with one thread each.
STRATEGY_EXPECTATIONS = {
    "kernel": (2, ["cpu@0", "cpu@1"]),
    "ddp": (2, ["cpu@0", "cpu@1"]),
    "ddp --shares 3,1": (2, ["cpu@0", "cpu@1"]),  # DDP's batch split 12 + 4: the same model
    "single": (1, ["cpu@0"]),
}
TINY_KERNELS = (4, 8)


@pytest.fixture(scope="module")
def strategy_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, str, dict | None]]:
    """Run the tiny job once per strategy; strategy -> (exit code, stderr, metrics or None)."""
    out = tmp_path_factory.mktemp("metrics")
    runs = {}
    for strategy in STRATEGY_EXPECTATIONS:
        path = out / f"{strategy.replace(' ', '_')}.json"
        result = _run_convshard("train", *TINY, *TWO_CPUS, "--threads", "1", "--strategy", *strategy.split(),
                                "--metrics-out", str(path))
        runs[strategy] = (result.returncode, result.stderr, json.loads(path.read_text()) if path.exists() else None)
    return runs


@pytest.mark.parametrize("strategy", STRATEGY_EXPECTATIONS)
def test_strategy_trains_and_writes_metrics(strategy: str, strategy_runs: dict) -> None:
    """Each strategy exits 0 and writes a complete --metrics-out JSON."""
    code, stderr, metrics = strategy_runs[strategy]
    assert code == 0, stderr
    assert metrics is not None, "no metrics JSON written"
    world, devices = STRATEGY_EXPECTATIONS[strategy]
    # the share of the 16 synthetic test images (64 // 4) that the final model classifies right
    assert metrics["test_accuracy"] * 16 == round(metrics["test_accuracy"] * 16)
    assert metrics["test_accuracy"] == metrics["history"][-1]["test_accuracy"]
    assert metrics["train_loss"] > 0
    assert metrics["epochs"] >= 0
    assert metrics["steps"] == 2
    assert metrics["mean_step_seconds"] > 0 and metrics["images_per_second"] > 0
    assert metrics["world_size"] == world
    assert metrics["devices"] == devices
    assert metrics["strategy"] == strategy.split()[0]
    if metrics["job_plan"]["engine"] == "sharded":  # kernels per rank of every group, as the plan splits them
        counts = list(metrics["shares"].values())
        assert [len(c) for c in counts] == [world] * len(TINY_KERNELS)
        assert [sum(c) for c in counts] == list(TINY_KERNELS)
    else:  # DDP holds every kernel on every rank
        assert metrics["shares"] == {} and metrics["job_plan"]["rows"] == ([12, 4] if "3,1" in strategy else [8, 8])


def test_strategies_agree_on_train_loss(strategy_runs: dict) -> None:
    """kernel, ddp and single train the same model from one seed: losses agree to float rounding."""
    losses = {s: metrics["train_loss"] for s, (code, _, metrics) in strategy_runs.items() if code == 0 and metrics}
    assert set(losses) == set(STRATEGY_EXPECTATIONS), "a strategy run failed"
    reference = losses["single"]
    for strategy, loss in losses.items():
        assert abs(loss - reference) / abs(reference) < 1e-4, losses


# --- models, the folder dataset, augmentation ----------------------------------


@pytest.mark.parametrize(("model", "needle"), [
    ("factory_models:not_a_module", "returned str, not a torch.nn.Module"),
    ("factory_models:raises", "raised RuntimeError"),
])
def test_bad_factory_exits_2_with_one_line(model: str, needle: str, capsys: pytest.CaptureFixture,
                                           no_training: None) -> None:
    tiny = [arg for arg in TINY if arg not in ("--kernels", "4,8")]
    assert _main_exit_code(["train", *tiny, "--model", model]) == 2
    _assert_one_line_error(capsys.readouterr().err, f"'{model}'", needle)


@pytest.mark.parametrize(("args", "raised_in", "needle"), [
    (["--model", "factory_models:raises"], "factory_models.py", "raised RuntimeError"),
    (["--dataset", "folder", "--data-dir", "{tmp}"], "folder.py", "{tmp}/one/img_2.png"),
])
def test_verbose_shows_the_traceback_behind_the_one_line_error(
    args: list[str], raised_in: str, needle: str, tmp_path: Path, capsys: pytest.CaptureFixture,
    no_training: None,
) -> None:
    """-v prints what the user's factory or data raised (its traceback, down to the
    file that raised) before the same one-line error; without -v only that line."""
    _image_folder(tmp_path, corrupt="img_2.png")
    tiny = [arg for arg in TINY if arg not in ("--kernels", "4,8")]
    argv = ["train", *tiny, *(a.replace("{tmp}", str(tmp_path)) for a in args)]
    needle = needle.replace("{tmp}", str(tmp_path))
    assert _main_exit_code(argv) == 2
    plain = capsys.readouterr().err
    _assert_one_line_error(plain, needle)
    assert _main_exit_code([*argv, "-v"]) == 2
    err = capsys.readouterr().err
    lines = err.rstrip().splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert raised_in in err
    assert lines[-1] == plain.strip()


@pytest.mark.parametrize(("content", "needle"), [
    (None, "No such file"),
    ("not json", "Expecting value"),
    ('{"job_plan": {"strategy": "fastest"}}', "it names no strategy (one of kernel, single, ddp, layers); "
                                              "got 'fastest'"),
    ('[1, 2]', "not a plan (a plan file holds a run's metrics JSON"),
])
def test_bad_plan_file_exits_2_with_one_line(content: str | None, needle: str, tmp_path: Path,
                                             capsys: pytest.CaptureFixture, no_training: None) -> None:
    path = tmp_path / "plan.json"
    if content is not None:
        path.write_text(content)
    assert _main_exit_code(["train", *TINY, "--plan", str(path)]) == 2
    _assert_one_line_error(capsys.readouterr().err, needle)


def test_help_lists_models_factories_folder_and_augment(capsys: pytest.CaptureFixture) -> None:
    assert _main_exit_code(["train", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for needle in ("resnet18, resnet34, resnet50, vgg11, vgg16", "package.module:function", "base width",
                   "folder", "--image-size", "--augment", "horizontal flip"):
        assert needle in text


@pytest.mark.parametrize("job", [
    ["--model", "factory_models:se_depthwise_net", "--dataset", "synthetic", "--synthetic-shape", "3,16,16"],
    ["--dataset", "folder", "--data-dir", "{tmp}", "--image-size", "16", "--kernels", "4,8", "--augment"],
], ids=["factory", "folder"])
def test_factory_model_and_folder_dataset_train(job: list[str], tmp_path: Path, restore_process_state: None) -> None:
    """One unpinned worker in this process: a user's model, a user's images."""
    _image_folder(tmp_path)
    path = tmp_path / "metrics.json"
    argv = ["train", *(arg.replace("{tmp}", str(tmp_path)) for arg in job), "--synthetic-size", "32",
            "--batch-size", "4", "--max-steps", "2", "--devices", "cpu", "--strategy", "single", "--quiet",
            "--metrics-out", str(path)]
    assert _main_exit_code(argv) == 0
    metrics = json.loads(path.read_text())
    assert metrics["steps"] == 2 and metrics["train_loss"] > 0


@pytest.fixture(scope="module")
def augmented_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """(model, strategy) -> metrics of 2 steps with --augment on two workers: the paper's
    CNN under single and ddp (no BatchNorm, so DDP trains the same model), ResNet-18
    of base width 4 under single and kernel."""
    out = tmp_path_factory.mktemp("augmented")
    resnet = ["--model", "resnet18", "--kernels", "4", "--synthetic-shape", "3,16,16", "--batch-size", "8"]
    jobs = {("paper", "single"): [], ("paper", "ddp"): [], ("resnet18", "single"): resnet,
            ("resnet18", "kernel"): resnet}
    runs = {}
    for (model, strategy), extra in jobs.items():
        path = out / f"{model}-{strategy}.json"
        result = _run_convshard("train", *TINY, *TWO_CPUS, "--threads", "1", "--strategy", strategy, "--augment",
                                *extra, "--metrics-out", str(path))
        assert result.returncode == 0, result.stderr
        runs[model, strategy] = json.loads(path.read_text())
    return runs


@pytest.mark.parametrize(("model", "other"), [("paper", "ddp"), ("resnet18", "kernel")])
def test_augmented_strategies_agree(model: str, other: str, augmented_runs: dict) -> None:
    """Every rank and strategy augments each global batch alike, so the losses agree to float rounding."""
    single, run = augmented_runs[model, "single"], augmented_runs[model, other]
    assert run["steps"] == single["steps"] == 2 and run["config"]["augment"] == ["crop", "flip"]
    assert abs(run["train_loss"] - single["train_loss"]) / single["train_loss"] < 1e-4


# --- the model meets the data: one image through it before any worker starts ---


def _tiny_without_kernels() -> list[str]:
    return [arg for arg in TINY if arg not in ("--kernels", "4,8")]


def test_model_with_wrong_output_size_exits_2_naming_the_shape(capsys: pytest.CaptureFixture,
                                                               no_training: None) -> None:
    """A factory whose logits do not match the classes (conv + flatten: 4 * 16 * 16 outputs for 10
    classes) is refused by validate: code 2, one line naming the model, the shape and the classes."""
    model = "factory_models:no_classifier"
    assert _main_exit_code(["train", *_tiny_without_kernels(), "--model", model]) == 2
    _assert_one_line_error(capsys.readouterr().err, f"'{model}'", "shape (1, 1024)", "10 classes")


def test_model_that_fails_on_the_data_exits_2_naming_the_input(capsys: pytest.CaptureFixture,
                                                              no_training: None) -> None:
    """A model built for 1-channel images, fed 3-channel ones: code 2, one line naming the model,
    the input shape and the exception."""
    model = "factory_models:takes_nothing"
    argv = ["train", *_tiny_without_kernels(), "--model", model, "--synthetic-shape", "3,16,16"]
    assert _main_exit_code(argv) == 2
    _assert_one_line_error(capsys.readouterr().err, f"'{model}'", "input of shape (1, 3, 16, 16)", "RuntimeError")


@pytest.mark.parametrize(("strategy", "warned"), [("kernel", True), ("ddp", False)])
def test_model_without_convs_warns_that_nothing_is_sharded(strategy: str, warned: bool,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    """A conv-less model under --strategy kernel validates with one warning line
    suggesting single or ddp; under ddp, which splits the batch, it says nothing."""
    argv = ["train", *_tiny_without_kernels(), *TWO_CPUS, "--model", "factory_models:mlp", "--strategy", strategy]
    config = cli.config_from_args(cli.build_parser().parse_args(argv))
    with caplog.at_level(logging.WARNING, logger="convshard"):
        cli.validate(config)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if not warned:
        assert warnings == []
        return
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    for needle in ("'factory_models:mlp'", "no conv layers", "nothing is sharded", "--strategy single or ddp"):
        assert needle in warnings[0]
