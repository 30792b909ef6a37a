"""``convshard train``: its options, and the summary line its rank 0 prints."""

from __future__ import annotations

import argparse

from ..run.config import PLANNED, SCHEDULES, STRATEGIES, TrainConfig, load_data, with_saved_plan
from .job import config_from_args, run
from .options import (augment_list, fraction, job_options, memory_option, optimizer_options, positive, rebalance_mode,
                      share_weights)

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

devices (one worker each): cpu | cpu@N | cpu@N-M | cpu@N+M (a core set) | cuda | cuda:N
  cpu@0,cpu@1,cpu@1   three workers; the two on core 1 share it (speeds about 1, 1/2, 1/2)

several hosts: start one torchrun per host; --devices lists that host's devices,
one per local rank (LOCAL_RANK i uses the i-th), so --nproc-per-node must equal
their number:
  torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d \\
           --rdzv-endpoint HOST0:29500 -m convshard train --devices cpu@0,cpu@1
torch.distributed has no authentication: run it on a trusted network only.
"""


def add_parser(sub: argparse._SubParsersAction, d: TrainConfig) -> None:
    """The ``train`` sub-parser: the job's options, then strategy, training and output."""
    t = sub.add_parser("train", help="train a CNN with sharded conv kernels",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
                       description="Train a CNN; kernels of every conv layer split across --devices.")
    job_options(t, d)
    _strategy_options(t, d)
    _training_options(t, d)
    _output_options(t, d)
    t.set_defaults(handler=train)


def _strategy_options(t: argparse.ArgumentParser, d: TrainConfig) -> None:
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
    g.add_argument("--shares", metavar="W1,W2,...", type=share_weights, default=None,
                   help="kernel share per worker (with --strategy ddp: batch share): 'equal' (default), "
                        "'auto' (planned from a profile: a device that would slow the step gets no kernels; "
                        "ddp's batch split in proportion to each device's speed) or weights such as 2,1,1")
    g.add_argument("--plan", metavar="FILE",
                   help="run the plan saved in FILE: a run's metrics JSON (--metrics-out) or its 'job_plan' "
                        "entry alone; engine, devices, threads, batch size, kernels and rows per rank come from "
                        "it, and --strategy, --shares, --devices, --threads or --batch-size that differ are an "
                        "error")
    g.add_argument("--rebalance", metavar="MODE", type=rebalance_mode, default=d.rebalance,
                   help="re-split the kernels while training: off, auto (checked every 5 steps: when the cost "
                        "model predicts a new split cuts the step by 3%% or more) or N (every N steps) (default: "
                        "auto for a planned split, --shares auto or --strategy auto; off otherwise)")
    g.add_argument("--trials", metavar="N", type=_steps, default=d.trials,
                   help="steps of each of --strategy auto's trials, half of them warm-up; each trial starts its "
                        "own workers, and auto says before them what they will cost; 0: no trials, the plan "
                        "predicted fastest trains (default: %(default)s)")
    memory_option(g)


def _steps(text: str) -> int:
    """``--trials``: 0, or a count of at least 2 steps (half of them, rounded down, warm-up)."""
    if not text.isdigit() or int(text) == 1:
        raise argparse.ArgumentTypeError(f"--trials takes 0 (no trials) or a number of steps of at least 2, "
                                         f"got {text!r}")
    return int(text)


