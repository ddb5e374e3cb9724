"""The freeze ledger and frozen(): exact restoration in every situation, kernel-preserving rules on a ViT."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
import torch
from helpers import TinyCNN, data, identical, tiny_cnn, tiny_vit
from hypothesis import given, settings
from hypothesis import strategies as st
from sensitive import find_sensitive
from torch import nn

import sbpatch
from sbpatch import freeze


def flags(model: nn.Module) -> list[bool]:
    return [p.requires_grad for p in model.parameters()]


def test_frozen_freezes_and_restores_exactly():
    model = tiny_cnn()
    before = flags(model)
    assert before.count(False) == 1  # conv.bias frozen by the user
    with sbpatch.frozen(model):
        assert not any(flags(model))
        assert freeze.held_count() == len(before) - 1
    assert flags(model) == before
    assert freeze.held_count() == 0


def test_user_frozen_parameter_is_never_set_true():
    model = tiny_cnn()
    with sbpatch.frozen(model):
        with sbpatch.frozen(model.conv):
            pass
        assert not model.conv.weight.requires_grad
    assert model.conv.bias.requires_grad is False
    assert model.conv.weight.requires_grad is True


def test_tied_and_shared_parameters_are_counted_once():
    model = tiny_cnn()
    other = nn.Sequential(model.head)  # shares head with model
    with sbpatch.frozen(model, other, model.parameters()):
        assert freeze.held_count() == sum(1 for p in model.parameters() if p.requires_grad is False) - 1
    assert flags(model) == flags(tiny_cnn())


def test_exception_and_keyboard_interrupt_restore():
    model = tiny_cnn()
    before = flags(model)
    for exc in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)), sbpatch.frozen(model):
            raise exc
        assert flags(model) == before
    assert freeze.held_count() == 0


def test_decorator_and_recursion():
    model = tiny_cnn()

    @sbpatch.frozen(model)
    def depth(n: int) -> list[bool]:
        return flags(model) if n == 0 else depth(n - 1)

    assert not any(depth(3))
    assert flags(model) == flags(tiny_cnn())


def test_grad_mode_buffers_untouched():
    model = tiny_cnn().train()
    x, y = data()
    nn.functional.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() if p.grad is not None else None for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    with sbpatch.frozen(model):
        x.requires_grad_(True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        assert x.grad is not None
    for p, g in zip(model.parameters(), grads):
        assert (p.grad is None) == (g is None) and (g is None or torch.equal(p.grad, g))
    assert model.training
    # train-mode batch norm updated its running stats in the frozen forward: sbpatch does not touch buffers
    assert not all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))


def test_keep_by_name_module_and_parameter():
    model = tiny_cnn()
    with sbpatch.frozen(model, keep=["hidden", "head.weight"]):
        assert model.hidden.weight.requires_grad and model.hidden.bias.requires_grad
        assert model.head.weight.requires_grad and not model.head.bias.requires_grad
    with sbpatch.frozen(model, keep=[model.conv]):
        assert model.conv.weight.requires_grad and not model.bn.weight.requires_grad
    with pytest.raises(ValueError, match="names no parameter"), sbpatch.frozen(model, keep=["nope"]):
        pass
    assert flags(model) == flags(tiny_cnn())


def test_cache_sees_modules_added_later():
    model = tiny_cnn()
    with sbpatch.frozen(model):
        pass
    model.extra = nn.Linear(2, 2)
    with sbpatch.frozen(model):
        assert not model.extra.weight.requires_grad
    assert model.extra.weight.requires_grad


def test_bad_target_type():
    with pytest.raises(TypeError, match="cannot freeze"), sbpatch.frozen(42):
        pass


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(st.sampled_from(["a", "b", "ab"]), min_size=1, max_size=12),
    data_=st.data(),
)
def test_overlapping_holders_end_with_original_state(ops, data_):
    """Holders acquire and release in any interleaving (not nested): the final state is the initial one."""
    a, b = tiny_cnn(), TinyCNN()
    b.head = a.head  # shared parameters between the two models
    b.hidden.weight.requires_grad_(False)
    before = (flags(a), flags(b))
    release_order = data_.draw(st.permutations(range(len(ops))))  # draw first: a draw may abort the example
    holders = []
    for which in ops:
        targets = {"a": [a], "b": [b], "ab": [a, b]}[which]
        held = freeze.Holder()
        freeze.acquire(freeze.collect(targets), held)
        holders.append(held)
        assert not a.head.weight.requires_grad
    for i in release_order:
        freeze.release(holders[i])
    assert (flags(a), flags(b)) == before
    assert freeze.held_count() == 0


def test_many_threads_nested_and_overlapping():
    model = tiny_cnn()
    before = flags(model)
    errors = []
    barrier = threading.Barrier(8)

    def work(i: int) -> None:
        try:
            barrier.wait()
            for _ in range(200):
                with sbpatch.frozen(model if i % 2 else model.head), sbpatch.frozen(model.head, model.hidden):
                    assert not model.head.weight.requires_grad
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert flags(model) == before
    assert freeze.held_count() == 0


# --- kernel-preserving rules ---------------------------------------------------------------------------------


def _logits_and_input_grad(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    plain = model(x).detach()  # a black-box query: grad mode on, but the input needs no gradient
    xg = x.clone().requires_grad_(True)
    out = model(xg)
    (grad,) = torch.autograd.grad(out.logsumexp(1).sum(), xg)
    return plain, out.detach(), grad


def test_vit_frozen_is_bit_identical_and_keeps_in_projections_live():
    model = tiny_vit()
    x, _ = data(n=4)
    expected = _logits_and_input_grad(model, x)
    with sbpatch.frozen(model):
        attn = model.encoder.layers[0].self_attention
        assert attn.in_proj_weight.requires_grad
        assert not attn.out_proj.weight.requires_grad
        got = _logits_and_input_grad(model, x)
    assert identical(expected, got)


def test_vit_one_liner_freeze_changes_kernels_where_this_cpu_shows_it():
    """Why the rule exists: freezing everything makes the no-grad query take MultiheadAttention's fused fast path.
    Whether that path rounds differently depends on the CPU: a ViT where it does is searched for; sbpatch stays
    identical there (and everywhere)."""
    x, _ = data(n=4)
    model, x, _ = find_sensitive(lambda w: (tiny_vit(seed=w - 1), x), _logits_and_input_grad, what="tiny ViT")
    expected = _logits_and_input_grad(model, x)
    with sbpatch.frozen(model):
        got = _logits_and_input_grad(model, x)
    assert identical(expected, got)


def test_kept_parameters_grad_set_aside_under_backward():
    model = tiny_vit()
    attn = model.encoder.layers[0].self_attention
    attn.in_proj_weight.grad = torch.ones_like(attn.in_proj_weight)
    saved = attn.in_proj_weight.grad
    x, y = data()
    with sbpatch.frozen(model):
        nn.functional.cross_entropy(model(x), y).backward()
    assert attn.in_proj_weight.grad is saved and torch.equal(saved, torch.ones_like(saved))
    assert model.encoder.layers[0].mlp[0].weight.grad is None


def test_keep_rules_are_data_and_extensible():
    assert sbpatch.keep_rules() == {}  # no static table: the built-in rules follow what the model does
    builtin = freeze.builtin_rules()
    assert "torch.nn.modules.rnn.RNNBase" in builtin and "torch.jit.ScriptModule" in builtin
    assert any("F.linear" in where and "matmul" in where for where in builtin)
    model = tiny_cnn()
    sbpatch.add_keep_rule(nn.BatchNorm2d, "weight")
    try:
        assert sbpatch.keep_rules() == {"torch.nn.modules.batchnorm.BatchNorm2d": ["weight"]}
        with sbpatch.frozen(model):
            assert model.bn.weight.requires_grad and not model.bn.bias.requires_grad
        assert freeze.kept_live()["TinyCNN.bn.weight"] == "user keep rule (add_keep_rule)"
    finally:
        sbpatch.remove_keep_rule(nn.BatchNorm2d)
    with sbpatch.frozen(model):
        assert not model.bn.weight.requires_grad
    assert "kept live" in str(sbpatch.status())


class FrameClassifier(nn.Module):
    """A Conv1d encoder, then a Linear on the transposed feature map (a per-frame classifier)."""

    def __init__(self, channels: int = 3, hidden: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv1d(channels, hidden, 3, padding=1)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x.flatten(2)))  # (B, hidden, N)
        return self.head(h.transpose(1, 2)).mean(1)  # non-foldable (B, N, hidden) input


def test_linear_fed_a_transposed_input_runs_on_a_live_alias_and_results_identical():
    def make(classes: int) -> tuple[nn.Module, torch.Tensor]:
        torch.manual_seed(0)
        return FrameClassifier(classes=classes).eval(), data(n=4, size=8)[0]

    # a head width where the paper's one-liner changes the kernel's rounding (mm vs bmm) on this CPU
    model, x, _ = find_sensitive(make, _logits_and_input_grad, what="Linear on a transposed input")
    expected = _logits_and_input_grad(model, x)
    model.head.weight.grad = torch.ones_like(model.head.weight)
    saved = model.head.weight.grad
    for _ in range(2):
        with sbpatch.frozen(model):  # the weight stays frozen: the product runs on a live alias of it
            got = _logits_and_input_grad(model, x)
            assert not model.head.weight.requires_grad and not model.conv.weight.requires_grad
            nn.functional.cross_entropy(model(x), torch.zeros(4, dtype=torch.long)).backward()
        assert identical(expected, got)
        assert model.head.weight.grad is saved and torch.equal(saved, torch.ones_like(saved))
        assert all(p.requires_grad for p in model.parameters())
        assert not model.head._forward_pre_hooks, "no hook is left after the call"
    assert "non-foldable" in freeze.kept_live()["FrameClassifier.head.weight"]
    assert "head.weight" in freeze.kept_in(model)


def test_cnn_and_contiguous_transformer_keep_every_weight_frozen():
    model = tiny_cnn()
    x, _ = data()
    with sbpatch.frozen(model):
        model(x)
        assert not any(p.requires_grad for p in model.parameters())
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=False, dropout=0.0).eval()
    seq = torch.randn(5, 3, 16)
    expected = layer(seq).detach()
    with sbpatch.frozen(layer):
        got = layer(seq).detach()
        assert not any(p.requires_grad for p in layer.parameters())
    assert torch.equal(expected, got)


def test_attention_batch_first_false_fed_transposed_input_is_learned():
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(64, 2, batch_first=False).eval()
    q = torch.randn(3, 7, 64).transpose(0, 1)  # (L, N, E) view of a batch-first tensor: not foldable
    expected = attn(q, q, q)[0].detach()
    with sbpatch.frozen(attn):
        got = attn(q, q, q)[0].detach()
        assert not attn.in_proj_weight.requires_grad and not attn.out_proj.weight.requires_grad  # a live alias ran
    assert torch.equal(expected, got)


def _query_and_grad(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    plain = model(x).detach()
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(xg).square().sum(), xg)
    return plain, grad


def _check_rule(make: Callable[[int], tuple[nn.Module, torch.Tensor]], kept: set[str], what: str) -> None:
    """On a width where the one-liner changes the numbers on this CPU (searched), sbpatch keeps ``kept`` live and
    gives the live model's logits and input gradient, on the call that learns the rule and the next."""
    model, x, _ = find_sensitive(make, _query_and_grad, what=what)
    expected = _query_and_grad(model, x)
    for _ in range(2):
        with sbpatch.frozen(model):
            got = _query_and_grad(model, x)
            assert {n for n, p in model.named_parameters() if p.requires_grad} == kept
        assert identical(expected, got)
        assert all(p.requires_grad for p in model.parameters())


