"""``convshard report``: where a run's time went per device, a table and a timeline PNG."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import ConfigError
from ..run.config import TrainConfig
from ..tools import report
from .options import positive


def add_parser(sub: argparse._SubParsersAction, d: TrainConfig) -> None:
    """The ``report`` sub-parser."""
    r = sub.add_parser("report", help="where a run's time went per device: a table and a timeline PNG",
                       description="Read a run's --metrics-out JSON; print per device the mean compute, "
                                   "transfer and wait per step, and draw the last steps as a timeline, and "
                                   "the last step's collectives beside the compute (RUN-transfers.png).")
    r.add_argument("metrics", metavar="RUN.json", help="the metrics JSON of a run")
    r.add_argument("--png", metavar="PATH", help="where to draw the timeline (default: RUN.png beside RUN.json)")
    r.add_argument("--steps", metavar="N", type=positive(int, "--steps"), default=10,
                   help="steps to draw (default: %(default)s)")
    r.set_defaults(handler=_report)


def _report(args: argparse.Namespace) -> None:
    """The run's table per device, then its last ``--steps`` steps drawn as a timeline."""
    metrics_path, png, steps = args.metrics, args.png, args.steps
    try:
        metrics = json.loads(Path(metrics_path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read metrics {metrics_path}: {exc}") from None
    print(report.format_report(metrics))
    png = Path(png) if png else Path(metrics_path).with_suffix(".png")
    print(f"timeline: {report.draw_timeline(metrics, png, steps=steps)}")
    drawn = report.draw_transfers(metrics, png.with_name(f"{png.stem}-transfers.png"))
    if drawn is not None:
        print(f"collectives of the last step: {drawn}")
