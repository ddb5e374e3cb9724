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


@pytest.mark.parametrize("layer", ["linear", "mha", "gru"])
def test_torch_compile_with_a_run_time_rule_firing_inside_the_compiled_region(layer: str):
    """A probe that keeps a weight live inside a compiled forward runs eagerly (dynamo does not trace sbpatch's
    bookkeeping): the call succeeds, is identical to live, and the weight is learned."""
    import torch._dynamo as dynamo

    dynamo.reset()
    torch.manual_seed(0)
    if layer == "linear":
        module, x = torch.nn.Linear(256, 10), torch.randn(4, 256, 49).transpose(1, 2)
        fn = module
    elif layer == "mha":
        module, x = torch.nn.MultiheadAttention(64, 2), torch.randn(3, 7, 64).transpose(0, 1)
        fn = lambda q: module(q, q, q)[0]  # noqa: E731
    else:
        module, x = torch.nn.GRU(16, 32, batch_first=True), torch.randn(2, 20, 16)
        fn = lambda q: module(q)[0]  # noqa: E731
    compiled = torch.compile(fn, backend="aot_eager")
    expected = compiled(x).detach()
    for _ in range(2):
        with sbpatch.frozen(module):
            got = compiled(x).detach()
        assert torch.equal(expected, got)
        assert all(p.requires_grad for p in module.parameters())
    assert sbpatch.freeze.kept_in(module)


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
