"""Elastic and exact: a job whose members change re-plans, resumes and trains the same model.

Two torchrun agents on this machine form one elastic job (``--nnodes 1:2``,
c10d rendezvous on loopback, one worker each, float64 through
``elastic_job.py``). When a second agent joins, torchrun stops the running
worker (a SIGTERM: it saves the step in progress) and restarts the job with
both; when that agent dies, torchrun restarts the survivor, which resumes
from the last checkpoint on the device still there. The run ends with the
weights of an uninterrupted one-device run from the same seed, within
float64 rounding of the different splits. Then a checkpoint written under
each kind of plan is resumed under each other kind.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import helpers
import torch
from helpers import join_gloo
from test_strict import KINDS

from convshard import plan
from convshard.parallel import comm
from convshard.parallel.sharded import full_state_dict
from convshard.run import alone, checkpoint, train
from convshard.run.config import Job, TrainConfig, load_data, model_groups
from convshard.run.engines import ShardedEngine, engine_for
from convshard.run.launch import launch_local
from convshard.run.local import launch_job, prepare

HERE = Path(__file__).parent
JOB = {"dataset": "synthetic", "synthetic_shape": [1, 16, 16], "synthetic_size": 8192, "kernels": [4, 8],
       "batch_size": 16, "threads": 1, "epochs": 1, "dtype": "float64", "lr": 0.02, "checkpoint_every": 20,
       "log_every": 100}
STEPS = 8192 // 16
RTOL = 1e-9  # float64: the splits' different rounding, far below any real change


class _Agent:
    """A torchrun agent of the elastic job, with one worker on ``device``;
    the one that ``hosts_store`` keeps the rendezvous store (it must outlive
    the others). Its output (torchrun's own at INFO) is read as it comes."""

    def __init__(self, port: int, device: str, directory: Path, *, hosts_store: bool) -> None:
        env = helpers.torchrun_env(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", LOGLEVEL="INFO")
        settings = {**JOB, "devices": device, "checkpoint_dir": str(directory / "checkpoints"),
                    "metrics_out": str(directory / "metrics.json")}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1:2", "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "convshard-elastic",
               "--rdzv-conf", f"last_call_timeout=3,keep_alive_interval=1,is_host={int(hosts_store)}", "--max-restarts", "2",
               "--monitor-interval", "0.1", str(HERE / "elastic_job.py"), json.dumps(settings)]
        self.proc = helpers.start(cmd, env)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self._reader.start()

    def said(self, text: str) -> bool:
        return text in self.text()

    def text(self) -> str:
        return "".join(list(self.lines))

    def finish(self, timeout: float) -> str:
        """Its output once it exited (within ``timeout`` s, or it and its worker are killed and the test fails)."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"torchrun still running after {timeout} s:\n{''.join(self.lines)[-3000:]}")
        self._reader.join(10)
        return self.text()

    def kill(self) -> None:
        """End the agent (its worker dies with it)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def _reference(tmp: Path) -> dict[str, torch.Tensor]:
    """The weights of the same run on one device, never interrupted."""
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in JOB.items()}
    config = TrainConfig(**given, strategy="single", devices="cpu@0", checkpoint_dir=str(tmp / "reference"),
                         quiet=True)
    dataset = load_data(config)
    launch_job(prepare(config, dataset), dataset)
    return checkpoint.load_checkpoint(tmp / "reference")["model"]


def _step_saved(directory: Path) -> int | None:
    saved = checkpoint.load_checkpoint(directory / "checkpoints")
    return None if saved is None else saved["progress"]["step"]


