"""torchattack (1.7.x, spencerwooo's transfer-attack library): every attack goes through ``Attack.__call__``.

What is wrapped: ``torchattack.attack.Attack.__call__`` (it calls ``self.forward``; no attack overrides ``__call__``;
attack classes defined later, a user's own included, inherit the wrapped one, and one that defines its own
``__call__`` has it wrapped when defined). The victim is ``self.model``: an
``nn.Module``, or the ``.model`` that ``Attack.__init__`` takes out of an ``AttackModel``. Nested calls
(``create_attack`` instances, an attack calling another) are frozen once and counted.

Gains: nearly every attack (FGSM, PGD, PGDL2, MI/NI/DI/TI/SI-NI/VMI/VNI-FGSM, MIG, SSA, BSR, DeCoWA, DR, FDA, FIA, NAA,
DANAA's final steps, ILPD, BPA, SGM, BFA's final steps, DeepFool, ATT, PNAPatchOut, TGR, VDC) calls plain
``loss.backward()`` with live parameters: freezing skips every weight gradient (time and memory) and stops them
accumulating in ``param.grad`` (as shipped they are left filled). Admix, GRA, L2T, MuMoDIG, BFA's and DANAA's
aggregate-gradient passes use ``torch.autograd.grad(loss, x)``, which PyTorch already prunes: memory only (the
frozen forward saves fewer tensors). GeoDA is query-only (forward passes, cheaper frozen).

Hooks: the feature-level attacks register forward hooks and *full* backward hooks (FIA, NAA, DANAA, ILPD, DR, FDA,
BFA) which see the same tensors frozen or not. ATT, PNAPatchOut, SGM, TGR and VDC register *old-style*
``register_backward_hook`` hooks, which receive the gradients of the last autograd node of the module's output:
which of those gradients exist depends on whether the module's parameters require grad, so the parameters of every
module carrying such a hook stay live during the call (``keep``), their ``.grad`` set aside and put back after.

Not wrapped or not frozen:

* the generative attacks (``GENERATIVE``: CDA, LTP, BIA, GAMA): the victim is an empty placeholder
  (``model=None``); the only network is the generator, which a user may be fine-tuning through the call (its output
  keeps the generator's graph as shipped). Calls run as shipped (``pass_instance``). torchattack 1.7.2 does not train
  generators itself; it downloads pretrained ones, which cannot be done offline (``weights=None`` builds a random one).
* SSP's perceptual VGG-16 (``self.perceptual_criteria``) is not frozen (only ``self.model``); SSP downloads its
  ImageNet weights at construction.
* ``torchattack.evaluate`` (datasets, metrics, ``run_attack``): no gradient work of its own; its attack calls go
  through the wrapped ``__call__``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from sbpatch import freeze
from sbpatch.locate import attribute
from sbpatch.patching import Integration, Target

_victim = attribute("model")


def _generative(instance: Any) -> str | None:
    category = getattr(type(instance), "attack_category", None)
    if getattr(category, "name", None) == "GENERATIVE":
        return "generative attack: the generator is the only network (a user may train it through the call)"
    return None


def _old_style_hooked(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Iterable[Any]:
    """Modules of the victim with ``register_backward_hook`` hooks: their parameters stay live (see docstring)."""
    model = getattr(instance, "model", None)
    modules = getattr(model, "modules", None)
    if modules is None:
        return ()
    return [m for m in modules() if m._backward_hooks and m._is_full_backward_hook is False]


def _feature_module(instance: Any) -> Any:
    module = getattr(instance, "feature_module", None)
    if module is None and getattr(instance, "feature_layer_cfg", None):  # BFA, DR keep only the name
        from torchattack._rgetattr import rgetattr

        module = rgetattr(instance.model, instance.feature_layer_cfg)
    return module


def _feature_maps_require_grad(output: Any) -> Any:
    """A leaf copy of a floating-point output that needs no gradient (grad mode on); None keeps the output."""
    import torch

    if (
        isinstance(output, torch.Tensor)
        and not output.requires_grad
        and output.is_floating_point()
        and torch.is_grad_enabled()
    ):
        return output.detach().requires_grad_()
    return None


@contextlib.contextmanager
def _live_feature_maps(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Iterator[None]:
    """During the call, the feature layer's output requires grad even when nothing before it does.

    NAA and BFA differentiate their loss with respect to the feature maps (``loss.backward()``,
    ``autograd.grad(loss, self.feature_maps)``) in passes whose input needs no gradient: as shipped the feature maps
    require grad only through the live weights before the layer. Frozen, a forward hook (first in line, so the
    library's own hooks see the same tensor) hands on a leaf copy that requires grad: same values, same gradient
    downstream; only the weight gradients before the layer (which nothing reads) are not computed. Not done when the
    user froze every parameter (the call fails as shipped, and still does); a model whose parameters before the
    feature layer were all frozen by the user, the rest live, fails as shipped but runs patched.
    """
    module = _feature_module(instance)
    model = getattr(instance, "model", None)
    if (
        module is None
        or not hasattr(module, "register_forward_hook")
        or not any(p.requires_grad for p in model.parameters())  # all frozen by the user: fails as shipped too
    ):
        yield
        return
    handle = module.register_forward_hook(lambda m, i, o: _feature_maps_require_grad(o), prepend=True)
    try:
        yield
    finally:
        handle.remove()


def _grads_set_aside(modules: Iterable[Any]) -> contextlib.AbstractContextManager[None]:
    """The kept-live parameters' ``.grad`` set aside for the call and put back after, through sbpatch's own
    set-aside (the one its kernel rules use): the attack's weight gradients (which no torchattack attack reads) never
    reach the user's ``.grad``, and overlapping calls from several threads put back what was there before the first."""
    return freeze.grads_set_aside(p for m in modules for p in m.parameters())


@contextlib.contextmanager
def _call_context(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Iterator[None]:
    with (
        _live_feature_maps(wrapped, instance, args, kwargs),
        _grads_set_aside(_old_style_hooked(wrapped, instance, args, kwargs)),
    ):
        yield


INTEGRATION = Integration(
    name="torchattack",
    distribution="torchattack",
    module="torchattack",
    supported=">=1.7,<2",
    targets=(
        Target(
            "torchattack.attack",
            "Attack.__call__",
            _victim,
            subclasses=True,  # a subclass's own __call__ (none in 1.7.2; a user's, defined later) is wrapped too
            pass_instance=_generative,
            keep=_old_style_hooked,
            context=_call_context,
        ),
    ),
    excluded={
        "torchattack generative attacks (CDA, LTP, BIA, GAMA)": (
            "the victim is an empty placeholder and the generator the only network (a user may train it through "
            "the call): called unpatched"
        ),
        "torchattack.ssp.PerceptualCriteria": "SSP's perceptual VGG-16 is not frozen (only self.model is)",
    },
)

# Attacks that need a timm ViT-B/16-like model (``blocks.{i}.attn.attn_drop``, ``.qkv``, ``.mlp``, 12 blocks).
VIT_ONLY = ("ATT", "PNAPatchOut", "TGR", "VDC")
GENERATIVE = ("BIA", "CDA", "GAMA", "LTP")

Builder = Callable[[Any, Any, Any, int], Callable[[], Any]]


def feature_layer(model: Any) -> str:
    """A module name of ``model`` for the feature-level attacks (they want 4-D feature maps): the first ``Conv2d``
    (a ViT's patch embedding), else the first block of a ``layers``/``blocks`` list, else the first submodule."""
    import torch.nn as nn

    names = [(n, m) for n, m in model.named_modules() if n]
    for n, m in names:
        if isinstance(m, nn.Conv2d):
            return n
    for n, _m in names:
        parts = n.split(".")
        if len(parts) >= 2 and parts[-2] in ("layers", "blocks") and parts[-1][-1:].isdigit():
            return n
    return names[0][0]


def cases() -> dict[str, Builder]:
    """One builder per exported attack: ``builder(model, x, y, steps)`` -> a zero-argument call of the attack.

    An attack is built when the builder runs (once: several register hooks on the model at construction); if
    construction fails (a pretrained download offline, an unsupported model), the returned call raises that error.
    """
    import torchattack as ta

    def n_classes(model: Any, x: Any) -> int:
        import torch

        with torch.no_grad():
            return int(model(x[:1]).shape[1])

    def deferred(make: Callable[[Any, Any, int], Any]) -> Builder:
        def build(model: Any, x: Any, y: Any, steps: int) -> Callable[[], Any]:
            try:
                attack = make(model, x, steps)
            except Exception as exc:  # the library cannot build it here: report it when called
                error = exc

                def fail() -> Any:
                    raise error

                return fail
            # a fresh copy of x per call: DeepFool sets requires_grad on its input in place, which would break the
            # attacks run after it on the same tensor (verify, bench)
            return lambda: attack(x.detach().clone(), y)

        return build

    def simple(name: str, **kw: Any) -> Builder:
        cls = getattr(ta, name)

        def make(model: Any, x: Any, steps: int) -> Any:
            args = {k: (steps if v == "steps" else v) for k, v in kw.items()}
            if args.get("feature_layer_cfg") == "auto":
                args["feature_layer_cfg"] = feature_layer(model)
            if args.get("num_classes") == "auto":
                args["num_classes"] = n_classes(model, x)
            return cls(model, **args)

        return deferred(make)

    def generative(name: str) -> Builder:
        cls = getattr(ta, name)
        return deferred(lambda model, x, steps: cls(weights=None))

    def geoda(model: Any, x: Any, y: Any, steps: int) -> Callable[[], Any]:
        return deferred(
            lambda m, x_, s: ta.GeoDA(
                m, input_shape=tuple(x_.shape[1:]), max_queries=500, sub_dim=5, grad_estimator_batch_size=4
            )
        )(model, x, y, steps)

    vit = {"hook_cfg": "vit_base_patch16_224", "steps": "steps"}
    return {
        "Admix": simple("Admix", steps="steps", size=2, num_classes="auto"),
        "ATT": simple("ATT", **vit),
        "BFA": simple("BFA", steps="steps", num_ens=2, feature_layer_cfg="auto", num_classes="auto"),
        "BIA": generative("BIA"),
        "BPA": simple("BPA", steps="steps"),
        "BSR": simple("BSR", steps="steps", num_scale=2),
        "CDA": generative("CDA"),
        "DANAA": simple("DANAA", steps="steps", num_ens=2, feature_layer_cfg="auto"),
        "DeCoWA": simple("DeCoWA", steps="steps", num_warping=2),
        "DeepFool": simple("DeepFool", steps="steps", num_classes="auto"),
        "DIFGSM": simple("DIFGSM", steps="steps"),
        "DR": simple("DR", steps="steps", feature_layer_cfg="auto"),
        "FDA": simple("FDA", steps="steps"),
        "FGSM": simple("FGSM"),
        "FIA": simple("FIA", steps="steps", num_ens=2, feature_layer_cfg="auto"),
        "GAMA": generative("GAMA"),
        "GeoDA": geoda,
        "GRA": simple("GRA", steps="steps", num_neighbors=2),
        "IFGSM": simple("IFGSM", steps="steps"),
        "ILPD": simple("ILPD", steps="steps", feature_layer_cfg="auto"),
        "L2T": simple("L2T", steps="steps", num_scale=2),
        "LTP": generative("LTP"),
        "MIFGSM": simple("MIFGSM", steps="steps"),
        "MIG": simple("MIG", steps="steps"),
        "MuMoDIG": simple("MuMoDIG", steps="steps", n_trans=2),
        "NAA": simple("NAA", steps="steps", num_ens=2, feature_layer_cfg="auto"),
        "NIFGSM": simple("NIFGSM", steps="steps"),
        "PGD": simple("PGD", steps="steps"),
        "PGDL2": simple("PGDL2", steps="steps"),
        "PNAPatchOut": simple("PNAPatchOut", **vit),
        "SGM": simple("SGM", hook_cfg="resnet18", steps="steps"),
        "SINIFGSM": simple("SINIFGSM", steps="steps", m=2),
        "SSA": simple("SSA", steps="steps", num_spectrum=2),
        "SSP": simple("SSP", steps="steps"),
        "TGR": simple("TGR", **vit),
        "TIFGSM": simple("TIFGSM", steps="steps", kern_len=3),
        "VDC": simple("VDC", **vit, sample_num_batches=4),
        "VMIFGSM": simple("VMIFGSM", steps="steps", n=2),
        "VNIFGSM": simple("VNIFGSM", steps="steps", n=2),
    }
