"""foolbox 3.3.4 adapter: every exported attack is bit-identical frozen vs unfrozen, on a CNN and on a ViT."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from helpers import MODELS, compare, data, expect, seed_all, tiny_cnn

import sbpatch
from sbpatch import registry
from sbpatch.contrib.foolbox import INTEGRATION, _victim, cases
from sbpatch.patching import SbpatchWrapper

CASES = cases()

_NUMBA = "No module named 'numba'"  # foolbox's Brendel-Bethge attacks need numba, which is not installed
KNOWN_BROKEN: dict[tuple[str, str], str] = {
    (attack, model): _NUMBA
    for attack in (
        "L0BrendelBethgeAttack",
        "L1BrendelBethgeAttack",
        "L2BrendelBethgeAttack",
        "LinfinityBrendelBethgeAttack",
    )
    for model in MODELS
}


def test_cases_cover_every_exported_attack() -> None:
    import foolbox.attacks as fa

    exported = {
        obj.__name__
        for obj in vars(fa).values()
        if isinstance(obj, type) and issubclass(obj, fa.Attack) and obj is not fa.Attack
    }
    assert exported - set(CASES) == set()
    assert "Repeated" in CASES  # the fourth __call__, reached through attack.repeat()


def test_integration_declares_gitpython_shim() -> None:
    assert "gitpython_quiet" in INTEGRATION.shims


def test_the_four_calls_and_every_run_are_wrapped() -> None:
    import foolbox.attacks as fa
    from foolbox.attacks.base import FixedEpsilonAttack, MinimizationAttack, Repeated

    for cls in (FixedEpsilonAttack, MinimizationAttack, Repeated, fa.SpatialAttack):
        assert isinstance(cls.__dict__["__call__"], SbpatchWrapper), cls
    for cls in (fa.LinfPGD, fa.L2CarliniWagnerAttack, fa.BoundaryAttack, fa.SpatialAttack, fa.L2FMNAttack):
        owner = next(c for c in cls.__mro__ if "run" in c.__dict__)
        assert isinstance(owner.__dict__["run"], SbpatchWrapper), owner
    # inherited names are not re-planted on subclasses
    assert "run" not in fa.LinfPGD.__dict__ and "__call__" not in fa.LinfPGD.__dict__


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("attack", sorted(CASES))
def test_identical(attack: str, model_name: str) -> None:
    model = MODELS[model_name]()
    x, y = data()
    outcome = compare("foolbox", attack, model, CASES[attack](model, x, y, 2), model_name)
    expect(outcome, KNOWN_BROKEN)


def test_wrapper_chain_is_unwrapped() -> None:
    import foolbox as fb

    model = tiny_cnn()
    fmodel = fb.PyTorchModel(model, bounds=(0, 1), device="cpu")
    chain: Any = fmodel
    for _ in range(6):  # deeper than find_modules' own depth
        chain = fb.models.ExpectationOverTransformationWrapper(chain, n_steps=1)
        chain = fb.models.ThresholdingWrapper(chain, threshold=0.5)
    chain = fb.models.TransformBoundsWrapper(chain, (0, 255))
    assert _victim(None, None, (chain, None, None), {}) == [model]
    assert _victim(None, None, (), {"model": fmodel}) == [model]


@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_transform_bounds_wrapper_is_located(model_name: str) -> None:
    import foolbox as fb
    import foolbox.attacks as fa

    model = MODELS[model_name]()
    x, y = data()
    fmodel = fb.models.TransformBoundsWrapper(fb.PyTorchModel(model, bounds=(0, 1), device="cpu"), (0, 255))
    attack = fa.L2CarliniWagnerAttack(binary_search_steps=1, steps=2)
    outcome = compare(
        "foolbox", "CW via TransformBoundsWrapper", model, lambda: attack(fmodel, x * 255, y, epsilons=None), model_name
    )
    assert outcome.result == "identical"


def test_direct_run_is_frozen() -> None:
    import foolbox as fb
    import foolbox.attacks as fa

    model = tiny_cnn()
    x, y = data()
    fmodel = fb.PyTorchModel(model, bounds=(0, 1), device="cpu")
    outcome = compare(
        "foolbox", "LinfPGD.run", model, lambda: fa.LinfPGD(steps=2).run(fmodel, x, y, epsilon=0.03), "cnn"
    )
    assert outcome.result == "identical"


def test_user_subclass_defined_after_enable_is_wrapped() -> None:
    import eagerpy as ep
    import foolbox as fb
    import foolbox.attacks as fa
    from foolbox.attacks.base import get_criterion

    seen: list[bool] = []

    class OneStepSign(fa.base.FixedEpsilonAttack):  # a user's own attack, defined after sbpatch.enable()
        distance = fb.distances.linf

        def run(self, model: Any, inputs: Any, criterion: Any, *, epsilon: float, **kwargs: Any) -> Any:
            x, restore_type = ep.astensor_(inputs)
            labels = get_criterion(criterion).labels
            seen.append(all(not p.requires_grad for p in net.hidden.parameters()))

            def loss_fn(z: Any) -> Any:
                return ep.crossentropy(model(z), labels).sum()

            _, grad = ep.value_and_grad(loss_fn, x)
            return restore_type((x + epsilon * grad.sign()).clip(0, 1))

    assert isinstance(OneStepSign.__dict__["run"], SbpatchWrapper)
    net = tiny_cnn()
    x, y = data()
    fmodel = fb.PyTorchModel(net, bounds=(0, 1), device="cpu")
    attack = OneStepSign()
    outcome = compare("foolbox", "OneStepSign", net, lambda: attack(fmodel, x, y, epsilons=0.03), "cnn")
    assert outcome.result == "identical"
    assert seen == [False, True]  # unpatched run live, patched run frozen


def test_non_torch_model_runs_unpatched() -> None:
    import foolbox as fb
    import foolbox.attacks as fa

    weights = np.random.default_rng(0).standard_normal((3 * 8 * 8, 10)).astype(np.float32)
    fmodel = fb.models.NumPyModel(lambda a: a.reshape(len(a), -1) @ weights, bounds=(0, 1))
    x, y = data()
    counters = registry.counters("foolbox")
    unlocated, calls = counters.unlocated, counters.calls
    seed_all(0)
    with sbpatch.paused():
        expected = fa.L2AdditiveGaussianNoiseAttack()(fmodel, x.numpy(), y.numpy(), epsilons=0.5)
    seed_all(0)
    got = fa.L2AdditiveGaussianNoiseAttack()(fmodel, x.numpy(), y.numpy(), epsilons=0.5)
    assert all(np.array_equal(a, b) for a, b in zip(expected, got))
    assert counters.unlocated > unlocated and counters.calls == calls
