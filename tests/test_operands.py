"""Kernel rules at the operands (sbpatch/operands.py): every product a frozen weight enters, wherever it happens.

Each case is a model where, on the CPU running the test, the paper's one-liner changes the numbers (the width is
searched: which widths round differently under ``mm`` vs ``bmm`` is CPU-specific); sbpatch must give exactly the live
model's logits and input gradient, leave every flag as it was, and write no ``.grad``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers import compare, identical
from hypothesis import given, settings
from hypothesis import strategies as st
from sensitive import find_sensitive
from torch import nn

import sbpatch
from sbpatch import freeze, operands


def _probe(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits with grad, the input gradient after ``backward()`` (which writes ``.grad`` when weights are live), and
    the logits under ``no_grad`` (a black-box query)."""
    xg = x.clone().requires_grad_(True)
    out = model(xg)
    out.square().sum().backward()
    with torch.no_grad():
        plain = model(x)
    for p in model.parameters():
        p.grad = None
    return out.detach(), xg.grad, plain


def _check(make: Callable[[int], tuple[nn.Module, torch.Tensor]], what: str, targets: Callable[[nn.Module], Any]
           = lambda m: m, frozen_during: bool = True) -> None:
    model, x, _ = find_sensitive(make, _probe, what=what)
    model.zero_grad(set_to_none=True)
    expected = _probe(model, x)
    before = [p.requires_grad for p in model.parameters()]
    seen: list[bool] = []
    for _ in range(2):
        with sbpatch.frozen(targets(model)):
            xg = x.clone().requires_grad_(True)
            out = model(xg)
            out.square().sum().backward()
            seen = [p.requires_grad for p in model.parameters()]
            with torch.no_grad():
                plain = model(x)
        assert identical(expected, (out.detach(), xg.grad, plain)), f"{what}: differs from the live model"
        assert [p.requires_grad for p in model.parameters()] == before
        assert all(p.grad is None for p in model.parameters()), f"{what}: .grad written"
        if frozen_during:
            assert not any(seen), f"{what}: a parameter was made live (the operand rule uses an alias)"
    assert operands.active() is None


class Frames(nn.Module):
    """A Conv1d encoder, then a head on the (batch, frames, channels) transpose of its output."""

    def __init__(self, width: int, head: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 64, 3, padding=1)
        self.head = nn.Linear(64, width)
        self.W = nn.Parameter(torch.randn(width, 64) / 8)
        self.b = nn.Parameter(torch.zeros(width))
        self.P = nn.Parameter(torch.randn(1, 64, width) / 8)
        self.how = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))  # (B, 64, N)
        return self.how(self, h)


X = torch.randn(4, 3, 20)


