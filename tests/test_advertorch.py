"""advertorch 0.2.3: equality on every attack class and wrapped function, the shapes of ``predict``, subclasses
defined after enable(), the rebinding of the module functions, and import orders (in subprocesses, with the shim)."""

from __future__ import annotations

import functools
import inspect
import os
import sys
import textwrap
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
import torch.nn as nn
from helpers import MODELS, compare, data, expect, kept_live_names, run_python, tiny_cnn

import sbpatch
from sbpatch import freeze, registry
from sbpatch.contrib.advertorch import INTEGRATION, cases
from sbpatch.patching import SbpatchWrapper

# advertorch 0.2.3 imports only with sbpatch's torch_zero_gradients shim, and cases() imports it at collection, before
# conftest's session fixture runs enable(): enable it here (idempotent; the fixture's enable() then does nothing more).
sbpatch.enable("advertorch")
CASES = cases()
FUNCTIONS = ("perturb_iterative", "spsa_perturb")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))

# (attack, model) -> a substring of the error the UNPATCHED call raises on this stack. None today: every attack runs.
KNOWN_BROKEN: dict[tuple[str, str], str] = {}




def _attack_classes() -> dict[str, type]:
    """Every attack class exported by ``advertorch.attacks`` (aliases folded into their class), by class name."""
    import advertorch.attacks as at

    return {
        obj.__name__: obj
        for obj in vars(at).values()
        if inspect.isclass(obj) and issubclass(obj, at.Attack) and obj is not at.Attack
    }


def test_cases_cover_every_attack_class_and_function() -> None:
    assert set(CASES) == set(_attack_classes()) | set(FUNCTIONS)


def test_perturb_is_wrapped_once_on_every_class_that_defines_it() -> None:
    from advertorch.attacks import Attack

    from sbpatch.patching import all_subclasses

    st = sbpatch.status()["advertorch"]
    assert st.enabled and not st.skipped, st.skipped
    assert INTEGRATION.shims == ("torch_zero_gradients",)
    assert hasattr(sys.modules["torch.autograd.gradcheck"], "zero_gradients")
    defining = [c for c in [Attack, *all_subclasses(Attack)] if c.__module__.startswith("advertorch.")]
    assert len(defining) >= len(_attack_classes())
    for cls in defining:
        if "perturb" in cls.__dict__:
            wrapper = cls.__dict__["perturb"]
            assert isinstance(wrapper, SbpatchWrapper), cls
            assert not isinstance(wrapper.__wrapped__, SbpatchWrapper), cls  # never double-wrapped
            assert f"{cls.__module__}.{cls.__qualname__}.perturb" in st.patched
        else:  # inherits a wrapped perturb; no duplicate planted on the subclass
            assert isinstance(inspect.getattr_static(cls, "perturb"), SbpatchWrapper), cls


@pytest.mark.parametrize("model_name", ["cnn", "vit"])
@pytest.mark.parametrize("attack", sorted(CASES))
def test_identical(attack: str, model_name: str) -> None:
    model = MODELS[model_name]()
    x, y = data()
    outcome = compare("advertorch", attack, model, CASES[attack](model, x, y, 2), model_name)
    expect(outcome, KNOWN_BROKEN)


# --- the shapes of predict -------------------------------------------------------------------------------------------


@contextmanager
def _watch(model: nn.Module) -> Iterator[list[bool]]:
    """Record, at each forward of every submodule holding parameters, whether every freezable parameter was frozen
    (the parameters the user left live, less those the kernel-preserving rules keep live)."""
    kept = kept_live_names(model)
    freezable = [p for name, p in model.named_parameters() if p.requires_grad and name not in kept]
    assert freezable
    seen: list[bool] = []

    def hook(mod: nn.Module, inp: Any) -> None:
        seen.append(not any(p.requires_grad for p in freezable))

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if m._parameters]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


_GLOBAL_MODEL: nn.Module | None = None


def _call(module: nn.Module, t: torch.Tensor) -> torch.Tensor:
    return module(t)


