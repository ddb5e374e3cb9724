"""The core under stress: Ctrl-C at any moment, every input answered clearly, no model kept alive."""

from __future__ import annotations

import asyncio
import gc
import random
import signal
import threading
import time
import weakref

import pytest
import torch
from helpers import data, tiny_cnn, tiny_vit
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import sbpatch
from sbpatch import freeze, operands
from sbpatch.errors import SbpatchError

TRIES = 1000  # alarms at random moments; the loaded-machine failure of issue 14 came at try 63 of 360


def flags(model: nn.Module) -> list[bool]:
    return [p.requires_grad for p in model.parameters()]


def assert_idle() -> None:
    assert freeze.held_count() == 0
    assert not freeze._active and not freeze._ledger and not freeze._guards and not freeze._promoted
    assert freeze._exclusive is None
    assert "requires_grad" not in nn.Parameter.__dict__ and "requires_grad_" not in nn.Parameter.__dict__
    assert operands.depth() == 0 and operands.active() is None and torch._C._len_torch_function_stack() == 0


# --- asynchronous exceptions --------------------------------------------------------------------------------


class Frames(nn.Module):
    """600 parameter tensors, one Linear fed a transposed input (an operand rule gives it a live alias mid-call)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(*[nn.Linear(4, 4) for _ in range(299)])
        self.mix = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(self.body(x).transpose(0, 1))


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs POSIX interval timers")
def test_keyboard_interrupt_at_any_moment_restores_everything():
    """A real SIGALRM whose handler raises KeyboardInterrupt, at random delays inside freeze, call and restore."""
    model = Frames()
    model.body[3].bias.requires_grad_(False)  # user-frozen: must stay frozen
    inner = model.body[7]
    x = torch.randn(3, 2, 4)
    before = flags(model)
    fired = [False]

    def handler(signum: int, frame: object) -> None:
        fired[0] = True
        raise KeyboardInterrupt

    def once(kind: int) -> None:
        if kind == 0:
            with sbpatch.frozen(model):
                model(x)
        elif kind == 1:
            with sbpatch.frozen(model), sbpatch.frozen(inner, model.mix):  # a second group: ledger mode
                pass
        else:
            freeze.call_frozen([model], (), lambda: None, (), {})

    durations = []
    for kind in range(3):
        t0 = time.perf_counter()
        for _ in range(5):
            once(kind)
        durations.append((time.perf_counter() - t0) / 5)
    assert flags(model) == before
    old = signal.signal(signal.SIGALRM, handler)
    rng = random.Random(0)
    interrupted = 0
    try:
        for i in range(TRIES):
            kind = i % 3
            fired[0] = False
            try:
                signal.setitimer(signal.ITIMER_REAL, max(rng.uniform(0, 1.2 * durations[kind]), 1e-6))
                once(kind)
                while not fired[0]:  # let the alarm land here if it did not land inside
                    pass
            except KeyboardInterrupt:
                interrupted += 1
            signal.setitimer(signal.ITIMER_REAL, 0)
            assert flags(model) == before, f"try {i}: flags not restored"
            assert_idle()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    # nearly every alarm lands as a KeyboardInterrupt; one landing in a weakref callback or __del__ (garbage
    # collection) is printed and swallowed by Python itself, so do not require all 360
    assert interrupted >= 0.94 * TRIES
    with sbpatch.frozen(model):  # still freezing afterwards (the transposed-input Linear runs on a live alias)
        assert not any(p.requires_grad for p in model.parameters())
    assert flags(model) == before


def test_release_finishes_an_interrupted_release():
    """Each step of release is idempotent: running it again after any partial run ends in the original state."""
    a, b = tiny_cnn(), tiny_cnn()
    b.head = a.head
    before = flags(a), flags(b)
    for stop in range(40):
        h1, h2 = freeze.Holder(), freeze.Holder()
        freeze.acquire(freeze.collect([a]), h1)
        freeze.acquire(freeze.collect([b]), h2)  # shared parameters: ledger mode
        group = h1.groups[0]
        # interrupt _unfreeze of the first group after `stop` parameter restorations, then finish with release()
        params = [(id(p), p) for r in group.refs if (p := r()) is not None][:stop]
        with freeze._lock:
            freeze._release_counted(group, params)
        freeze.release(h1)
        freeze.release(h1)
        freeze.release(h2)
        assert (flags(a), flags(b)) == before
        assert_idle()


# --- every input answered clearly ---------------------------------------------------------------------------


def test_keep_accepts_one_parameter_or_one_module():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    with sbpatch.frozen(model, keep=model[0].weight):
        assert model[0].weight.requires_grad and not model[0].bias.requires_grad
    with sbpatch.frozen(model, keep=model[0]):
        assert model[0].weight.requires_grad and model[0].bias.requires_grad and not model[1].weight.requires_grad
    with sbpatch.frozen(model, keep="1.bias"):
        assert model[1].bias.requires_grad and not model[1].weight.requires_grad
    assert all(flags(model))


def test_parameters_generator_is_read_once_and_freezes_every_call():
    model = tiny_cnn()

    @sbpatch.frozen(model.parameters())
    def inside() -> list[bool]:
        return flags(model)

    for _ in range(3):
        assert not any(inside())
    assert flags(model) == flags(tiny_cnn())


def test_named_parameters_and_parameter_dicts_are_accepted():
    model = tiny_cnn()
    for target in (model.named_parameters(), dict(model.named_parameters()), model.state_dict(keep_vars=True)):
        with sbpatch.frozen(target):
            assert not any(flags(model))
    assert flags(model) == flags(tiny_cnn())


@pytest.mark.parametrize("bad", ["abc", None, 3, b"x"])
def test_bad_targets_say_what_is_accepted(bad):
    with pytest.raises(TypeError, match=r"cannot freeze .*pass nn\.Module"):
        sbpatch.frozen(bad)


def test_state_dict_is_refused_with_the_reason():
    model = tiny_cnn()
    with pytest.raises(TypeError, match="state_dict.*detached copies"):
        sbpatch.frozen(model.state_dict())
    with pytest.raises(ValueError, match="non-leaf"):
        sbpatch.frozen(model.head.weight * 2)


def test_add_keep_rule_validates():
    with pytest.raises(TypeError, match="must be strings"):
        sbpatch.add_keep_rule(nn.Linear, 5)
    with pytest.raises(ValueError, match="qualified name"):
        sbpatch.add_keep_rule("Linear", "weight")
    with pytest.raises(TypeError, match="nn.Module subclass"):
        sbpatch.add_keep_rule(5, "weight")
    with pytest.raises(TypeError, match="nn.Module subclass"):
        sbpatch.add_keep_rule(int, "weight")
    with pytest.raises(ValueError, match="at least one"):
        sbpatch.add_keep_rule(nn.Linear)
    with pytest.raises(ValueError, match="not a parameter name"):
        sbpatch.add_keep_rule(nn.Linear, "bad name")
    assert sbpatch.keep_rules() == {}
    str(sbpatch.status())
    sbpatch.add_keep_rule("torch.nn.modules.conv.Conv2d", "wieght")
    try:
        with pytest.warns(sbpatch.SbpatchWarning, match="'wieght'.*weight, bias"), sbpatch.frozen(tiny_cnn()):
            pass
        assert "wieght" in str(sbpatch.status())
    finally:
        sbpatch.remove_keep_rule("torch.nn.modules.conv.Conv2d")


def test_generator_and_async_functions_hold_the_freeze_across_their_body():
    model = tiny_cnn()

    @sbpatch.frozen(model)
    def steps(n: int):
        for _ in range(n):
            yield any(flags(model))

    @sbpatch.frozen(model)
    async def attack() -> bool:
        await asyncio.sleep(0)
        return any(flags(model))

    assert list(steps(3)) == [False, False, False]
    assert asyncio.run(attack()) is False
    assert flags(model) == flags(tiny_cnn())
    with pytest.raises(TypeError, match="async generator"):

        @sbpatch.frozen(model)
        async def agen():
            yield 1


def test_exit_in_another_thread_restores():
    model = tiny_cnn()
    cm = sbpatch.frozen(model)
    cm.__enter__()
    errors = []

    def leave() -> None:
        try:
            cm.__exit__(None, None, None)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    t = threading.Thread(target=leave)
    t.start()
    t.join()
    assert not errors
    assert flags(model) == flags(tiny_cnn())
    assert_idle()


_model = tiny_cnn()
_inputs = st.one_of(
    st.none(),
    st.integers(),
    st.text(max_size=5),
    st.sampled_from(["head", "head.weight", "conv", "nope", ""]),
    st.just(_model),
    st.just(_model.head),
    st.just(_model.head.weight),
    st.builds(lambda: _model.parameters()),
    st.builds(lambda: _model.named_parameters()),
    st.builds(lambda: _model.state_dict()),
    st.builds(lambda: {"a": 1}),
    st.builds(lambda: torch.ones(2, requires_grad=True) * 2),
)


@settings(max_examples=150, deadline=None)
@given(targets=st.lists(_inputs, max_size=3), keep=st.one_of(_inputs, st.lists(_inputs, max_size=2)))
def test_fuzz_frozen_either_works_or_says_why(targets, keep):
    before = flags(_model)
    try:
        with sbpatch.frozen(*targets, keep=keep):
            pass
    except (TypeError, ValueError, SbpatchError) as exc:
        assert str(exc)
    assert flags(_model) == before
    assert_idle()


@settings(max_examples=80, deadline=None)
@given(
    module_type=st.one_of(st.just(nn.Linear), st.just(int), st.text(max_size=12), st.integers(), st.none()),
    names=st.lists(st.one_of(st.text(max_size=8), st.integers(), st.none()), max_size=3),
)
def test_fuzz_keep_rules_either_work_or_say_why(module_type, names):
    try:
        sbpatch.add_keep_rule(module_type, *names)
    except (TypeError, ValueError, SbpatchError) as exc:
        assert str(exc)
    else:
        sbpatch.remove_keep_rule(module_type)
    assert sbpatch.keep_rules() == {}
    str(sbpatch.status())


# --- no leaks -----------------------------------------------------------------------------------------------


def test_models_with_hooks_referencing_them_are_not_kept_alive():
    import torchattacks

    sbpatch.enable("torchattacks")
    x, y = data()
    refs = []
    for i in range(12):
        model = tiny_cnn(seed=i)
        for p in model.parameters():
            if p.requires_grad:
                p.register_hook(lambda g, model=model: g)  # gradient logging that references the model
        with sbpatch.frozen(model):
            model(x)
        torchattacks.FGSM(model, eps=0.1)(x, y)
        refs.append(weakref.ref(model))
        del model, p
    gc.collect()
    assert sum(r() is not None for r in refs) == 0


def test_a_parameter_set_to_false_inside_the_call_stays_false():
    model, other = tiny_cnn(), tiny_cnn()
    other.head = model.head  # a second group on shared parameters: the ledger path
    with sbpatch.frozen(model):
        model.head.weight.requires_grad = False  # attribute write
        model.hidden.requires_grad_(False)  # Module.requires_grad_ -> Tensor.requires_grad_
        with sbpatch.frozen(other):
            other.conv.weight.requires_grad_(False)
            model.head.bias.requires_grad = True  # set True inside: live afterwards too
    assert [n for n, p in model.named_parameters() if not p.requires_grad] == [
        "conv.bias",  # the user froze it before
        "hidden.weight",
        "hidden.bias",
        "head.weight",
    ]
    assert not other.conv.weight.requires_grad and other.bn.weight.requires_grad
    assert "requires_grad" not in nn.Parameter.__dict__ and "requires_grad_" not in nn.Parameter.__dict__
    x = torch.zeros(2, requires_grad=True)  # torch's own attribute again, untouched
    assert x.requires_grad
    assert_idle()


def test_a_library_saving_and_restoring_the_flag_gets_the_original_back():
    """TextAttack's get_grad: found = w.requires_grad (False: frozen); w.requires_grad = True; ...; = found."""
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
    emb = model[0]
    with sbpatch.frozen(model):
        found = emb.weight.requires_grad
        emb.weight.requires_grad = True
        model(torch.tensor([[1, 2]])).sum().backward()
        emb.weight.requires_grad = found
    assert emb.weight.requires_grad and model[1].weight.requires_grad
    assert_idle()


