"""deeprobust 0.2.11 (image): every attack patched vs unpatched, a user's own attack, and PGD adversarial training.

The training tests use ``CPUPGDtraining``: the library's ``PGDtraining`` with one change, its ``adv_data`` builds the
PGD attack on the trainer's device (as shipped it builds ``PGD(self.model)``, whose device defaults to 'cuda', so it
cannot run without a GPU; ``test_pgdtraining_as_shipped_needs_cuda`` pins that).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import MODELS, compare, data, expect, seed_all, tiny_cnn, tiny_vit

import sbpatch
from sbpatch import freeze, registry
from sbpatch.contrib.deeprobust import INTEGRATION, cases, generator
from sbpatch.patching import SbpatchWrapper

CASES = cases()
STEPS = 2
# LBFGS converts its loss to a float; unpatched that loss requires grad (through the weights) and torch warns.
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True:UserWarning")

# attack -> what the unpatched call raises on this stack (torch 2.14, NumPy 2, scipy, CPU), on both 3x8x8 models.
KNOWN_BROKEN = {
    "BPDA_attack": "'int' object has no attribute 'size'",  # nn.MSELoss()(0, tensor)
    "CarliniWagner": "unsupported format string passed to Tensor.__format__",  # print of a 1-element loss
    "NATTACK": "cannot reshape array of size 192 into shape (1,1,28,28)",  # MNIST only: see test_nattack_mnist
    "Onepixel": "np.asfarray",  # removed in NumPy 2 (its differential_evolution); it also calls .cuda()
    "universal_adversarial_perturbation": "must match the size of tensor b (224)",  # hard-coded 224x224
}
NOT_WRAPPED = {"universal_adversarial_perturbation"}  # see INTEGRATION.excluded


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """LBFGS makes thousands of tiny forward passes: one thread is much faster on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    """deeprobust prints a lot; keep pytest's captured output small."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def test_integration_is_patched() -> None:
    import deeprobust.image.attack.BPDA as bpda
    import deeprobust.image.attack.l2_attack as l2
    import deeprobust.image.attack.Universal as universal
    import deeprobust.image.attack.YOPOpgd as yopo
    from deeprobust.image.attack import cw, deepfool, fgsm, lbfgs, onepixel, pgd
    from deeprobust.image.attack.base_attack import BaseAttack
    from deeprobust.image.attack.Nattack import NATTACK
    from deeprobust.image.defense.base_defense import BaseDefense

    status = sbpatch.status()["deeprobust"]
    assert status.enabled and not status.skipped, status.skipped
    for cls in (
        BaseAttack,
        pgd.PGD,
        fgsm.FGSM,
        deepfool.DeepFool,
        cw.CarliniWagner,
        lbfgs.LBFGS,
        onepixel.Onepixel,
        NATTACK,
        l2.CarliniL2,
    ):
        assert isinstance(cls.__dict__["generate"], SbpatchWrapper), cls
    assert isinstance(yopo.FASTPGD.__dict__["attack"], SbpatchWrapper)
    assert isinstance(bpda.BPDA_attack, SbpatchWrapper)
    assert not isinstance(universal.universal_adversarial_perturbation, SbpatchWrapper)
    assert not isinstance(BaseDefense.__dict__["generate"], SbpatchWrapper)  # it IS training
    assert "deeprobust.image.defense.base_defense.BaseDefense.generate" in INTEGRATION.excluded
    assert "scipy_status_message" in INTEGRATION.shims


def test_every_attack_has_a_case() -> None:
    """Each class of deeprobust.image.attack (all its modules imported) with its own generate/attack has a case, and
    so have the two module-level attack functions."""
    import importlib
    import pkgutil

    import deeprobust.image.attack as package

    found = set()
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for name, obj in vars(module).items():
            if isinstance(obj, type) and obj.__module__ == module.__name__ and {"generate", "attack"} & set(vars(obj)):
                found.add(name)
        found |= {"BPDA_attack", "universal_adversarial_perturbation"} & set(vars(module))
    assert found - {"BaseAttack"} == set(CASES)


@pytest.mark.parametrize("model_name", ["cnn", "vit"])
@pytest.mark.parametrize("attack", sorted(CASES))
def test_identical(attack: str, model_name: str) -> None:
    model = MODELS[model_name]()
    x, y = data()
    outcome = compare(
        "deeprobust",
        attack,
        model,
        CASES[attack](model, x, y, STEPS),
        model_name,
        expect_freeze=attack not in NOT_WRAPPED,
    )
    expect(outcome, KNOWN_BROKEN)


@pytest.mark.parametrize("attack", sorted(set(KNOWN_BROKEN) - NOT_WRAPPED))
def test_broken_call_restores(attack: str) -> None:
    """A patched call that raises (the library's own bug) raises the same and leaves every flag and .grad as it was."""
    model = tiny_cnn()
    x, y = data()
    run = CASES[attack](model, x, y, STEPS)
    flags = [p.requires_grad for p in model.parameters()]
    calls = registry.counters("deeprobust").calls
    with pytest.raises(Exception) as info:
        run()
    assert KNOWN_BROKEN[attack] in str(info.value)
    assert registry.counters("deeprobust").calls == calls + 1
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert freeze.held_count() == 0


def _mnist_vit() -> nn.Module:
    model = tiny_vit(size=28)
    torch.manual_seed(5)
    model.conv_proj = nn.Conv2d(1, 8, 4, 4)  # one input channel; still nn.MultiheadAttention inside
    return model.eval()


@pytest.mark.parametrize("model_name", ["cnn", "vit"])
def test_nattack_mnist(model_name: str) -> None:
    """NATTACK hard-codes 1x28x28 inputs: on MNIST-shaped models it runs, and patched equals unpatched."""
    model = tiny_cnn(channels=1, size=28) if model_name == "cnn" else _mnist_vit()
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(4, 1, 28, 28, generator=g), torch.randint(0, 10, (4,), generator=g)
    outcome = compare("deeprobust", "NATTACK", model, CASES["NATTACK"](model, x, y, STEPS), model_name)
    assert outcome.result == "identical", outcome


@pytest.mark.parametrize("model_name", ["cnn", "vit"])
def test_carlini_l2_freezes_the_generator_too(model_name: str) -> None:
    """CarliniL2 attacks through ``self.gan``: both modules are frozen, both restored, the latent really moves."""
    from deeprobust.image.attack.l2_attack import CarliniL2

    model = MODELS[model_name]()
    x, _ = data()
    gan = generator(x)
    gan[0].bias.requires_grad_(False)  # a user-frozen generator parameter stays frozen
    attack = CarliniL2(model, device="cpu")
    attack.parse_params(gan, binary_search_steps=1, max_iterations=STEPS, learning_rate=0.01)
    start = torch.zeros(len(x), 4)
    with torch.no_grad():
        labels = F.one_hot(model(gan(start)).argmax(1), 10).float()

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        latent = start.clone()
        return attack.generate(x, labels, latent), latent

    outcome = compare("deeprobust", "CarliniL2", model, run, model_name, models=[model, gan])
    assert outcome.result == "identical", outcome
    assert not torch.equal(run()[1], start)  # the optimisation ran


@pytest.mark.parametrize("model_name", ["cnn", "vit"])
def test_fastpgd_leaves_eval_mode_as_shipped(model_name: str) -> None:
    """FASTPGD calls ``net.eval()``: a model in train mode ends in eval mode, patched as unpatched."""
    model = MODELS[model_name]().train()
    x, y = data()
    outcome = compare("deeprobust", "FASTPGD", model, CASES["FASTPGD"](model, x, y, STEPS), model_name)
    assert outcome.result == "identical", outcome
    assert not any(m.training for m in model.modules())


@pytest.mark.parametrize("model_name", ["cnn", "vit"])
def test_user_attack_defined_after_enable(model_name: str) -> None:
    from deeprobust.image.attack.base_attack import BaseAttack

    class MyFGSM(BaseAttack):
        def generate(self, image: torch.Tensor, label: torch.Tensor, **kwargs: float) -> torch.Tensor:
            x = image.clone().requires_grad_(True)
            F.cross_entropy(self.model(x), label).backward()
            return (x + kwargs.get("epsilon", 0.03) * x.grad.sign()).clamp(0, 1).detach()

    class Inherits(MyFGSM):  # inherits the wrapped generate: not wrapped twice
        pass

    assert isinstance(MyFGSM.__dict__["generate"], SbpatchWrapper)
    assert "generate" not in Inherits.__dict__
    model = MODELS[model_name]()
    x, y = data()
    for cls in (MyFGSM, Inherits):
        attack = cls(model, device="cpu")
        outcome = compare("deeprobust", cls.__name__, model, lambda a=attack: a.generate(x, y), model_name)
        assert outcome.result == "identical", outcome


# --- adversarial training ---------------------------------------------------------------------------------------


def _cpu_trainer() -> type:
    from deeprobust.image.attack.pgd import PGD
    from deeprobust.image.defense.pgdtraining import PGDtraining

    class CPUPGDtraining(PGDtraining):
        """PGDtraining with its PGD built on ``self.device``; also records the adversarial batches."""

        def adv_data(
            self,
            data: torch.Tensor,
            output: torch.Tensor,
            ep: float = 0.3,
            num_steps: int = 10,
            perturb_step_size: float = 0.01,
        ) -> tuple[torch.Tensor, torch.Tensor]:
            adversary = PGD(self.model, device=self.device)
            data_adv = adversary.generate(
                data, output.flatten(), epsilon=ep, num_steps=num_steps, step_size=perturb_step_size
            )
            output = self.model(data_adv)
            self.adversarial = [*getattr(self, "adversarial", []), data_adv.detach().clone()]
            return data_adv, output

    return CPUPGDtraining


def _loader(batches: int, seed: int = 3) -> torch.utils.data.DataLoader:
    x, y = data(4 * batches, seed=seed)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="as shipped it needs CUDA; with CUDA it runs")
