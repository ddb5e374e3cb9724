"""sbpatch with torch's wrappers: DistributedDataParallel (gloo, 2 processes on 127.0.0.1) and torch.compile."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import textwrap

import torch
import torchattacks
from helpers import compare, data, tiny_cnn

import sbpatch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DDP_SCRIPT = """
import os, sys
import torch, torch.distributed as dist, torch.multiprocessing as mp
sys.path.insert(0, {tests!r})

def work(rank):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="{port}")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    import sbpatch, torchattacks
    from helpers import tiny_cnn, data
    sbpatch.enable("torchattacks")
    model = torch.nn.parallel.DistributedDataParallel(tiny_cnn(), broadcast_buffers=False)
    x, y = data(seed=rank)
    flags = [p.requires_grad for p in model.parameters()]
    attack = torchattacks.CW(model, steps=3)
    torch.manual_seed(0)
    with sbpatch.paused():
        expected = attack(x, y)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    got = attack(x, y)
    with sbpatch.frozen(model):  # frozen() accepts the DDP wrapper itself
        inner = [p.requires_grad for p in model.module.parameters()]
    # Ranks taking different numbers of backward steps: unfrozen, DDP would all-reduce at each and hang; frozen,
    # nothing is reduced.
    torchattacks.CW(model, steps=2 + 3 * rank)(x, y)
    ok = (torch.equal(expected, got) and [p.requires_grad for p in model.parameters()] == flags
          and not any(inner) and all(p.grad is None for p in model.parameters()))
    dist.barrier()
    print(f"rank {{rank}} ok={{ok}}", flush=True)
    dist.destroy_process_group()

if __name__ == "__main__":
    mp.spawn(work, nprocs=2)
"""


def test_ddp_attack_frozen_identical_and_no_hang(tmp_path):
    """Unfrozen, an attack's backward through DDP all-reduces at every step and hangs when ranks take different
    numbers of steps; frozen, nothing is reduced, the result is identical and no parameter gradient appears."""
    script = tmp_path / "ddp.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT.format(tests=os.path.dirname(__file__), port=_free_port())))
    env = {k: v for k, v in os.environ.items() if k != "SBPATCH"}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=150, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert sorted(re.findall(r"rank (\d) ok=(True|False)", out.stdout)) == [("0", "True"), ("1", "True")], out.stdout


def test_torch_compile_identical_with_bounded_recompiles():
    import torch._dynamo as dynamo

    dynamo.reset()
    model = tiny_cnn()
    compiled = torch.compile(model, backend="aot_eager")
    x, y = data()
    attack = torchattacks.CW(compiled, steps=3)
    outcome = compare("torchattacks", "CW(compiled)", model, lambda: attack(x, y), "cnn-compiled")
    assert outcome.result == "identical"
    for _ in range(3):  # alternating frozen and live calls reuse the graphs already compiled
        attack(x, y)
        with sbpatch.paused():
            attack(x, y)
    frames = dynamo.utils.counters["stats"]["unique_graphs"]
    assert frames <= 4, f"{frames} graphs compiled: sbpatch's freezing should cost at most one recompile per mode"
