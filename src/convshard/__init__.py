"""convshard: train CNNs on every device at once by sharding conv kernels.

Inside an initialised torch.distributed process group::

    model = convshard.shard_model(model, shares=[0.5, 0.25, 0.25])
    ...                                  # train as usual, calling
    convshard.sync_replicas(model)       # between backward() and step()
    state = convshard.full_state_dict(model)   # unsharded, identical on every rank

After ``convshard train --checkpoint-dir D``, in any process::

    model = convshard.load_model("D")    # the plain nn.Module, eval mode, float32, CPU
"""

from .errors import ConfigError
from .parallel.shard import shard_model, sync_replicas
from .parallel.sharded import ShardedConv2d, ShardSplit, full_state_dict, load_full_state_dict
from .plan.splits import split_counts
from .run.inference import load_model

__all__ = [
    "ConfigError",
    "ShardSplit",
    "ShardedConv2d",
    "full_state_dict",
    "load_full_state_dict",
    "load_model",
    "shard_model",
    "split_counts",
    "sync_replicas",
]
__version__ = "0.1.0"
