"""torchattack 1.7.2 on the real library: every attack identical patched vs unpatched, on a CNN and ViTs."""

from __future__ import annotations

import pytest
import timm
import torch
import torchattack
import torchvision
from helpers import MODELS, compare, data, expect, tiny_cnn

import sbpatch
from sbpatch import freeze, registry
from sbpatch.contrib.torchattack import GENERATIVE, VIT_ONLY, cases

CASES = cases()


def tiny_timm_vit(seed: int = 0) -> torch.nn.Module:
    """A timm ViT-B/16-shaped model (12 blocks, 224 px, 16 px patches) at width 8: the ViT-only attacks hook its
    ``blocks.{i}.attn.attn_drop``/``qkv``/``mlp`` by name. Unfused attention, so ``attn_drop`` runs."""
    torch.manual_seed(seed)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=224, patch_size=16, embed_dim=8, depth=12, num_heads=2, mlp_ratio=2, num_classes=10
    ).eval()
    for block in model.blocks:
        block.attn.fused_attn = False
    model.head.bias.requires_grad_(False)  # a user-frozen parameter
    return model


def tiny_resnet(seed: int = 0) -> torch.nn.Module:
    """A torchvision ResNet with one BasicBlock per stage (``layerN.0.relu``...): SGM and BPA rewire/hook ResNets."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=10)
    model.eval().fc.bias.requires_grad_(False)  # a user-frozen parameter
    return model


# (attack, model) pairs whose *unpatched* call fails on this stack (torch 2.14, offline, tiny inputs).
_NO_BLOCKS = "object has no attribute 'blocks'"  # the ViT-only attacks need timm ViT module names
KNOWN_BROKEN: dict[tuple[str, str] | str, str] = {
    **{(a, m): _NO_BLOCKS for a in ("ATT", "PNAPatchOut", "TGR") for m in ("cnn", "vit")},
    **{("VDC", m): "object has no attribute 'norm'" for m in ("cnn", "vit")},
    "MuMoDIG": "`kornia` is required",  # optional dependency, not installed
    "SSP": "urlopen error",  # downloads VGG-16 ImageNet weights at construction
    **{("SSA", m): "size of tensor b (224)" for m in ("cnn", "vit")},  # hard-codes 224 px
    ("SGM", "vit"): "incorrect number of values",  # ResNet/DenseNet hook configs only
}


def test_every_registered_attack_has_a_case():
    assert set(torchattack.ATTACK_REGISTRY) == set(CASES)
    assert {n for n in torchattack.__all__ if n in torchattack.ATTACK_REGISTRY} == set(CASES)


def test_attack_call_is_wrapped_once():
    from torchattack.attack import Attack

    assert isinstance(Attack.__dict__["__call__"], sbpatch.patching.SbpatchWrapper)
    library = [c for c in sbpatch.patching.all_subclasses(Attack) if c.__module__.startswith("torchattack")]
    assert set(torchattack.ATTACK_REGISTRY.values()) <= set(library)
    assert not any("__call__" in c.__dict__ for c in library)
    status = sbpatch.status()["torchattack"]
    assert "torchattack.attack.Attack.__call__" in status.patched
    assert any("generative" in k for k in status.excluded)


@pytest.mark.parametrize("model_name", ["cnn", "vit"])
@pytest.mark.parametrize("attack", sorted(CASES))
def test_identical(attack: str, model_name: str):
    model = MODELS[model_name]()
    x, y = data(n=2)
    run = CASES[attack](model, x, y, 2)
    outcome = compare("torchattack", attack, model, run, model_name, expect_freeze=attack not in GENERATIVE)
    expect(outcome, KNOWN_BROKEN)


@pytest.mark.parametrize("attack", [*VIT_ONLY, "SSA", "FIA", "NAA", "MIFGSM"])
def test_identical_timm_vit(attack: str):
    model = tiny_timm_vit()
    x, y = data(n=2, size=224)
    run = CASES[attack](model, x, y, 2)
    expect(compare("torchattack", attack, model, run, "timm_vit"), KNOWN_BROKEN)


@pytest.mark.parametrize("attack", ["SGM", "BPA", "FIA", "DANAA", "MIFGSM"])
def test_identical_resnet(attack: str):
    model = tiny_resnet()
    x, y = data(n=2, size=32)
    run = CASES[attack](model, x, y, 2)
    expect(compare("torchattack", attack, model, run, "resnet"), KNOWN_BROKEN)


def test_user_frozen_model_fails_as_shipped():
    """Every parameter frozen by the user: NAA fails as shipped, and sbpatch does not make it run."""
    model = tiny_cnn()
    model.requires_grad_(False)
    x, y = data(n=2)
    run = CASES["NAA"](model, x, y, 1)
    with sbpatch.paused(), pytest.raises(RuntimeError, match="does not require grad"):
        run()
    with pytest.raises(RuntimeError, match="does not require grad"):
        run()
    assert not any(p.requires_grad for p in model.parameters())


def test_old_style_backward_hooks_keep_their_modules_live():
    """TGR hooks qkv/mlp/attn_drop with register_backward_hook: those modules stay live, the rest is frozen, and the
    kept parameters' .grad is put back untouched."""
    model = tiny_timm_vit()
    x, y = data(n=2, size=224)
    attack = torchattack.TGR(model, hook_cfg="vit_base_patch16_224", steps=1)
    seen = []
    model.register_forward_pre_hook(
        lambda m, i: seen.append((m.blocks[0].attn.qkv.weight.requires_grad, m.patch_embed.proj.weight.requires_grad))
    )
    qkv = model.blocks[0].attn.qkv.weight
    qkv.grad = torch.ones_like(qkv)
    calls = registry.counters("torchattack").calls
    attack(x, y)
    assert registry.counters("torchattack").calls == calls + 1
    assert seen and all(s == (True, False) for s in seen)
    assert torch.equal(qkv.grad, torch.ones_like(qkv))
    assert model.patch_embed.proj.weight.grad is None


