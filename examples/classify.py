"""A small CNN classifier trained with its conv kernels split across processes.

    torchrun --standalone --nproc-per-node 2 examples/classify.py --steps 200
    python examples/classify.py --steps 200        # one process: the same model, unsplit

Each rank holds a share of every conv layer's kernels (and of the BatchNorm
after it) and computes only those output channels; the ranks exchange
activations where a layer needs every channel. Everything else (the linear
classifier) is replicated. The result is the model one process would train,
up to rounding: run both commands with --dtype float64 --out FILE and compare.

The images are synthetic so that nothing is downloaded: each of the 10
classes is a fixed random 28x28 pattern, and an image is its class's pattern
plus three times as much noise.
"""

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn

import convshard

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--steps", type=int, default=200, help="optimizer steps (default: %(default)s)")
parser.add_argument("--batch-size", type=int, default=64, help="(default: %(default)s)")
parser.add_argument("--lr", type=float, default=0.01, help="SGD learning rate (default: %(default)s)")
parser.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                    help="float64 makes a split run and a one-process run agree to ~1e-12")
parser.add_argument("--out", help="save the trained model's full state dict here (rank 0)")
args = parser.parse_args()

# torchrun sets WORLD_SIZE and the rendezvous variables; without it this is one
# process and no process group: shard_model then leaves every kernel here.
if "WORLD_SIZE" in os.environ:
    dist.init_process_group("gloo")  # CPU processes; on GPUs: "nccl", and move model and batches to cuda:LOCAL_RANK
rank = dist.get_rank() if dist.is_initialized() else 0
dtype = getattr(torch, args.dtype)
torch.manual_seed(0)

# -----------------------------------------------------------------------------
# data: every rank draws the same images in the same order. convshard splits
# kernels, not data, so each rank must see the whole global batch (no
# DistributedSampler); shard_model checks this on the first forward.
classes = 10
patterns = torch.randn(classes, 1, 28, 28, dtype=dtype)  # one pattern per class


def batch(step):
    g = torch.Generator().manual_seed(step)  # the same batch on every rank
    y = torch.randint(0, classes, (args.batch_size,), generator=g)  # (B,)
    x = patterns[y] + 3.0 * torch.randn(args.batch_size, 1, 28, 28, generator=g, dtype=dtype)  # (B, 1, 28, 28)
    return x, y


# -----------------------------------------------------------------------------
# model: two conv blocks and a linear classifier, as one would write it anyway
model = nn.Sequential(
    nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),   # (B, 16, 14, 14)
    nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),  # (B, 32, 7, 7)
    nn.Flatten(), nn.Linear(32 * 7 * 7, classes),                                      # (B, 10) logits
).to(dtype)
# Split every conv's kernels over the ranks, equally here (shares=[2, 1] would
# give rank 0 twice as many). Rank 0's initial weights are broadcast to all.
model = convshard.shard_model(model)
optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)

# -----------------------------------------------------------------------------
# training loop: a plain PyTorch loop, plus one call between backward and step
for step in range(args.steps):
    x, y = batch(step)
    logits = model(x)  # (B, 10); a collective: every rank runs every forward
    loss = nn.functional.cross_entropy(logits, y)
    optimizer.zero_grad()
    loss.backward()
    # The replicated parameters (the linear layer) get the same gradient on
    # every rank; this makes them bitwise equal, so that the ranks never drift.
    convshard.sync_replicas(model)
    optimizer.step()
    if rank == 0 and (step % 20 == 0 or step == args.steps - 1):
        accuracy = (logits.argmax(1) == y).float().mean().item()  # on the batch just trained on
        print(f"step {step:4d}  loss {loss.item():.4f}  batch accuracy {accuracy:.2f}")

# full_state_dict gathers the kernel shards (a collective: every rank calls
# it): the keys and shapes of the unsplit nn.Sequential above.
state = convshard.full_state_dict(model)
if rank == 0 and args.out:
    torch.save(state, args.out)
    print(f"saved {len(state)} tensors to {args.out}")
if dist.is_initialized():
    dist.destroy_process_group()