def _frames(how: Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> Callable[[int], tuple[nn.Module, Any]]:
    def make(width: int) -> tuple[nn.Module, torch.Tensor]:
        torch.manual_seed(width)
        return Frames(width, how).eval(), X

    return make


HEADS = {
    "layer.forward(x.mT)": lambda m, h: m.head.forward(h.mT).mean(1),
    "x.mT @ W.T": lambda m, h: (h.mT @ m.W.T).mean(1),
    "torch.matmul(x.mT, W.mT)": lambda m, h: torch.matmul(h.mT, m.W.mT).mean(1),
    "F.linear(x.mT, W, b)": lambda m, h: F.linear(h.mT, m.W, m.b).mean(1),
    "W @ x": lambda m, h: (m.W @ h).mean(2),
    "x.mT.matmul(W.t())": lambda m, h: h.mT.matmul(m.W.t()).mean(1),
    "x @ P, P (1, C, O)": lambda m, h: (h.mT.contiguous() @ m.P).mean(1),
    "softmax(W) @ x": lambda m, h: (torch.softmax(m.W, 1) @ h).mean(2),
}


@pytest.mark.parametrize("how", list(HEADS), ids=list(HEADS))
def test_products_outside_module_calls(how: str):
    _check(_frames(HEADS[how]), how)


class Keyed(nn.Module):
    """A 2-D operand that requires grad only because the weights that make it are live (docs/kernels.md)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.key = nn.Linear(16, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.transpose(1, 2) @ self.key(x.mean(0))).mean(1)


def test_operand_computed_by_a_frozen_layer_in_a_query_pass():
    def make(width: int) -> tuple[nn.Module, torch.Tensor]:
        torch.manual_seed(width)
        return Keyed(width).eval(), torch.randn(2, 16, 16)

    _check(make, "2-D operand made by a frozen Linear")


def test_views_of_a_frozen_parameter_get_an_alias_under_no_grad_too():
    """A view of a leaf that requires grad requires grad even when taken under ``no_grad`` (the live model folds),
    so ``W.T`` gets a live alias there too; a tensor computed under ``no_grad`` from a frozen weight does not (it
    would not require grad in the live model either)."""
    model = Frames(1, lambda m, h: h).eval()
    x = torch.randn(2, 64, 16).mT
    with sbpatch.frozen(model):
        mode = operands.active()
        with torch.no_grad():
            view, computed = model.W.T, model.W.T * 2
            assert operands._matmul_rule(mode, (x, view), {})[0][1] is not view
            assert operands._matmul_rule(mode, (x, computed), {})[0][1] is computed
        assert operands._matmul_rule(mode, (x, model.W.T * 2), {})[0][1].requires_grad


@pytest.mark.parametrize("kind", ["plain", "prepend", "with_kwargs"])
def test_user_pre_hook_transposing_the_input(kind: str):
    def make(width: int) -> tuple[nn.Module, torch.Tensor]:
        torch.manual_seed(width)
        model = Frames(width, lambda m, h: m.head(h).mean(1)).eval()
        if kind == "with_kwargs":
            model.head.register_forward_pre_hook(lambda mod, a, kw: ((a[0].transpose(1, 2),), kw), with_kwargs=True)
        else:
            model.head.register_forward_pre_hook(lambda mod, a: (a[0].transpose(1, 2),), prepend=kind == "prepend")
        return model, X

    _check(make, f"user pre-hook ({kind})")


class LoRALinear(nn.Linear):
    """An ``nn.Linear`` subclass with extra raw low-rank parameters (LoRA-style)."""

    def __init__(self, i: int, o: int, rank: int = 4) -> None:
        super().__init__(i, o)
        self.lora_A = nn.Parameter(torch.randn(rank, i) / 8)
        self.lora_B = nn.Parameter(torch.randn(o, rank) / 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + x @ self.lora_A.T @ self.lora_B.T


def test_lora_extra_parameters():
    def make(width: int) -> tuple[nn.Module, torch.Tensor]:
        torch.manual_seed(width)
        model = Frames(width, lambda m, h: m.head(h.mT).mean(1))
        model.head = LoRALinear(64, width)
        return model.eval(), X

    _check(make, "LoRA Linear")


def test_merged_weight_computed_from_frozen_parameters_is_tracked():
    """A weight computed in the forward from frozen parameters (a merged adapter) is followed to its sources."""

    def merged(m: nn.Module, h: torch.Tensor) -> torch.Tensor:
        w = m.W + 0.5 * m.head.weight  # computed from two frozen parameters
        return F.linear(h.mT, w, m.b).mean(1)

    _check(_frames(merged), "merged weight")


@pytest.mark.parametrize("how", ["parameters", "named_parameters", "state_dict"])
def test_parameter_targets_get_the_same_rules(how: str):
    def targets(model: nn.Module) -> Any:
        if how == "parameters":
            return model.parameters()
        if how == "named_parameters":
            return [p for _, p in model.named_parameters()]
        return list(model.state_dict(keep_vars=True).values())

    _check(_frames(lambda m, h: m.head.forward(h.mT).mean(1)), f"frozen({how})", targets)


class ScriptHead(nn.Module):
    """A Conv1d encoder and a Linear on its transposed output, to compile with TorchScript."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 64, 3, padding=1)
        self.head = nn.Linear(64, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).transpose(1, 2)).mean(1)


@pytest.mark.parametrize("compile_with", ["script", "trace"])
def test_torchscript_keeps_what_feeds_a_product_live(compile_with: str):
    def make(width: int) -> tuple[nn.Module, torch.Tensor]:
        torch.manual_seed(width)
        model = ScriptHead(width).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still used
            return (torch.jit.script(model) if compile_with == "script" else torch.jit.trace(model, X)), X

    # TorchScript's profiling executor optimises a graph after its first calls, and the optimised graph rounds
    # differently from the first one (live vs live); without optimisation each call runs the same graph
    with torch.jit.optimized_execution(False):
        _check(make, f"torch.jit.{compile_with}", frozen_during=False)
    model = make(3)[0]
    assert set(freeze.kept_in(model)) == {"head.weight"}, "the conv weight does not feed a product: frozen"
    with sbpatch.frozen(model):
        assert model.head.weight.requires_grad and not model.conv.weight.requires_grad


