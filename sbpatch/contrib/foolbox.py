"""foolbox 3: every attack is called as ``attack(fmodel, inputs, criterion, epsilons=...)``.

Wrapped: ``Attack.__call__`` and every subclass's own ``__call__`` (in foolbox 3.3.4 exactly the four
``FixedEpsilonAttack``, ``MinimizationAttack``, ``Repeated`` and ``SpatialAttack``), and each attack's own ``run``
(``FixedEpsilonAttack.run`` and ``MinimizationAttack.run`` with their subclasses, ``SpatialAttack.run``), so a direct
``attack.run(...)`` and a user's own attack subclass are covered too. Nested calls (``__call__`` -> ``run``,
``Repeated`` -> inner attack, init attacks) just take the freeze again.

The victim: the first argument (or ``model=``) is a foolbox ``Model``. ``PyTorchModel`` keeps the ``nn.Module`` only in
the closure of ``fmodel._model``; wrappers (``TransformBoundsWrapper``, ``ThresholdingWrapper``,
``ExpectationOverTransformationWrapper``) hold another Model in ``._model``. Models of other frameworks have no module:
those calls run unpatched. foolbox differentiates through eagerpy's ``value_and_grad`` (``loss.backward()``), so every
gradient attack gains (decision-based ones gain on their forward passes), and none of them leaves gradients in
``param.grad`` any more. Nothing in foolbox trains.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sbpatch.locate import NotTorch, find_modules
from sbpatch.patching import Integration, Target

_MAX_WRAPPERS = 32


def _victim(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> list[Any]:
    """The modules behind the foolbox Model given as ``model`` (first argument), through any wrapper chain."""
    model = args[0] if args else kwargs.get("model")
    if model is None:
        return []
    import torch

    for _ in range(_MAX_WRAPPERS):  # unwrap Model wrappers: each keeps the next Model in ``._model``
        if isinstance(model, torch.nn.Module):
            break
        inner = getattr(model, "_model", None)
        if inner is None or not hasattr(inner, "_model"):
            break
        model = inner
    found = find_modules(model, attributes=("_model", "model"))
    if not found and "pytorch" not in type(model).__module__:  # a NumPy, TensorFlow or JAX model
        return NotTorch()
    return found


INTEGRATION = Integration(
    name="foolbox",
    distribution="foolbox",
    module="foolbox",
    supported=">=3.3,<4",
    targets=(
        Target("foolbox.attacks.base", "Attack.__call__", _victim, subclasses=True),
        Target("foolbox.attacks.base", "FixedEpsilonAttack.run", _victim, subclasses=True),
        Target("foolbox.attacks.base", "MinimizationAttack.run", _victim, subclasses=True),
        Target("foolbox.attacks.spatial_attack", "SpatialAttack.run", _victim, subclasses=True),
    ),
    shims=("gitpython_quiet",),
)

Builder = Callable[[Any, Any, Any, int], Callable[[], Any]]

# perturbation budgets of the fixed-epsilon attacks, by norm (inputs in [0, 1])
_EPS = {"Linf": 8 / 255, "L2": 0.5, "L1": 5.0}


def cases() -> dict[str, Builder]:
    """One builder per attack class exported by ``foolbox.attacks`` (plus ``Repeated``).

    ``builder(model, x, y, steps)`` wraps the model in a ``PyTorchModel`` (bounds (0, 1)) and returns a zero-argument
    call of the attack that yields ``(raw, clipped, success)``. A construction error is deferred into that call, so a
    case the library cannot run on this stack shows up as the call's failure.
    """
    import foolbox as fb
    import foolbox.attacks as fa

    def fmodel_of(model: Any, x: Any) -> Any:
        return fb.PyTorchModel(model, bounds=(0, 1), device=x.device)

    def deferred(make: Callable[[], Callable[[], Any]]) -> Callable[[], Any]:
        try:
            return make()
        except Exception as exc:  # e.g. Brendel-Bethge without numba: fail at call time, where compare() looks
            error = exc

            def fail() -> Any:
                raise error

            return fail

    def norm_eps(name: str) -> float | None:
        for prefix in ("Linf", "L2", "L1"):
            if name.startswith(prefix):
                return _EPS[prefix]
        return None

    def tiny_init() -> Any:
        return fa.SaltAndPepperNoiseAttack(steps=50)

    def simple(cls: Any, eps: float | None = None, **kw: Any) -> Builder:
        """``cls(**kw)``: ``"steps"`` becomes the budget, ``tiny_init`` a fresh init attack; ``eps=None``: minimize."""

        def build(model: Any, x: Any, y: Any, steps: int) -> Callable[[], Any]:
            def make() -> Callable[[], Any]:
                args = {k: (steps if v == "steps" else v() if v is tiny_init else v) for k, v in kw.items()}
                attack = cls(**args)
                fmodel = fmodel_of(model, x)
                return lambda: attack(fmodel, x, y, epsilons=eps)

            return deferred(make)

        return build

    def fixed(cls: Any, **kw: Any) -> Builder:
        eps = norm_eps(cls.__name__)
        return simple(cls, eps if eps is not None else _EPS["L2"], **kw)

    def gen(model: Any, x: Any, y: Any, steps: int) -> Callable[[], Any]:
        def make() -> Callable[[], Any]:
            import torch

            with torch.no_grad():
                classes = int(model(x[:1]).shape[1])
            attack = fa.GenAttack(steps=steps, population=4)
            fmodel = fmodel_of(model, x)
            criterion = fb.criteria.TargetedMisclassification((y + 1) % classes)
            return lambda: attack(fmodel, x, criterion, epsilons=_EPS["Linf"])

        return deferred(make)

    def spatial(model: Any, x: Any, y: Any, steps: int) -> Callable[[], Any]:
        def make() -> Callable[[], Any]:
            attack = fa.SpatialAttack(num_translations=2, num_rotations=2, max_translation=1, max_rotation=10)
            fmodel = fmodel_of(model, x)
            return lambda: attack(fmodel, x, y)

        return deferred(make)

    def dataset(model: Any, x: Any, y: Any, steps: int) -> Callable[[], Any]:
        def make() -> Callable[[], Any]:
            attack = fa.DatasetAttack(distance=fb.distances.l2)
            fmodel = fmodel_of(model, x)
            attack.feed(fmodel, x.flip(0))  # the pool to draw adversarials from
            attack.feed(fmodel, 1 - x)
            return lambda: attack(fmodel, x, y, epsilons=None)

        return deferred(make)

    def binarization(model: Any, x: Any, y: Any, steps: int) -> Callable[[], Any]:
        def make() -> Callable[[], Any]:
            # the attack refines adversarials of a thresholding model: start from ones found on that model
            fmodel = fb.models.ThresholdingWrapper(fmodel_of(model, x), threshold=0.5)
            import sbpatch

            with sbpatch.paused():
                starting, _, _ = tiny_init()(fmodel, x, y, epsilons=None)
            attack = fa.BinarizationRefinementAttack(threshold=0.5, distance=fb.distances.l2)
            return lambda: attack(fmodel, x, y, epsilons=None, starting_points=starting)

        return deferred(make)

    def repeated(model: Any, x: Any, y: Any, steps: int) -> Callable[[], Any]:
        def make() -> Callable[[], Any]:
            attack = fa.LinfPGD(steps=steps).repeat(2)
            fmodel = fmodel_of(model, x)
            return lambda: attack(fmodel, x, y, epsilons=_EPS["Linf"])

        return deferred(make)

    out: dict[str, Builder] = {}
    for cls in (  # gradient-based fixed-epsilon attacks with a ``steps`` budget
        fa.L1ProjectedGradientDescentAttack,
        fa.L2ProjectedGradientDescentAttack,
        fa.LinfProjectedGradientDescentAttack,
        fa.L1AdamProjectedGradientDescentAttack,
        fa.L2AdamProjectedGradientDescentAttack,
        fa.LinfAdamProjectedGradientDescentAttack,
        fa.L1BasicIterativeAttack,
        fa.L2BasicIterativeAttack,
        fa.LinfBasicIterativeAttack,
        fa.L1AdamBasicIterativeAttack,
        fa.L2AdamBasicIterativeAttack,
        fa.LinfAdamBasicIterativeAttack,
        fa.L1MomentumIterativeFastGradientMethod,
        fa.L2MomentumIterativeFastGradientMethod,
        fa.LinfMomentumIterativeFastGradientMethod,
        fa.SparseL1DescentAttack,
    ):
        out[cls.__name__] = fixed(cls, steps="steps")
    for cls in (fa.L1FastGradientAttack, fa.L2FastGradientAttack, fa.LinfFastGradientAttack):
        out[cls.__name__] = fixed(cls, random_start=True)
    for cls in (
        fa.L2AdditiveGaussianNoiseAttack,
        fa.L2AdditiveUniformNoiseAttack,
        fa.L2ClippingAwareAdditiveGaussianNoiseAttack,
        fa.L2ClippingAwareAdditiveUniformNoiseAttack,
        fa.LinfAdditiveUniformNoiseAttack,
        fa.L2ContrastReductionAttack,
    ):
        out[cls.__name__] = fixed(cls)
    for cls in (
        fa.L2RepeatedAdditiveGaussianNoiseAttack,
        fa.L2RepeatedAdditiveUniformNoiseAttack,
        fa.L2ClippingAwareRepeatedAdditiveGaussianNoiseAttack,
        fa.L2ClippingAwareRepeatedAdditiveUniformNoiseAttack,
        fa.LinfRepeatedAdditiveUniformNoiseAttack,
    ):
        out[cls.__name__] = fixed(cls, repeats="steps")
    out["VirtualAdversarialAttack"] = fixed(fa.VirtualAdversarialAttack, steps="steps")
    out["GenAttack"] = gen

    # minimization attacks (epsilons=None: no early stop)
    out["DDNAttack"] = simple(fa.DDNAttack, steps="steps")
    out["L2CarliniWagnerAttack"] = simple(fa.L2CarliniWagnerAttack, binary_search_steps=1, steps="steps")
    out["EADAttack"] = simple(fa.EADAttack, binary_search_steps=1, steps="steps")
    out["NewtonFoolAttack"] = simple(fa.NewtonFoolAttack, steps="steps")
    out["L2DeepFoolAttack"] = simple(fa.L2DeepFoolAttack, steps="steps", candidates=3)
    out["LinfDeepFoolAttack"] = simple(fa.LinfDeepFoolAttack, steps="steps", candidates=3)
    for cls in (fa.L0FMNAttack, fa.L1FMNAttack, fa.L2FMNAttack, fa.LInfFMNAttack):
        out[cls.__name__] = simple(cls, steps="steps", binary_search_steps=2)
    for cls in (
        fa.L0BrendelBethgeAttack,
        fa.L1BrendelBethgeAttack,
        fa.L2BrendelBethgeAttack,
        fa.LinfinityBrendelBethgeAttack,
    ):
        out[cls.__name__] = simple(cls, init_attack=tiny_init, steps="steps", binary_search_steps=2)
    out["BoundaryAttack"] = simple(fa.BoundaryAttack, init_attack=tiny_init, steps="steps")
    out["HopSkipJumpAttack"] = simple(
        fa.HopSkipJumpAttack,
        init_attack=tiny_init,
        steps="steps",
        initial_gradient_eval_steps=4,
        max_gradient_eval_steps=8,
    )
    out["PointwiseAttack"] = simple(fa.PointwiseAttack, init_attack=tiny_init)
    out["SaltAndPepperNoiseAttack"] = simple(fa.SaltAndPepperNoiseAttack, steps="steps")
    out["InversionAttack"] = simple(fa.InversionAttack, distance=fb.distances.l2)
    out["GaussianBlurAttack"] = simple(fa.GaussianBlurAttack, distance=fb.distances.l2, steps="steps")
    out["LinearSearchContrastReductionAttack"] = simple(
        fa.LinearSearchContrastReductionAttack, distance=fb.distances.l2, steps="steps"
    )
    out["BinarySearchContrastReductionAttack"] = simple(
        fa.BinarySearchContrastReductionAttack, distance=fb.distances.l2, binary_search_steps="steps"
    )
    out["LinearSearchBlendedUniformNoiseAttack"] = simple(
        fa.LinearSearchBlendedUniformNoiseAttack, distance=fb.distances.l2, directions=10, steps="steps"
    )
    out["BinarizationRefinementAttack"] = binarization
    out["DatasetAttack"] = dataset
    out["SpatialAttack"] = spatial
    out["Repeated"] = repeated
    return out
