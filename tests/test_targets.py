"""Named targets (``SBPATCH_TARGETS``, ``sbpatch.enable_targets``, ``sbpatch run --target``): functions and methods of
code that is not a supported library, frozen around the first ``nn.Module`` of each call. The GCG example is an
llm-attacks-style ``token_gradients`` (``loss.backward()`` on a one-hot) on a small random Llama, unedited."""

from __future__ import annotations

import sys
import textwrap
import warnings

import pytest
import torch
from helpers import ROOT, run_python
from torch import nn

import sbpatch
from sbpatch import registry

EXAMPLES = f"{ROOT}/examples"
GCG_OUT = ["identical: True", "weights with .grad: as shipped 21, with sbpatch 0", "flags restored: True",
           "frozen calls: 1"]


def test_gcg_token_gradients_via_the_environment_variable_is_identical_and_leaves_no_grad():
    out = run_python(args=[f"{EXAMPLES}/named_target_gcg.py"], env={"SBPATCH_TARGETS": "gcg_utils:token_gradients",
                                                                     "PYTHONPATH": f"{ROOT}:{EXAMPLES}"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == GCG_OUT


def test_gcg_via_sbpatch_run_target():
    out = run_python(args=["-m", "sbpatch", "run", "--target", "gcg_utils:token_gradients",
                           f"{EXAMPLES}/named_target_gcg.py"])
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == GCG_OUT


def test_unset_the_example_runs_as_shipped():
    """The control: without the variable nothing is frozen (the same script leaves the weight gradients)."""
    out = run_python(args=[f"{EXAMPLES}/named_target_gcg.py"], env={"PYTHONPATH": f"{ROOT}:{EXAMPLES}"})
    assert out.returncode != 0 or "with sbpatch 21" in out.stdout  # status()['targets'] does not exist unset
    assert "weights with .grad: as shipped 21, with sbpatch 21" in out.stdout


@pytest.fixture
def research_module(tmp_path, monkeypatch):
    """A module of research code written for the test: a function and a method that call ``backward()``."""
    (tmp_path / "research_code.py").write_text(textwrap.dedent('''
        import torch

        def input_gradient(model, x):
            seen = [p.requires_grad for p in model.parameters()]
            x = x.clone().requires_grad_(True)
            model(x).sum().backward()
            return x.grad, seen

        class Attacker:
            def __init__(self, model):
                self.model = model

            def step(self, x):
                seen = [p.requires_grad for p in self.model.parameters()]
                x = x.clone().requires_grad_(True)
                self.model(x).sum().backward()
                return x.grad, seen
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sbpatch.disable("targets")
    sys.modules.pop("research_code", None)


def test_function_and_method_targets_freeze_around_the_first_module_and_restore(research_module):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    model[2].bias.requires_grad_(False)  # user-frozen: stays frozen
    flags = [p.requires_grad for p in model.parameters()]
    x = torch.randn(3, 4)
    names = sbpatch.enable_targets("research_code:input_gradient, research_code:Attacker.step")  # before import
    assert names == ["research_code:input_gradient", "research_code:Attacker.step"]
    import research_code

    with sbpatch.paused():
        expected, seen = research_code.input_gradient(model, x)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad) and seen == flags
    model.zero_grad(set_to_none=True)
    got, seen = research_code.input_gradient(model, x)  # a positional argument
    assert torch.equal(expected, got) and not any(seen)
    got, seen = research_code.input_gradient(x=x, model=model)  # a keyword argument
    assert torch.equal(expected, got) and not any(seen)
    got, seen = research_code.Attacker(model).step(x)  # the bound instance's attribute
    assert torch.equal(expected, got) and not any(seen)
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == flags
    row = sbpatch.status()["targets"]
    assert row.calls == 3 and set(row.patched) >= {"research_code.input_gradient", "research_code.Attacker.step"}
    original = research_code.input_gradient.__wrapped__
    sbpatch.disable("targets")
    assert research_code.input_gradient is original


def test_a_name_that_does_not_resolve_warns_once_and_shows_in_status(research_module):
    import research_code  # noqa: F401

    with pytest.warns(sbpatch.SbpatchWarning, match="research_code.missing"):
        sbpatch.enable_targets("research_code:missing")
    assert "research_code.missing" in sbpatch.status()["targets"].skipped
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sbpatch.enable_targets("research_code:missing")  # once


@pytest.mark.parametrize("bad", ["research_code", "research_code:", ":f", "a b:f", "pkg.mod:f-g", ""])
def test_bad_names_say_the_form(bad):
    with pytest.raises(sbpatch.ConfigError, match="package.module:function"):
        sbpatch.enable_targets(bad)
    with pytest.raises(TypeError):
        sbpatch.enable_targets(3)  # type: ignore[arg-type]


def test_the_variable_alone_costs_nothing_until_the_module_is_imported():
    """SBPATCH unset, SBPATCH_TARGETS set: start-up imports no wrapt, torch or registry; a bad value is one line."""
    code = "import sys; print(sorted(m for m in ('wrapt', 'torch', 'sbpatch.registry') if m in sys.modules))"
    out = run_python(code, env={"SBPATCH_TARGETS": "not_imported_here:f"})
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr
    out = run_python("print('ran')", env={"SBPATCH_TARGETS": "no-colon"})
    assert out.returncode == 0 and out.stdout.strip() == "ran"
    assert "SBPATCH_TARGETS" in out.stderr and "package.module:function" in out.stderr
    assert registry.INTEGRATIONS.keys().isdisjoint({"targets"})
