"""secml-torch 1.5 on the real library: every evasion attack (native, foolbox and adv-lib backends), eager and
streamed, identical patched vs unpatched on a CNN and a ViT; the adversarial trainer still trains."""

from __future__ import annotations

import importlib

import pytest
import torch
from helpers import MODELS, compare, data, expect, run_python, seed_all, tiny_cnn
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import sbpatch
from sbpatch import freeze, registry
from sbpatch.contrib.secmlt import INTEGRATION, MODULES, cases
from sbpatch.patching import SbpatchWrapper, all_subclasses

CASES = cases()
STEPS = 2
# (case, model) or case -> a piece of the error the UNPATCHED call raises on this stack; none today. A newly broken
# (or newly fixed) case fails test_identical.
KNOWN_BROKEN: dict[object, str] = {}


def loader(x: torch.Tensor, y: torch.Tensor, batch_size: int = 2) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def pgd(num_steps: int = STEPS, backend: str = "native"):
    from secmlt.adv.evasion.perturbation_models import LpPerturbationModels
    from secmlt.adv.evasion.pgd import PGD

    return PGD(LpPerturbationModels.LINF, 0.03, num_steps, 0.01, backend=backend)


def test_every_creator_and_backend_has_a_case():
    """Each attack creator, with each backend it offers, is a case (eager and streamed): a new one is noticed."""
    from secmlt.adv.evasion.base_evasion_attack import BaseEvasionAttackCreator

    for module in set(MODULES.values()):
        importlib.import_module(f"secmlt.adv.evasion.{module}")
    expected = set()
    for creator in all_subclasses(BaseEvasionAttackCreator):
        assert MODULES.get(creator.__name__) == creator.__module__.rsplit(".", 1)[1], creator
        for backend in creator.get_backends():
            expected |= {f"{creator.__name__}-{backend}", f"{creator.__name__}-{backend}-stream"}
    assert expected <= set(CASES)
    assert {name.replace("PGD_L2", "PGD") for name in CASES} == expected


def test_run_of_every_attack_class_is_wrapped_once():
    """The per-batch ``_run`` is wrapped where it is defined (base, modular, foolbox, adv-lib), never duplicated on a
    class that inherits it; ``__call__`` is not wrapped; status() lists the targets."""
    import secmlt.adv.evasion.aggregators.ensemble  # Ensemble.__call__ is patched when this is imported
    import secmlt.adv.evasion.ddn  # noqa: F401  (imports the modular attacks)
    from secmlt.adv.evasion.base_evasion_attack import BaseEvasionAttack

    owners = {c.__name__ for c in [BaseEvasionAttack, *all_subclasses(BaseEvasionAttack)] if "_run" in c.__dict__}
    assert owners == {
        "BaseEvasionAttack",
        "ModularEvasionAttack",
        "BaseFoolboxEvasionAttack",
        "BaseAdvLibEvasionAttack",
    }
    for c in [BaseEvasionAttack, *all_subclasses(BaseEvasionAttack)]:
        if "_run" in c.__dict__:
            assert isinstance(c.__dict__["_run"], SbpatchWrapper), c
    assert not isinstance(BaseEvasionAttack.__dict__["__call__"], SbpatchWrapper)
    status = sbpatch.status()["secmlt"]
    assert status.enabled and not status.skipped
    for name in (
        "secmlt.adv.evasion.base_evasion_attack.BaseEvasionAttack._run",
        "secmlt.adv.evasion.modular_attacks.modular_attack.ModularEvasionAttack._run",
        "secmlt.adv.evasion.foolbox_attacks.foolbox_base.BaseFoolboxEvasionAttack._run",
        "secmlt.adv.evasion.advlib_attacks.advlib_base.BaseAdvLibEvasionAttack._run",
        "secmlt.adv.evasion.aggregators.ensemble.Ensemble.__call__",
    ):
        assert name in status.patched, (name, status.patched)
    assert any("AdversarialTrainer" in k for k in status.excluded)


@pytest.mark.parametrize("model_name", ["cnn", "vit"])
@pytest.mark.parametrize("attack", sorted(CASES))
def test_identical(attack: str, model_name: str):
    model = MODELS[model_name]()
    x, y = data()
    outcome = compare("secmlt", attack, model, CASES[attack](model, x, y, STEPS), model_name)
    expect(outcome, KNOWN_BROKEN)