def _closure(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda t: module(t)


def _global_lambda(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    global _GLOBAL_MODEL
    _GLOBAL_MODEL = module
    return lambda t: _GLOBAL_MODEL(t)  # names a module global, captures nothing


PREDICT_SHAPES: dict[str, Callable[[nn.Module], Any]] = {
    "module": lambda m: m,
    "bound_method": lambda m: m.forward,
    "partial": lambda m: functools.partial(_call, m),
    "lambda_closure": _closure,
    "lambda_global": _global_lambda,
}


@pytest.mark.parametrize("model_name", ["cnn", "vit"])
@pytest.mark.parametrize("shape", sorted(PREDICT_SHAPES))
def test_predict_shapes_are_located_and_frozen(shape: str, model_name: str) -> None:
    from advertorch.attacks import LinfPGDAttack

    model = MODELS[model_name]()
    x, y = data()
    attack = LinfPGDAttack(PREDICT_SHAPES[shape](model), eps=0.03, eps_iter=0.01, nb_iter=2)
    assert compare("advertorch", f"LinfPGD-{shape}", model, lambda: attack.perturb(x, y), model_name).result == (
        "identical"
    )
    counters = registry.counters("advertorch")
    calls, unlocated = counters.calls, counters.unlocated
    with _watch(model) as seen:
        attack(x, y)  # __call__ forwards to the wrapped perturb
    assert seen and all(seen), f"{shape}: a forward ran with live parameters"
    assert counters.calls - calls == 2  # perturb, and perturb_iterative through its module global
    assert counters.unlocated == unlocated


def test_predict_without_a_module_runs_unpatched_and_is_counted() -> None:
    from advertorch.attacks import GradientSignAttack

    x, y = data()
    weight = torch.randn(3 * 8 * 8, 10, generator=torch.Generator().manual_seed(0))
    counters = registry.counters("advertorch")
    calls, unlocated = counters.calls, counters.unlocated
    out = GradientSignAttack(lambda t: t.flatten(1) @ weight, eps=0.03).perturb(x, y)
    assert out.shape == x.shape and not torch.equal(out, x)
    assert counters.unlocated == unlocated + 1 and counters.calls == calls


@pytest.mark.parametrize("model_name", ["cnn", "vit"])
def test_an_attack_that_raises_restores_every_flag(model_name: str) -> None:
    from advertorch.attacks import LinfPGDAttack

    model = MODELS[model_name]()
    flags = [p.requires_grad for p in model.parameters()]
    x, _ = data()
    seen: list[bool] = []
    handle = model.register_forward_pre_hook(lambda m, i: seen.append(any(not p.requires_grad for p in m.parameters())))
    try:
        with pytest.raises((RuntimeError, ValueError, IndexError)):
            LinfPGDAttack(model, eps=0.03, eps_iter=0.01, nb_iter=2).perturb(x, torch.zeros(len(x) + 1).long())
    finally:
        handle.remove()
    assert seen and all(seen)  # it did run frozen before failing
    assert [p.requires_grad for p in model.parameters()] == flags
    assert freeze.held_count() == 0


@pytest.mark.parametrize(
    ("attack", "nested"),
    [("LinfPGDAttack", 1), ("FastFeatureAttack", 1), ("LinfSPSAAttack", 1), ("ChooseBestAttack", 3)],
)
def test_nested_calls_are_frozen_and_counted(attack: str, nested: int) -> None:
    """The attack's own perturb plus what it reaches: perturb_iterative / spsa_perturb through the module globals,
    the base adversaries of ChooseBestAttack (FGSM, and PGD with its perturb_iterative)."""
    model = tiny_cnn()
    x, y = data()
    run = CASES[attack](model, x, y, 2)
    counters = registry.counters("advertorch")
    calls = counters.calls
    with _watch(model) as seen:
        run()
    assert counters.calls - calls == 1 + nested
    assert seen and all(seen)
    assert freeze.held_count() == 0
    assert all(p.grad is None for p in model.parameters())  # unpatched, advertorch leaves every param.grad filled


# --- subclasses defined after enable() -------------------------------------------------------------------------------


def test_user_subclasses_defined_after_enable_are_covered() -> None:
    from advertorch.attacks import Attack, LabelMixin, LinfPGDAttack

    class MyPGD(LinfPGDAttack):
        def perturb(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
            return super().perturb(x, y)

    class Inherits(LinfPGDAttack):
        pass

    class OneStep(Attack, LabelMixin):
        """A user's own attack that calls the model itself and ``loss.backward()`` with live parameters."""

        def __init__(self, predict: Any) -> None:
            super().__init__(predict, nn.CrossEntropyLoss(), 0.0, 1.0)
            self.targeted = False

        def perturb(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
            x, y = self._verify_and_process_inputs(x, y)
            x = x.requires_grad_()
            self.loss_fn(self.predict(x), y).backward()
            return (x + 0.03 * x.grad.sign()).clamp(0, 1).detach()

    assert isinstance(MyPGD.__dict__["perturb"], SbpatchWrapper)
    assert isinstance(OneStep.__dict__["perturb"], SbpatchWrapper)
    assert "perturb" not in Inherits.__dict__
    x, y = data()
    counters = registry.counters("advertorch")
    for cls, per_call in ((MyPGD, 3), (Inherits, 2), (OneStep, 1)):
        for model_name in ("cnn", "vit"):
            model = MODELS[model_name]()
            attack = cls(model) if cls is OneStep else cls(model.forward, eps=0.03, eps_iter=0.01, nb_iter=2)
            assert compare("advertorch", cls.__name__, model, lambda a=attack: a(x, y), model_name).result == (
                "identical"
            )
            calls = counters.calls
            with _watch(model) as seen:
                attack(x, y)
            assert seen and all(seen), cls
            assert counters.calls - calls == per_call, cls


# --- the module functions: rebinding, disable and re-enable ----------------------------------------------------------


def test_functions_reached_through_module_globals_and_disable_restores_them() -> None:
    import advertorch.attacks.iterative_projected_gradient as ipg
    import advertorch.attacks.spsa as spsa_mod
    from advertorch.attacks import Attack, LinfPGDAttack, LinfSPSAAttack, PGDAttack

    pgd_perturb = PGDAttack.__dict__["perturb"]
    spsa_perturb_method = LinfSPSAAttack.__dict__["perturb"]
    assert isinstance(pgd_perturb, SbpatchWrapper) and isinstance(spsa_perturb_method, SbpatchWrapper)
    # the globals the attack methods call the functions through hold sbpatch's wrappers
    pi_wrapper = pgd_perturb.__wrapped__.__globals__["perturb_iterative"]
    sp_wrapper = spsa_perturb_method.__wrapped__.__globals__["spsa_perturb"]
    assert isinstance(pi_wrapper, SbpatchWrapper) and pi_wrapper is ipg.perturb_iterative
    assert isinstance(sp_wrapper, SbpatchWrapper) and sp_wrapper is spsa_mod.spsa_perturb
    originals = {"pi": pi_wrapper.__wrapped__, "sp": sp_wrapper.__wrapped__, "pgd": pgd_perturb.__wrapped__}
    assert not any(isinstance(f, SbpatchWrapper) for f in originals.values())

    model = tiny_cnn()
    x, y = data()
    counters = registry.counters("advertorch")
    try:
        sbpatch.disable("advertorch")
        assert ipg.perturb_iterative is originals["pi"]
        assert pgd_perturb.__wrapped__.__globals__["perturb_iterative"] is originals["pi"]
        assert spsa_mod.spsa_perturb is originals["sp"]
        assert PGDAttack.__dict__["perturb"] is originals["pgd"]
        assert not isinstance(Attack.__dict__["perturb"], SbpatchWrapper)

        class Late(LinfPGDAttack):  # defined while disabled: not wrapped
            def perturb(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
                return super().perturb(x, y)

        assert not isinstance(Late.__dict__["perturb"], SbpatchWrapper)
        calls = counters.calls
        with _watch(model) as seen:
            LinfPGDAttack(model, eps=0.03, eps_iter=0.01, nb_iter=2).perturb(x, y)
        assert counters.calls == calls and seen and not any(seen)
    finally:
        model.zero_grad(set_to_none=True)
        sbpatch.enable("advertorch")

    assert ipg.perturb_iterative is pgd_perturb.__wrapped__.__globals__["perturb_iterative"]
    for current, original in (
        (ipg.perturb_iterative, originals["pi"]),
        (spsa_mod.spsa_perturb, originals["sp"]),
        (PGDAttack.__dict__["perturb"], originals["pgd"]),
    ):
        assert isinstance(current, SbpatchWrapper) and current.__wrapped__ is original  # wrapped again, once
    assert isinstance(Late.__dict__["perturb"], SbpatchWrapper)  # the existing subclass is found at re-enable
    calls = counters.calls
    with _watch(model) as seen:
        LinfPGDAttack(model, eps=0.03, eps_iter=0.01, nb_iter=2).perturb(x, y)
    assert counters.calls - calls == 2 and seen and all(seen)


# --- import orders, in fresh interpreters ----------------------------------------------------------------------------

PRELUDE = """
import importlib
import sys
sys.path.insert(0, {tests!r})
from helpers import data, tiny_cnn
import sbpatch
from sbpatch import registry
from sbpatch.patching import SbpatchWrapper

IPG, SPSA = "advertorch.attacks.iterative_projected_gradient", "advertorch.attacks.spsa"

def advertorch_globals():
    return {{
        (name, key): value
        for name, mod in list(sys.modules.items())
        if mod is not None and (name == "advertorch" or name.startswith("advertorch."))
        for key, value in vars(mod).items()
    }}

def wrappers(globals_):
    return {{k for k, v in globals_.items() if isinstance(v, SbpatchWrapper)}}

def check_pgd_frozen():
    from advertorch.attacks import LinfPGDAttack
    model = tiny_cnn()
    x, y = data()
    states = []
    model.register_forward_pre_hook(lambda m, i: states.append(any(p.requires_grad for p in m.parameters())))
    calls = counters.calls
    LinfPGDAttack(model, eps=0.03, eps_iter=0.01, nb_iter=3).perturb(x, y)
    assert counters.calls - calls == 2, counters.calls  # perturb and perturb_iterative
    assert len(states) == 3 and not any(states), states  # every forward ran frozen
    assert all(p.requires_grad for n, p in model.named_parameters() if n != "conv.bias")
    assert all(p.grad is None for p in model.parameters())

counters = registry.counters("advertorch")
"""


def _run(body: str) -> None:
    code = textwrap.dedent(PRELUDE.format(tests=TESTS)) + textwrap.dedent(body) + "\nprint('OK')\n"
    proc = run_python(code, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout + proc.stderr


def test_enable_before_import_applies_the_shim_and_wraps_everything() -> None:
    _run(
        """
        sbpatch.enable("advertorch")
        assert "advertorch" not in sys.modules
        import advertorch  # imports FAB, which needs torch.autograd.gradcheck.zero_gradients: the shim
        from advertorch.attacks.iterative_projected_gradient import perturb_iterative  # bound after enable
        from advertorch.attacks import LinfFABAttack, PGDAttack

        st = sbpatch.status()["advertorch"]
        assert st.shims == ["torch_zero_gradients"] and not st.skipped, (st.shims, st.skipped)
        assert isinstance(perturb_iterative, SbpatchWrapper)
        assert wrappers(advertorch_globals()) == {(IPG, "perturb_iterative"), (SPSA, "spsa_perturb")}
        assert isinstance(PGDAttack.__dict__["perturb"], SbpatchWrapper)
        assert "perturb" not in LinfFABAttack.__dict__
        assert IPG + ".PGDAttack.perturb" in st.patched and IPG + ".perturb_iterative" in st.patched
        check_pgd_frozen()
        """
    )


def test_import_failing_before_enable_works_after_enable() -> None:
    """Without the shim advertorch 0.2.3 cannot import on this torch; enable() adds it, and the retried import is
    patched (the submodules left in sys.modules by the failed import are patched directly)."""
    _run(
        """
        try:
            import advertorch
        except ImportError as exc:
            assert "zero_gradients" in str(exc), exc
        else:
            raise AssertionError("advertorch imported without the shim: the shim may no longer be needed")
        sbpatch.enable("advertorch")
        import advertorch
        from advertorch.attacks import FABAttack, PGDAttack

        assert isinstance(PGDAttack.__dict__["perturb"], SbpatchWrapper)
        assert isinstance(FABAttack.__dict__["perturb"], SbpatchWrapper)
        assert wrappers(advertorch_globals()) == {(IPG, "perturb_iterative"), (SPSA, "spsa_perturb")}
        assert not sbpatch.status()["advertorch"].skipped
        check_pgd_frozen()
        """
    )


def test_enable_after_import_rebinds_library_globals_not_user_names() -> None:
    _run(
        """
        from sbpatch import compat
        compat.apply("torch_zero_gradients")  # the user's own workaround, so advertorch imports before enable()
        import advertorch
        from advertorch.attacks.iterative_projected_gradient import perturb_iterative as user_pi

        before = advertorch_globals()
        assert not wrappers(before)
        sbpatch.enable("advertorch")
        after = advertorch_globals()
        changed = {k for k in before if after[k] is not before[k]}
        assert changed == wrappers(after) == {(IPG, "perturb_iterative"), (SPSA, "spsa_perturb")}, changed
        assert all(after[k].__wrapped__ is before[k] for k in changed)
        assert user_pi is before[(IPG, "perturb_iterative")]  # the user's name, bound before enable(): unreachable
        assert any("before enable()" in k for k in sbpatch.status()["advertorch"].excluded)
        check_pgd_frozen()

        sbpatch.disable("advertorch")
        assert all(advertorch_globals()[k] is v for k, v in before.items())
        sbpatch.enable("advertorch")
        assert {k for k, v in advertorch_globals().items() if v is not before.get(k)} == changed
        check_pgd_frozen()
        """
    )
