"""sbpatch with torch.compile (DistributedDataParallel and other torch.distributed wrappers: test_distributed.py)."""

from __future__ import annotations

import torch
import torchattacks
from helpers import compare, data, tiny_cnn

import sbpatch


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
