"""Logs that read anywhere: a bar in a terminal, timestamped lines elsewhere, --quiet, --log-dir, --version;
the report's curves and DDP's all-reduce time."""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios

import pytest
from helpers import child_env

from convshard import __version__
from convshard.cli import main
from convshard.run.logbook import Logbook

TINY = ["--dataset", "synthetic", "--synthetic-shape", "1,16,16", "--synthetic-size", "64", "--kernels", "4,8",
        "--batch-size", "8", "--threads", "1", "--devices", "cpu@0", "--seed", "0"]
STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d "


def _convshard(*args: str, stderr=subprocess.PIPE) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "convshard", *args], env=child_env(), stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=stderr, text=True, timeout=300, check=True)


def test_outside_a_terminal_a_timestamped_line_every_n_steps_and_per_epoch():
    done = _convshard("train", *TINY, "--epochs", "2", "--log-every", "3")
    assert "\r" not in done.stderr
    steps = [line for line in done.stderr.splitlines() if re.fullmatch(STAMP + r"step \d+/16 .*", line)]
    assert [int(re.search(r"step (\d+)/", line).group(1)) for line in steps] == [3, 6, 9, 12, 15]
    assert re.fullmatch(STAMP + r"step 3/16 \(epoch 1/2\): loss \d+\.\d{4}, lr [\d.e-]+, [\d.]+ ms/step, "
                                r"[\d.]+ images/s", steps[0])
    epochs = [line for line in done.stderr.splitlines() if re.fullmatch(STAMP + r"epoch \d: train loss .*", line)]
    assert len(epochs) == 2
    assert re.fullmatch(r"test accuracy \d\.\d{4} \| train loss \d\.\d{4} \| [\d.]+ ms/step \| [\d.]+ images/s \| "
                        r"[\d.]+ s\n", done.stdout)


def test_the_opening_line_says_precision_and_memory_format_when_not_the_default():
    """bf16 and channels_last change the run's numbers and speed: its first line says
    so; a float32, contiguous run's line says neither."""
    plain = _convshard("train", *TINY, "--max-steps", "1").stderr
    assert re.search(r"single: 1 worker\(s\) on cpu@0 \(rank 0: 1 thread\(s\)\)\n", plain), plain
    done = _convshard("train", *TINY, "--max-steps", "1", "--precision", "bf16", "--memory-format", "channels_last")
    assert re.search(r"single: 1 worker\(s\) on cpu@0 \(rank 0: 1 thread\(s\), precision bf16, channels_last\)\n",
                     done.stderr), done.stderr


def test_quiet_keeps_only_the_final_summary():
    done = _convshard("train", *TINY, "--epochs", "1", "--quiet")
    assert done.stderr == "" and done.stdout.startswith("test accuracy ") and done.stdout.count("\n") == 1


