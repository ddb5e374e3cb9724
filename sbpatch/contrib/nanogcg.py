"""nanogcg (nanoGCG 0.3.x, GraySwan): the GCG gradient step ``GCG.compute_token_gradient`` runs frozen.

What is wrapped and why. ``nanogcg.run(model, tokenizer, messages, target, config)`` builds a ``GCG`` and calls
``GCG.run``; each optimisation step of ``GCG.run`` calls ``self.compute_token_gradient(optim_ids)`` (the only place
with autograd: a forward of the one-hot suffix through ``self.model`` and ``torch.autograd.grad(loss, one_hot)``), then
evaluates the candidate suffixes under ``torch.no_grad()`` (also the probe-sampling draft model's forwards, in threads).
sbpatch wraps ``GCG.compute_token_gradient`` (and any subclass's own override, also one defined later) and freezes
``self.model`` and, when probe sampling is configured, ``self.draft_model`` for that call. The candidate-evaluation
forwards and everything else in ``GCG.run`` stay exactly as shipped, so ``nanogcg.run``, ``GCG.run`` and a direct
``compute_token_gradient`` call are all covered by the one target.

What it buys: nanoGCG computes the token gradient with ``torch.autograd.grad(outputs=[loss], inputs=[one_hot])``,
which PyTorch already prunes to the input gradient, so there are no weight gradients to skip and no ``.grad`` left:
freezing saves **memory, not time** (the activations that autograd saves only for weight gradients: the inputs of
every Linear layer, no longer saved when its weight is frozen). llm-attacks-style code that calls ``loss.backward()``
with live weights (``examples/gcg_utils.py``, name it in ``SBPATCH_TARGETS``) also skips the weight gradients and their
``.grad`` buffers, a model's worth of floats. ``benchmarks/llm.py`` measures both.

Known library breakage (not sbpatch's): the default ``GCGConfig(use_prefix_cache=True)`` fails as shipped on
transformers >= 4.56 with ``AttributeError: 'list' object has no attribute 'get_seq_length'`` (it passes a list of
per-layer key/value lists as ``past_key_values``); use ``GCGConfig(use_prefix_cache=False)``. nanoGCG's ``run`` with a
``seed`` also calls ``torch.use_deterministic_algorithms(True, warn_only=True)`` for the rest of the process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sbpatch.locate import attribute
from sbpatch.patching import Integration, Target

MODALITY = "llm"  # cases() take a causal LM and its tokenizer, not images

_victims = attribute("model", "draft_model")  # draft_model is None unless probe sampling is configured

INTEGRATION = Integration(
    name="nanogcg",
    distribution="nanogcg",
    module="nanogcg",
    supported=">=0.3,<0.4",
    targets=(Target("nanogcg.gcg", "GCG.compute_token_gradient", _victims, subclasses=True),),
)

BROKEN_DEFAULT = "'list' object has no attribute 'get_seq_length'"  # the default prefix cache on transformers 4.57


def cases() -> dict[str, Callable[..., Callable[[], Any]]]:
    """One builder per way of running nanoGCG: ``builder(model, tokenizer, message, target, steps, **config)`` ->
    a zero-argument call that runs the attack and returns its ``GCGResult``.

    ``model``: a Hugging Face causal LM; ``tokenizer``: its tokenizer (with a chat template); ``message``: the user
    prompt; ``target``: the target completion; ``steps``: ``num_steps``; ``config``: any other ``GCGConfig`` field
    (``search_width``, ``topk``, ``seed``, ``optim_str_init``...). Every case sets ``use_prefix_cache=False`` (the
    default prefix cache is broken as shipped on transformers 4.57, see the module docstring) except
    ``"GCG default prefix cache"``, which keeps the default to show that breakage; ``"probe sampling"`` uses the model
    itself as its draft model unless ``draft_model``/``draft_tokenizer`` are passed in ``config``.
    """
    import nanogcg
    from nanogcg import GCGConfig, ProbeSamplingConfig
    from nanogcg.gcg import GCG

    def make_config(steps: int, config: dict[str, Any], prefix_cache: bool = False) -> Any:
        config = {"verbosity": "WARNING", "use_prefix_cache": prefix_cache, **config, "num_steps": steps}
        return GCGConfig(**config)

    def run(model: Any, tokenizer: Any, message: str, target: str, steps: int, **config: Any) -> Callable[[], Any]:
        cfg = make_config(steps, config)
        return lambda: nanogcg.run(model, tokenizer, message, target, cfg)

    def gcg_run(model: Any, tokenizer: Any, message: str, target: str, steps: int, **config: Any) -> Callable[[], Any]:
        cfg = make_config(steps, config)
        return lambda: GCG(model, tokenizer, cfg).run(message, target)

    def default_cache(model: Any, tokenizer: Any, message: str, target: str, steps: int,
                      **config: Any) -> Callable[[], Any]:
        cfg = make_config(steps, {k: v for k, v in config.items() if k != "use_prefix_cache"}, prefix_cache=True)
        return lambda: nanogcg.run(model, tokenizer, message, target, cfg)

    def probe(model: Any, tokenizer: Any, message: str, target: str, steps: int, **config: Any) -> Callable[[], Any]:
        draft_model = config.pop("draft_model", model)
        draft_tokenizer = config.pop("draft_tokenizer", tokenizer)
        sampling = ProbeSamplingConfig(draft_model=draft_model, draft_tokenizer=draft_tokenizer, r=2,
                                       sampling_factor=2)
        cfg = make_config(steps, {**config, "probe_sampling_config": sampling})
        return lambda: nanogcg.run(model, tokenizer, message, target, cfg)

    def mellowmax(model: Any, tokenizer: Any, message: str, target: str, steps: int,
                  **config: Any) -> Callable[[], Any]:
        return run(model, tokenizer, message, target, steps, **{**config, "use_mellowmax": True})

    def buffer(model: Any, tokenizer: Any, message: str, target: str, steps: int, **config: Any) -> Callable[[], Any]:
        return run(model, tokenizer, message, target, steps, **{**config, "buffer_size": 2, "n_replace": 2})

    return {
        "run": run,
        "GCG.run": gcg_run,
        "mellowmax": mellowmax,
        "buffer": buffer,
        "probe sampling": probe,
        "GCG default prefix cache": default_cache,
    }