def test_a_block_whose_exit_never_ran_is_released_when_its_frozen_object_goes():
    """The window the loaded run hit: a signal landing at the first bytecode of ``frozen.__exit__`` (Python checks
    for signals when a function starts), so none of its lines runs. The ``frozen`` object is then dropped with its
    block still entered: sbpatch releases it at once, and the next acquire reaps any that got past that."""
    model = tiny_cnn()
    before = flags(model)
    cm = sbpatch.frozen(model)
    cm.__enter__()  # an exit that never comes
    assert not model.head.weight.requires_grad and freeze.held_count() > 0
    del cm
    gc.collect()
    assert flags(model) == before and freeze.held_count() == 0
    # the reaper: a holder whose frozen() object is gone but whose __del__ did not run its release
    cm = sbpatch.frozen(model)
    cm.__enter__()
    holder = cm._stacks[threading.get_ident()][-1][0]
    cm._stacks.clear()  # as if __del__ had been interrupted before its first line
    del cm
    assert not holder.done and not model.head.weight.requires_grad
    with sbpatch.frozen(model):  # the next acquire reaps it; this block holds the model as usual
        assert not model.head.weight.requires_grad
    assert holder.done and flags(model) == before and freeze.held_count() == 0


def test_release_all_gives_back_everything_whatever_holds_it():
    a, b = tiny_cnn(), tiny_vit()
    before = flags(a), flags(b)
    kept = b.encoder.layers[0].self_attention.in_proj_weight  # kept live: its .grad is set aside
    kept.grad = torch.ones_like(kept)
    grad = kept.grad
    held = sbpatch.frozen(a)
    held.__enter__()  # still referenced, never exited: only release_all() can end it
    lost = freeze.Holder()
    freeze.acquire(freeze.collect([a, b]), lost)  # a holder nobody will release (ledger mode: a is shared)
    held_now = freeze.held_count()
    assert held_now > 0 and kept.grad is None
    assert sbpatch.release_all() == held_now
    assert (flags(a), flags(b)) == before and freeze.held_count() == 0 and kept.grad is grad
    assert not any(m._forward_pre_hooks for m in b.modules()), "probe hooks removed"
    assert "requires_grad" not in nn.Parameter.__dict__, "write watch removed"
    assert operands.active() is None and torch._C._len_torch_function_stack() == 0, "operand mode removed"
    with sbpatch.frozen(a):  # business as usual afterwards
        assert not a.head.weight.requires_grad
    assert flags(a) == before[0]
    held._stacks.clear()


