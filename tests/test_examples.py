"""The scripts in examples/ run as the README says, and a split run trains the one-process model.

Each example is run for a few steps twice, in float64: under torchrun with
two processes (every conv's kernels split over them) and as one plain
process (world size 1, no process group). The saved final weights must agree
to float64 rounding: the split computes the same sums, only grouped by
output channel and possibly in another order, so after a few steps they
differ by a few ulps (about 1e-15 measured); a tolerance of 1e-12 leaves
room for that while a lost gradient or a wrong slice moves weights by at
least the learning rate times a gradient, far more.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import child_env, finish, start, torchrun_env

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
STEPS = 3


def _run(script: str, out: Path, *, processes: int) -> str:
    """The example run for ``STEPS`` steps in float64, saving its weights to ``out``; its output."""
    args = [str(EXAMPLES / script), "--steps", str(STEPS), "--dtype", "float64", "--out", str(out)]
    if processes == 1:
        proc = subprocess.run([sys.executable, *args], env=child_env(), capture_output=True, text=True,
                              timeout=180, stdin=subprocess.DEVNULL)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout
    torchrun = start([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                      str(processes), *args], torchrun_env())
    output = finish(torchrun, timeout=240)
    assert torchrun.returncode == 0, output[-3000:]
    return output


@pytest.mark.parametrize("script", ["classify.py", "heatmap.py"])
def test_example_split_over_two_processes_trains_the_one_process_model(tmp_path, script):
    alone = _run(script, tmp_path / "alone.pt", processes=1)
    split = _run(script, tmp_path / "split.pt", processes=2)
    for output in (alone, split):  # --steps is obeyed: the last step printed is STEPS - 1
        steps = [int(line.split()[1]) for line in output.splitlines() if line.startswith("step ")]
        assert steps[-1] == STEPS - 1, output[-3000:]
    expected = torch.load(tmp_path / "alone.pt", weights_only=True)
    got = torch.load(tmp_path / "split.pt", weights_only=True)
    assert got.keys() == expected.keys()
    assert all(v.dtype == torch.float64 for v in expected.values() if v.is_floating_point())  # --dtype obeyed
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-12, msg=key)