class GRUTagger(nn.Module):
    def __init__(self, cell: type = nn.GRU, hidden: int = 32, **kw: object) -> None:
        super().__init__()
        self.rnn = cell(16, hidden, batch_first=True, **kw)
        self.head = nn.Linear(kw.get("proj_size") or hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


@pytest.mark.parametrize(
    "cell, kw", [(nn.GRU, {}), (nn.RNN, {}), (nn.LSTM, {"proj_size": 8})], ids=["gru", "rnn", "lstm-proj"]
)
def test_batch_first_rnn_keeps_its_input_weights_live(cell, kw):
    x = torch.randn(2, 20, 16)

    def make(width: int) -> tuple[nn.Module, torch.Tensor]:
        torch.manual_seed(0)
        return GRUTagger(cell, hidden=width + (8 if kw else 0), **kw).eval(), x

    _check_rule(make, {"rnn.weight_ih_l0"}, f"batch-first {cell.__name__}")
    lstm = GRUTagger(nn.LSTM).eval()  # fused oneDNN LSTM: no fold, every weight frozen
    with sbpatch.frozen(lstm):
        lstm(x)
        assert not any(p.requires_grad for p in lstm.parameters())


@pytest.mark.parametrize("norm", ["parametrization", "legacy"])
def test_weight_normalised_linear_keeps_the_weight_sources_live(norm):
    x = torch.rand(4, 3, 7, 7)

    def make(classes: int) -> tuple[nn.Module, torch.Tensor]:
        torch.manual_seed(0)
        model = FrameClassifier(hidden=256, classes=classes)
        if norm == "parametrization":
            model.head = nn.utils.parametrizations.weight_norm(model.head)
        else:
            model.head = nn.utils.weight_norm(model.head)
        return model, x

    # the weight computed from the frozen originals is tracked: the product runs on a live alias of it
    _check_rule(make, set(), f"weight-normalised Linear ({norm})")


class RelPosAttention(nn.Module):
    """timm-style attention with a learned relative-position bias passed to SDPA as its mask."""

    def __init__(self, dim: int = 16, tokens: int = 17) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.relative_position_bias_table = nn.Parameter(torch.randn(1, 2, tokens, tokens))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, 2, c // 2).permute(2, 0, 3, 1, 4)
        out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=self.relative_position_bias_table)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


