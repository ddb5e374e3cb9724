"""torchattacks: every attack goes through ``Attack.__call__`` (no subclass overrides it); the model is ``self.model``.

Only the attacks that call ``loss.backward()`` gain speed (CW, DeepFool, JSMA, EADL1/EADEN, PIFGSM(++), FAB and the
black-box ones' forward passes); the PGD family uses ``torch.autograd.grad``, which PyTorch already prunes. All of
them stop leaving gradients in ``param.grad``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sbpatch.locate import attribute
from sbpatch.patching import Integration, Target

_victim = attribute("model")


def _trains(instance: Any) -> str | None:
    return "LGV trains copies of the model with SGD" if type(instance).__name__ == "LGV" else None


INTEGRATION = Integration(
    name="torchattacks",
    distribution="torchattacks",
    module="torchattacks",
    supported=">=3.4,<4",
    targets=(Target("torchattacks.attack", "Attack.__call__", _victim, pass_instance=_trains),),
    excluded={"torchattacks.LGV": "trains copies of the model with SGD (collect_models); called unpatched"},
)


def cases() -> dict[str, Callable[..., Callable[[], Any]]]:
    """One builder per exported attack: ``builder(model, x, y, steps)`` -> a zero-argument call of the attack."""
    import torchattacks as ta

    def n_classes(model: Any, x: Any) -> int:
        import torch

        with torch.no_grad():
            return int(model(x[:1]).shape[1])

    def simple(cls: Any, **kw: Any) -> Callable[..., Callable[[], Any]]:
        def build(model: Any, x: Any, y: Any, steps: int) -> Callable[[], Any]:
            attack = cls(model, **{k: (steps if v == "steps" else v) for k, v in kw.items()})
            return lambda: attack(x, y)

        return build

    def multi(model: Any, x: Any, y: Any, steps: int) -> Callable[[], Any]:
        attack = ta.MultiAttack([ta.FGSM(model, eps=0.03), ta.PGD(model, eps=0.03, steps=steps)])
        return lambda: attack(x, y)

    def auto(model: Any, x: Any, y: Any, steps: int) -> Callable[[], Any]:
        attack = ta.AutoAttack(model, eps=0.03, n_classes=n_classes(model, x), seed=0)
        for sub in attack._autoattack.attacks:  # keep it tiny: few iterations and queries
            for name, value in (("steps", steps), ("n_queries", 5 * steps), ("n_restarts", 1)):
                if hasattr(sub, name):
                    setattr(sub, name, value)
        return lambda: attack(x, y)

    def fab(model: Any, x: Any, y: Any, steps: int) -> Callable[[], Any]:
        attack = ta.FAB(model, steps=steps, n_restarts=1, n_classes=n_classes(model, x))
        return lambda: attack(x, y)

    def lgv(model: Any, x: Any, y: Any, steps: int) -> Callable[[], Any]:
        import torch

        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=len(x))
        attack = ta.LGV(model, loader, epochs=1, nb_models_epoch=1, attack_class=ta.BIM, steps=steps, verbose=False)
        return lambda: attack(x, y)

    return {
        "VANILA": simple(ta.VANILA),
        "GN": simple(ta.GN),
        "FGSM": simple(ta.FGSM),
        "BIM": simple(ta.BIM, steps="steps"),
        "RFGSM": simple(ta.RFGSM, steps="steps"),
        "PGD": simple(ta.PGD, steps="steps"),
        "EOTPGD": simple(ta.EOTPGD, steps="steps", eot_iter=2),
        "FFGSM": simple(ta.FFGSM),
        "TPGD": simple(ta.TPGD, steps="steps"),
        "MIFGSM": simple(ta.MIFGSM, steps="steps"),
        "UPGD": simple(ta.UPGD, steps="steps"),
        "APGD": simple(ta.APGD, steps="steps"),
        "APGDT": simple(ta.APGDT, steps="steps", n_classes=10),
        "DIFGSM": simple(ta.DIFGSM, steps="steps"),
        "TIFGSM": simple(ta.TIFGSM, steps="steps", kernel_name="gaussian", len_kernel=3),
        "Jitter": simple(ta.Jitter, steps="steps"),
        "NIFGSM": simple(ta.NIFGSM, steps="steps"),
        "PGDRS": simple(ta.PGDRS, steps="steps", noise_batch_size=2, batch_max=8),
        "SINIFGSM": simple(ta.SINIFGSM, steps="steps", m=2),
        "VMIFGSM": simple(ta.VMIFGSM, steps="steps", N=2),
        "VNIFGSM": simple(ta.VNIFGSM, steps="steps", N=2),
        "SPSA": simple(ta.SPSA, nb_iter=1, nb_sample=8, max_batch_size=8),
        "JSMA": simple(ta.JSMA, gamma=0.05),
        "EADL1": simple(ta.EADL1, max_iterations=10, binary_search_steps=1),
        "EADEN": simple(ta.EADEN, max_iterations=10, binary_search_steps=1),
        "PIFGSM": simple(ta.PIFGSM, num_iter_set=2),
        "PIFGSMPP": simple(ta.PIFGSMPP, num_iter_set=2),
        "CW": simple(ta.CW, steps="steps"),
        "PGDL2": simple(ta.PGDL2, steps="steps"),
        "DeepFool": simple(ta.DeepFool, steps="steps"),
        "PGDRSL2": simple(ta.PGDRSL2, steps="steps", noise_batch_size=2, batch_max=8),
        "SparseFool": simple(ta.SparseFool, steps="steps", lam=3),
        "OnePixel": simple(ta.OnePixel, steps=1, popsize=2),
        "Pixle": simple(ta.Pixle, max_iterations=2, restarts=1),
        "FAB": fab,
        "AutoAttack": auto,
        "Square": simple(ta.Square, n_queries=10),
        "MultiAttack": multi,
        "LGV": lgv,
    }
