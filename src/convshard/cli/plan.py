"""``convshard profile`` and ``convshard plan``: a job's profile, or every
candidate plan's prediction on measured devices or a described cluster."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from .. import atomic, devices, precision, profile
from ..errors import ConfigError
from ..plan import cluster, explain, memory, search
from ..run import launch
from ..run.config import TrainConfig, cap_batch
from ..run.local import profile_job
from .job import config_from_args, validate
from .options import job_options, memory_option, optimizer_options


def add_parsers(sub: argparse._SubParsersAction, d: TrainConfig) -> None:
    """The ``profile`` and ``plan`` sub-parsers: a job's options; plan's cluster and output."""
    for name, text in (("profile", "measure each device's speed per conv layer and the links' speed; "
                                   "print it and write it to --profile"),
                       ("plan", "profile (or reuse --profile), then print the planned split, the predicted "
                                "step time of every strategy and the choice; trains nothing")):
        p = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        job_options(p, d)
        optimizer_options(p, d)
        if name == "plan":
            p.add_argument("--cluster", metavar="FILE",
                           help="plan for the cluster FILE describes (TOML: hosts, their devices as profiles "
                                "written by convshard profile --profile, memory, links; see docs/cluster.md) "
                                "instead of measuring --devices; --batch-size replaces its batch size")
            p.add_argument("--plan-out", metavar="FILE",
                           help="write the plan auto would start from to FILE, for convshard train --plan FILE")
            memory_option(p)
        p.set_defaults(handler=_plan if name == "plan" else _profile)


def _profile(args: argparse.Namespace) -> None:
    """``convshard profile``: measure the job, print its profile."""
    _profile_or_plan(config_from_args(args), "profile")


def _plan(args: argparse.Namespace) -> None:
    """``convshard plan``: every candidate on the cluster ``--cluster`` describes, or on the measured devices."""
    if args.cluster:
        _plan_cluster(args)
    else:
        _profile_or_plan(config_from_args(args), "plan", args.plan_out)


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
    _print_plans(memory.with_limits(job_profile, config.device_memory), plan_out, threads=config.threads,
                 grad_precision=config.grad_precision)


def _plan_cluster(args: argparse.Namespace) -> None:
    """``convshard plan --cluster FILE``: every candidate's prediction on the described cluster."""
    for flag in ("devices", "profile", "threads"):
        if getattr(args, flag):
            raise ConfigError(f"--cluster describes the devices and their profiles: leave --{flag} out")
    described = memory.with_limits(cluster.load(args.cluster, batch_size=args.batch_size,
                                                optimizer=(args.optimizer, args.momentum)), args.device_memory)
    print(cluster.describe(described))
    _print_plans(described, args.plan_out, grad_precision=args.grad_precision or "32")


def _print_plans(job_profile: dict, plan_out: str | None, *, threads: int | None = None,
                 grad_precision: str = "32") -> None:
    """Every candidate's prediction, the plan auto would start from (which
    ``plan_out`` receives) and why each device it leaves out is left out."""
    rejected: list[search.Candidate] = []
    found = search.candidates(job_profile, threads=threads, grad_precision=grad_precision, rejected=rejected)
    pool = search.auto_candidates(found, job_profile)
    chosen = search.fastest(pool)
    print(explain.format_candidates(found, chosen, left_out=explain.left_out_of_auto(found, job_profile)))
    for line in explain.left_out(job_profile, chosen, found, rejected):
        print(line)
    if plan_out:
        atomic.write_text(plan_out, json.dumps({"job_plan": chosen.plan.to_json(),
                                                "predicted_seconds": chosen.prediction.step}, indent=1) + "\n")
        print(f"plan written to {plan_out}")
        if "topology" in job_profile:
            print(how_it_runs(chosen.plan.devices, plan_out))


def how_it_runs(planned: Sequence[str], plan_out: str) -> str:
    """How a plan for a described cluster runs: one torchrun per host that
    has planned devices (labels ``host/device``), and how to try its split
    on this machine's devices instead."""
    hosts: dict[str, int] = {}
    for label in planned:
        host = label.split("/", 1)[0]
        hosts[host] = hosts.get(host, 0) + 1
    each = ", ".join(f"{host}: {n} device(s)" for host, n in hosts.items())
    cores = sorted(devices.usable_cores())
    here = ",".join(f"cpu@{cores[i % len(cores)]}" for i in range(len(planned)))
    return (f"it runs under torchrun, one node per host in this order ({each}), each with --plan {plan_out} "
            f"and --devices naming that host's devices (docs/cluster.md, section 4); to try its split on this "
            f"machine: convshard train --plan {plan_out} --devices {here}")