def test_old_style_hooks_grads_put_back_by_overlapping_threads():
    """Two threads attack the same model with TGR and leave in the order they did not enter (A enters, B enters, A
    leaves, B leaves): the kept-live parameters' .grad is what it was before either call, and the user's tensor is
    not written into."""
    import threading

    model = tiny_timm_vit()
    x, y = data(n=2, size=224)
    attack = torchattack.TGR(model, hook_cfg="vit_base_patch16_224", steps=1)
    qkv = model.blocks[0].attn.qkv.weight
    before = torch.ones_like(qkv)
    qkv.grad = before
    a_in, b_in, a_done = threading.Event(), threading.Event(), threading.Event()
    first: set[str] = set()

    def gate(module, inputs):
        name = threading.current_thread().name
        if name in first:
            return
        first.add(name)
        if name == "A":
            a_in.set()
            assert b_in.wait(60)
        elif name == "B":
            b_in.set()
            assert a_done.wait(60)

    model.register_forward_pre_hook(gate)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            attack(x, y)
        except BaseException as e:  # reported below
            errors.append(e)

    a, b = threading.Thread(target=run, name="A"), threading.Thread(target=run, name="B")
    a.start()
    assert a_in.wait(60)
    b.start()
    a.join(120)
    a_done.set()
    b.join(120)
    assert not errors, errors
    assert qkv.grad is before and torch.equal(before, torch.ones_like(qkv))
    assert freeze.held_count() == 0
    assert all(p.requires_grad for n, p in model.named_parameters() if n != "head.bias")


@pytest.mark.parametrize("attack", ["NAA", "BFA"])
def test_feature_maps_stay_differentiable(attack: str):
    """NAA/BFA differentiate w.r.t. the feature maps of an input that needs no gradient: frozen, the feature layer's
    output is made to require grad for the call only (the hook is gone afterwards)."""
    model = tiny_cnn()
    x, y = data(n=2)
    run = CASES[attack](model, x, y, 1)
    hooks = dict(model.conv._forward_hooks)
    seen = []
    model.register_forward_pre_hook(lambda m, i: seen.append(m.conv.weight.requires_grad))
    run()  # raised "element 0 of tensors does not require grad" before the feature-map hook
    assert seen and not any(seen)
    assert dict(model.conv._forward_hooks) == hooks


@pytest.mark.parametrize("attack", GENERATIVE)
def test_generative_attacks_run_as_shipped(attack: str):
    """The generator is the only network and may be trained through the call: never frozen, output keeps its graph."""
    x, _ = data(n=2)
    attack_ = getattr(torchattack, attack)(weights=None)
    counters = registry.counters("torchattack")
    passed = counters.passed
    out = attack_(x)
    assert counters.passed == passed + 1
    assert out.requires_grad and all(p.requires_grad for p in attack_.generator.parameters())


@pytest.mark.parametrize("exc", [RuntimeError("model failed"), KeyboardInterrupt()])
def test_attack_that_raises_restores(exc: BaseException):
    model = tiny_cnn()
    n = [0]

    def explode(m, i):
        n[0] += 1
        if n[0] > 1:
            raise exc

    handle = model.register_forward_pre_hook(explode)
    x, y = data(n=2)
    before = [p.requires_grad for p in model.parameters()]
    attack = torchattack.NAA(model, feature_layer_cfg="conv", steps=2, num_ens=2)
    with pytest.raises(type(exc)):
        attack(x, y)
    handle.remove()
    assert [p.requires_grad for p in model.parameters()] == before
    assert not [h for h in model.conv._forward_hooks.values() if h.__module__ == "sbpatch.contrib.torchattack"]
    assert freeze.held_count() == 0


def test_user_subclass_with_its_own_call_is_frozen():
    from torchattack.attack import Attack

    class MyFGSM(torchattack.FGSM):
        def __call__(self, x, y):  # not calling super().__call__: wrapped when the class is defined
            return self.forward(x, y)

    assert isinstance(MyFGSM.__dict__["__call__"], sbpatch.patching.SbpatchWrapper)
    assert issubclass(MyFGSM, Attack)
    model = tiny_cnn()
    x, y = data(n=2)
    seen = []
    model.register_forward_pre_hook(lambda m, i: seen.append(m.hidden.weight.requires_grad))
    MyFGSM(model)(x, y)
    assert seen == [False] and model.hidden.weight.requires_grad


def test_grads_left_as_shipped_vs_patched():
    """As shipped, MIFGSM (loss.backward()) fills param.grad; with sbpatch it stays None."""
    model = tiny_cnn()
    x, y = data(n=2)
    with sbpatch.paused():
        torchattack.MIFGSM(model, steps=1)(x, y)
    assert model.hidden.weight.grad is not None
    model.zero_grad(set_to_none=True)
    torchattack.MIFGSM(model, steps=1)(x, y)
    assert all(p.grad is None for p in model.parameters())
