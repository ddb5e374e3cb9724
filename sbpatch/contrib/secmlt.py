"""secml-torch (``secmlt``): every evasion attack's per-batch run, ``BaseEvasionAttack._run``, native and backends.

What is wrapped, and why:

* ``BaseEvasionAttack._run(model, samples, labels)`` and the ``_run`` of every subclass that defines its own (in
  secml-torch 1.5: ``ModularEvasionAttack`` (the native PGD, FMN, DDN), ``BaseFoolboxEvasionAttack`` (every foolbox
  backend attack) and ``BaseAdvLibEvasionAttack`` (every adv-lib backend attack), plus any subclass defined later,
  a user's own attack included). ``__call__`` is not the place: ``attack(model, loader, stream=True)`` returns a lazy
  generator (``_run_batches``) that runs ``_run`` batch by batch only when the caller pulls the next batch, long
  after ``__call__`` returned; the adversarial trainer consumes the attack that way and trains the model between two
  batches. Freezing each ``_run`` covers the eager path (``stream=False``: one freeze per batch) and the lazy path
  alike, and leaves everything the caller does between batches (a training step) untouched. ``_run_loop`` runs
  inside ``_run`` (so it is frozen with it) and is not wrapped on its own; a nested ``_run`` (an attack used as
  another's initializer) just takes the freeze again.
* ``Ensemble.__call__(model, data_loader, adv_loaders)`` (``MinDistanceEnsemble``, ``FixedEpsilonEnsemble``): it
  picks the best adversarial example per sample with forward passes only, built with live parameters as shipped.

The victim: ``_run`` gets the ``BasePyTorchClassifier`` (``__call__`` wraps a bare ``nn.Module`` into one first),
which holds the user's module in ``_model`` (public ``model``); its preprocessing and postprocessing, when they are
modules with parameters, are frozen with it (the attack never needs their gradients either). A model that is not a
PyTorch one (a user's ``BaseModel`` with no module behind it) runs unpatched.

What gains time, and what only memory: the native attacks (``ModularEvasionAttack._loss_and_grad``) call
``loss.backward()`` with the model's parameters live, so freezing removes the weight-gradient half of every backward
(time and memory), and as shipped every ``param.grad`` is left filled; with sbpatch it is not. The foolbox backend
differentiates through eagerpy's ``value_and_grad`` (``loss.backward()`` too): it gains the same way. The adv-lib
backend's attacks take ``torch.autograd.grad`` with respect to the input, which PyTorch already prunes: they gain
memory only (Linear layers no longer save their inputs for backward). Decision-based attacks and ``Ensemble`` gain
on their forward passes (no graph built through the weights). Measured (torchvision ResNet18, B=8, 32 px, PGD-5,
1 thread, CPU-time medians, shipped / sbpatch): native 2.48x, foolbox backend 2.38x, adv-lib backend 1.00x.

Not wrapped, and why (``INTEGRATION.excluded``): the training code. ``AdversarialTrainer.train`` and its
``_train_epoch_clf``, ``BasePyTorchTrainer.train`` / ``train_epoch`` and ``BasePyTorchClassifier.train`` need
parameter gradients; inside ``AdversarialTrainer.train`` only the attack's per-batch ``_run`` is frozen, the training
step on each yielded batch runs with the parameters exactly as the user left them. The data poisoning datasets
(``secmlt.adv.poisoning``) only edit data (no model). The metrics (``secmlt.metrics``) and trackers are not attacks.
The language-model wrappers (``secmlt.models.hugging_face``) have no attack in 1.5.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sbpatch.locate import argument
from sbpatch.patching import Integration, Target

# _run's first argument is the BasePyTorchClassifier: it keeps the user's module in ``_model`` (also found through the
# code of its __call__ -> decision_function -> _decision_function); any other BaseModel is searched the same way.
_victim = argument(0, "model", attributes=("_model",))

INTEGRATION = Integration(
    name="secmlt",
    distribution="secml-torch",
    module="secmlt",
    supported=">=1.5,<2",
    targets=(
        Target("secmlt.adv.evasion.base_evasion_attack", "BaseEvasionAttack._run", _victim, subclasses=True),
        Target("secmlt.adv.evasion.aggregators.ensemble", "Ensemble.__call__", _victim, subclasses=True),
    ),
    excluded={
        "secmlt.defenses.adv_training.pytorch.adversarial_trainer.AdversarialTrainer.train, _train_epoch_clf": (
            "trains the model (needs parameter gradients); only the attack's per-batch _run it streams is frozen"
        ),
        "secmlt.models.pytorch.base_pytorch_trainer.BasePyTorchTrainer.train, train_epoch": (
            "trains the model: needs parameter gradients"
        ),
        "secmlt.models.pytorch.base_pytorch_nn.BasePyTorchClassifier.train": (
            "trains the model through its trainer: needs parameter gradients"
        ),
        "secmlt.adv.evasion.base_evasion_attack.BaseEvasionAttack.__call__, _run_batches": (
            "not wrapped: with stream=True they return a lazy generator whose batches run after the call returned; "
            "each batch's _run is frozen instead"
        ),
        "secmlt.adv.poisoning": "poisoning datasets edit data only (no model involved)",
    },
)

Builder = Callable[[Any, Any, Any, int], Callable[[], Any]]


# creator class -> its module under secmlt.adv.evasion (the package exports only the foolbox/adv-lib classes)
MODULES = {
    "AdditiveNoise": "additive_noise",
    "BoundaryAttack": "boundary_attack",
    "ContrastReduction": "contrast_reduction",
    "CW": "cw",
    "DDN": "ddn",
    "DeepFool": "deepfool",
    "FGSM": "fgsm",
    "FMN": "fmn",
    "GaussianBlur": "gaussian_blur",
    "HopSkipJump": "hopskipjump",
    "PGD": "pgd",
    "SaltAndPepperNoise": "saltandpepper",
    "SpatialAttack": "spatial_attack",
    "VAT": "vat",
}


def _collect(batches: Any) -> Any:
    """(adversarial examples, labels) of every batch, concatenated: from a DataLoader or a stream."""
    import torch

    xs, ys = [], []
    for x_adv, labels in batches:
        xs.append(x_adv)
        ys.append(labels)
    return torch.cat(xs), torch.cat(ys)


def cases() -> dict[str, Builder]:
    """One builder per (attack, backend) secml-torch offers, eager and streamed: ``builder(model, x, y, steps)``.

    The call runs the attack on a ``DataLoader`` over ``x``, ``y`` in two batches and returns the concatenated
    adversarial examples and labels. ``"<attack>-<backend>"`` materialises the result (``stream=False``);
    ``"<attack>-<backend>-stream"`` pulls the batches from ``stream=True``. A backend whose library is missing on
    this stack fails inside the call (reported as library-broken by the tests).
    """
    import torch
    from secmlt.adv.evasion.perturbation_models import LpPerturbationModels as Lp

    def loader(x: Any, y: Any) -> Any:
        half = max(1, (len(x) + 1) // 2)  # two batches: the per-batch freeze of the stream is exercised
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=half, shuffle=False)

    def make(creator: str, backend: str, stream: bool, **kw: Any) -> Builder:
        def build(model: Any, x: Any, y: Any, steps: int) -> Callable[[], Any]:
            from secmlt.models.pytorch.base_pytorch_nn import BasePyTorchClassifier

            classifier = BasePyTorchClassifier(model)
            data = loader(x, y)

            def run() -> Any:
                import importlib

                cls = getattr(importlib.import_module(f"secmlt.adv.evasion.{MODULES[creator]}"), creator)
                params = {k: (steps if v == "steps" else v) for k, v in kw.items()}
                attack = cls(backend=backend, **params)
                return _collect(attack(classifier, data, stream=stream))

            return run

        return build

    table: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
        "PGD": (
            ("native", "foolbox", "advlib"),
            {
                "perturbation_model": Lp.LINF,
                "epsilon": 0.03,
                "num_steps": "steps",
                "step_size": 0.01,
                "random_start": True,
            },
        ),
        "PGD_L2": (
            ("native", "foolbox"),
            {"perturbation_model": Lp.L2, "epsilon": 0.5, "num_steps": "steps", "step_size": 0.1},
        ),
        "FMN": (("native", "foolbox", "advlib"), {"perturbation_model": Lp.L2, "num_steps": "steps", "step_size": 0.1}),
        "DDN": (("native", "foolbox", "advlib"), {"num_steps": "steps"}),
        "FGSM": (("foolbox", "advlib"), {"perturbation_model": Lp.LINF, "epsilon": 0.03}),
        # adv-lib's carlini_wagner_l2 takes ``i % (max_iterations // 10)``: fewer than 10 steps divide by zero
        "CW": (("foolbox", "advlib"), {"binary_search_steps": 1, "num_steps": 10, "step_size": 0.01}),
        "DeepFool": (("foolbox", "advlib"), {"num_steps": "steps"}),
        "AdditiveNoise": (("foolbox",), {"epsilon": 0.1}),
        "BoundaryAttack": (("foolbox",), {"steps": "steps"}),
        "ContrastReduction": (("foolbox",), {"epsilon": 0.1}),
        "GaussianBlur": (("foolbox",), {"steps": "steps"}),
        "HopSkipJump": (
            ("foolbox",),
            {"steps": "steps", "initial_gradient_eval_steps": 4, "max_gradient_eval_steps": 8},
        ),
        "SaltAndPepperNoise": (("foolbox",), {"steps": "steps"}),
        "SpatialAttack": (("foolbox",), {"num_translations": 2, "num_rotations": 2}),
        "VAT": (("foolbox",), {"epsilon": 0.03, "steps": "steps"}),
    }
    out: dict[str, Builder] = {}
    for creator, (backends, kw) in table.items():
        name = creator.split("_")[0]
        for backend in backends:
            for stream in (False, True):
                key = f"{creator}-{backend}" + ("-stream" if stream else "")
                out[key] = make(name, backend, stream, **kw)
    return out