def _training_options(t: argparse.ArgumentParser, d: TrainConfig) -> None:
    g = t.add_argument_group("training")
    g.add_argument("--epochs", metavar="N", type=positive(int, "--epochs"), default=d.epochs, help="(default: %(default)s)")
    g.add_argument("--max-steps", metavar="N", type=positive(int, "--max-steps"),
                   help="stop after this many optimizer steps (for benchmarks)")
    optimizer_options(g, d)
    g.add_argument("--lr", metavar="LR", type=positive(float, "--lr"), default=d.lr, help="(default: %(default)s)")
    g.add_argument("--weight-decay", metavar="L", type=fraction("--weight-decay", below_one=False),
                   default=d.weight_decay,
                   help="weight decay of the conv kernels and linear weights (sgd, adam: L2 added to the gradient; "
                        "adamw: decoupled), not of biases or BatchNorm parameters (default: %(default)s)")
    g.add_argument("--decay-all", action="store_true", help="apply --weight-decay to biases and BatchNorm too")
    g.add_argument("--clip-grad-norm", metavar="N", type=positive(float, "--clip-grad-norm"),
                   help="scale the gradients so that the whole model's L2 norm is at most N (the same norm on "
                        "every worker, whatever the split)")
    g.add_argument("--label-smoothing", metavar="S", type=fraction("--label-smoothing"), default=d.label_smoothing,
                   help="cross-entropy against (1 - S) one-hot + S spread over the classes (default: %(default)s)")
    g.add_argument("--schedule", choices=SCHEDULES, default=d.schedule,
                   help="learning-rate schedule; cosine decays it to 0 over the run (default: %(default)s)")
    g.add_argument("--warmup-epochs", metavar="E", type=fraction("--warmup-epochs", below_one=False),
                   default=d.lr_warmup_epochs,
                   help="raise the learning rate linearly from lr/w to lr over the first E epochs (w steps, "
                        "fractions allowed), then follow --schedule over the rest (default: %(default)s)")
    g.add_argument("--augment", metavar="T1,T2", nargs="?", const="default", type=augment_list,
                   help="transforms of every training image, drawn from --seed, the epoch and the image, so every "
                        "worker, strategy and resumed run sees the same augmented batch: crop (random crop of the "
                        "image padded with ceil(side/8) black pixels: 4 at 28 and 32), flip (horizontal flip), "
                        "rotate (by up to 15 degrees either way), resized-crop (8-100%% of the area at aspect 3/4 to "
                        "4/3, resized to the image size), jitter (brightness, contrast, saturation by up to 40%%). "
                        "--augment alone: what suits the dataset: crop,rotate for mnist (a flipped digit is another "
                        "shape), crop,flip for cifar10 and synthetic, resized-crop,flip for photos (folder, "
                        "package.module:function)")
    g.add_argument("--workers", metavar="N", type=positive(int, "--workers", zero=True),
                   help="loader processes per worker that decode images (folder, package.module:function) while "
                        "the step computes; 0 decodes in the worker itself (default: 1 on a CPU device, whose "
                        "decode shares its cores, 4 on a GPU; none for data held in memory)")
    g.add_argument("--eval-every", metavar="N", type=positive(int, "--eval-every"),
                   help="also measure the test accuracy every N optimizer steps (and save a checkpoint there "
                        "with --checkpoint-dir; --keep-best keeps the best one) (default: at each epoch's end)")


def _output_options(t: argparse.ArgumentParser, d: TrainConfig) -> None:
    g = t.add_argument_group("output")
    g.add_argument("--metrics-out", metavar="PATH", help="write metrics JSON here")
    g.add_argument("--checkpoint-dir", metavar="DIR", help="save a checkpoint here after every epoch")
    g.add_argument("--checkpoint-every", metavar="N", type=positive(int, "--checkpoint-every"),
                   help="also save a checkpoint every N optimizer steps")
    g.add_argument("--checkpoint-every-seconds", metavar="T", type=positive(float, "--checkpoint-every-seconds"),
                   help="also save a checkpoint once T seconds passed since the last one. Checkpoints are written "
                        "in the background while training goes on; a SIGTERM (pre-emption, torchrun re-forming "
                        "the job) saves one at the end of the step in progress, then exits with code 143")
    g.add_argument("--resume", action="store_true", help="continue from the checkpoint in --checkpoint-dir")
    g.add_argument("--keep-last", metavar="N", type=positive(int, "--keep-last"),
                   help="also keep the checkpoints of the last N saves (checkpoint-<step>.pt)")
    g.add_argument("--keep-best", action="store_true",
                   help="also keep the checkpoint of the best test accuracy at an evaluation (best.pt): each "
                        "epoch's end, and every --eval-every steps")
    g.add_argument("--quiet", action="store_true", help="no progress; warnings, errors and the final summary only")
    g.add_argument("--log-every", metavar="N", type=positive(int, "--log-every"), default=d.log_every,
                   help="outside a terminal (a file, CI, a scheduler) one timestamped line every N steps "
                        "instead of the progress bar (default: %(default)s)")
    g.add_argument("--log-dir", metavar="DIR",
                   help="write steps.csv (step, epoch, loss, lr, ms, images_per_s), epochs.csv (epoch, step, "
                        "train_loss, test_accuracy, seconds) and, when tensorboard is installed, TensorBoard events")


def train(args: argparse.Namespace) -> None:
    """Run the job the flags (or ``--plan FILE``) describe; print rank 0's summary."""
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
