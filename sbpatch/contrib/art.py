"""ART (adversarial-robustness-toolbox): every evasion attack's ``generate``, and the PyTorch estimators' gradients.

What is wrapped, and why:

* ``EvasionAttack.generate`` and the ``generate`` of every subclass that defines its own (55 classes in ART 1.20, plus
  any the user defines later). The victim is the attack's estimator when it is a PyTorch estimator (``_model``, the
  ART ``ModelWrapper`` around the user's module, and ``model``, the user's module); a wrapper estimator
  (``EnsembleClassifier``, ``DetectorClassifier``, ``QueryEfficientGradientEstimationClassifier``...) is looked
  through for PyTorch estimators inside. TensorFlow, Keras, scikit-learn and other estimators yield no module: the
  call runs unpatched and is counted as unlocated.
* ``PyTorchClassifier.loss_gradient``, ``class_gradient``, ``custom_loss_gradient`` (and the subclasses' own, e.g.
  randomized smoothing), ``PyTorchRegressor.loss_gradient`` and ``custom_loss_gradient``: they compute input
  gradients only, with ``loss.backward()``, so freezing removes the weight-gradient half of each backward. This also
  covers callers outside ``generate``: ``AdversarialTrainerFBFPyTorch``'s perturbation step, and the input-gradient
  steps of ``FeatureCollisionAttack`` (poisoning) and ``MIFace`` (model inversion), which need no weight gradient.

ART's gradient methods call ``self._model.zero_grad()`` before their backward: as shipped they leave every
``param.grad`` cleared and refilled with the attack's gradient; with sbpatch the same call leaves ``param.grad``
cleared (``None``) and fills nothing. The adversarial examples are bitwise identical.

The estimator-level wrappers freeze whoever calls them (an evasion attack, a trainer, a poisoning or inference
attack, user code): they return input gradients only. A caller that read ``param.grad`` after one of them (none in
ART 1.20 does; it would be reading the attack's loss gradient) finds ``None`` under sbpatch. Not wrapped at the
estimator level: object detectors', trackers' and speech recognisers' ``loss_gradient`` (their attacks are frozen
through ``generate``).

Never wrapped: ``fit`` of every estimator, the trainers' own training steps, and poisoning, extraction, inference and
reconstruction attacks' entry points (a class that also derives from one of those bases is skipped even if it is an
evasion attack).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

from sbpatch.locate import NotTorch, find_modules
from sbpatch.patching import Integration, Target

# Attributes through which a non-PyTorch wrapper estimator (or an attack) holds the estimators it delegates to.
_DELEGATES = ("_estimator", "estimator", "_classifier", "classifier", "_classifiers", "classifiers", "detector")
# Attack bases whose code may need parameter gradients: never frozen.
_TRAINING_BASES = frozenset(
    {
        "PoisoningAttack",
        "PoisoningAttackGenerator",
        "PoisoningAttackObjectDetector",
        "ExtractionAttack",
        "InferenceAttack",
        "ReconstructionAttack",
    }
)


def _pytorch_estimator_type() -> type | None:
    module = sys.modules.get("art.estimators.pytorch")
    return getattr(module, "PyTorchEstimator", None)


def _pytorch_estimators(obj: Any, depth: int = 3) -> list[Any]:
    """The PyTorch estimators behind ``obj`` (an attack, a PyTorch estimator or a wrapper estimator)."""
    base = _pytorch_estimator_type()
    if base is None or obj is None:
        return []
    if isinstance(obj, base):
        return [obj]
    if depth == 0:
        return []
    if isinstance(obj, (list, tuple)):
        return [e for item in obj for e in _pytorch_estimators(item, depth - 1)]
    found: list[Any] = []
    for name in _DELEGATES:
        try:
            value = getattr(obj, name, None)
        except Exception:  # a property that raises
            continue
        if value is not None and value is not obj:
            for est in _pytorch_estimators(value, depth - 1):
                if all(est is not e for e in found):
                    found.append(est)
        if found and name in ("_estimator", "_classifier"):
            break  # the public property names the same object
    return found


def _victim(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> list[Any]:
    """The nn.Modules of the PyTorch estimator(s) behind an attack or an estimator; NotTorch for any other framework
    (a TensorFlow, scikit-learn or black-box estimator: nothing to freeze, nothing to warn about)."""
    modules: list[Any] = []
    estimators = _pytorch_estimators(instance)
    if not estimators:
        return NotTorch()
    for est in estimators:
        for module in find_modules(est, ("_model", "model")):
            if all(module is not m for m in modules):
                modules.append(module)
    return modules


@functools.cache
def _training_class(cls: type) -> str | None:
    for base in cls.__mro__:
        if base.__name__ in _TRAINING_BASES and base.__module__ == "art.attacks.attack":
            return f"{cls.__qualname__} is also a {base.__name__} (may need parameter gradients)"
    return None


def _training_instance(instance: Any) -> str | None:
    return _training_class(type(instance))


def _gradient_targets(module: str, cls: str, methods: tuple[str, ...]) -> tuple[Target, ...]:
    return tuple(Target(module, f"{cls}.{m}", _victim, subclasses=True) for m in methods)


INTEGRATION = Integration(
    name="art",
    distribution="adversarial-robustness-toolbox",
    module="art",
    supported=">=1.15,<2",
    targets=(
        Target(
            "art.attacks.attack",
            "EvasionAttack.generate",
            _victim,
            subclasses=True,
            exclude_class=_training_class,
            pass_instance=_training_instance,
        ),
        *_gradient_targets(
            "art.estimators.classification.pytorch",
            "PyTorchClassifier",
            ("loss_gradient", "class_gradient", "custom_loss_gradient"),
        ),
        *_gradient_targets(
            "art.estimators.regression.pytorch", "PyTorchRegressor", ("loss_gradient", "custom_loss_gradient")
        ),
    ),
    excluded={
        "art.estimators.*.fit, fit_generator": "trains the model: needs parameter gradients",
        "art.defences.trainer.*.fit": "the training step needs parameter gradients; the attacks it calls (generate, "
        "loss_gradient) are frozen, the step itself is not",
        "art.attacks.poisoning": "poisoning attacks (gradient matching, sleeper agent, bullseye...) train or read "
        "parameter gradients; their input-gradient calls of a PyTorch estimator (custom_loss_gradient) are frozen",
        "art.attacks.extraction": "model stealing trains a thieved model",
        "art.attacks.inference": "inference and model-inversion attacks are never wrapped themselves; their "
        "class_gradient calls (MIFace) are input gradients and are frozen",
        "art.attacks.evasion.*TensorFlowV2, MalwareGDTensorFlow": "not a PyTorch image classifier attack "
        "(TensorFlow only); the locator finds no PyTorch estimator: runs unpatched",
        "art.attacks.evasion.DecisionTreeAttack": "not a PyTorch image classifier attack (scikit-learn decision "
        "trees): runs unpatched",
        "art.attacks.evasion.HighConfidenceLowUncertainty": "not a PyTorch image classifier attack (GPy Gaussian "
        "process classifier): runs unpatched",
        "art.attacks.evasion.DPatch, RobustDPatch, OverloadPyTorch, SNAL": "not a PyTorch image classifier attack "
        "(object detectors); generate is still wrapped, not in cases()",
        "art.attacks.evasion.AdversarialTexturePyTorch": "not a PyTorch image classifier attack (object tracker); "
        "generate is still wrapped, not in cases()",
        "art.attacks.evasion.OverTheAirFlickeringPyTorch": "not a PyTorch image classifier attack (video "
        "classifier, 5-D input); generate is still wrapped, not in cases()",
        "art.attacks.evasion.CarliniWagnerASR, ImperceptibleASR, ImperceptibleASRPyTorch": "not a PyTorch image "
        "classifier attack (speech recognition); generate is still wrapped, not in cases()",
    },
)

Builder = Callable[[Any, Any, Any, int], Callable[[], Any]]


def cases() -> dict[str, Builder]:
    """One builder per evasion attack usable on a PyTorchClassifier: ``builder(model, x, y, steps)`` -> a call.

    ``x`` and ``y`` are torch tensors (images in [0, 1], int64 labels); the call runs ``generate`` on NumPy copies
    and returns the adversarial examples (a NumPy array). Attacks that keep state across calls (patches, universal
    perturbations) are built inside the call so that two calls start from the same state.
    """
    import art.attacks.evasion as ev
    import numpy as np
    import torch
    from art.attacks.evasion.laser_attack.laser_attack import LaserBeam, LaserBeamAttack, LaserBeamGenerator
    from art.estimators.classification import PyTorchClassifier

    class ToNCHW(torch.nn.Module):
        def forward(self, x: Any) -> Any:
            return x.permute(0, 3, 1, 2)

    def classifier(model: Any, x: Any, layout: str = "nchw", probs: bool = False) -> Any:
        with torch.no_grad():
            nb_classes = int(model(x[:1]).shape[1])
        shape = tuple(x.shape[1:])
        if layout == "flat":  # tabular attacks see flat feature vectors
            model = torch.nn.Sequential(torch.nn.Unflatten(1, shape), model)
            shape = (int(np.prod(shape)),)
        elif layout == "nhwc":  # attacks that only handle channels-last images
            model = torch.nn.Sequential(ToNCHW(), model)
            shape = (shape[1], shape[2], shape[0])
        if probs:  # attacks that insist on probabilities
            model = torch.nn.Sequential(model, torch.nn.Softmax(dim=1))
        return PyTorchClassifier(
            model=model,
            loss=torch.nn.CrossEntropyLoss(),
            input_shape=shape,
            nb_classes=nb_classes,
            clip_values=(0.0, 1.0),
            channels_first=layout != "nhwc",
        )

    def simple(
        cls: Any,
        labels: str = "onehot",
        batch: int | None = None,
        fresh: bool = False,
        layout: str = "nchw",
        probs: bool = False,
        derive: Callable[[Any, int], dict[str, Any]] | None = None,
        call: dict[str, Any] | None = None,
        **kw: Any,
    ) -> Builder:
        """A builder for ``cls(estimator, **kw)``; ``kw`` values equal to "steps" take the iteration budget.

        labels: what ``generate`` gets as ``y``: "onehot", "index", "none", "guide" (other images: feature
        adversaries) or "target" (one-hot, plus ``x_tar`` images: GRAPHITE). batch: attack only that many samples.
        fresh: build the attack inside each call (attacks that keep state across calls). layout: "nchw", "nhwc" or
        "flat" inputs (the model is wrapped to match). probs: the estimator outputs softmax probabilities.
        derive: ``(estimator, steps) -> more constructor arguments``. call: keyword arguments of ``generate``
        ("steps" taken as above). A constructor that fails on this stack (a missing optional dependency) fails
        inside the call, where it is reported as library-broken.
        """

        def build(model: Any, x: Any, y: Any, steps: int) -> Callable[[], Any]:
            est = classifier(model, x, layout, probs)
            xn = x.detach().cpu().numpy().astype(np.float32)
            yi = y.cpu().numpy()
            if batch is not None:
                xn, yi = xn[:batch], yi[:batch]
            if layout == "flat":
                xn = xn.reshape(len(xn), -1)
            elif layout == "nhwc":
                xn = np.ascontiguousarray(xn.transpose(0, 2, 3, 1))
            onehot = np.eye(est.nb_classes, dtype=np.float32)[yi]
            other = np.ascontiguousarray(np.roll(xn, 1, axis=0))
            gen_y = {"onehot": onehot, "target": onehot, "index": yi, "none": None, "guide": other}[labels]
            gen_kw = {k: (steps if v == "steps" else v) for k, v in (call or {}).items()}
            if labels == "target":
                gen_kw["x_tar"] = other

            def make() -> Any:
                params = {k: (steps if v == "steps" else v) for k, v in kw.items()}
                if derive is not None:
                    params.update(derive(est, steps))
                return cls(est, **params)

            attack = None
            if not fresh:
                try:
                    attack = make()
                except Exception:
                    pass

            def run() -> Any:
                a = make() if attack is None else attack
                return a.generate(xn, gen_y, **gen_kw)

            return run

        return build

    def lazy(module: str, name: str, **kw: Any) -> Builder:
        """An attack whose module may fail to import on this stack: the failure surfaces when the call runs."""

        def build(model: Any, x: Any, y: Any, steps: int) -> Callable[[], Any]:
            def run() -> Any:
                import importlib

                cls = getattr(importlib.import_module(module), name)
                return simple(cls, **kw)(model, x, y, steps)()

            return run

        return build

    def auto_attacks(est: Any, steps: int) -> dict[str, Any]:
        apgd = ev.AutoProjectedGradientDescent(
            est, eps=0.03, eps_step=0.01, max_iter=steps, nb_random_init=1, verbose=False
        )
        square = ev.SquareAttack(est, eps=0.03, max_iter=steps, nb_restarts=1, verbose=False)
        return {"attacks": [apgd, square]}

    def saliency_attacker(est: Any, steps: int) -> dict[str, Any]:
        return {"attacker": ev.BasicIterativeMethod(est, eps=0.03, eps_step=0.01, max_iter=steps, verbose=False)}

    laser_min, laser_max = [380.0, 0.0, 1.0, 1], [780.0, 3.14, 32.0, 16]  # wavelength, angle, bias, width

    def laser_generator(est: Any, steps: int) -> dict[str, Any]:
        return {"laser_generator": LaserBeamGenerator(LaserBeam.from_array(laser_min), LaserBeam.from_array(laser_max))}

    def importance(est: Any, steps: int) -> dict[str, Any]:
        n = int(est.input_shape[0])
        return {"importance": np.full(n, 1.0 / np.sqrt(n))}

    pgd = {"eps": 0.03, "eps_step": 0.01, "max_iter": "steps", "verbose": False}
    carlini = {"max_iter": "steps", "batch_size": 4, "verbose": False}
    patch = {"max_iter": "steps", "batch_size": 4, "verbose": False}
    return {
        "AdversarialPatch": simple(ev.AdversarialPatch, fresh=True, patch_shape=(3, 4, 4), **patch),
        "AdversarialPatchNumpy": simple(ev.AdversarialPatchNumpy, fresh=True, **patch),
        "AdversarialPatchPyTorch": simple(ev.AdversarialPatchPyTorch, fresh=True, patch_shape=(3, 4, 4), **patch),
        "AutoAttack": simple(ev.AutoAttack, eps=0.03, eps_step=0.01, derive=auto_attacks),
        "AutoConjugateGradient": simple(ev.AutoConjugateGradient, nb_random_init=1, **pgd),
        "AutoProjectedGradientDescent": simple(ev.AutoProjectedGradientDescent, nb_random_init=1, **pgd),
        "BasicIterativeMethod": simple(ev.BasicIterativeMethod, **pgd),
        "BoundaryAttack": simple(
            ev.BoundaryAttack, targeted=False, max_iter="steps", num_trial=2, sample_size=2, init_size=5, verbose=False
        ),
        "BrendelBethgeAttack": lazy(
            "art.attacks.evasion.brendel_bethge",
            "BrendelBethgeAttack",
            steps="steps",
            binary_search_steps=2,
            init_size=5,
        ),
        "CarliniL0Method": simple(ev.CarliniL0Method, binary_search_steps=1, **carlini),
        "CarliniL2Method": simple(ev.CarliniL2Method, binary_search_steps=1, **carlini),
        "CarliniLInfMethod": simple(ev.CarliniLInfMethod, largest_const=0.1, **carlini),
        "CompositeAdversarialAttackPyTorch": simple(ev.CompositeAdversarialAttackPyTorch, max_inner_iter=2, **carlini),
        "DeepFool": simple(ev.DeepFool, nb_grads=3, **carlini),
        "ElasticNet": simple(ev.ElasticNet, binary_search_steps=1, **carlini),
        "FastGradientMethod": simple(ev.FastGradientMethod, eps=0.03),
        # layer -2: ART cannot hook a module registered under two names (TinyCNN.tied is TinyCNN.head: KeyError)
        "FeatureAdversariesNumpy": simple(
            ev.FeatureAdversariesNumpy, labels="guide", batch=2, delta=0.1, layer=-2, batch_size=4, call={"maxiter": 1}
        ),
        "FeatureAdversariesPyTorch": simple(
            ev.FeatureAdversariesPyTorch,
            labels="guide",
            delta=0.1,
            step_size=0.01,
            layer=-2,
            max_iter="steps",
            batch_size=4,
            verbose=False,
        ),
        "FrameSaliencyAttack": simple(
            ev.FrameSaliencyAttack, method="iterative_saliency", frame_index=1, verbose=False, derive=saliency_attacker
        ),
        # GeoDA plans its queries from max_iter and fails below 500 (round(max_iter / 500) iterations)
        "GeoDA": simple(ev.GeoDA, batch=1, max_iter=500, sub_dim=2, batch_size=64, verbose=False),
        "GRAPHITEBlackbox": simple(
            ev.GRAPHITEBlackbox,
            labels="target",
            noise_size=(8, 8),
            net_size=(8, 8),
            num_xforms_mask=2,
            num_xforms_boost=2,
            num_boost_queries=4,
            batch_size=4,
        ),
        "GRAPHITEWhiteboxPyTorch": simple(
            ev.GRAPHITEWhiteboxPyTorch, net_size=(8, 8), num_xforms=2, steps="steps", first_steps="steps", batch_size=4
        ),
        "HopSkipJump": simple(ev.HopSkipJump, max_iter="steps", max_eval=10, init_eval=2, init_size=5, verbose=False),
        "LaserAttack": simple(
            ev.LaserAttack, labels="index", layout="nhwc", iterations="steps", derive=laser_generator
        ),
        "LaserBeamAttack": simple(
            LaserBeamAttack,
            labels="index",
            layout="nhwc",
            iterations="steps",
            max_laser_beam=tuple(laser_max),
            min_laser_beam=tuple(laser_min),
        ),
        "LowProFool": simple(ev.LowProFool, layout="flat", n_steps="steps", derive=importance),
        "MomentumIterativeMethod": simple(ev.MomentumIterativeMethod, **pgd),
        "NewtonFool": simple(ev.NewtonFool, **carlini),
        "PixelAttack": simple(ev.PixelAttack, th=10, max_iter="steps"),
        "ProjectedGradientDescent": simple(ev.ProjectedGradientDescent, **pgd),
        "ProjectedGradientDescentNumpy": simple(ev.ProjectedGradientDescentNumpy, **pgd),
        "ProjectedGradientDescentPyTorch": simple(ev.ProjectedGradientDescentPyTorch, **pgd),
        "RescalingAutoConjugateGradient": simple(ev.RescalingAutoConjugateGradient, nb_random_init=1, **pgd),
        "SaliencyMapMethod": simple(ev.SaliencyMapMethod, theta=0.1, gamma=0.05, batch_size=4, verbose=False),
        "ShadowAttack": simple(ev.ShadowAttack, batch=1, nb_steps="steps", batch_size=4, verbose=False),
        "SignOPTAttack": simple(
            ev.SignOPTAttack, targeted=False, num_trial=2, max_iter="steps", query_limit=40, k=2, batch_size=4
        ),
        "SimBA": simple(ev.SimBA, batch=1, probs=True, max_iter="steps", attack="dct", verbose=False),
        "SpatialTransformation": simple(
            ev.SpatialTransformation,
            max_translation=10.0,
            num_translations=2,
            max_rotation=10.0,
            num_rotations=2,
            verbose=False,
        ),
        "SquareAttack": simple(ev.SquareAttack, eps=0.03, max_iter="steps", nb_restarts=1, batch_size=4, verbose=False),
        "TargetedUniversalPerturbation": simple(
            ev.TargetedUniversalPerturbation,
            fresh=True,
            attacker="fgsm",
            attacker_params={"eps": 0.03},
            max_iter="steps",
            eps=0.1,
        ),
        "ThresholdAttack": simple(ev.ThresholdAttack, th=10, max_iter="steps"),
        "UniversalPerturbation": simple(
            ev.UniversalPerturbation,
            fresh=True,
            attacker="fgsm",
            attacker_params={"eps": 0.03},
            max_iter="steps",
            eps=0.1,
            batch_size=4,
            verbose=False,
        ),
        "VirtualAdversarialMethod": simple(
            ev.VirtualAdversarialMethod, probs=True, max_iter=1, eps=0.03, batch_size=4, verbose=False
        ),
        "Wasserstein": simple(
            ev.Wasserstein,
            max_iter="steps",
            eps_iter=2,
            conjugate_sinkhorn_max_iter=5,
            projected_sinkhorn_max_iter=5,
            kernel_size=3,
            batch_size=4,
            verbose=False,
        ),
        # ZOO's Adam state is sized for one sample: batch_size > 1 raises an IndexError in ART 1.20
        "ZooAttack": simple(
            ev.ZooAttack,
            max_iter="steps",
            nb_parallel=4,
            use_resize=False,
            use_importance=False,
            batch_size=1,
            verbose=False,
        ),
    }
