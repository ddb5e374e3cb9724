"""cleverhans (4.x, torch attacks): the module functions in ``cleverhans.torch.attacks.*``; the model is ``model_fn``.

Each attack is a plain function whose first argument (or ``model_fn=``) is the model: an ``nn.Module``, a bound method
(``net.forward``), a ``functools.partial``, a lambda/closure over the module (``lambda x: self.net(x)``), or a callable
object holding it in an attribute (a ``Normalized`` wrapper with ``self.net``); :func:`sbpatch.locate.find_modules`
looks through all of them, following only what the call's code loads. A call with no module found runs unpatched and
warns once per function (``SbpatchWarning``).

One target per function, with ``rebind=True``: ``projected_gradient_descent`` calls
``fast_gradient_method`` through the name it imported into its own module globals, and ``spsa`` calls itself once
per sample through its module global, so those references must hold the wrapper too (nested calls are frozen and
counted, the ledger makes them cheap).

What cannot be reached: a name the user bound in their *own* module (``from ...fast_gradient_method import
fast_gradient_method``) *before* ``enable()`` keeps the original function, and its calls run unfrozen (PGD's internal
FGM calls are still frozen, since the library's own globals are rebound). Enable before importing cleverhans (or
with the ``SBPATCH`` environment variable) to reach every name.

Gains: FGM (so PGD, which runs it each step) and CW call ``loss.backward()`` with live parameters, so freezing skips
the weight gradients and stops them accumulating in ``param.grad``; sparse L1 descent uses ``torch.autograd.grad``,
which PyTorch already prunes (no gain); SPSA and HopSkipJump are query-only and gain the cheaper frozen forward
passes. ``noise`` and ``semantic`` take no model and are not wrapped (``semantic`` raises NameError in 4.0.0).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from sbpatch.locate import argument
from sbpatch.patching import Integration, Target

# module (under cleverhans.torch.attacks) -> the attack function it defines; every one takes model_fn first.
ATTACKS: tuple[str, ...] = (
    "fast_gradient_method",
    "projected_gradient_descent",
    "carlini_wagner_l2",
    "sparse_l1_descent",
    "spsa",
    "hop_skip_jump_attack",
)

# attack functions that take no model: nothing to freeze.
MODEL_FREE: dict[str, str] = {
    "noise": "takes no model (uniform random noise): nothing to freeze",
    "semantic": "takes no model (negates the image; raises NameError in 4.0.0): nothing to freeze",
}


# The modules behind model_fn (first positional argument, or the keyword: spsa calls itself with model_fn=).
_victim = argument(0, "model_fn")


INTEGRATION = Integration(
    name="cleverhans",
    distribution="cleverhans",
    module="cleverhans",
    supported=">=4.0,<5",
    targets=tuple(Target(f"cleverhans.torch.attacks.{name}", name, _victim, rebind=True) for name in ATTACKS),
    excluded={
        **{f"cleverhans.torch.attacks.{name}.{name}": reason for name, reason in MODEL_FREE.items()},
        "names bound before enable()": (
            "`from cleverhans.torch.attacks.X import X` in the user's own module before enable() keeps the original "
            "function (calls through it run unfrozen); the library's own modules are rebound"
        ),
    },
)


Builder = Callable[[Any, Any, Any, int], Callable[[], Any]]


def cases() -> dict[str, Builder]:
    """One builder per torch attack function: ``builder(model, x, y, steps)`` -> a zero-argument call of it."""
    import numpy as np
    import torch

    def fn(name: str) -> Callable[..., Any]:
        """The attack function as the library's module holds it now (the wrapper once enabled).

        Looked up at each call, never bound here: cases() may run before enable(), and a name bound before enable()
        keeps the original function (see the module docstring).
        """
        return getattr(importlib.import_module(f"cleverhans.torch.attacks.{name}"), name)

    def bounds(x: Any) -> dict[str, float]:
        return {"clip_min": float(x.min().clamp(max=0.0)), "clip_max": float(x.max().clamp(min=1.0))}

    def n_classes(model: Any, x: Any) -> int:
        with torch.no_grad():
            return int(model(x[:1]).shape[1])

    def fgm(model: Any, x: Any, y: Any, steps: int) -> Callable[[], Any]:
        return lambda: fn("fast_gradient_method")(model, x, 0.03, np.inf, y=y, **bounds(x))

    def pgd(model: Any, x: Any, y: Any, steps: int) -> Callable[[], Any]:
        return lambda: fn("projected_gradient_descent")(model, x, 0.03, 0.01, steps, np.inf, y=y, **bounds(x))

    def cw(model: Any, x: Any, y: Any, steps: int) -> Callable[[], Any]:
        k = n_classes(model, x)
        return lambda: fn("carlini_wagner_l2")(
            model, x, k, y=y, binary_search_steps=1, max_iterations=steps, **bounds(x)
        )

    def sl1d(model: Any, x: Any, y: Any, steps: int) -> Callable[[], Any]:
        return lambda: fn("sparse_l1_descent")(model, x, eps=1.0, eps_iter=0.5, nb_iter=steps, y=y, **bounds(x))

    def spsa_(model: Any, x: Any, y: Any, steps: int) -> Callable[[], Any]:
        return lambda: fn("spsa")(model, x, 0.03, steps, y=y, spsa_samples=4, **bounds(x))

    def hsja(model: Any, x: Any, y: Any, steps: int) -> Callable[[], Any]:
        return lambda: fn("hop_skip_jump_attack")(
            model, x, 2, initial_num_evals=4, max_num_evals=8, num_iterations=steps, verbose=False, **bounds(x)
        )

    def noise_(model: Any, x: Any, y: Any, steps: int) -> Callable[[], Any]:
        return lambda: fn("noise")(x, eps=0.03, **bounds(x))

    def semantic_(model: Any, x: Any, y: Any, steps: int) -> Callable[[], Any]:
        return lambda: fn("semantic")(x)

    return {
        "fast_gradient_method": fgm,
        "projected_gradient_descent": pgd,
        "carlini_wagner_l2": cw,
        "sparse_l1_descent": sl1d,
        "spsa": spsa_,
        "hop_skip_jump_attack": hsja,
        "noise": noise_,
        "semantic": semantic_,
    }
