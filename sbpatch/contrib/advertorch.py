"""advertorch (0.2.x): ``perturb`` on every ``Attack`` subclass, plus ``perturb_iterative`` and ``spsa_perturb``.

Every attack class derives from ``advertorch.attacks.base.Attack`` and defines its own ``perturb`` (``__call__`` only
forwards to it); the victim is ``self.predict``, any callable: the module, a bound method (``net.forward``), a lambda
or closure over the module, a ``functools.partial``, a callable object holding it in an attribute (``self.net``).
:func:`sbpatch.locate.find_modules` looks through all of them; a call with no module found runs unpatched and warns
once per patched method (``SbpatchWarning``).
``perturb`` is wrapped on ``Attack`` and on every subclass that defines it in its own ``__dict__`` (``FABAttack``'s
Linf/L2/L1 variants inherit it), including subclasses defined later (a user's own attack). ``ChooseBestAttack``
calls its base adversaries' ``perturb``: those nested calls are frozen too (the ledger makes that cheap).

The two module functions are public entry points of their own: ``perturb_iterative(xvar, yvar, predict, ...)`` (the
PGD/BIM/FastFeature loop; ``predict`` is its *third* argument) and ``spsa_perturb(predict, loss_fn, x, y, ...)``
(``predict`` first). The attack classes call them through the globals of the defining module, which the patch
replaces; ``rebind=True`` also replaces any other advertorch module's by-name reference (none in 0.2.3, so this only
matters for later versions). A name the user bound in their *own* module before ``enable()`` keeps the original
function (its calls run unfrozen); one bound after ``enable()`` gets the wrapper.

advertorch 0.2.3 imports ``zero_gradients`` from ``torch.autograd.gradcheck`` (removed from torch): the
``torch_zero_gradients`` shim adds it before the import. Nothing in advertorch trains the model (``defenses`` and
``bpda`` are modules the user puts in front of the model, not attacks), so nothing is excluded.

Gains: every advertorch gradient attack (the PGD family, FGSM/FGM, CW, EAD, DDN, LBFGS, JSMA, spatial, FAB) calls
``backward()`` with live parameters, so freezing skips the weight gradients and stops them accumulating in
``param.grad``; LocalSearch/SinglePixel are query-only and gain the cheaper frozen forward passes. SPSA estimates its
gradient under ``torch.no_grad()`` already: identical, no speed-up.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sbpatch.locate import argument, attribute
from sbpatch.patching import Integration, Target

Builder = Callable[[Any, Any, Any, int], Callable[[], Any]]

_ATTACKS = "advertorch.attacks"


_attack_victim = attribute("predict")  # the modules behind self.predict (any callable)


INTEGRATION = Integration(
    name="advertorch",
    distribution="advertorch",
    module="advertorch",
    supported=">=0.2,<0.3",
    targets=(
        Target(f"{_ATTACKS}.base", "Attack.perturb", _attack_victim, subclasses=True),
        Target(f"{_ATTACKS}.iterative_projected_gradient", "perturb_iterative", argument(2, "predict"), rebind=True),
        Target(f"{_ATTACKS}.spsa", "spsa_perturb", argument(0, "predict"), rebind=True),
    ),
    excluded={
        "names bound before enable()": (
            "`from advertorch.attacks.iterative_projected_gradient import perturb_iterative` (or spsa_perturb) in the "
            "user's own module before enable() keeps the original function (calls through it run unfrozen); the "
            "library's own modules are rebound"
        ),
    },
    shims=("torch_zero_gradients",),
)


def cases() -> dict[str, Builder]:
    """One builder per attack class of ``advertorch.attacks`` and per wrapped function.

    ``builder(model, x, y, steps)`` -> a zero-argument call of the attack. Aliases (``FGM``, ``FGSM``, ``JSMA``) are
    the same classes as ``GradientAttack``, ``GradientSignAttack`` and ``JacobianSaliencyMapAttack``.
    """
    import torch
    import torch.nn as nn
    from advertorch import attacks as at
    from advertorch.attacks.iterative_projected_gradient import perturb_iterative
    from advertorch.attacks.spsa import spsa_perturb
    from advertorch.attacks.utils import MarginalLoss

    def n_classes(model: Any, x: Any) -> int:
        with torch.no_grad():
            return int(model(x[:1]).shape[1])

    def simple(cls: Any, classes: bool = False, predicted: bool = False, **kw: Any) -> Builder:
        """``cls(model, [num_classes=], **kw)``; a value ``"steps"`` becomes the iteration budget.

        ``predicted``: call ``perturb(x)`` (y=None: the library attacks the model's own predictions), for the
        minimal-distortion attacks, which otherwise keep the clean input wherever the random labels are already wrong.
        """

        def build(model: Any, x: Any, y: Any, steps: int) -> Callable[[], Any]:
            params = {k: (steps if v == "steps" else v) for k, v in kw.items()}
            if classes:
                params["num_classes"] = n_classes(model, x)
            attack = cls(model, **params)
            return (lambda: attack.perturb(x)) if predicted else (lambda: attack.perturb(x, y))

        return build

    def fast_feature(model: Any, x: Any, y: Any, steps: int) -> Callable[[], Any]:
        attack = at.FastFeatureAttack(model, eps=0.03, eps_iter=0.01, nb_iter=steps)
        guide = x.roll(1, dims=0)  # another image of the batch as the guide
        return lambda: attack.perturb(x, guide)

    def choose_best(model: Any, x: Any, y: Any, steps: int) -> Callable[[], Any]:
        attack = at.ChooseBestAttack(
            model,
            [at.GradientSignAttack(model, eps=0.03), at.LinfPGDAttack(model, eps=0.03, eps_iter=0.01, nb_iter=steps)],
        )
        return lambda: attack.perturb(x, y)

    def iterative(model: Any, x: Any, y: Any, steps: int) -> Callable[[], Any]:
        loss_fn = nn.CrossEntropyLoss(reduction="sum")
        return lambda: perturb_iterative(x, y, model, nb_iter=steps, eps=0.03, eps_iter=0.01, loss_fn=loss_fn)

    def spsa(model: Any, x: Any, y: Any, steps: int) -> Callable[[], Any]:
        marginal = MarginalLoss(reduction="none")

        def loss_fn(*args: Any) -> Any:
            return -marginal(*args)

        return lambda: spsa_perturb(
            model, loss_fn, x, y, eps=0.03, delta=0.01, lr=0.01, nb_iter=steps, nb_sample=8, max_batch_size=8
        )

    pgd = {"eps": 0.03, "eps_iter": 0.01, "nb_iter": "steps"}
    opt = {"classes": True, "predicted": True, "max_iterations": "steps", "initial_const": 10.0}
    fab = {"predicted": True, "n_restarts": 1, "n_iter": "steps"}
    return {
        "GradientAttack": simple(at.GradientAttack, eps=0.03),
        "GradientSignAttack": simple(at.GradientSignAttack, eps=0.03),
        "PGDAttack": simple(at.PGDAttack, **pgd),
        "LinfPGDAttack": simple(at.LinfPGDAttack, **pgd),
        "L2PGDAttack": simple(at.L2PGDAttack, eps=0.5, eps_iter=0.1, nb_iter="steps"),
        "L1PGDAttack": simple(at.L1PGDAttack, eps=2.0, eps_iter=0.5, nb_iter="steps"),
        "SparseL1DescentAttack": simple(at.SparseL1DescentAttack, eps=2.0, eps_iter=0.5, nb_iter="steps"),
        "LinfBasicIterativeAttack": simple(at.LinfBasicIterativeAttack, **pgd),
        "L2BasicIterativeAttack": simple(at.L2BasicIterativeAttack, eps=0.5, eps_iter=0.1, nb_iter="steps"),
        "MomentumIterativeAttack": simple(at.MomentumIterativeAttack, **pgd),
        "LinfMomentumIterativeAttack": simple(at.LinfMomentumIterativeAttack, **pgd),
        "L2MomentumIterativeAttack": simple(at.L2MomentumIterativeAttack, eps=0.5, eps_iter=0.1, nb_iter="steps"),
        "FastFeatureAttack": fast_feature,
        "CarliniWagnerL2Attack": simple(
            at.CarliniWagnerL2Attack, binary_search_steps=1, learning_rate=0.1, abort_early=False, **opt
        ),
        "ElasticNetL1Attack": simple(at.ElasticNetL1Attack, binary_search_steps=1, learning_rate=0.5, **opt),
        "DDNL2Attack": simple(at.DDNL2Attack, predicted=True, nb_iter="steps"),
        "LBFGSAttack": simple(at.LBFGSAttack, binary_search_steps=1, **opt),
        "SinglePixelAttack": simple(at.SinglePixelAttack, max_pixels=3),
        "LocalSearchAttack": simple(at.LocalSearchAttack, round_ub=1, max_nb_seeds=4, t=2),
        "SpatialTransformAttack": simple(at.SpatialTransformAttack, **opt),
        "JacobianSaliencyMapAttack": simple(at.JacobianSaliencyMapAttack, classes=True, gamma=0.05),
        "LinfSPSAAttack": simple(at.LinfSPSAAttack, eps=0.03, nb_iter="steps", nb_sample=8, max_batch_size=8),
        "FABAttack": simple(at.FABAttack, **fab),
        "LinfFABAttack": simple(at.LinfFABAttack, **fab),
        "L2FABAttack": simple(at.L2FABAttack, **fab),
        "L1FABAttack": simple(at.L1FABAttack, **fab),
        "ChooseBestAttack": choose_best,
        "perturb_iterative": iterative,
        "spsa_perturb": spsa,
    }
