"""Dense prediction with split conv kernels: a fully convolutional net maps an
image to a per-pixel map, trained by mean squared error.

    torchrun --standalone --nproc-per-node 2 examples/heatmap.py --steps 200
    python examples/heatmap.py --steps 200         # one process: the same model, unsplit

The task: each 32x32 image holds a few bright squares under noise; the model
predicts, for every pixel, whether it lies in a square (1) or not (0). No
labels, no classifier: nothing in convshard is specific to classification.
Every conv, the 1x1 output head included, has its kernels split over the
ranks, and every rank computes the loss on the gathered (B, 1, 32, 32) map.
"""

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn

import convshard

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--steps", type=int, default=200, help="optimizer steps (default: %(default)s)")
parser.add_argument("--batch-size", type=int, default=32, help="(default: %(default)s)")
parser.add_argument("--lr", type=float, default=0.01, help="Adam learning rate (default: %(default)s)")
parser.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                    help="float64 makes a split run and a one-process run agree to ~1e-12")
parser.add_argument("--out", help="save the trained model's full state dict here (rank 0)")
args = parser.parse_args()

# torchrun sets WORLD_SIZE; without it: one process, no process group, no split
if "WORLD_SIZE" in os.environ:
    dist.init_process_group("gloo")  # CPU processes; on GPUs: "nccl", and move model and batches to cuda:LOCAL_RANK
rank = dist.get_rank() if dist.is_initialized() else 0
dtype = getattr(torch, args.dtype)
torch.manual_seed(0)


# -----------------------------------------------------------------------------
# data: the same seeded batch on every rank (kernels are split, not data)
def batch(step, size=32, squares=3):
    g = torch.Generator().manual_seed(step)
    target = torch.zeros(args.batch_size, 1, size, size, dtype=dtype)  # (B, 1, H, W): 1 inside a square
    for i in range(args.batch_size):
        for _ in range(squares):
            side = int(torch.randint(3, 9, (1,), generator=g))
            top, left = torch.randint(0, size - side, (2,), generator=g).tolist()
            target[i, 0, top:top + side, left:left + side] = 1.0
    x = target + 0.5 * torch.randn(target.shape, generator=g, dtype=dtype)  # (B, 1, H, W) noisy image
    return x, target


# -----------------------------------------------------------------------------
# model: conv features at full resolution, a 1x1 conv head to one channel
def block(c_in, c_out):  # no conv bias: the BatchNorm after it subtracts any per-channel constant
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


model = nn.Sequential(
    *block(1, 16), *block(16, 32), *block(32, 16),  # (B, 16, 32, 32)
    nn.Conv2d(16, 1, 1),                            # (B, 1, 32, 32): the predicted map
).to(dtype)
# shares weight the ranks; the head's single kernel goes to one of them, and
# its output is gathered for everyone like any other conv's
model = convshard.shard_model(model)
optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)

# -----------------------------------------------------------------------------
# training loop
for step in range(args.steps):
    x, target = batch(step)
    loss = nn.functional.mse_loss(model(x), target)  # every rank: the same full map, the same loss
    optimizer.zero_grad()
    loss.backward()
    convshard.sync_replicas(model)  # between backward and step: replicated parts stay bitwise equal
    optimizer.step()
    if rank == 0 and (step % 20 == 0 or step == args.steps - 1):
        print(f"step {step:4d}  mse {loss.item():.4f}")

state = convshard.full_state_dict(model)  # a collective: the unsplit weights, every rank
if rank == 0 and args.out:
    torch.save(state, args.out)
    print(f"saved {len(state)} tensors to {args.out}")
if dist.is_initialized():
    dist.destroy_process_group()
