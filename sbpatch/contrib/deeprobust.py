"""deeprobust (image): ``generate`` of every ``BaseAttack`` subclass, ``CarliniL2.generate``, ``FASTPGD.attack`` and
``BPDA_attack``. The victim is ``self.model`` (CarliniL2 also ``self.gan``, the generator it attacks through),
FASTPGD's ``net`` argument, BPDA's ``model`` argument.

Most deeprobust attacks call ``loss.backward()`` with live parameters, so freezing saves their weight gradients and
stops them leaving junk in ``param.grad``. That junk matters in the library's own adversarial training
(``PGDtraining.train`` calls ``optimizer.zero_grad()`` *before* the attack, so as shipped the attack's parameter
gradients enter the update); with sbpatch the adversarial examples are the same and the update is the clean one.

Never wrapped: the defenses (they train), ``netmodels`` and ``deeprobust.graph``; see ``excluded``. Library side
effects kept as shipped: FASTPGD calls ``net.eval()``; ``check_type_device`` moves the model to ``self.device``.
deeprobust 0.2.11 needs the ``scipy_status_message`` shim to import on current scipy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sbpatch.locate import argument, attribute
from sbpatch.patching import Integration, Target

# BaseAttack.generate and its overrides: self.model. CarliniL2.generate: also the generator self.gan.
_attack_model = attribute("model")
_model_and_gan = attribute("model", "gan")


INTEGRATION = Integration(
    name="deeprobust",
    distribution="deeprobust",
    module="deeprobust",
    supported=">=0.2.11,<0.3",
    targets=(
        # PGD, FGSM, DeepFool, CarliniWagner, LBFGS, Onepixel, NATTACK and any user subclass defined later.
        Target("deeprobust.image.attack.base_attack", "BaseAttack.generate", _attack_model, subclasses=True),
        # Not a BaseAttack: a plain class (Defense-GAN style C&W through a generator).
        Target("deeprobust.image.attack.l2_attack", "CarliniL2.generate", _model_and_gan, subclasses=True),
        # YOPO's evaluation attack: a BaseAttack subclass whose entry point is attack(net, inp, label).
        Target("deeprobust.image.attack.YOPOpgd", "FASTPGD.attack", argument(0, "net"), subclasses=True),
        Target("deeprobust.image.attack.BPDA", "BPDA_attack", argument(2, "model"), rebind=True),
    ),
    excluded={
        "deeprobust.image.defense": "adversarial training (PGDtraining, FGSMtraining, fast, AWP, TRADES, YOPO, "
        "LID, thermometer encoding): every train step needs parameter gradients; the attacks they call "
        "(PGD/FGSM.generate, FASTPGD.attack) are frozen on their own, call by call",
        "deeprobust.image.defense.base_defense.BaseDefense.generate": "IS training (fits the model); never frozen",
        "deeprobust.image.defense.YOPO.FastGradientLayerOneTrainer.step": "an attack-like inner loop that trains: "
        "YOPO's layer-one update needs the weight gradients it computes",
        "deeprobust.image.netmodels": "model definitions and train_* helpers (training)",
        "deeprobust.graph": "graph attacks train surrogate models and differentiate through weights; not covered",
        "deeprobust.image.attack.Universal.universal_adversarial_perturbation": "never wrapped: on success it "
        "leaves requires_grad=False on every model parameter for good (get_fooling_rate), which a freeze's restore "
        "would undo; in 0.2.11 it cannot run at all (it calls the deepfool module, reads undefined names k, "
        "data_list, tf); the DeepFool.generate calls it is meant to make are frozen one by one",
    },
    shims=("scipy_status_message",),
)


def cases() -> dict[str, Callable[..., Callable[[], Any]]]:
    """One builder per attack: ``builder(model, x, y, steps)`` -> a zero-argument call of the attack.

    Every deeprobust attack defaults to ``device='cuda'`` and moves the model there: the builders pass the inputs'
    device. DeepFool, CarliniWagner, LBFGS, Onepixel and BPDA_attack handle one image: they get the first one.
    Calls that print their progress return ``(result, printed text)``; NATTACK (MNIST's 1x28x28 only) returns None,
    so what it printed is its output.
    CarliniL2 returns ``(images, optimised latent)``. LBFGS differentiates by finite differences (one forward pass
    per input element per gradient): keep its inputs tiny.
    """
    import contextlib
    import io

    import torch
    from deeprobust.image.attack import cw, deepfool, fgsm, lbfgs, onepixel, pgd
    from deeprobust.image.attack.BPDA import BPDA_attack
    from deeprobust.image.attack.l2_attack import CarliniL2
    from deeprobust.image.attack.Nattack import NATTACK
    from deeprobust.image.attack.Universal import universal_adversarial_perturbation
    from deeprobust.image.attack.YOPOpgd import FASTPGD

    def n_classes(model: Any, x: Any) -> int:
        with torch.no_grad():
            return int(model(x[:1]).shape[1])

    def ranked(model: Any, x: Any) -> list[int]:
        """The classes in the model's order of preference for the first image."""
        with torch.no_grad():
            return model(x[:1])[0].argsort(descending=True).tolist()

    def printed(call: Callable[[], Any]) -> Callable[[], Any]:
        """Run ``call`` with stdout captured; return (its result, what it printed)."""

        def run() -> Any:
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                result = call()
            return result, out.getvalue()

        return run

    class WithLogits(torch.nn.Module):
        """deeprobust's own netmodels expose ``get_logits``; CarliniWagner calls it instead of ``forward``."""

        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: Any) -> Any:
            return self.model(x)

        def get_logits(self, x: Any) -> Any:
            return self.model(x)

    def fgsm_(model: Any, x: Any, y: Any, steps: int) -> Callable[[], Any]:
        attack = fgsm.FGSM(model, device=x.device.type)
        return lambda: attack.generate(x, y, epsilon=0.03, clip_min=0.0, clip_max=1.0)

    def pgd_(model: Any, x: Any, y: Any, steps: int) -> Callable[[], Any]:
        attack = pgd.PGD(model, device=x.device.type)
        return lambda: attack.generate(x, y, epsilon=0.03, num_steps=steps, step_size=0.01)

    def deepfool_(model: Any, x: Any, y: Any, steps: int) -> Callable[[], Any]:
        attack = deepfool.DeepFool(model, device=x.device.type)
        k = n_classes(model, x)
        return lambda: attack.generate(x[:1], y[:1], num_classes=k, max_iteration=steps)

    def carlini_wagner(model: Any, x: Any, y: Any, steps: int) -> Callable[[], Any]:
        attack = cw.CarliniWagner(WithLogits(model), device=x.device.type)
        k = n_classes(model, x)
        target = (int(y[0]) + 1) % k
        return printed(
            lambda: attack.generate(
                x[:1], y[:1], target_label=target, classnum=k, max_iterations=steps, binary_search_steps=1
            )
        )

    def lbfgs_(model: Any, x: Any, y: Any, steps: int) -> Callable[[], Any]:
        attack = lbfgs.LBFGS(model, device=x.device.type)
        k = n_classes(model, x)
        # The runner-up class, and a coarse c grid: its search for c doubles c up to 30 times while the target is
        # reached, then bisects down to `epsilon`, each step a finite-difference L-BFGS-B (193 forwards a gradient).
        target = ranked(model, x)[1]
        return printed(
            lambda: attack.generate(x[:1], y[:1], target_label=target, class_num=k, maxiter=steps, epsilon=10.0)
        )

    def one_pixel(model: Any, x: Any, y: Any, steps: int) -> Callable[[], Any]:
        attack = onepixel.Onepixel(model, device=x.device.type)
        return lambda: attack.generate(x[:1], y[:1], pixels=1, maxiter=steps, popsize=5, print_log=False)

    def nattack(model: Any, x: Any, y: Any, steps: int) -> Callable[[], Any]:
        attack = NATTACK(model, device=x.device.type)
        with torch.no_grad():
            labels = model(x).argmax(1)  # it skips the images the model gets wrong: attack the predicted labels
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, labels), batch_size=1)
        k = n_classes(model, x)
        return printed(
            lambda: attack.generate(dataloader=loader, classnum=k, population=4, max_iterations=steps, epsilon=0.2)
        )

    def carlini_l2(model: Any, x: Any, y: Any, steps: int) -> Callable[[], Any]:
        gan = generator(x)
        k = n_classes(model, x)
        attack = CarliniL2(model, device=x.device.type)
        attack.parse_params(gan, binary_search_steps=1, max_iterations=steps, learning_rate=0.01)
        start = torch.zeros(len(x), 4)
        # As shipped it crashes at its end (np.array over l2 tensors that require grad) once it finds an adversarial
        # example, and any class but the label counts: label each image by the model's class at the start point.
        with torch.no_grad():
            labels = model(gan(start)).argmax(1)
        onehot = torch.nn.functional.one_hot(labels, k).float()  # 1-D labels hit a CUDA-only get_device() path

        def run() -> Any:
            latent = start.clone()  # it optimises its `start` argument in place (nn.Parameter(start)): return it too
            return attack.generate(x, onehot, latent), latent

        return run

    def fast_pgd(model: Any, x: Any, y: Any, steps: int) -> Callable[[], Any]:
        attack = FASTPGD(eps=0.03, sigma=0.01, nb_iter=steps, DEVICE=x.device)
        return lambda: attack.attack(model, x.clone(), y)  # it sets requires_grad on its input: give it a copy

    def bpda(model: Any, x: Any, y: Any, steps: int) -> Callable[[], Any]:
        return printed(lambda: BPDA_attack(x[:1].clone().requires_grad_(), int(y[0]), model, iterations=steps))

    def universal(model: Any, x: Any, y: Any, steps: int) -> Callable[[], Any]:
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=1)
        k = n_classes(model, x)
        return printed(
            lambda: universal_adversarial_perturbation(
                loader, model, "cpu", xi=0.1, max_iter_uni=steps, num_classes=k, max_iter_df=steps
            )
        )

    return {
        "FGSM": fgsm_,
        "PGD": pgd_,
        "DeepFool": deepfool_,
        "CarliniWagner": carlini_wagner,
        "LBFGS": lbfgs_,
        "Onepixel": one_pixel,
        "NATTACK": nattack,
        "CarliniL2": carlini_l2,
        "FASTPGD": fast_pgd,
        "BPDA_attack": bpda,
        "universal_adversarial_perturbation": universal,
    }


def generator(x: Any, latent: int = 4, seed: int = 0) -> Any:
    """A tiny generator ``z (N, latent) -> images shaped like x[0]`` for CarliniL2 (which attacks through a GAN)."""
    import torch

    shape = tuple(x.shape[1:])
    numel = 1
    for s in shape:
        numel *= s
    g = torch.Generator().manual_seed(seed)
    gan = torch.nn.Sequential(torch.nn.Linear(latent, numel), torch.nn.Sigmoid(), torch.nn.Unflatten(1, shape))
    with torch.no_grad():
        for p in gan.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return gan.eval()