@contextlib.contextmanager
def _paused(worker: int) -> Iterator[None]:
    """``worker`` stopped (SIGSTOP) inside the block, so that the run cannot go on, or end, meanwhile."""
    os.kill(worker, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(worker, signal.SIGCONT)


def test_a_host_joins_then_leaves_and_the_run_ends_with_the_one_device_model(tmp_path):
    """One agent trains alone; a second joins: torchrun stops the worker (a
    SIGTERM: it saves the step in progress) and restarts the job on both,
    which resumes at that very step by the rendezvous id. Then the second
    agent and its worker are killed: the first is restarted alone and resumes
    from the last checkpoint. The run ends with the one-device run's weights,
    and its metrics keep the plan of each stretch that reached a checkpoint.
    The first worker is paused while the membership changes, so that the run
    cannot move on meanwhile."""
    port, directory = helpers.free_port(), tmp_path / "checkpoints"
    first = _Agent(port, "cpu@0", tmp_path, hosts_store=True)
    second = None
    try:
        helpers.wait_for(lambda: (_step_saved(tmp_path) or 0) > 0, 180, "the first checkpoint", every=0.01)
        alone_worker = helpers.worker_pid(first.proc.pid, 0)
        with _paused(alone_worker):
            second = _Agent(port, "cpu@1", tmp_path, hosts_store=False)
            helpers.wait_for(lambda: first.said("new nodes"), 120, "torchrun to see the second agent")
        helpers.wait_for(lambda: any(a.said("for 2 worker(s)") for a in (first, second)), 120,
                         "the job on two hosts", every=0.01)
        joined = int(re.search(r"stopped by SIGTERM at step (\d+)", first.text())[1])
        helpers.wait_for(lambda: _step_saved(tmp_path) > joined, 120, "a checkpoint of the two hosts", every=0.01)
        with _paused(helpers.worker_pid(first.proc.pid, 0)):
            second.kill()  # the host is gone: its agent and its worker
        out = first.finish(timeout=300)
    finally:
        for agent in (first, second):
            if agent is not None:
                agent.kill()
    assert first.proc.returncode == 0, out[-3000:]
    final = checkpoint.load_checkpoint(directory)
    assert final["progress"]["step"] == STEPS
    helpers.assert_same_weights(final["model"], _reference(tmp_path), rtol=RTOL, atol=1e-12)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    plans = [(p["step"], sorted(p["devices"])) for p in metrics["plans"]]
    assert [devices for _, devices in plans] == [["cpu@0"], ["cpu@0", "cpu@1"], ["cpu@0"]], plans
    assert plans[1][0] == joined, plans
    left = plans[2][0]
    both = out + second.text()
    assert f"stopped by SIGTERM at step {joined}" in out, out[-3000:]
    assert f"resuming from {directory} at step {joined}" in both and 0 < joined < left < STEPS, plans
    assert f"resuming from {directory} at step {left}" in out, out[-3000:]
    assert metrics["world_size"] == 1


# --- a checkpoint of any plan resumes under any other ---------------------------


def _reshard_worker(tmp: str) -> dict | None:
    """Rank 0's verdicts: for every pair of plan kinds (A, B), 2 steps under A,
    its checkpoint resumed under B for 2 more, against 4 steps on one device."""
    rank, _ = join_gloo()
    comm.set_rank_device(torch.device("cpu"))
    lone = alone.group_of(0)  # the one-device plan runs on rank 0 in a group of its own
    # the paper's CNN, without BatchNorm: DDP normalises each rank's rows alone, another model's maths
    config = TrainConfig(devices="cpu@0,cpu@1", model="paper", kernels=(4, 8), dataset="synthetic",
                         synthetic_shape=(1, 16, 16), synthetic_size=64, batch_size=8, threads=1, quiet=True,
                         dtype="float64", lr=0.05)
    dataset = load_data(config)
    groups = model_groups(config, dataset)
    plans = {kind: build(groups) for kind, build in KINDS.items()}

    def train_to(job_plan: plan.Plan, steps: int, directory: Path, *, resume: bool) -> dict | None:
        """Train under ``job_plan`` to step ``steps`` (from the checkpoint in
        ``directory`` when ``resume``, else saving there); the full weights on rank 0."""
        if job_plan.world == 1 and rank != 0:
            return None
        engine = ShardedEngine(job_plan, 0, lone) if job_plan.world == 1 else engine_for(job_plan, rank, None)
        settings = replace(config.settings(), checkpoint_dir=str(directory), max_steps=steps, resume=resume)
        run = train._setup(Job(job_plan, settings, config.to_json()), dataset, torch.device("cpu"), engine)
        train._train_epoch(run)
        if not resume:
            train._save(run)
            run.writer.wait()
        train._close_batches(run)
        weights = full_state_dict(run.net)
        return weights if rank == 0 else None

    reference = train_to(plans["single"], 4, Path(tmp) / "reference", resume=False)
    worst = {}
    for source, source_plan in plans.items():
        saved = Path(tmp) / source
        train_to(source_plan, 2, saved, resume=False)
        comm.barrier()  # the checkpoint is on disk before any rank reads it
        for target, target_plan in plans.items():
            weights = train_to(target_plan, 4, saved, resume=True)
            if rank == 0:
                worst[f"{source} -> {target}"] = max(
                    ((weights[k] - v).abs().max() / v.abs().max().clamp(min=1e-12)).item()
                    for k, v in reference.items() if v.is_floating_point())
    return worst if rank == 0 else None


def test_a_checkpoint_of_any_plan_resumes_under_any_other(tmp_path):
    """Model and optimizer state (SGD momentum, per kernel) saved whole under
    one plan and cut again for another: all 25 pairs of single, kernel,
    layers, all-batch and ddp end where one device does, in float64."""
    worst = launch_local(_reshard_worker, 2, args=(str(tmp_path),), timeout=600,
                         env={"OMP_NUM_THREADS": "1"})[0]
    assert len(worst) == len(KINDS) ** 2
    assert all(error < 1e-10 for error in worst.values()), "; ".join(f"{k} {v:.1e}" for k, v in worst.items())
