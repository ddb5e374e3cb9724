"""ART adapter: every evasion attack's ``generate`` and the PyTorch estimators' gradients, patched vs unpatched.

ART's gradient methods call ``model.zero_grad()`` themselves, so as shipped they clear ``param.grad`` and refill it;
with sbpatch they clear it and fill nothing. ``compare()`` checks ``.grad`` against the state before the call, which
neither run keeps, so every ART call here goes through :func:`grad_guard`: it restores ``.grad`` after each run and,
in the frozen run, asserts that no parameter received a gradient.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn as nn
from helpers import MODELS, compare, data, expect, seed_all, tiny_cnn

import sbpatch
from sbpatch import registry
from sbpatch.contrib.art import cases
from sbpatch.patching import SbpatchWrapper

CASES = cases()
STEPS = 2

NUMPY2_DOUBLE = "Input type (double) and bias type (float)"  # NumPy 2 promotes the perturbation to float64
# (attack, model) -> a piece of the error the UNPATCHED call raises on this stack (torch 2.14, NumPy 2, no extras).
KNOWN_BROKEN: dict[tuple[str, str], str] = {
    **{(a, m): "'patch'" for a in ("AdversarialPatchNumpy",) for m in MODELS},  # np.float32 mean value
    **{(a, m): "No module named 'numba'" for a in ("BrendelBethgeAttack",) for m in MODELS},
    **{(a, m): "No module named 'kornia'" for a in ("CompositeAdversarialAttackPyTorch",) for m in MODELS},
    **{(a, m): "No module named 'cv2'" for a in ("GRAPHITEBlackbox", "GRAPHITEWhiteboxPyTorch") for m in MODELS},
    **{(a, m): "np.mat" for a in ("GeoDA",) for m in MODELS},
    **{(a, m): "np.asfarray" for a in ("LaserAttack", "LaserBeamAttack") for m in MODELS},
    **{(a, m): "No module named 'cma'" for a in ("ThresholdAttack",) for m in MODELS},
    **{(a, m): NUMPY2_DOUBLE for a in ("BoundaryAttack", "HopSkipJump") for m in MODELS},
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    """ART's per-sample loops issue thousands of tiny ops: extra intra-op threads only spin on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def grad_guard(model: nn.Module, run: Callable[[], Any]) -> Callable[[], Any]:
    """``run`` with ``.grad`` restored afterwards; in a frozen (counted) call, assert no gradient was written."""
    params = list(model.parameters())
    counters = registry.counters("art")

    def guarded() -> Any:
        before = [p.grad for p in params]
        calls = counters.calls
        try:
            out = run()
        finally:
            after = [p.grad for p in params]
            for p, g in zip(params, before):
                p.grad = g
        if counters.calls > calls:
            for i, (g0, g1) in enumerate(zip(before, after)):
                assert g1 is None or g1 is g0, f"parameter {i} received a gradient during a frozen ART call"
        return out

    return guarded


def test_cases_cover_every_pytorch_evasion_attack() -> None:
    """Each public evasion attack is either a case or listed as excluded (so a new ART attack is noticed)."""
    import art.attacks.evasion as ev
    from art.attacks.attack import EvasionAttack

    from sbpatch.contrib.art import INTEGRATION

    public = {n for n, c in vars(ev).items() if inspect.isclass(c) and issubclass(c, EvasionAttack)}
    excluded = " ".join(INTEGRATION.excluded)
    missing = {n for n in public - set(CASES) if n not in excluded and not n.endswith("TensorFlowV2")}
    assert missing == set()
    assert "FastGradientMethod" in CASES and "ProjectedGradientDescentPyTorch" in CASES


@pytest.mark.parametrize("model_name", ["cnn", "vit"])
@pytest.mark.parametrize("attack", sorted(CASES))
def test_identical(attack: str, model_name: str) -> None:
    model = MODELS[model_name]()
    x, y = data()
    outcome = compare("art", attack, model, grad_guard(model, CASES[attack](model, x, y, STEPS)), model_name)
    expect(outcome, KNOWN_BROKEN)


def _classifier(model: nn.Module, optimizer: bool = False) -> Any:
    from art.estimators.classification import PyTorchClassifier

    opt = torch.optim.SGD(model.parameters(), lr=0.1) if optimizer else None
    return PyTorchClassifier(model, nn.CrossEntropyLoss(), (3, 8, 8), 10, optimizer=opt, clip_values=(0.0, 1.0))


