"""sbpatch with torch.compile and torch.autocast (DDP, FSDP and torchrun: test_distributed.py)."""

from __future__ import annotations

import pytest
import torch
import torchattacks
from helpers import MODELS, compare, data, tiny_cnn

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


AUTOCAST_CASES = [  # one attack that calls backward(), one that uses autograd.grad, one query-only, in two libraries
    ("torchattacks", "CW"),
    ("torchattacks", "PGD"),
    ("torchattacks", "SPSA"),
    ("cleverhans", "projected_gradient_descent"),
    ("cleverhans", "spsa"),
]


@pytest.mark.parametrize("model_name", ["cnn", "vit"])
@pytest.mark.parametrize("library,attack", AUTOCAST_CASES)
def test_autocast_bf16_identical(library: str, attack: str, model_name: str):
    """Under torch.autocast("cpu", bfloat16) the attack is identical patched vs unpatched. Autocast caches the
    low-precision cast of a weight only for leaves that require grad, so frozen weights are re-cast at each use:
    the same values (benchmarks/autocast.py measures the cost)."""
    import importlib

    builder = importlib.import_module(f"sbpatch.contrib.{library}").cases()[attack]
    model = MODELS[model_name]()
    x, y = data()
    run = builder(model, x, y, 2)

    def autocast_run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return run()

    assert compare(library, f"{attack}(autocast)", model, autocast_run, model_name).result == "identical"
