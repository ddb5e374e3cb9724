"""Adversarial training on two processes (DistributedDataParallel, gloo) with an unchanged library attack.

The script does not mention sbpatch. Run it as shipped, then patched, with no code change:

    torchrun --nproc_per_node 2 examples/ddp_adversarial_training.py              # as shipped
    SBPATCH=all torchrun --nproc_per_node 2 examples/ddp_adversarial_training.py  # patched in every rank
    sbpatch run torchrun --nproc_per_node 2 examples/ddp_adversarial_training.py  # the same

As shipped, cleverhans' PGD calls loss.backward() through the DDP model, so every attack step all-reduces the whole
model's gradients across the ranks (and leaves them in param.grad). Patched, the attack freezes the model and runs
under the wrapper's no_sync(): it communicates nothing, even though the attention in-projections stay live to keep
PyTorch's kernels, and DDP needs no find_unused_parameters. The training step still all-reduces, and the ranks stay
equal. A DDP comm hook counts the all-reduces. Any collective gives up after --timeout seconds, and torchrun tears
down the other rank when one fails.
"""

import argparse
import datetime
import os
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from cleverhans.torch.attacks.projected_gradient_descent import projected_gradient_descent
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--steps", type=int, default=3, help="training steps")
parser.add_argument("--pgd-steps", type=int, default=3, help="PGD steps per attack (K)")
parser.add_argument("--batch-size", type=int, default=8, help="per rank")
parser.add_argument("--timeout", type=int, default=60, help="seconds before a collective gives up")
parser.add_argument("--fail-rank", type=int, default=None, help="make this rank crash at step 1 (shows the teardown)")
args = parser.parse_args()

dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.timeout))
rank = dist.get_rank()
torch.set_num_threads(1)
torch.manual_seed(0)  # the same initial model on every rank (DDP also broadcasts rank 0's)
model = torchvision.models.VisionTransformer(  # nn.MultiheadAttention inside
    image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
)
torch.nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision zero-initialises the head
ddp = DDP(model)  # DDP's defaults: no find_unused_parameters
optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)

phase = "training"
all_reduces = {"attack": 0, "training": 0}


def counting_hook(state, bucket):
    all_reduces[phase] += 1
    return default_hooks.allreduce_hook(state, bucket)


ddp.register_comm_hook(None, counting_hook)
g = torch.Generator().manual_seed(1 + rank)  # each rank its own data
for step in range(args.steps):
    x = torch.rand(args.batch_size, 3, 16, 16, generator=g)
    y = torch.randint(0, 10, (args.batch_size,), generator=g)
    if step == 1 and rank == args.fail_rank:
        raise RuntimeError(f"rank {rank} fails on purpose (--fail-rank)")
    model.eval()
    phase = "attack"
    x_adv = projected_gradient_descent(ddp, x, 0.03, 0.01, args.pgd_steps, np.inf, clip_min=0.0, clip_max=1.0, y=y)
    phase = "training"
    model.train()
    optimizer.zero_grad()
    loss = F.cross_entropy(ddp(x_adv), y)
    loss.backward()
    optimizer.step()
    if rank == 0:
        print(f"step {step}: adversarial loss {loss.item():.4f}", flush=True)

flat = torch.cat([p.detach().flatten() for p in model.parameters()])
copies = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
dist.all_gather(copies, flat)
sbpatch = sys.modules.get("sbpatch")  # loaded only when SBPATCH or `sbpatch run` enabled it
if rank == 0:
    print(f"sbpatch: {'on' if sbpatch is not None else 'off'} (SBPATCH={os.environ.get('SBPATCH', '')!r})")
    print(f"gradient all-reduces: attacks {all_reduces['attack']}, training {all_reduces['training']}")
    print(f"parameters identical on every rank: {all(torch.equal(copies[0], c) for c in copies)}")
dist.destroy_process_group()