@pytest.mark.parametrize("backend", ["native", "foolbox", "advlib"])
def test_stream_freezes_each_batch_and_restores_between_batches(backend: str):
    """stream=True runs lazily: each batch is frozen while the caller pulls it, and between two batches (where a
    trainer trains) every parameter is exactly as the user left it and nothing is held."""
    model = tiny_cnn()
    x, y = data()
    flags = [p.requires_grad for p in model.parameters()]
    seen: list[bool] = []
    model.register_forward_pre_hook(lambda m, i: seen.append(m.hidden.weight.requires_grad))
    calls = registry.counters("secmlt").calls
    # the backends' own sbpatch adapters stand aside: the freeze seen here is secmlt's
    others = [registry.counters(name) for name in ("foolbox", "adv_lib")]
    enabled = [c.enabled for c in others]
    try:
        for c in others:
            c.enabled = False
        stream = pgd(backend=backend)(model, loader(x, y), stream=True)  # a bare nn.Module: secmlt wraps it
        assert not seen and registry.counters("secmlt").calls == calls  # nothing ran yet
        batches = 0
        for _x_adv, _labels in stream:
            batches += 1
            assert seen and not any(seen), "a batch ran with its parameters live"
            assert [p.requires_grad for p in model.parameters()] == flags
            assert freeze.held_count() == 0
            assert all(p.grad is None for p in model.parameters())
            seen.clear()
    finally:
        for c, e in zip(others, enabled):
            c.enabled = e
    assert batches == 2 and registry.counters("secmlt").calls == calls + 2


def test_stream_abandoned_midway_holds_nothing():
    model = tiny_cnn()
    x, y = data()
    flags = [p.requires_grad for p in model.parameters()]
    stream = pgd()(model, loader(x, y), stream=True)
    next(stream)
    assert freeze.held_count() == 0 and [p.requires_grad for p in model.parameters()] == flags
    stream.close()


class Exploding(nn.Module):
    def __init__(self, inner: nn.Module, after: int) -> None:
        super().__init__()
        self.inner, self.after, self.n = inner, after, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.n += 1
        if self.n > self.after:
            raise RuntimeError("model failed")
        return self.inner(x)


def test_stream_batch_that_raises_restores():
    model = Exploding(tiny_cnn(), after=STEPS + 1)  # the second batch fails
    x, y = data()
    flags = [p.requires_grad for p in model.parameters()]
    stream = pgd()(model, loader(x, y), stream=True)
    next(stream)
    with pytest.raises(RuntimeError, match="model failed"):
        next(stream)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert freeze.held_count() == 0


def test_native_attack_grads_as_shipped_vs_patched():
    """The documented side effect: as shipped, the native PGD (loss.backward()) fills param.grad; with sbpatch not."""
    model = tiny_cnn()
    x, y = data()
    with sbpatch.paused():
        pgd()(model, loader(x, y))
    assert model.hidden.weight.grad is not None
    model.zero_grad(set_to_none=True)
    pgd()(model, loader(x, y))
    assert all(p.grad is None for p in model.parameters())


def _adversarial_training(model: nn.Module, seed: int = 0) -> tuple[nn.Module, list[bool]]:
    """AdversarialTrainer (PGD streamed per batch) for one epoch; returns the model and, per forward pass, whether
    the hidden weight was live (training forwards come with the model in train mode)."""
    from secmlt.defenses.adv_training.pytorch.adversarial_trainer import AdversarialTrainer

    x, y = data(n=4)
    live_in_training: list[bool] = []
    hook = model.register_forward_pre_hook(
        lambda m, i: (
            live_in_training.append(m.hidden.weight.requires_grad)
            if torch.is_grad_enabled() and m.training and not i[0].requires_grad
            else None
        )
    )
    seed_all(seed)
    try:
        trainer = AdversarialTrainer(optimizer=torch.optim.SGD(model.parameters(), lr=0.1), epochs=1)
        trainer.train(model, loader(x, y), pgd())
    finally:
        hook.remove()
    return model, live_in_training