def _numpy(x: torch.Tensor, y: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    return x.numpy(), np.eye(10, dtype=np.float32)[y.numpy()]


GRADIENTS: dict[str, Callable[[Any, np.ndarray, np.ndarray], Any]] = {
    "loss_gradient": lambda clf, x, y: clf.loss_gradient(x, y),
    "class_gradient": lambda clf, x, y: clf.class_gradient(x, label=3),
    "class_gradient_all": lambda clf, x, y: clf.class_gradient(x),
    "custom_loss_gradient": lambda clf, x, y: clf.custom_loss_gradient(
        torch.norm, x, x[::-1].copy(), clf.layer_names[0]
    ),
}


@pytest.mark.parametrize("model_name", ["cnn", "vit"])
@pytest.mark.parametrize("method", sorted(GRADIENTS))
def test_estimator_gradients_identical(method: str, model_name: str) -> None:
    """A gradient called outside any attack (AdversarialTrainerFBFPyTorch, user code) is frozen on its own."""
    model = MODELS[model_name]()
    clf = _classifier(model)
    xn, yn = _numpy(*data())
    run = grad_guard(model, lambda: GRADIENTS[method](clf, xn, yn))
    assert compare("art", method, model, run, model_name).result == "identical"


def test_regressor_gradient_identical() -> None:
    from art.estimators.regression import PyTorchRegressor

    model = tiny_cnn(classes=1)
    reg = PyTorchRegressor(model, nn.MSELoss(), (3, 8, 8), clip_values=(0.0, 1.0))
    x, _ = data()
    xn, yn = x.numpy(), np.linspace(0, 1, len(x), dtype=np.float32)
    run = grad_guard(model, lambda: reg.loss_gradient(xn, yn))
    assert compare("art", "PyTorchRegressor.loss_gradient", model, run, "cnn").result == "identical"


def test_ensemble_of_pytorch_classifiers_is_located() -> None:
    """A non-PyTorch wrapper estimator is looked through: both members are frozen by one generate call."""
    from art.attacks.evasion import FastGradientMethod
    from art.estimators.classification import EnsembleClassifier

    first, second = tiny_cnn(seed=0), tiny_cnn(seed=1)
    members = [_classifier(first), _classifier(second)]
    ensemble = EnsembleClassifier(members, clip_values=(0.0, 1.0), channels_first=True)
    xn, yn = _numpy(*data())
    attack = FastGradientMethod(ensemble, eps=0.03)
    seen: list[bool] = []
    hook = second.register_forward_pre_hook(lambda m, i: seen.append(m.hidden.weight.requires_grad))
    run = grad_guard(second, grad_guard(first, lambda: attack.generate(xn, yn)))
    try:
        outcome = compare("art", "EnsembleClassifier", first, run, "cnn", models=[first, second])
    finally:
        hook.remove()
    assert outcome.result == "identical"
    assert False in seen  # the second member ran frozen in the patched call too


def test_non_pytorch_estimator_runs_unpatched() -> None:
    """An estimator of another framework (here ART's BlackBoxClassifierNeuralNetwork over a function) is left alone."""
    from art.attacks.evasion import SquareAttack
    from art.estimators.classification import BlackBoxClassifierNeuralNetwork

    model = tiny_cnn()
    seen: list[bool] = []
    hook = model.register_forward_pre_hook(lambda m, i: seen.append(m.hidden.weight.requires_grad))

    def predict(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return torch.softmax(model(torch.from_numpy(x)), 1).numpy()

    clf = BlackBoxClassifierNeuralNetwork(predict, (3, 8, 8), 10, clip_values=(0.0, 1.0))
    xn, yn = _numpy(*data())
    attack = SquareAttack(clf, eps=0.03, max_iter=STEPS, nb_restarts=1, verbose=False)
    counters = registry.counters("art")
    calls, unlocated = counters.calls, counters.unlocated
    try:
        seed_all(0)
        with sbpatch.paused():
            expected = attack.generate(xn, yn)
        seed_all(0)
        got = attack.generate(xn, yn)
    finally:
        hook.remove()
    assert np.array_equal(expected, got)
    assert counters.calls == calls and counters.unlocated > unlocated
    assert seen and all(seen)  # never frozen


def test_user_subclass_defined_after_enable_is_wrapped() -> None:
    from art.attacks.attack import EvasionAttack
    from art.attacks.evasion import ProjectedGradientDescentPyTorch
    from art.estimators.classification import PyTorchClassifier

    class SignStep(EvasionAttack):
        _estimator_requirements = (PyTorchClassifier,)
        attack_params: list[str] = []

        def generate(self, x: np.ndarray, y: np.ndarray | None = None, **kwargs: Any) -> np.ndarray:
            self.flags = [p.requires_grad for p in self.estimator.model.parameters()]
            return np.clip(x + 0.03 * np.sign(self.estimator.loss_gradient(x, y)), 0, 1)

    class MyPGD(ProjectedGradientDescentPyTorch):
        def generate(self, x: np.ndarray, y: np.ndarray | None = None, **kwargs: Any) -> np.ndarray:
            self.flags = [p.requires_grad for p in self.estimator.model.parameters()]
            return super().generate(x, y, **kwargs)

    assert isinstance(SignStep.__dict__["generate"], SbpatchWrapper)
    assert isinstance(MyPGD.__dict__["generate"], SbpatchWrapper)
    for cls, kw in ((SignStep, {}), (MyPGD, {"eps": 0.03, "eps_step": 0.01, "max_iter": 2, "verbose": False})):
        model = tiny_cnn()
        attack = cls(estimator=_classifier(model), **kw)
        xn, yn = _numpy(*data())
        run = grad_guard(model, lambda attack=attack, xn=xn, yn=yn: attack.generate(xn, yn))
        outcome = compare("art", cls.__name__, model, run, "cnn")
        assert outcome.result == "identical"
        assert not any(attack.flags)  # inside the patched generate every parameter was frozen


def test_nothing_excluded_inherits_a_wrapped_method() -> None:
    import importlib

    from art.attacks.attack import Attack, EvasionAttack
    from art.defences.trainer import Trainer
    from art.estimators.estimator import BaseEstimator

    from sbpatch.patching import all_subclasses

    for mod in (
        "art.attacks.poisoning",
        "art.attacks.extraction",
        "art.attacks.inference",
        "art.defences.trainer",
        "art.estimators.classification",
        "art.estimators.regression",
    ):
        importlib.import_module(mod)
    checked = 0
    for cls in [c for c in all_subclasses(Attack) if not issubclass(c, EvasionAttack)]:
        for name in ("generate", "poison", "extract", "infer", "reconstruct", "fit"):
            assert not isinstance(inspect.getattr_static(cls, name, None), SbpatchWrapper), (cls, name)
            checked += 1
    for cls in all_subclasses(Trainer) + all_subclasses(BaseEstimator):
        for name in ("fit", "fit_generator"):
            assert not isinstance(inspect.getattr_static(cls, name, None), SbpatchWrapper), (cls, name)
            checked += 1
    assert checked > 100


def test_evasion_class_that_is_also_poisoning_is_not_frozen() -> None:
    """exclude_class skips such a class's own generate; pass_instance lets an inherited one through unfrozen."""
    from art.attacks.attack import Attack, EvasionAttack, PoisoningAttackBlackBox
    from art.attacks.evasion import SquareAttack

    class Poisoner(PoisoningAttackBlackBox):
        def __init__(self, **kwargs: Any) -> None:  # cooperative with EvasionAttack's keyword arguments
            Attack.__init__(self, **kwargs)

        def poison(self, x: np.ndarray, y: np.ndarray | None = None, **kwargs: Any) -> tuple:
            return x, y

    class OwnGenerate(EvasionAttack, Poisoner):
        def generate(self, x: np.ndarray, y: np.ndarray | None = None, **kwargs: Any) -> np.ndarray:
            return x

    class Inherited(SquareAttack, Poisoner):  # queries the model only: no nested estimator gradient
        pass

    assert not isinstance(OwnGenerate.__dict__["generate"], SbpatchWrapper)
    model = tiny_cnn()
    attack = Inherited(estimator=_classifier(model), eps=0.03, max_iter=STEPS, nb_restarts=1, verbose=False)
    seen: list[bool] = []
    hook = model.register_forward_pre_hook(lambda m, i: seen.append(m.hidden.weight.requires_grad))
    counters = registry.counters("art")
    passed = counters.passed
    try:
        attack.generate(*_numpy(*data()))
    finally:
        hook.remove()
    assert counters.passed > passed and seen and all(seen)


def test_status_lists_the_patched_methods() -> None:
    import art.attacks.evasion
    import art.estimators.certification.randomized_smoothing
    import art.estimators.regression  # noqa: F401

    status = sbpatch.status()["art"]
    assert status.enabled and status.skipped == {}
    patched = set(status.patched)
    for name in (
        "art.attacks.attack.EvasionAttack.generate",
        "art.attacks.evasion.fast_gradient.FastGradientMethod.generate",
        "art.estimators.classification.pytorch.PyTorchClassifier.loss_gradient",
        "art.estimators.certification.randomized_smoothing.pytorch.PyTorchRandomizedSmoothing.loss_gradient",
        "art.estimators.regression.pytorch.PyTorchRegressor.custom_loss_gradient",
    ):
        assert name in patched, name
    assert not any(".fit" in name for name in patched)


# --- adversarial training: the attack inside is frozen, the training step is not -------------------------------------


def _trainer(name: str, clf: Any) -> Any:
    from art.attacks.evasion import FastGradientMethod, ProjectedGradientDescent
    from art.defences.trainer import (
        AdversarialTrainer,
        AdversarialTrainerFBFPyTorch,
        AdversarialTrainerMadryPGD,
        AdversarialTrainerTRADESPyTorch,
    )

    pgd = ProjectedGradientDescent(clf, eps=0.03, eps_step=0.01, max_iter=2, verbose=False)
    if name == "AdversarialTrainer-PGD":
        return AdversarialTrainer(clf, pgd, ratio=0.5)
    if name == "AdversarialTrainer-FGSM":
        return AdversarialTrainer(clf, FastGradientMethod(clf, eps=0.03), ratio=1.0)
    if name == "AdversarialTrainerMadryPGD":
        return AdversarialTrainerMadryPGD(clf, nb_epochs=1, batch_size=4, eps=0.03, eps_step=0.01, max_iter=2)
    if name == "AdversarialTrainerTRADESPyTorch":
        return AdversarialTrainerTRADESPyTorch(clf, pgd, beta=1.0)
    return AdversarialTrainerFBFPyTorch(clf, eps=0.03)


TRAINERS = [
    "AdversarialTrainer-PGD",
    "AdversarialTrainer-FGSM",
    "AdversarialTrainerMadryPGD",
    "AdversarialTrainerTRADESPyTorch",
    "AdversarialTrainerFBFPyTorch",
]


@pytest.mark.parametrize("model_name", ["cnn", "vit"])
@pytest.mark.parametrize("trainer", TRAINERS)
def test_adversarial_training(trainer: str, model_name: str) -> None:
    """fit() trains (weights move) with the attack frozen inside, and ends with the weights of an unpatched fit."""
    x, y = data(n=8)
    xn, yn = _numpy(x, y)
    initial = MODELS[model_name]()
    results = []
    counters = registry.counters("art")
    for patched in (False, True):
        model = copy.deepcopy(initial)
        clf = _classifier(model, optimizer=True)
        seen: list[bool] = []
        hook = model.register_forward_pre_hook(
            lambda m, i, seen=seen: seen.append(
                any(p.requires_grad for n, p in m.named_parameters() if "in_proj" not in n)
            )
        )
        calls = counters.calls
        seed_all(0)
        try:
            if patched:
                _fit(trainer, clf, xn, yn)
            else:
                with sbpatch.paused():
                    _fit(trainer, clf, xn, yn)
        finally:
            hook.remove()
        results.append((model, seen, counters.calls - calls))
    (plain, seen_plain, calls_plain), (frozen, seen_frozen, calls_frozen) = results
    assert calls_plain == 0 and calls_frozen > 0
    assert all(seen_plain)  # unpatched: parameters always live
    assert False in seen_frozen and True in seen_frozen  # patched: attack passes frozen, training passes live
    assert all(p.requires_grad == q.requires_grad for p, q in zip(initial.parameters(), frozen.parameters()))
    before, after, reference = initial.state_dict(), frozen.state_dict(), plain.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "fit did not train"
    differing = [k for k in reference if not torch.equal(reference[k], after[k])]
    assert differing == [], f"weights after a patched fit differ from an unpatched fit: {differing}"


def _fit(trainer: str, clf: Any, xn: np.ndarray, yn: np.ndarray) -> None:
    t = _trainer(trainer, clf)
    if trainer == "AdversarialTrainerMadryPGD":
        t.fit(xn, yn)
    else:
        t.fit(xn, yn, batch_size=4, nb_epochs=1)
