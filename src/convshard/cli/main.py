"""The dispatcher: every command's sub-parser, and ``main``, which runs the
chosen command's handler and turns its errors into exit codes."""

from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import sys
import traceback
from collections.abc import Sequence

from .. import __version__
from ..errors import ConfigError, TrainingError
from ..run import checkpoint, launch
from ..run.config import TrainConfig
from . import bench, download, export, inference, plan, report, train
from .options import Parser


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="convshard", description=(
        "Train CNNs on every device at once: each conv layer's kernels are split "
        "across worker processes (CPU cores, GPUs, hosts), the rest runs replicated."))
    parser.add_argument("--version", action="version", version=f"convshard {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    d = TrainConfig()
    train.add_parser(sub, d)
    plan.add_parsers(sub, d)
    bench.add_parser(sub, d)
    report.add_parser(sub, d)
    inference.add_parsers(sub, d)
    export.add_parser(sub, d)
    download.add_parser(sub, d)
    return parser


LIST_OPTIONS = ("--shares", "--kernels", "--synthetic-shape")


def _keep_negative_lists(argv: Sequence[str]) -> list[str]:
    """argparse reads a value such as '-1,1' as an option; bind it to its flag
    (``--shares=-1,1``) so that the value's own check names it."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1] in LIST_OPTIONS and re.fullmatch(r"-[\d.,-]+", arg):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(_keep_negative_lists(argv))
    quiet, verbose = getattr(args, "quiet", False), getattr(args, "verbose", False)
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(message)s")
    try:
        args.handler(args)
    except ConfigError as exc:
        if verbose and exc.__cause__ is not None:  # what the user's model or data raised, where it raised it
            traceback.print_exception(exc.__cause__, file=sys.stderr)
        print(f"convshard: error: {exc}", file=sys.stderr)
        return 2
    except launch.WorkerFailed as exc:
        if exc.details:
            print(exc.details.rstrip(), file=sys.stderr)
        print(f"convshard: error: {exc}", file=sys.stderr)
        return 1
    except TrainingError as exc:
        print(f"convshard: error: {exc}", file=sys.stderr)
        return exc.exit_code  # 143 for a run a SIGTERM stopped (``run.saving``), as a process a SIGTERM ended
    except KeyboardInterrupt:
        print(f"convshard: interrupted{_resumable(args, argv)}", file=sys.stderr)
        return 130
    return 0


def _resumable(args: argparse.Namespace, argv: Sequence[str]) -> str:
    """For an interrupted run with a checkpoint in its ``--checkpoint-dir``:
    where that checkpoint is and the command line that resumes from it."""
    directory = getattr(args, "checkpoint_dir", None)
    if directory is None or not checkpoint.path_in(directory).is_file():
        return ""
    again = [*argv, *([] if "--resume" in argv else ["--resume"])]
    return (f"; the last checkpoint is {checkpoint.path_in(directory)}, resume with: "
            f"convshard {shlex.join(again)}")


def entry() -> None:
    """The ``convshard`` command. A torchrun worker leaves through
    ``launch.hard_exit``, like a worker of the local launcher."""
    try:
        code = main()
    except BrokenPipeError:  # the reader left (``convshard plan | head``): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 1
    if launch.in_torchrun():
        launch.hard_exit(code)
    sys.exit(code)