def test_torchattacks_cw_end_to_end_with_a_transposing_pre_hook():
    import torchattacks

    def make(width: int) -> tuple[nn.Module, torch.Tensor]:
        torch.manual_seed(width)
        model = Frames(width, lambda m, h: m.head(h).mean(1)).eval()
        model.head.register_forward_pre_hook(lambda mod, a: (a[0].transpose(1, 2),))
        return model, torch.rand(4, 3, 20)

    model, x, _ = find_sensitive(make, _probe, widths=range(2, 17), what="CW through a pre-hook")
    model.conv.bias.requires_grad_(False)  # a user-frozen parameter (compare() checks it stays frozen)
    y = torch.zeros(4, dtype=torch.long)
    attack = torchattacks.CW(model, steps=3)
    assert compare("torchattacks", "CW(pre-hook)", model, lambda: attack(x, y), "frames").result == "identical"




def test_products_in_a_worker_thread_get_the_rules():
    """A forward of the frozen model run in another thread (a thread pool inside the attack) gets a mode of its own
    for that forward: identical to the live model, no parameter made live, no ``.grad``, no mode left behind."""
    from concurrent.futures import ThreadPoolExecutor

    model, x, _ = find_sensitive(_frames(HEADS["layer.forward(x.mT)"]), _probe, what="forward in a worker thread")
    expected = _probe(model, x)
    with ThreadPoolExecutor(1) as pool:
        with sbpatch.frozen(model):
            seen = pool.submit(lambda: [p.requires_grad for p in model.parameters()]).result()
            got = pool.submit(_probe, model, x).result()
        assert pool.submit(operands.active).result() is None
    assert identical(expected, got)
    assert not any(seen)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert not model._forward_pre_hooks and not model._forward_hooks


def test_fast_path_module_as_the_root_in_a_worker_thread():
    """A batch-first MultiheadAttention as the model itself, run in a worker thread: the worker's mode is set aside
    while it runs (its fast path), as in the calling thread."""
    from concurrent.futures import ThreadPoolExecutor

    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 2, batch_first=True).eval()
    q = torch.randn(3, 5, 16)

    def query() -> torch.Tensor:
        with torch.no_grad():
            return mha(q, q, q, need_weights=False)[0]

    expected = query()
    with ThreadPoolExecutor(1) as pool, sbpatch.frozen(mha):
        got = pool.submit(query).result()
    assert torch.equal(expected, got)

# --- which calls run the mode -------------------------------------------------------------------------------------


def _moded_calls(model: nn.Module, run: Callable[[], Any], calls: int) -> tuple[list[bool], list[Any]]:
    """Run a patched ``run`` ``calls`` times: whether the operand mode was active in each call's first forward, and
    each call's result."""
    seen: list[bool] = []
    results = []
    handle = model.register_forward_pre_hook(lambda mod, a: seen.append(operands.active() is not None))
    try:
        for _ in range(calls):
            before = len(seen)
            torch.manual_seed(0)
            results.append(run())
            seen[before + 1:] = []
    finally:
        handle.remove()
    return seen, results


def _unpatched(run: Callable[[], Any]) -> Any:
    torch.manual_seed(0)
    with sbpatch.paused():
        return run()


def test_a_call_that_needed_no_rule_teaches_that_its_signature_needs_no_mode():
    """The first call runs the mode and gives no alias (contiguous inputs): the next calls with arguments of the same
    shapes run without it, and a call with another shape runs it again; every result identical to the library's."""
    import torchattacks

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    attack = torchattacks.PGD(model, eps=0.1, alpha=0.03, steps=2, random_start=True)
    x, y = torch.rand(4, 3, 4), torch.tensor([0, 1, 2, 0])
    seen, got = _moded_calls(model, lambda: attack(x, y), 3)  # every library is enabled in the tests
    assert seen == [True, False, False], seen
    seen_other, got_other = _moded_calls(model, lambda: attack(x[:3], y[:3]), 2)
    assert seen_other == [True, False], seen_other
    assert all(torch.equal(g, _unpatched(lambda: attack(x, y))) for g in got)
    assert all(torch.equal(g, _unpatched(lambda: attack(x[:3], y[:3]))) for g in got_other)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def _transposed_head() -> tuple[nn.Module, torch.Tensor]:
    def make(width: int) -> tuple[nn.Module, torch.Tensor]:
        torch.manual_seed(width)
        return Frames(width, lambda m, h: m.head(h.mT).mean(1)).eval(), torch.rand(4, 3, 20)

    model, x, _ = find_sensitive(make, _probe, widths=range(2, 17), what="Linear on a transposed input")
    return model, x


