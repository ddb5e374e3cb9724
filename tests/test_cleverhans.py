"""cleverhans 4.0.0 torch attacks: equality on every attack function, the shapes of ``model_fn``, nested calls,
import orders (in subprocesses) and the rebinding of the library's own module globals."""

from __future__ import annotations

import functools
import importlib
import os
import pkgutil
import textwrap
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn as nn
from helpers import MODELS, compare, data, expect, kept_live_names, run_python, tiny_cnn

import sbpatch
from sbpatch import freeze, registry
from sbpatch.contrib.cleverhans import ATTACKS, MODEL_FREE, cases
from sbpatch.patching import SbpatchWrapper

CASES = cases()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (attack, model) -> a substring of the error the UNPATCHED call raises on this stack.
KNOWN_BROKEN: dict[tuple[str, str], str] = {
    ("semantic", "cnn"): "NameError: name 'self' is not defined",  # the function body reads self.center
    ("semantic", "vit"): "NameError: name 'self' is not defined",
}




def test_cases_cover_every_attack_function() -> None:
    """Each module of cleverhans.torch.attacks defines one attack function of its own name: all are in cases()."""
    import cleverhans.torch.attacks as pkg

    found = set()
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        if callable(getattr(mod, info.name, None)):
            found.add(info.name)
    assert found == set(CASES) == set(ATTACKS) | set(MODEL_FREE)


def test_every_model_attack_is_wrapped_and_model_free_ones_are_not() -> None:
    st = sbpatch.status()["cleverhans"]
    assert st.enabled and not st.skipped
    for name in ATTACKS:
        mod = importlib.import_module(f"cleverhans.torch.attacks.{name}")
        assert isinstance(getattr(mod, name), SbpatchWrapper), name
        assert f"cleverhans.torch.attacks.{name}.{name}" in st.patched
    for name in MODEL_FREE:
        mod = importlib.import_module(f"cleverhans.torch.attacks.{name}")
        assert not isinstance(getattr(mod, name), SbpatchWrapper), name
        assert f"cleverhans.torch.attacks.{name}.{name}" in st.excluded


@pytest.mark.parametrize("model_name", ["cnn", "vit"])
@pytest.mark.parametrize("attack", sorted(CASES))
def test_identical(attack: str, model_name: str) -> None:
    model = MODELS[model_name]()
    x, y = data()
    outcome = compare(
        "cleverhans", attack, model, CASES[attack](model, x, y, 2), model_name, expect_freeze=attack not in MODEL_FREE
    )
    expect(outcome, KNOWN_BROKEN)


# --- the shapes of model_fn -------------------------------------------------------------------------------------