def test_adversarial_trainer_trains_and_matches_unpatched():
    """Never freeze the training step: with sbpatch enabled the trainer's parameters get gradients and change, and
    the trained weights are bit-identical to an unpatched run (the attack's junk .grad is zeroed before each step
    as shipped); the attack itself was frozen (counted), the training forwards ran live."""
    with sbpatch.paused():
        reference, _ = _adversarial_training(tiny_cnn())
    start = tiny_cnn()
    before = {n: p.detach().clone() for n, p in start.named_parameters()}
    flags = [p.requires_grad for p in start.parameters()]
    calls = registry.counters("secmlt").calls
    trained, live = _adversarial_training(start)
    assert registry.counters("secmlt").calls >= calls + 2  # one frozen _run per batch
    assert live and all(live), "a training forward ran with frozen parameters"
    assert [p.requires_grad for p in trained.parameters()] == flags
    changed = [n for n, p in trained.named_parameters() if not torch.equal(p, before[n])]
    assert "hidden.weight" in changed and "conv.bias" not in changed  # conv.bias is user-frozen
    assert trained.hidden.weight.grad is not None  # the training step's gradient
    for (n, p), q in zip(trained.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), f"{n}: trained weights differ from the unpatched run"


@pytest.mark.parametrize("kind", ["MinDistanceEnsemble", "FixedEpsilonEnsemble"])
@pytest.mark.parametrize("model_name", ["cnn", "vit"])
def test_ensemble_identical(kind: str, model_name: str):
    from secmlt.adv.evasion.aggregators import ensemble
    from secmlt.adv.evasion.perturbation_models import LpPerturbationModels
    from secmlt.models.pytorch.base_pytorch_nn import BasePyTorchClassifier

    model = MODELS[model_name]()
    x, y = data()
    clf = BasePyTorchClassifier(model)
    with sbpatch.paused():
        advs = [pgd(1)(clf, loader(x, y)), pgd(2)(clf, loader(x, y))]
    if kind == "MinDistanceEnsemble":
        agg = ensemble.MinDistanceEnsemble(LpPerturbationModels.L2)
    else:
        agg = ensemble.FixedEpsilonEnsemble(nn.CrossEntropyLoss())

    def run() -> torch.Tensor:
        return torch.cat([b for b, _ in agg(clf, loader(x, y), advs)])

    expect(compare("secmlt", kind, model, run, model_name), {})


def test_user_attack_subclass_defined_later_is_wrapped():
    from secmlt.adv.evasion.pgd import PGDNative

    class MyPGD(PGDNative):
        def _run(self, model, samples, labels, init_deltas=None):
            return super()._run(model, samples, labels, init_deltas)

    assert isinstance(MyPGD.__dict__["_run"], SbpatchWrapper)
    model = tiny_cnn()
    x, y = data()
    attack = MyPGD("linf", 0.03, STEPS, 0.01, random_start=False)
    expect(compare("secmlt", "MyPGD", model, lambda: torch.cat([b for b, _ in attack(model, loader(x, y))]), "cnn"), {})


def test_enable_after_import_then_disable():
    """In a fresh interpreter: secmlt's attack classes imported first, then enable("secmlt") wraps every _run already
    defined; a streamed PGD is frozen per batch; disable() puts the original functions back."""
    result = run_python(
        """
        import torch
        from torch.utils.data import DataLoader, TensorDataset
        from secmlt.adv.evasion.base_evasion_attack import BaseEvasionAttack
        from secmlt.adv.evasion.modular_attacks.modular_attack import ModularEvasionAttack
        from secmlt.adv.evasion.pgd import PGD
        originals = (BaseEvasionAttack.__dict__["_run"], ModularEvasionAttack.__dict__["_run"])
        import sbpatch
        from sbpatch import registry
        sbpatch.enable("secmlt")
        assert ModularEvasionAttack.__dict__["_run"] is not originals[1]
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
        seen = []
        model.register_forward_pre_hook(lambda m, i: seen.append(m[1].weight.requires_grad))
        data = DataLoader(TensorDataset(torch.rand(4, 3, 2, 2), torch.tensor([0, 1, 2, 0])), batch_size=2)
        for _ in PGD("linf", 0.03, 2, 0.01, backend="native")(model, data, stream=True):
            assert model[1].weight.requires_grad
        assert seen and not any(seen), seen
        print("calls", registry.counters("secmlt").calls)
        sbpatch.disable("secmlt")
        assert (BaseEvasionAttack.__dict__["_run"], ModularEvasionAttack.__dict__["_run"]) == originals
        print("restored")
        """,
        env={"GIT_PYTHON_REFRESH": "quiet"},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "calls 2" in result.stdout and "restored" in result.stdout, result.stdout


def test_integration_declares_the_trainer_excluded():
    assert INTEGRATION.distribution == "secml-torch" and INTEGRATION.module == "secmlt"
    assert any("AdversarialTrainer.train" in k for k in INTEGRATION.excluded)
