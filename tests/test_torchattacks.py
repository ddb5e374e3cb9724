"""torchattacks 3.5.1 on the real library: every exported attack identical patched vs unpatched, on a CNN and a ViT."""

from __future__ import annotations

import threading

import pytest
import torch
import torchattacks
from helpers import MODELS, compare, data, expect, tiny_cnn
from torch import nn

import sbpatch
from sbpatch import freeze, registry
from sbpatch.contrib.torchattacks import cases

CASES = cases()
# (attack, model) pairs whose unpatched call fails on this stack; none today. A new failure shows up here.
KNOWN_BROKEN: dict[tuple[str, str], str] = {}


def test_every_exported_attack_has_a_case():
    assert set(torchattacks.__all__) == set(CASES)


def test_attack_call_is_wrapped_once():
    from torchattacks.attack import Attack

    assert isinstance(Attack.__dict__["__call__"], sbpatch.patching.SbpatchWrapper)
    assert not any("__call__" in c.__dict__ for c in sbpatch.patching.all_subclasses(Attack))
    assert "torchattacks.attack.Attack.__call__" in sbpatch.status()["torchattacks"].patched


@pytest.mark.parametrize("model_name", ["cnn", "vit"])
@pytest.mark.parametrize("attack", sorted(CASES))
def test_identical(attack: str, model_name: str):
    model = MODELS[model_name]()
    x, y = data()
    run = CASES[attack](model, x, y, 2)
    outcome = compare("torchattacks", attack, model, run, model_name, expect_freeze=attack != "LGV")
    expect(outcome, KNOWN_BROKEN)


def test_lgv_trains_unfrozen():
    """LGV trains copies of the model with SGD: sbpatch must call it straight through."""
    model = tiny_cnn()
    x, y = data()
    seen = []
    model.register_forward_pre_hook(lambda m, i: seen.append(m.hidden.weight.requires_grad))
    counters = registry.counters("torchattacks")
    passed = counters.passed
    CASES["LGV"](model, x, y, 1)()
    assert counters.passed == passed + 1
    assert seen and seen[0] is True  # the first forward passes are LGV's training, with live parameters
    assert "torchattacks.LGV" in sbpatch.status()["torchattacks"].excluded


@pytest.mark.parametrize("attack", ["AutoAttack", "MultiAttack"])
def test_nested_attacks_count_and_restore(attack: str):
    model = tiny_cnn()
    x, y = data()
    before = [p.requires_grad for p in model.parameters()]
    counters = registry.counters("torchattacks")
    calls = counters.calls
    CASES[attack](model, x, y, 1)()
    assert counters.calls >= calls + 2  # the outer call and the inner attacks it ran, each counted
    assert [p.requires_grad for p in model.parameters()] == before
    assert freeze.held_count() == 0


class Exploding(nn.Module):
    def __init__(self, inner: nn.Module, after: int, exc: BaseException) -> None:
        super().__init__()
        self.inner, self.after, self.exc, self.n = inner, after, exc, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.n += 1
        if self.n > self.after:
            raise self.exc
        return self.inner(x)


@pytest.mark.parametrize("exc", [RuntimeError("model failed"), KeyboardInterrupt()])
def test_attack_that_raises_restores(exc: BaseException):
    model = Exploding(tiny_cnn(), after=2, exc=exc)
    x, y = data()
    before = [p.requires_grad for p in model.parameters()]
    attack = torchattacks.CW(model, steps=5)
    with pytest.raises(type(exc)):
        attack(x, y)
    assert [p.requires_grad for p in model.parameters()] == before
    assert freeze.held_count() == 0


def test_grads_left_as_shipped_vs_patched():
    """The documented side effect: as shipped, CW fills param.grad; with sbpatch it stays None."""
    model = tiny_cnn()
    x, y = data()
    with sbpatch.paused():
        torchattacks.CW(model, steps=2)(x, y)
    assert model.hidden.weight.grad is not None
    model.zero_grad(set_to_none=True)
    torchattacks.CW(model, steps=2)(x, y)
    assert all(p.grad is None for p in model.parameters())


def test_paused_is_per_thread():
    """paused() in one thread leaves another thread's calls patched."""
    model = tiny_cnn()
    x, y = data()
    seen: dict[str, bool] = {}

    def attack(name: str) -> None:
        seen[name] = False
        hook = model.register_forward_pre_hook(lambda m, i: seen.__setitem__(name, not m.hidden.weight.requires_grad))
        try:
            torchattacks.FGSM(model)(x, y)
        finally:
            hook.remove()

    with sbpatch.paused():
        worker = threading.Thread(target=attack, args=("other thread",))
        worker.start()
        worker.join()
        attack("paused thread")
    assert seen == {"other thread": True, "paused thread": False}


def test_cli_run_with_a_library_that_cannot_be_enabled_exits_2(capsys: pytest.CaptureFixture[str], tmp_path):
    import dataclasses

    from sbpatch import cli

    script = tmp_path / "script.py"
    script.write_text("print('ran')\n")

    state = registry._state("cleverhans")
    original = state.integration
    state.integration = dataclasses.replace(original, supported="<1")
    try:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["run", "--libraries", "cleverhans", str(script)])
    finally:
        state.integration = original
    assert exit_info.value.code == 2
    assert "cleverhans 4.0.0 is outside the supported range <1" in capsys.readouterr().err
