"""nanoGCG 0.3.0 on the real library: GCG runs identical patched vs unpatched on a tiny random Llama (offline).

The tokenizer is a WordLevel tokenizer built offline from a few sentences (with a chat template, which nanoGCG
applies); the model is a 2-layer ``LlamaForCausalLM`` with hidden size 32, random-initialised from a config
(``sbpatch.bench.llm``, also ``sbpatch verify --model llama``'s victim).
"""

from __future__ import annotations

import pytest
import torch
from helpers import compare, expect

import sbpatch
from sbpatch import freeze, registry
from sbpatch.bench.llm import MESSAGE, SMALL_GCG, TARGET, tiny_llama, tiny_tokenizer
from sbpatch.bench.runner import SavedTensorMeter
from sbpatch.contrib.nanogcg import BROKEN_DEFAULT, INTEGRATION, cases

nanogcg = pytest.importorskip("nanogcg")
from nanogcg.gcg import GCG  # noqa: E402

CASES = cases()
# cases whose unpatched call fails on this stack, with the error: nanoGCG's default prefix cache on transformers 4.57
KNOWN_BROKEN: dict[str, str] = {"GCG default prefix cache": BROKEN_DEFAULT}
SMALL = SMALL_GCG


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(autouse=True)
def keep_deterministic_flag():
    """nanoGCG's run(seed=...) turns on torch.use_deterministic_algorithms for the whole process: undo it."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def test_target_wrapped_and_in_status():
    from sbpatch.patching import SbpatchWrapper

    assert isinstance(GCG.__dict__["compute_token_gradient"], SbpatchWrapper)
    assert "nanogcg.gcg.GCG.compute_token_gradient" in sbpatch.status()["nanogcg"].patched
    assert not isinstance(GCG.__dict__["run"], SbpatchWrapper)  # candidate evaluation runs as shipped


@pytest.mark.parametrize("case", sorted(CASES))
def test_identical(case: str, tokenizer):
    model = tiny_llama(len(tokenizer))
    models = [model]
    config = dict(SMALL)
    if case == "probe sampling":  # a separate draft model, frozen with the model in the gradient step
        draft = tiny_llama(len(tokenizer), seed=1)
        models.append(draft)
        config.update(draft_model=draft, draft_tokenizer=tokenizer)
    run = CASES[case](model, tokenizer, MESSAGE, TARGET, 3, **config)
    outcome = compare("nanogcg", case, model, run, "llama", models=models)
    expect(outcome, KNOWN_BROKEN)


def test_default_prefix_cache_is_library_broken(tokenizer):
    """As shipped, GCGConfig()'s prefix cache fails on transformers 4.57; patched it fails the same way, restored."""
    model = tiny_llama(len(tokenizer))
    run = CASES["GCG default prefix cache"](model, tokenizer, MESSAGE, TARGET, 1, **SMALL)
    flags = [p.requires_grad for p in model.parameters()]
    with sbpatch.paused(), pytest.raises(AttributeError, match=BROKEN_DEFAULT):
        run()
    with pytest.raises(AttributeError, match=BROKEN_DEFAULT):
        run()
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())


def test_locator_finds_model_and_draft_model(tokenizer):
    from nanogcg import GCGConfig, ProbeSamplingConfig

    model, draft = tiny_llama(len(tokenizer)), tiny_llama(len(tokenizer), seed=1)
    locate = INTEGRATION.targets[0].locate
    plain = GCG(model, tokenizer, GCGConfig(verbosity="WARNING"))
    assert locate(None, plain, (), {}) == [model]
    probing = GCG(model, tokenizer, GCGConfig(verbosity="WARNING", probe_sampling_config=ProbeSamplingConfig(
        draft_model=draft, draft_tokenizer=tokenizer)))
    assert locate(None, probing, (), {}) == [model, draft]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saved_for_backward_lower_patched(tokenizer, dtype: torch.dtype):
    """The gradient step's bytes saved for backward (autograd.grad: no .grad either way) drop when frozen."""
    model = tiny_llama(len(tokenizer), dtype=dtype)
    run = CASES["run"](model, tokenizer, MESSAGE, TARGET, 1, **SMALL)
    counters = registry.counters("nanogcg")
    peaks = {}
    for mode in ("shipped", "sbpatch"):
        meter = SavedTensorMeter(list(model.parameters()))
        calls = counters.calls
        with meter.measuring(), (sbpatch.paused() if mode == "shipped" else _null()):
            result = run()
        assert (counters.calls > calls) == (mode == "sbpatch")
        peaks[mode] = (meter.peak, result)
        assert all(p.grad is None for p in model.parameters())
    assert peaks["sbpatch"][1] == peaks["shipped"][1]
    assert 0 < peaks["sbpatch"][0] < peaks["shipped"][0], peaks


def _null():
    import contextlib

    return contextlib.nullcontext()


def test_user_subclass_defined_later_is_wrapped(tokenizer):
    from nanogcg import GCGConfig

    seen = []

    class Mine(GCG):
        def compute_token_gradient(self, optim_ids):
            seen.append(self.model.lm_head.weight.requires_grad)
            return super().compute_token_gradient(optim_ids)

    from sbpatch.patching import SbpatchWrapper

    assert isinstance(Mine.__dict__["compute_token_gradient"], SbpatchWrapper)
    model = tiny_llama(len(tokenizer))
    flags = [p.requires_grad for p in model.parameters()]
    Mine(model, tokenizer, GCGConfig(num_steps=1, use_prefix_cache=False, **SMALL)).run(
        MESSAGE, TARGET
    )
    assert seen == [False]
    assert [p.requires_grad for p in model.parameters()] == flags
    assert freeze.held_count() == 0


@pytest.mark.parametrize("exc", [RuntimeError("model failed"), KeyboardInterrupt()])
def test_gradient_step_that_raises_restores(tokenizer, exc: BaseException):
    from nanogcg import GCGConfig

    model = tiny_llama(len(tokenizer))
    flags = [p.requires_grad for p in model.parameters()]
    gcg = GCG(model, tokenizer, GCGConfig(num_steps=1, use_prefix_cache=False, **SMALL))

    def boom(module, args, kwargs):
        if torch.is_grad_enabled():  # only the gradient step's forward, not the no_grad candidate losses
            raise exc

    hook = model.register_forward_pre_hook(boom, with_kwargs=True)
    try:
        with pytest.raises(type(exc)):
            gcg.run(MESSAGE, TARGET)
    finally:
        hook.remove()
    assert [p.requires_grad for p in model.parameters()] == flags
    assert freeze.held_count() == 0
