"""One rank of a torchrun job that tests/test_elastic.py runs: ``convshard
train`` with the settings given as JSON, float64 among them (a setting the
command line does not offer). Exits as ``convshard train`` does: 143 when a
SIGTERM stopped it, 1 on any other failure (torchrun restarts on either)."""

from __future__ import annotations

import json
import sys

from convshard.errors import TrainingError
from convshard.run import launch
from convshard.run.config import TrainConfig
from convshard.run.train import torchrun_worker

if __name__ == "__main__":
    given = json.loads(sys.argv[1])
    config = TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in given.items()})
    try:
        torchrun_worker(config)
        code = 0
    except TrainingError as exc:
        print(f"convshard: error: {exc}", file=sys.stderr)
        code = exc.exit_code
    launch.hard_exit(code)