def _call(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return module(x)


def _closure(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda t: module(t)


MODEL_FN_SHAPES: dict[str, Callable[[nn.Module], Any]] = {
    "module": lambda m: m,
    "bound_method": lambda m: m.forward,
    "partial": lambda m: functools.partial(_call, m),
    "lambda_closure": _closure,
}


def _kept_live(model: nn.Module) -> set[str]:
    """Names of the parameters the kernel-preserving rules leave live."""
    return kept_live_names(model)


@contextmanager
def _watch(model: nn.Module) -> Iterator[list[set[str]]]:
    """Record, at each forward of every submodule holding parameters, the names of the parameters still live."""
    seen: list[set[str]] = []

    def hook(mod: nn.Module, inp: Any) -> None:
        seen.append({n for n, p in model.named_parameters() if p.requires_grad})

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if m._parameters]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("model_name", ["cnn", "vit"])
@pytest.mark.parametrize("keyword", [False, True], ids=["positional", "keyword"])
@pytest.mark.parametrize("shape", sorted(MODEL_FN_SHAPES))
def test_model_fn_shapes_are_frozen(shape: str, keyword: bool, model_name: str) -> None:
    from cleverhans.torch.attacks.projected_gradient_descent import projected_gradient_descent

    model = MODELS[model_name]()
    x, y = data()
    model_fn = MODEL_FN_SHAPES[shape](model)

    def run() -> torch.Tensor:
        if keyword:
            return projected_gradient_descent(
                model_fn=model_fn, x=x, eps=0.03, eps_iter=0.01, nb_iter=2, norm=np.inf, y=y, clip_min=0.0, clip_max=1.0
            )
        return projected_gradient_descent(model_fn, x, 0.03, 0.01, 2, np.inf, y=y, clip_min=0.0, clip_max=1.0)

    assert compare("cleverhans", f"pgd-{shape}", model, run, model_name).result == "identical"
    counters = registry.counters("cleverhans")
    calls, unlocated = counters.calls, counters.unlocated
    with _watch(model) as seen:
        run()
    kept = _kept_live(model)
    assert bool(kept) == (model_name == "vit")
    assert seen and all(live <= kept for live in seen), f"{shape}: a forward ran with live parameters: {seen}"
    assert counters.calls - calls == 1 + 2  # PGD, and its two internal FGM calls
    assert counters.unlocated == unlocated


def test_model_fn_without_a_module_runs_unpatched_and_is_counted() -> None:
    from cleverhans.torch.attacks.fast_gradient_method import fast_gradient_method

    x, y = data()
    weight = torch.randn(3 * 8 * 8, 10, generator=torch.Generator().manual_seed(0))
    counters = registry.counters("cleverhans")
    calls, unlocated = counters.calls, counters.unlocated
    out = fast_gradient_method(lambda t: t.flatten(1) @ weight, x, 0.03, np.inf, y=y)
    assert out.shape == x.shape
    assert counters.unlocated == unlocated + 1 and counters.calls == calls


def test_nested_calls_are_counted() -> None:
    """PGD reaches FGM, and spsa itself once per sample, through the library's own (rebound) module globals."""
    from cleverhans.torch.attacks.projected_gradient_descent import projected_gradient_descent
    from cleverhans.torch.attacks.spsa import spsa

    model = tiny_cnn()
    x, y = data()
    counters = registry.counters("cleverhans")
    calls = counters.calls
    projected_gradient_descent(model, x, 0.03, 0.01, 3, np.inf, y=y, clip_min=0.0, clip_max=1.0)
    assert counters.calls - calls == 1 + 3
    calls = counters.calls
    spsa(model, x, 0.03, 1, y=y, spsa_samples=2, clip_min=0.0, clip_max=1.0)
    assert counters.calls - calls == 1 + len(x)
    assert freeze.held_count() == 0


# --- import orders, in fresh interpreters --------------------------------------------------------------------------

PRELUDE = """
import sys
import numpy as np
import torch
import sbpatch
from sbpatch import registry
from sbpatch.patching import SbpatchWrapper

def cleverhans_globals():
    return {
        (name, key): value
        for name, mod in list(sys.modules.items())
        if mod is not None and (name == "cleverhans" or name.startswith("cleverhans."))
        for key, value in vars(mod).items()
    }

def wrappers(globals_):
    return {k for k, v in globals_.items() if isinstance(v, SbpatchWrapper)}

torch.manual_seed(0)  # a small CNN without torchvision (its import is slow); conv bias frozen by the user
model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                            torch.nn.Linear(4 * 8 * 8, 10)).eval()
model[0].bias.requires_grad_(False)
x, y = torch.rand(4, 3, 8, 8), torch.randint(0, 10, (4,))
states = []
model.register_forward_pre_hook(lambda m, i: states.append(any(p.requires_grad for p in m.parameters())))
counters = registry.counters("cleverhans")
PGD, FGM = "cleverhans.torch.attacks.projected_gradient_descent", "cleverhans.torch.attacks.fast_gradient_method"
"""


def _run(body: str) -> None:
    code = textwrap.dedent(PRELUDE) + textwrap.dedent(body) + "\nprint('OK')\n"
    proc = run_python(code, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout + proc.stderr


def test_enable_before_import_gives_wrappers_and_freezes_nested_fgm() -> None:
    _run(
        """
        sbpatch.enable("cleverhans")
        assert "cleverhans" not in sys.modules
        from cleverhans.torch.attacks.projected_gradient_descent import projected_gradient_descent
        import cleverhans.torch.attacks.fast_gradient_method as fgm_mod
        import cleverhans.torch.attacks.projected_gradient_descent as pgd_mod

        assert isinstance(projected_gradient_descent, SbpatchWrapper)
        assert isinstance(pgd_mod.fast_gradient_method, SbpatchWrapper)
        assert pgd_mod.fast_gradient_method is fgm_mod.fast_gradient_method  # one wrapper, no double wrap
        assert not isinstance(fgm_mod.fast_gradient_method.__wrapped__, SbpatchWrapper)

        projected_gradient_descent(model, x, 0.03, 0.01, 3, np.inf, y=y, clip_min=0.0, clip_max=1.0)
        assert counters.calls == 1 + 3, counters.calls  # the outer PGD and its three internal FGM calls
        assert len(states) == 3 and not any(states), states  # every forward ran frozen
        assert [p.requires_grad for p in model.parameters()] == [True, False, True, True]
        assert all(p.grad is None for p in model.parameters())
        """
    )


def test_enable_after_import_rebinds_library_globals_and_disable_restores_them() -> None:
    _run(
        """
        # the user's own names, bound before enable(): sbpatch cannot reach them
        from cleverhans.torch.attacks.projected_gradient_descent import projected_gradient_descent as user_pgd
        from cleverhans.torch.attacks.fast_gradient_method import fast_gradient_method as user_fgm
        from cleverhans.torch.attacks.spsa import spsa as user_spsa
        import cleverhans.torch.attacks.fast_gradient_method as fgm_mod
        import cleverhans.torch.attacks.projected_gradient_descent as pgd_mod
        import cleverhans.torch.attacks.spsa as spsa_mod

        before = cleverhans_globals()
        assert not wrappers(before)
        sbpatch.enable("cleverhans")
        after = cleverhans_globals()
        changed = {k for k in before if after[k] is not before[k]}
        assert changed == wrappers(after)
        for k in changed:  # each a wrapper of exactly the original object
            assert after[k].__wrapped__ is before[k], k
        assert {(PGD, "fast_gradient_method"), (PGD, "projected_gradient_descent"), (FGM, "fast_gradient_method"),
                ("cleverhans.torch.attacks.spsa", "spsa")} <= changed, changed
        assert pgd_mod.fast_gradient_method is fgm_mod.fast_gradient_method  # PGD's internal FGM is the wrapper

        # names bound in the user's module before enable() stay the originals
        assert user_pgd is before[(PGD, "projected_gradient_descent")] and not isinstance(user_pgd, SbpatchWrapper)
        assert user_fgm is before[(FGM, "fast_gradient_method")] and not isinstance(user_fgm, SbpatchWrapper)
        assert user_spsa is not spsa_mod.spsa
        st = sbpatch.status()["cleverhans"]
        assert PGD + ".fast_gradient_method" in st.patched
        assert any("before enable()" in k for k in st.excluded), st.excluded

        # the user's original PGD runs unfrozen itself, but its internal FGM calls go through the wrapper
        user_pgd(model, x, 0.03, 0.01, 3, np.inf, y=y, clip_min=0.0, clip_max=1.0)
        assert counters.calls == 3, counters.calls
        assert len(states) == 3 and not any(states), states
        states.clear()
        # the user's original FGM is not reached at all
        user_fgm(model, x, 0.03, np.inf, y=y)
        assert counters.calls == 3 and states == [True], (counters.calls, states)

        sbpatch.disable("cleverhans")
        restored = cleverhans_globals()
        assert not wrappers(restored)
        assert all(restored[k] is v for k, v in before.items())

        sbpatch.enable("cleverhans")  # re-enable: wrapped again, once
        again = cleverhans_globals()
        assert wrappers(again) == changed
        assert all(again[k].__wrapped__ is before[k] for k in changed)
        sbpatch.disable("cleverhans")
        assert all(cleverhans_globals()[k] is v for k, v in before.items())
        """
    )
