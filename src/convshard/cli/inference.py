"""``convshard evaluate`` and ``convshard predict``: a checkpoint's model on one device."""

from __future__ import annotations

import argparse

import torch

from .. import data, loader
from ..run import checkpoint, inference
from ..run.config import TrainConfig
from .options import fraction, positive

CHECKPOINT_OPTION = {"metavar": "PATH", "required": True,  # evaluate and predict read one checkpoint
                     "help": "a --checkpoint-dir (its checkpoint.pt) or a checkpoint file (best.pt, ...)"}


def add_parsers(sub: argparse._SubParsersAction, d: TrainConfig) -> None:
    """The ``evaluate`` and ``predict`` sub-parsers."""
    e = sub.add_parser("evaluate", help="a checkpoint's accuracy, per-class accuracy and confusion matrix",
                       description="Rebuild a checkpoint's model on one device and evaluate it on the test "
                                   "images of a dataset (default: the one it was trained on).")
    e.add_argument("--checkpoint", **CHECKPOINT_OPTION)
    e.add_argument("--dataset", choices=data.DATASETS, help="(default: the checkpoint's)")
    e.add_argument("--data-dir", metavar="DIR",
                   help="folder: class sub-folders (or train/ and val/), matched to the model's classes by name; "
                        "cifar10: the archive (default: the checkpoint's)")
    e.add_argument("--val-fraction", metavar="F", type=fraction("--val-fraction"),
                   help="folder without val/: the share of each class evaluated (default: the checkpoint's)")
    e.add_argument("--batch-size", metavar="N", type=positive(int, "--batch-size"), default=d.batch_size,
                   help="(default: %(default)s)")
    e.set_defaults(handler=_evaluate)

    pr = sub.add_parser("predict", help="class and probability of image files, from a checkpoint",
                        description="Rebuild a checkpoint's model on one device and print, for each image "
                                    "file, the class it predicts and that class's probability.")
    pr.add_argument("--checkpoint", **CHECKPOINT_OPTION)
    pr.add_argument("images", metavar="IMAGE", nargs="+", help="image files Pillow reads")
    pr.set_defaults(handler=_predict)


def _evaluate(args: argparse.Namespace) -> None:
    """``convshard evaluate``: the checkpoint's model on the test images of its dataset, or of the one given."""
    payload = checkpoint.read_checkpoint(args.checkpoint)
    model, info = inference.from_checkpoint(payload, args.checkpoint)
    dataset = inference.test_data(payload, info, dataset=args.dataset, data_dir=args.data_dir,
                                  val_fraction=args.val_fraction)
    labels = inference.labels_in(dataset, info)  # (N,) the model's class of each test image
    read = loader.TestBatches(dataset, range(len(labels)), args.batch_size,
                              loader.default_workers(dataset, torch.device("cpu")))
    batches = ((x, labels[i * args.batch_size:i * args.batch_size + len(x)]) for i, (x, _) in enumerate(read))
    confusion = inference.evaluate(model, batches, classes=len(info.class_names))
    print(f"{args.checkpoint}: --model {info.model} on {dataset.name}, {len(labels)} test images")
    print(inference.format_evaluation(confusion, info.class_names))


def _predict(args: argparse.Namespace) -> None:
    """``convshard predict``: each image's most probable class and its probability."""
    path, images = args.checkpoint, args.images
    model, info = inference.load(path)
    probabilities = inference.predict(model, inference.images(images, info))
    best, index = probabilities.max(1)
    width, names = max(len(str(p)) for p in images), max(len(n) for n in info.class_names)
    for image, p, i in zip(images, best.tolist(), index.tolist()):
        print(f"{image:<{width}}  {info.class_names[i]:<{names}}  {p:.4f}")
