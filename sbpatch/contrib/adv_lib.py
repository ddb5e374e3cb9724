"""adv-lib (0.2.x, ``import adv_lib``): every attack function that takes the model as its first argument.

What is wrapped: the functions ``adv_lib.attacks`` exports (``alma``, ``apgd``, ``apgd_targeted``,
``carlini_wagner_l2``, ``carlini_wagner_linf``, ``ddn``, ``df``, ``fab``, ``fga``, ``fmn``, ``pdgd``, ``pdpgd``,
``perc_al``, ``pgd_linf``, ``sdf``, ``sigma_zero``, ``str_attack``, ``tr``, ``vfga``), the public ``minimal_apgd`` of
``adv_lib.attacks.auto_pgd``, and the segmentation attacks ``adv_lib.attacks.segmentation`` exports (``alma_prox``,
``asma``, ``dag``, ``pdgd``, ``pdpgd``). The victim is the argument ``model`` (first positional or keyword:
``minimal_apgd`` calls ``apgd`` through a ``functools.partial(apgd, model=model)``); any callable holding the module
works (:func:`sbpatch.locate.find_modules`). A call with no module found runs unpatched and warns once per function.

One target per function, on the module that defines it, with ``rebind=True``: ``adv_lib.attacks`` and its
``segmentation`` package re-export them by name, ``superdeepfool`` imports ``df`` by name and ``auto_pgd``'s
``minimal_apgd`` calls ``apgd``/``apgd_targeted`` through its module globals, so those references hold the wrapper
too (nested calls are frozen and counted; the ledger makes them cheap). A name the user bound in their *own* module
(``from adv_lib.attacks import ddn``) *before* ``enable()`` keeps the original function and its calls run unfrozen;
enable first (or use the ``SBPATCH`` environment variable) to reach every name.

What it buys, honestly: every adv-lib attack takes its gradients with ``torch.autograd.grad(loss, inputs)``, which
PyTorch already prunes to the input (no weight gradients are computed, ``param.grad`` is never filled), so there is
no time saving in the backward passes. Freezing still makes the forward passes build a smaller graph: layers whose
weights need no gradient do not save their inputs for backward (Linear layers above all), so less memory is held
for backward during each step, and the query-only forward passes (predictions, checks) build no graph for the
weights. Adversarial examples are identical (tested on a CNN and a torchvision ViT for every function).

What is not wrapped, and why: the private helpers (``_apgd``, ``_fab``, ``_pgd_linf``, trust region's ``_step``...)
are only reached through the public functions, which are frozen already; ``adv_lib.utils.attack_utils.run_attack``
and ``compute_attack_metrics`` are benchmarking utilities, not attacks (the attack passed to ``run_attack`` is frozen
when it is one of the functions above, a ``functools.partial`` of one included); ``adv_lib.distances`` (LPIPS, SSIM,
CIEDE2000) take no victim model. Nothing in adv-lib trains the victim, so nothing is excluded for that reason.

adv-lib imports ``visdom`` at the top of ``adv_lib.utils.visdom_logger`` (through most attack modules) but needs it
only for live plots (a ``VisdomLogger`` passed as ``callback``): when visdom is not installed, the ``visdom_stand_in``
shim answers adv-lib's own ``import visdom`` with a stand-in (a ``Visdom`` client built from it raises
``ModuleNotFoundError``); any other ``import visdom`` still fails as without sbpatch.

Library bugs met (not sbpatch's): as shipped, ``carlini_wagner_l2`` with ``abort_early=True`` (the default) and
``max_iterations < 10`` raises ``ZeroDivisionError`` (``i % (max_iterations // 10)``), so :func:`cases` runs it with at
least 10 iterations; ``str_attack``'s retraining phase raises ``IndexError`` on NumPy 2 (``np.percentile`` of an empty
array) when the first phase found no adversarial example, so :func:`cases` passes ``retrain=False``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from sbpatch.locate import argument
from sbpatch.patching import Integration, Target

_A = "adv_lib.attacks"

# (defining module, function): every attack function that takes the model first. tests/test_adv_lib.py checks this
# table against the names adv_lib.attacks and adv_lib.attacks.segmentation export, by introspection.
ATTACKS: tuple[tuple[str, str], ...] = (
    (f"{_A}.augmented_lagrangian", "alma"),
    (f"{_A}.auto_pgd", "apgd"),
    (f"{_A}.auto_pgd", "apgd_targeted"),
    (f"{_A}.auto_pgd", "minimal_apgd"),
    (f"{_A}.carlini_wagner.l2", "carlini_wagner_l2"),
    (f"{_A}.carlini_wagner.linf", "carlini_wagner_linf"),
    (f"{_A}.decoupled_direction_norm", "ddn"),
    (f"{_A}.deepfool", "df"),
    (f"{_A}.fast_adaptive_boundary.fast_adaptive_boundary", "fab"),
    (f"{_A}.fast_minimum_norm", "fmn"),
    (f"{_A}.perceptual_color_attacks.perceptual_color_distance_al", "perc_al"),
    (f"{_A}.primal_dual_gradient_descent", "pdgd"),
    (f"{_A}.primal_dual_gradient_descent", "pdpgd"),
    (f"{_A}.projected_gradient_descent", "pgd_linf"),
    (f"{_A}.sigma_zero", "sigma_zero"),
    (f"{_A}.stochastic_sparse_attacks", "fga"),
    (f"{_A}.stochastic_sparse_attacks", "vfga"),
    (f"{_A}.structured_adversarial_attack", "str_attack"),
    (f"{_A}.superdeepfool", "sdf"),
    (f"{_A}.trust_region", "tr"),
    (f"{_A}.segmentation.alma_prox", "alma_prox"),
    (f"{_A}.segmentation.asma", "asma"),
    (f"{_A}.segmentation.dense_adversary", "dag"),
    (f"{_A}.segmentation.primal_dual_gradient_descent", "pdgd"),
    (f"{_A}.segmentation.primal_dual_gradient_descent", "pdpgd"),
)

_victim = argument(0, "model")

INTEGRATION = Integration(
    name="adv_lib",
    distribution="adv-lib",
    module="adv_lib",
    supported=">=0.2.8,<0.3",
    targets=tuple(Target(module, name, _victim, rebind=True) for module, name in ATTACKS),
    excluded={
        "private helpers (auto_pgd._apgd, fab._fab, _pgd_linf, trust_region._step...)": "reached only through the "
        "wrapped public functions",
        "adv_lib.utils.attack_utils.run_attack": "a benchmarking utility, not an attack: the attack it is given is "
        "frozen when it calls one of the wrapped functions (a partial of one included); its own forward pass on the "
        "clean inputs runs as shipped",
        "adv_lib.utils.attack_utils.compute_attack_metrics": "evaluation utility, not an attack",
        "names bound before enable()": (
            "`from adv_lib.attacks import ddn` in the user's own module before enable() keeps the original function "
            "(calls through it run unfrozen); the library's own modules are rebound"
        ),
    },
    shims=("visdom_stand_in",),
)


Builder = Callable[[Any, Any, Any, int], Callable[[], Any]]


def cases() -> dict[str, Builder]:
    """One builder per wrapped function: ``builder(model, x, y, steps)`` -> a zero-argument call of it.

    Keys are the function names; the segmentation attacks are ``segmentation.<name>`` and run on the classifier seen
    as a 2x2-pixel segmentation model (its logits at every pixel, the label at every pixel).
    """
    import torch

    def fn(module: str, name: str) -> Callable[..., Any]:
        """The function as its module holds it now (the wrapper once enabled); looked up at each call, never bound
        here: cases() may run before enable()."""
        return getattr(importlib.import_module(f"{_A}.{module}"), name)

    class PerPixel(torch.nn.Module):
        """A classifier seen as a segmentation model: its logits repeated over a 2x2 pixel grid."""

        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: Any) -> Any:
            return self.model(x)[:, :, None, None].expand(-1, -1, 2, 2)

    def n_classes(model: Any, x: Any) -> int:
        with torch.no_grad():
            return int(model(x[:1]).shape[1])

    def simple(module: str, name: str, **kw: Any) -> Builder:
        """A builder passing ``kw`` (a callable value is called with ``steps``)."""

        def build(model: Any, x: Any, y: Any, steps: int) -> Callable[[], Any]:
            args = {k: (v(steps) if callable(v) else v) for k, v in kw.items()}
            return lambda: fn(module, name)(model, x, y, **args)

        return build

    def seg(name: str, **kw: Any) -> Builder:
        def build(model: Any, x: Any, y: Any, steps: int) -> Callable[[], Any]:
            seg_model = PerPixel(model)
            labels = y[:, None, None].expand(-1, 2, 2).contiguous()
            args = {k: (v(steps) if callable(v) else v) for k, v in kw.items()}
            return lambda: fn(f"segmentation.{name.split('.')[0]}", name.split(".")[-1])(seg_model, x, labels, **args)

        return build

    def perc_al(model: Any, x: Any, y: Any, steps: int) -> Callable[[], Any]:
        k = n_classes(model, x)
        return lambda: fn("perceptual_color_attacks.perceptual_color_distance_al", "perc_al")(
            model, x, y, num_classes=k, max_iterations=steps
        )

    return {
        "alma": simple("augmented_lagrangian", "alma", num_steps=lambda s: s),
        "apgd": simple("auto_pgd", "apgd", eps=0.03, norm=float("inf"), n_iter=lambda s: s),
        "apgd_targeted": simple(
            "auto_pgd", "apgd_targeted", eps=0.03, norm=float("inf"), n_iter=lambda s: s, num_targets=2
        ),
        "minimal_apgd": simple(
            "auto_pgd", "minimal_apgd", norm=float("inf"), max_eps=0.1, binary_search_steps=2, n_iter=lambda s: s
        ),
        # max_iterations < 10 divides by zero as shipped (abort_early's `i % (max_iterations // 10)`)
        "carlini_wagner_l2": simple(
            "carlini_wagner.l2", "carlini_wagner_l2", binary_search_steps=1, max_iterations=lambda s: max(s, 10)
        ),
        "carlini_wagner_linf": simple("carlini_wagner.linf", "carlini_wagner_linf", max_iterations=lambda s: s),
        "ddn": simple("decoupled_direction_norm", "ddn", steps=lambda s: s),
        "df": simple("deepfool", "df", steps=lambda s: s),
        "fab": simple("fast_adaptive_boundary.fast_adaptive_boundary", "fab", norm=float("inf"), n_iter=lambda s: s),
        "fga": simple("stochastic_sparse_attacks", "fga", targeted=False, max_iter=lambda s: s, n_samples=2),
        "fmn": simple("fast_minimum_norm", "fmn", norm=2, steps=lambda s: s, binary_search_steps=2),
        "perc_al": perc_al,
        "pdgd": simple("primal_dual_gradient_descent", "pdgd", num_steps=lambda s: s),
        "pdpgd": simple("primal_dual_gradient_descent", "pdpgd", norm=2, num_steps=lambda s: s),
        "pgd_linf": simple("projected_gradient_descent", "pgd_linf", ε=0.03, steps=lambda s: s),
        "sdf": simple("superdeepfool", "sdf", steps=lambda s: s, df_steps=lambda s: s, search_iter=2),
        "sigma_zero": simple("sigma_zero", "sigma_zero", num_steps=lambda s: s),
        # retrain=False: the retraining phase runs 8 x 400 steps, and as shipped on NumPy 2 it raises IndexError
        # (np.percentile of an empty array) when the first phase found no adversarial example
        "str_attack": simple(
            "structured_adversarial_attack",
            "str_attack",
            binary_search_steps=1,
            max_iterations=lambda s: s,
            retrain=False,
        ),
        "tr": simple("trust_region", "tr", iter=lambda s: s),
        "vfga": simple("stochastic_sparse_attacks", "vfga", targeted=False, max_iter=lambda s: s, n_samples=2),
        "segmentation.alma_prox": seg("alma_prox", num_steps=lambda s: s),
        "segmentation.asma": seg("asma", num_steps=lambda s: s),
        "segmentation.dag": seg("dense_adversary.dag", max_iter=lambda s: s),
        "segmentation.pdgd": seg("primal_dual_gradient_descent.pdgd", num_steps=lambda s: s),
        "segmentation.pdpgd": seg("primal_dual_gradient_descent.pdpgd", norm=2, num_steps=lambda s: s),
    }