def test_relative_position_bias_stays_live():
    def make(width: int) -> tuple[nn.Module, torch.Tensor]:
        torch.manual_seed(0)
        return RelPosAttention(tokens=width + 1).eval(), torch.randn(2, width + 1, 16)

    _check_rule(make, {"relative_position_bias_table"}, "relative-position attention bias")


def test_no_probe_inside_a_fast_path_encoder_layer():
    """TransformerEncoderLayer skips its fused fast path when any submodule has a hook: sbpatch adds none there; the
    encoder (whose fast path, like the layer's, is refused under any torch function mode) sets sbpatch's mode aside
    while it runs, with hooks on itself only (those, and the hooks that push a mode for a forward run in another
    thread)."""
    torch.manual_seed(0)
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 2).eval()
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        expected = encoder(x)
    seen = []
    with sbpatch.frozen(encoder), torch.no_grad():
        seen = [len(m._forward_pre_hooks) + len(m._forward_hooks) for m in encoder.modules()]
        got = encoder(x)
    assert seen[0] == 4 and not any(seen[1:]) and torch.equal(expected, got)
    assert not encoder._forward_pre_hooks and not encoder._forward_hooks


def test_batch_norm_cuda_rule_costs_nothing_on_cpu():
    """The batch-norm rule (CUDA only: benchmarks/results/gpu/gpu_exactness.md) installs no probe on a CPU model:
    the frozen call runs exactly the hooks it ran before, and nothing is kept live."""
    import torchvision

    model = torchvision.models.resnet18(num_classes=10).eval()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    group = freeze._module_group(model)
    assert len(group.cuda_probes) == len(norms) == 20
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    with sbpatch.frozen(model):
        hooked = [m for m in norms if m._forward_pre_hooks]
        torch.nn.functional.cross_entropy(model(x), torch.tensor([1, 2])).backward()
    assert hooked == []
    assert all(not m._forward_pre_hooks for m in norms)
    assert x.grad is not None and all(p.grad is None and p.requires_grad for p in model.parameters())
    assert freeze.kept_in(model) == {}