def test_pgdtraining_as_shipped_needs_cuda() -> None:
    from deeprobust.image.defense.pgdtraining import PGDtraining

    model = tiny_cnn()
    trainer = PGDtraining(model, "cpu")
    trainer.parse_params(epoch_num=1, num_steps=1)
    with pytest.raises((AssertionError, RuntimeError), match="NVIDIA|CUDA"):
        trainer.train("cpu", _loader(1), torch.optim.SGD(model.parameters(), lr=0.1), 1)


def test_pgdtraining_attack_frozen_training_not() -> None:
    """With sbpatch on, each PGD call inside PGDtraining is frozen; the training forward/step is not."""
    model = tiny_cnn()
    flags = [p.requires_grad for p in model.parameters()]
    before = [p.detach().clone() for p in model.parameters()]
    seen: list[bool] = []
    hook = model.register_forward_pre_hook(lambda m, i: seen.append(m.hidden.weight.requires_grad))
    counters = registry.counters("deeprobust")
    calls = counters.calls
    loader = _loader(3)
    trainer = _cpu_trainer()(model, "cpu")
    try:
        trainer.generate(loader, loader, epoch_num=1, num_steps=2, lr=0.01, save_per_epoch=10**6)
    finally:
        hook.remove()
    assert counters.calls - calls == 6  # one PGD call per batch: 3 in train(), 3 in test()
    # train(), first batch: PGD's clean forward and 2 steps frozen, then the training forward live.
    assert seen[:4] == [False, False, False, True]
    assert [p.requires_grad for p in model.parameters()] == flags
    for p, b, trainable in zip(model.parameters(), before, flags):
        assert torch.equal(p, b) != trainable  # trained parameters moved, the user-frozen one did not
    assert freeze.held_count() == 0


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_pgdtraining_step_is_clean_with_sbpatch(optimizer: str) -> None:
    """The documented difference: PGDtraining zeroes gradients BEFORE its attack, so as shipped the attack's
    parameter gradients are added to the training gradient. With sbpatch the adversarial batch is identical and the
    step equals a reference step on that batch with clean gradients; the shipped step does not."""
    make = {"sgd": lambda ps: torch.optim.SGD(ps, lr=0.1), "adam": lambda ps: torch.optim.Adam(ps, lr=0.01)}[optimizer]
    loader = _loader(1)
    _, y = next(iter(loader))

    def one_step() -> tuple[nn.Module, torch.Tensor]:
        model = tiny_cnn()
        trainer = _cpu_trainer()(model, "cpu")
        trainer.parse_params(num_steps=3, perturb_step_size=0.01)
        seed_all(0)
        trainer.train("cpu", loader, make(model.parameters()), 1)
        return model, trainer.adversarial[0]

    with sbpatch.paused():
        shipped, adv_shipped = one_step()
    patched, adv_patched = one_step()
    assert torch.equal(adv_shipped, adv_patched)

    reference = tiny_cnn().train()
    opt = make(reference.parameters())
    opt.zero_grad()
    F.cross_entropy(reference(adv_patched), y).backward()
    opt.step()

    params = lambda m: [p for p in m.parameters() if p.requires_grad]  # noqa: E731
    assert all(torch.equal(a, b) for a, b in zip(params(patched), params(reference)))
    assert not all(torch.equal(a, b) for a, b in zip(params(shipped), params(reference)))
    assert all(torch.equal(a, b) for a, b in zip(patched.buffers(), shipped.buffers()))  # same forwards, same stats
