"""``convshard bench``: the paper's sweeps against one device, one process on all cores and DDP."""

from __future__ import annotations

import argparse

from .. import precision
from ..run.config import TrainConfig
from ..tools import bench
from .options import int_list, model_name, positive, precision_list, rate_list


def add_parser(sub: argparse._SubParsersAction, d: TrainConfig) -> None:
    """The ``bench`` sub-parser."""
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
    b.add_argument("--steps", metavar="N", type=positive(int, "--steps"),
                   help="steps per job, 3 of them warm-up (default: paper 6, smoke 4; the data sweep: "
                        "paper 200, smoke 6)")
    b.add_argument("--rounds", metavar="N", type=positive(int, "--rounds"), default=1,
                   help="run each point's jobs N times, in turn, and report each job's median: the machine's "
                        "drift then falls on every job alike (default: %(default)s)")
    b.add_argument("--batches", metavar="B1,B2", type=int_list("--batches"),
                   help="batch sizes of the batch, models and bandwidth sweeps (default: batch 16,32,64,128,256; "
                        "models 16,64; bandwidth 64)")
    b.add_argument("--model", metavar="NAME", type=model_name, default="paper",
                   help="the CNN every sweep trains: a built-in (the ResNets and VGG11/16 run at their "
                        "default width at --size paper, and the kernels sweep varies that width) or "
                        "package.module:function (default: %(default)s)")
    b.add_argument("--precision", metavar="P1,P2", type=precision_list, default=("32",),
                   help="run every job in each of these precisions (32, bf16, fp16), a job beyond 32 named "
                        "'JOB bf16'; one device, the reference of every speedup, runs in the first "
                        "(default: 32)")
    b.add_argument("--grad-precision", choices=precision.GRAD_PRECISIONS, default="32",
                   help="every convshard job sums its gradients in this (see train --grad-precision) "
                        "(default: %(default)s)")
    b.add_argument("--jobs", metavar="J1,J2", type=lambda text: tuple(text.split(",")),
                   help="only these jobs of each point (one device always runs): e.g. 'auto,plain loop'; "
                        "default: every job")
    b.add_argument("--rates", metavar="R1,R2", type=rate_list,
                   help=f"links of the bandwidth sweep, tc rates (default: {','.join(bench.RATES)})")
    b.add_argument("--out-dir", metavar="DIR", default="runs/bench", help="(default: %(default)s)")
    b.add_argument("--cluster", metavar="FILE",
                   help="with --sweeps scale: also predict the cluster FILE describes (see convshard plan "
                        "--cluster) against link bandwidth and batch size")
    b.set_defaults(handler=_bench)


def _bench(args: argparse.Namespace) -> None:
    """Run the chosen sweeps; ``tools.bench`` writes their results into ``--out-dir``."""
    bench.run_bench(sweeps=args.sweeps.split(","), size=args.size, out_dir=args.out_dir, steps=args.steps,
                    batches=args.batches, rounds=args.rounds, model=args.model, cluster=args.cluster,
                    precisions=args.precision, jobs=args.jobs, rates=args.rates,
                    grad_precision=args.grad_precision)
    print(f"bench: results in {args.out_dir}/bench.md, bench.json and <sweep>.png")
