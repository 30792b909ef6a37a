"""``convshard export``: a checkpoint's model as a file plain torch (or an ONNX runtime) runs."""

from __future__ import annotations

import argparse
import logging

from ..run import export
from ..run.config import TrainConfig
from .inference import CHECKPOINT_OPTION

log = logging.getLogger("convshard")


def add_parser(sub: argparse._SubParsersAction, d: TrainConfig) -> None:
    """The ``export`` sub-parser."""
    ex = sub.add_parser(
        "export", help="write a checkpoint's model as a torch.export program (or ONNX) for use without convshard",
        description="Rebuild a checkpoint's model on one device and write it for people who never install "
                    "convshard: a torch.export program (load it with torch.export.load(OUT).module()) or, "
                    "with --format onnx, an ONNX model. Either maps normalised (N, C, H, W) float32 images "
                    "to (N, classes) logits. Beside it, OUT with the suffix .json holds the input shape, "
                    "the class names and the normalisation: a pixel p in [0, 1] enters as (p - mean) / std.")
    ex.add_argument("--checkpoint", **CHECKPOINT_OPTION)
    ex.add_argument("--out", metavar="FILE", required=True,
                    help="the program to write (e.g. model.pt2); its spec goes to FILE with the suffix .json")
    ex.add_argument("--format", choices=export.FORMATS, default="torch",
                    help="torch: a torch.export program (torch.export.save); onnx: an ONNX model, input "
                         "'images', output 'logits', which needs pip install 'convshard[onnx]' "
                         "(default: %(default)s)")
    ex.set_defaults(handler=_export)


def _export(args: argparse.Namespace) -> None:
    """``convshard export``: the program and its spec, each path logged."""
    program, spec = export.export(args.checkpoint, args.out, args.format)
    log.info("wrote %s (%s) and its spec %s", program, args.format, spec)
