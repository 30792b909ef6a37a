"""What rank 0 records of a run as it goes: ``--log-dir``'s CSV files and TensorBoard events.

``steps.csv`` has one row per optimizer step: step (1-based), epoch
(1-based), loss (the mean over the images rank 0 fed: the global batch,
or under DDP its own rows), lr, ms (the step's wall time) and
images_per_s (the global batch over that time). ``epochs.csv`` has one row
per epoch: epoch, step, train_loss, test_accuracy, seconds. A resumed run
appends to both, after dropping the rows past the checkpoint it resumed
from: the steps after its step, and the row of an epoch it had not finished
(a run stopped mid-epoch by ``--max-steps`` wrote one), which the resumed
run writes again when it ends that epoch; so each epoch has one row. When the ``tensorboard`` package is installed (``pip
install convshard[tensorboard]``) the same values go to TensorBoard event
files in the same directory, under train/loss, train/lr, train/images_per_s,
epoch/train_loss and epoch/test_accuracy.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .. import atomic

STEP_FIELDS = ("step", "epoch", "loss", "lr", "ms", "images_per_s")
EPOCH_FIELDS = ("epoch", "step", "train_loss", "test_accuracy", "seconds")


class Logbook:
    """The CSV files (and TensorBoard writer) of one run in ``directory``."""

    def __init__(self, directory: str | os.PathLike, *, resumed: Mapping[str, int] | None = None) -> None:
        """``resumed``: the progress (``epoch``: epochs finished, ``step``) of
        the checkpoint a resumed run starts from; rows past it are dropped."""
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        if resumed is not None:
            self._drop("steps.csv", lambda row: int(row["step"]) > resumed["step"])
            self._drop("epochs.csv", lambda row: int(row["epoch"]) > resumed["epoch"])
        self._steps, self._step_rows = self._open("steps.csv", STEP_FIELDS)
        self._epochs, self._epoch_rows = self._open("epochs.csv", EPOCH_FIELDS)
        self._board = None
        if importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._board = SummaryWriter(str(self.directory))

    def _drop(self, name: str, past: Callable[[dict[str, str]], bool]) -> None:
        """Rewrite ``name`` (atomically) without the rows that are ``past`` the resume point."""
        path = self.directory / name
        if not path.exists() or path.stat().st_size == 0:
            return
        with open(path, newline="") as file:
            reader = csv.DictReader(file)
            fields, rows = reader.fieldnames or [], list(reader)
        kept = [row for row in rows if not past(row)]
        if len(kept) == len(rows):
            return
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=fields)
        writer.writeheader()
        writer.writerows(kept)
        atomic.write_text(path, text.getvalue())

    def _open(self, name: str, fields: tuple[str, ...]) -> tuple[Any, csv.DictWriter]:
        path = self.directory / name
        new = not path.exists() or path.stat().st_size == 0
        file = open(path, "a", newline="")  # noqa: SIM115 (kept open for the run; close() closes it)
        writer = csv.DictWriter(file, fieldnames=fields)
        if new:
            writer.writeheader()
        return file, writer

    def step(self, *, step: int, epoch: int, loss: float, lr: float, seconds: float, images: int) -> None:
        """Record optimizer step ``step`` (1-based) of ``epoch`` (1-based)."""
        rate = images / seconds if seconds > 0 else 0.0
        self._step_rows.writerow({"step": step, "epoch": epoch, "loss": f"{loss:.6g}", "lr": f"{lr:.6g}",
                                  "ms": f"{1000 * seconds:.3f}", "images_per_s": f"{rate:.1f}"})
        if self._board is not None:
            for tag, value in (("train/loss", loss), ("train/lr", lr), ("train/images_per_s", rate)):
                self._board.add_scalar(tag, value, step)

    def epoch(self, *, epoch: int, step: int, train_loss: float, test_accuracy: float, seconds: float) -> None:
        """Record the end of ``epoch`` (1-based) at optimizer step ``step``."""
        self._epoch_rows.writerow({"epoch": epoch, "step": step, "train_loss": f"{train_loss:.6g}",
                                   "test_accuracy": f"{test_accuracy:.6g}", "seconds": f"{seconds:.3f}"})
        self._epochs.flush()
        self._steps.flush()
        if self._board is not None:
            self._board.add_scalar("epoch/train_loss", train_loss, step)
            self._board.add_scalar("epoch/test_accuracy", test_accuracy, step)
            self._board.flush()

    def close(self) -> None:
        self._steps.close()
        self._epochs.close()
        if self._board is not None:
            self._board.close()