def test_frozen_needs_something_to_freeze():
    with pytest.raises(TypeError, match="needs what to freeze"):
        sbpatch.frozen()


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_copies_taken_during_a_call_come_out_as_the_model_was_before_it(how):
    """A checkpoint callback inside an attack: the copy has the flags from before the call (a user-frozen parameter
    stays frozen, every other one live) and none of sbpatch's probe hooks, so it trains and runs as the original."""
    import copy
    import io
    import pickle

    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    seq[2].bias.requires_grad_(False)
    # a batch-first attention gets sbpatch's hooks during the call (its fast path is kept free of the operand mode)
    model = nn.ModuleDict({"seq": seq, "attn": nn.MultiheadAttention(4, 2, batch_first=True)})
    before = flags(model)

    def take() -> nn.Module:
        if how == "deepcopy":
            return copy.deepcopy(model)
        if how == "pickle":
            return pickle.loads(pickle.dumps(model))
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        return torch.load(buf, weights_only=False)

    with sbpatch.frozen(model):
        seq(torch.randn(2, 5, 4).transpose(0, 1))  # an operand rule gives seq[0].weight a live alias mid-call
        assert not seq[2].weight.requires_grad and model["attn"]._forward_pre_hooks and model["attn"]._forward_hooks
        copied = take()
    assert flags(copied) == before == flags(model)
    assert not any(m._forward_pre_hooks or m._forward_pre_hooks_with_kwargs or m._forward_hooks
                   or m._forward_hooks_always_called for m in copied.modules())
    assert all(torch.equal(a, b) for a, b in zip(copied.parameters(), model.parameters()))
    assert flags(copy.deepcopy(model)) == before, "after the call the wrappers left in place are pass-throughs"
    sbpatch.release_all()
    assert nn.Parameter.__dict__["__deepcopy__"].__module__ == "torch.nn.parameter", "release_all puts torch's back"