def test_a_rule_learned_under_autograd_grad_keeps_its_weight_live_instead_of_running_the_mode():
    """A Linear fed a transposed input (found sensitive on this CPU), attacked with ``autograd.grad``: the first call
    runs the mode and aliases the weight; later calls keep that weight live and run no mode (its weight gradient is
    never computed: autograd prunes it); every result is the library's own, no ``.grad``, flags restored."""
    import torchattacks

    model, x = _transposed_head()
    y = torch.zeros(4, dtype=torch.long)
    attack = torchattacks.PGD(model, eps=0.1, alpha=0.03, steps=2, random_start=True)
    live: list[bool] = []
    handle = model.head.register_forward_pre_hook(lambda mod, a: live.append(mod.weight.requires_grad))
    try:
        seen, got = _moded_calls(model, lambda: attack(x, y), 3)
    finally:
        handle.remove()
    assert seen == [True, False, False], seen
    assert live[0] is False and live[-1] is True, live  # aliased in the first call, live in the last
    expected = _unpatched(lambda: attack(x, y))
    assert all(torch.equal(g, expected) for g in got)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    frozen_during: list[bool] = []
    handle = model.conv.register_forward_pre_hook(lambda mod, a: frozen_during.append(not mod.weight.requires_grad))
    try:
        attack(x, y)
    finally:
        handle.remove()
    assert frozen_during and all(frozen_during)


def test_a_rule_learned_under_backward_keeps_running_the_mode():
    """The same model attacked with an attack that calls ``backward()`` (advertorch PGD): a live weight would get its
    gradient computed, so every call runs the mode; every result is the library's own."""
    from advertorch.attacks import LinfPGDAttack

    model, x = _transposed_head()
    y = torch.zeros(4, dtype=torch.long)
    attack = LinfPGDAttack(model, eps=0.1, eps_iter=0.03, nb_iter=2)
    seen, got = _moded_calls(model, lambda: attack.perturb(x, y), 3)
    assert seen == [True, True, True], seen
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    expected = _unpatched(lambda: attack.perturb(x, y))  # as shipped: leaves .grad, which the calls above did not
    assert all(torch.equal(g, expected) for g in got)


def test_with_blocks_always_run_the_mode():
    model = nn.Linear(4, 2)
    for _ in range(2):
        with sbpatch.frozen(model):
            assert operands.active() is not None
    assert operands.active() is None


def test_signature_tells_shapes_strides_flags_and_grad_mode_apart():
    def f() -> None:
        pass

    x = torch.randn(2, 3)
    sig = operands.signature(f, (x,), {}, [])
    assert sig == operands.signature(f, (torch.randn(2, 3),), {}, [])
    others = [
        operands.signature(f, (x.mT.contiguous().mT,), {}, []),  # same shape, other strides
        operands.signature(f, (torch.randn(3, 3),), {}, []),
        operands.signature(f, (x.double(),), {}, []),
        operands.signature(f, (x.requires_grad_(),), {}, []),
        operands.signature(f, (x,), {"k": 1}, []),
        operands.signature(f, (x,), {}, [nn.Linear(1, 1).eval()]),
    ]
    with torch.no_grad():
        others.append(operands.signature(f, (x,), {}, []))
    assert all(o is not None and o != sig for o in others)
    assert len(set(others)) == len(others)

# --- property: random small modules of Linear and raw-parameter products on random strides ------------------------

_OPS = ("linear", "linear_T", "raw_mT", "raw_left", "flinear_T", "rmatmul")


class RandomNet(nn.Module):
    def __init__(self, ops: list[str], width: int, bias: bool) -> None:
        super().__init__()
        self.ops = ops
        self.layers = nn.ModuleList(nn.Linear(width, width, bias=bias) for _ in ops)
        self.raw = nn.ParameterList(nn.Parameter(torch.randn(width, width) / width**0.5) for _ in ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, N, C) with C == width, any strides
        for op, layer, w in zip(self.ops, self.layers, self.raw):
            if op == "linear":
                x = layer(x)
            elif op == "linear_T":  # a square (B, C, N) view as the input
                x = layer(x.transpose(1, 2)).transpose(1, 2)
            elif op == "raw_mT":
                x = (x.mT @ w).mT
            elif op == "raw_left":
                x = (w @ x.mT).mT
            elif op == "flinear_T":
                x = F.linear(x.transpose(1, 2), w).transpose(1, 2)
            else:
                x = torch.matmul(x.permute(0, 2, 1), w.T).permute(0, 2, 1)
            x = torch.tanh(x)
        return x.mean((1, 2))