def _in_terminal(columns: int, *args: str) -> tuple[str, subprocess.CompletedProcess]:
    """``convshard *args`` with stderr on a pseudo-terminal ``columns`` wide: what it drew there, and the run."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    try:
        done = _convshard(*args, stderr=follower)
        os.close(follower)
        follower = None
        drawn = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal closed: everything is read
                break
            if not chunk:
                break
            drawn += chunk
    finally:
        os.close(leader)
        if follower is not None:
            os.close(follower)
    return drawn.decode(errors="replace"), done


def test_in_a_terminal_the_progress_bar():
    text, done = _in_terminal(120, "train", *TINY, "--epochs", "1")
    assert re.search("\r(?!\n)", text) and "epoch 1/1:" in text and "step/s" in text  # tqdm redraws in place
    assert not re.search(STAMP + "step ", text)
    assert done.stdout.startswith("test accuracy ")


def test_a_terminal_zero_columns_wide_gets_the_timestamped_lines():
    """A bar has no room in zero columns (tqdm draws nothing there): the step lines
    of a log file are written instead, every --log-every steps."""
    text, done = _in_terminal(0, "train", *TINY, "--epochs", "1", "--log-every", "4")
    steps = [int(n) for n in re.findall(STAMP + r"step (\d+)/8 ", text)]
    assert steps == [4, 8] and "step/s" not in text, text
    assert done.stdout.startswith("test accuracy ")


def test_a_run_resumed_mid_epoch_logs_each_epoch_once(tmp_path):
    """--max-steps stops the first run in epoch 1 (step 5 of 8), which writes a
    partial row for it; the resumed run ends epoch 1 and writes its row: epochs.csv
    must then hold epochs 1 and 2 once each, at their last steps, and steps.csv
    every step once."""
    logs = tmp_path / "logs"
    job = ["train", *TINY, "--epochs", "2", "--checkpoint-dir", str(tmp_path / "ck"), "--checkpoint-every", "2",
           "--log-dir", str(logs), "--quiet"]
    _convshard(*job, "--max-steps", "5")
    assert [row.split(",")[:2] for row in (logs / "epochs.csv").read_text().split()[1:]] == [["1", "5"]]
    _convshard(*job, "--resume", "--metrics-out", str(tmp_path / "m.json"))
    assert [row.split(",")[:2] for row in (logs / "epochs.csv").read_text().split()[1:]] == [["1", "8"], ["2", "16"]]
    assert [int(row.split(",")[0]) for row in (logs / "steps.csv").read_text().split()[1:]] == list(range(1, 17))
    history = json.loads((tmp_path / "m.json").read_text())["history"]
    assert [(h["epoch"], h["steps"]) for h in history] == [(1, 8), (2, 16)]


def test_a_resumed_logbook_drops_the_rows_past_its_checkpoint(tmp_path):
    """A run that crashed at step 7 after a checkpoint at step 5 (epoch 1 finished at
    step 4): resumed from that checkpoint, steps 6-7 and epoch 2's partial row go."""
    book = Logbook(tmp_path)
    for step in range(1, 8):
        book.step(step=step, epoch=1 + (step > 4), loss=1.0, lr=0.1, seconds=0.01, images=8)
        if step in (4, 7):
            book.epoch(epoch=1 + (step > 4), step=step, train_loss=1.0, test_accuracy=0.5, seconds=1.0)
    book.close()
    Logbook(tmp_path, resumed={"epoch": 1, "step": 5}).close()
    assert [row.split(",")[0] for row in (tmp_path / "steps.csv").read_text().split()] == ["step", *"12345"]
    assert [row.split(",")[:2] for row in (tmp_path / "epochs.csv").read_text().split()[1:]] == [["1", "4"]]


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"convshard {__version__}\n"


def test_log_dir_tensorboard_events_when_installed(tmp_path):
    assert main(["train", *TINY, "--max-steps", "3", "--quiet", "--log-dir", str(tmp_path)]) == 0
    events = list(tmp_path.glob("events.out.tfevents.*"))
    assert (tmp_path / "steps.csv").read_text().count("\n") == 4  # header and 3 steps
    assert len(events) == (1 if importlib.util.find_spec("tensorboard") else 0)


def test_report_of_ddp_counts_its_all_reduce_and_draws_the_curves(tmp_path, capsys):
    out = tmp_path / "ddp.json"
    assert main(["train", *TINY, "--devices", "cpu@0,cpu@1", "--strategy", "ddp", "--max-steps", "4",
                 "--metrics-out", str(out), "--quiet"]) == 0
    metrics = json.loads(out.read_text())
    assert len(metrics["step_loss"]) == 4 and all(loss > 0 for loss in metrics["step_loss"])
    collective = metrics["timeline"]["collective_seconds"]
    assert all(0 < c <= s for cs, ss in zip(collective, metrics["timeline"]["step_seconds"]) for c, s in zip(cs, ss))
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.strip().startswith(("0 ", "1 "))]
    assert len(rows) == 2 and all(float(r[3]) > 0 for r in rows)  # transfer ms: the all-reduce, not 0
    assert (tmp_path / "ddp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