@settings(max_examples=30, deadline=None)
@given(
    ops=st.lists(st.sampled_from(_OPS), min_size=1, max_size=4),
    width=st.integers(1, 12),
    bias=st.booleans(),
    batch=st.integers(1, 3),
    permute=st.booleans(),
    seed=st.integers(0, 3),
)
def test_random_products_live_vs_frozen_identical(ops, width, bias, batch, permute, seed):
    torch.manual_seed(seed)
    model = RandomNet(ops, width, bias).eval()
    x = torch.randn(batch, width, width).transpose(1, 2) if permute else torch.randn(batch, width, width)
    expected = _probe(model, x)
    with sbpatch.frozen(model):
        got = _probe(model, x)
    assert identical(expected, got), f"{ops} width={width} bias={bias} batch={batch} permute={permute}"
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


# --- the group cache under every model edit -----------------------------------------------------------------------


def _edits() -> dict[str, Callable[[nn.Sequential, dict], None]]:
    def delete(m: nn.Sequential, new: dict) -> None:
        del m[2]
        m._modules["2"] = new["tail"]

    return {
        "Sequential.insert": lambda m, new: m.insert(1, new["lin"]),
        "_modules[k] = m": lambda m, new: m._modules.__setitem__("1", new["lin"]),
        "register_parameter": lambda m, new: m[0].register_parameter("extra", new["b"]),
        "load_state_dict(assign=True)": lambda m, new: m.load_state_dict(new["state"], assign=True),
        "del, then _modules[k] = m": delete,
        "setattr": lambda m, new: setattr(m[0], "weight", new["w"]),
        "_parameters[k] = p": lambda m, new: m[0]._parameters.__setitem__("weight", new["w"]),
        "_parameters[new key] = p, in a layer with none": lambda m, new: m[1]._parameters.__setitem__("b", new["b"]),
        "_modules[k] = m, in a leaf layer": lambda m, new: m[0]._modules.__setitem__("inner", new["lin"]),
    }


class _SameHash(nn.Linear):
    """A layer class with its own ``__hash__`` (every instance equal for it)."""

    def __hash__(self) -> int:
        return 0


@pytest.mark.parametrize("edit", list(_edits()))
def test_group_cache_follows_every_model_edit(edit: str):
    """Edits made after a first frozen call, with layers and parameters created before it (so no registration hook
    fires at the edit), in containers and leaf layers: the next call freezes the new parameters and writes no
    ``.grad``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    new = {
        "lin": nn.Linear(4, 4),
        "tail": nn.Linear(4, 2),
        "w": nn.Parameter(torch.randn(4, 4)),
        "b": nn.Parameter(torch.randn(4)),
        "state": {k: v.clone() for k, v in model.state_dict().items()},
    }
    x = torch.randn(3, 4)
    with sbpatch.frozen(model):
        model(x.clone().requires_grad_()).sum().backward()
    _edits()[edit](model, new)
    with sbpatch.frozen(model):
        live = [n for n, p in model.named_parameters() if p.requires_grad]
        model(x.clone().requires_grad_()).sum().backward()
    assert live == [], f"{edit}: {live} not frozen"
    assert [n for n, p in model.named_parameters() if p.grad is not None] == []
    assert all(p.requires_grad for p in model.parameters())


def test_group_cache_sees_a_replaced_layer_whose_class_hashes_its_own_way():
    """The tree check keeps the hash of the children only when each hashes by identity: children whose class makes
    every instance hash alike are compared by id, so replacing one with another is still seen."""
    torch.manual_seed(0)
    model = nn.Sequential(_SameHash(4, 4), nn.ReLU(), _SameHash(4, 2))
    replacement = _SameHash(4, 4)  # built before the first call: no registration hook fires at the edit
    x = torch.randn(3, 4)
    with sbpatch.frozen(model):
        model(x.clone().requires_grad_()).sum().backward()
    model._modules["0"] = replacement
    with sbpatch.frozen(model):
        live = [n for n, p in model.named_parameters() if p.requires_grad]
        model(x.clone().requires_grad_()).sum().backward()
    assert live == []
    assert [n for n, p in model.named_parameters() if p.grad is not None] == []
