"""TextAttack 0.3.11 on the real library, offline: every recipe that runs without a download, and attacks built from
its components (embedding swaps over a local embedding, gradient word swaps, the genetic and PSO searches), identical
patched vs unpatched on a tiny BERT and on TextAttack's own LSTM; ``requires_grad`` restored exactly although
TextAttack's ``get_grad`` flips the embedding weight itself; what cannot run offline is listed with its reason."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import textattack
import torch
from helpers import compare, expect, run_python
from text_helpers import MODELS, STEPS, capture, grads_written, texts, victim

import sbpatch
from sbpatch import freeze, registry
from sbpatch.contrib.textattack import OFFLINE_UNAVAILABLE, cases
from sbpatch.contrib.textattack import _runner as runner
from sbpatch.contrib.textattack import _wrapper as model_wrapper
from sbpatch.verify import identical

CASES = cases()
# (attack, model) pairs whose unpatched call fails on this stack; none today. A new failure shows up here.
KNOWN_BROKEN: dict[Any, str] = {
    # TextAttack's WordSwapGradientBased validates the model: only its own word-level LSTM is accepted.
    ("GradientSwapBeam", "bert"): "Cannot perform GradientBasedWordSwap",
    # WordSwapHomoglyphSwap reads textattack/shared/intentional_homoglyphs.txt, which the 0.3.11 wheel does not ship.
    "BadCharacters2021": "intentional_homoglyphs.txt",
}
# Cases that call the model wrapper's get_grad (a backward pass): the ones freezing speeds up.
GRADIENT = {"EmbeddingSwapGradientWIR", "GradientSwapBeam"}
# Attacks that must succeed on at least one BERT example (the identity is then not trivial).
SUCCEEDS = {"EmbeddingSwapGreedyWIR", "EmbeddingSwapGradientWIR", "EmbeddingSwapGenetic", "EmbeddingSwapPSO"}


def _recipes() -> set[str]:
    from textattack.attack_recipes import AttackRecipe

    return {
        name
        for name, obj in vars(textattack.attack_recipes).items()
        if isinstance(obj, type) and issubclass(obj, AttackRecipe) and obj is not AttackRecipe
    }


def test_every_recipe_is_a_case_or_listed_with_its_reason():
    recipes = _recipes()
    assert recipes - set(CASES) == set(OFFLINE_UNAVAILABLE), recipes - set(CASES) ^ set(OFFLINE_UNAVAILABLE)
    assert all(OFFLINE_UNAVAILABLE.values())


def grad_guard(model: torch.nn.Module, embedding: torch.nn.Embedding, run: Callable[[], Any]) -> Callable[[], Any]:
    """``run`` with ``.grad`` put back afterwards (TextAttack's get_grad calls ``model.zero_grad()`` itself); in the
    frozen run, assert that no parameter but the word-embedding weight (which TextAttack sets live) got a gradient."""
    params = list(model.named_parameters())

    def guarded() -> Any:
        before = [p.grad for _, p in params]
        calls = registry.counters("textattack").calls
        try:
            return run()
        finally:
            after = [p.grad for _, p in params]
            for (_, p), g in zip(params, before):
                p.grad = g
            if registry.counters("textattack").calls > calls:
                written = [
                    n for (n, p), g0, g1 in zip(params, before, after)
                    if g1 is not None and g1 is not g0 and p is not embedding.weight
                ]
                assert not written, f"a frozen TextAttack call wrote .grad of {written}"

    return guarded


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("attack", sorted(CASES))
def test_identical(attack: str, model_name: str):
    v = victim(model_name, "textattack")
    x, y = texts(v)
    results: list = []
    run = grad_guard(v.model, v.embedding, capture(CASES[attack](v, x, y, STEPS), results))
    expect(compare("textattack", attack, v.model, run, model_name), KNOWN_BROKEN)
    if model_name == "bert" and attack in SUCCEEDS:
        kinds = [r[0] for r in results[-1]]
        assert "SuccessfulAttackResult" in kinds, f"{attack}: {kinds}: a trivial identity"


@pytest.mark.parametrize("model_name", MODELS)
def test_gradient_attack_writes_only_the_embedding_gradient(model_name: str):
    """As shipped, get_grad backpropagates into every weight; frozen, only into the word embedding TextAttack
    sets live itself. Inside the call the embedding is live and everything else frozen; afterwards all restored."""
    v = victim(model_name, "textattack")
    x, y = texts(v, 1)
    run = CASES["EmbeddingSwapGradientWIR"](v, x, y, STEPS)
    with sbpatch.paused():
        shipped, names_shipped = grads_written(v.model, run)
    seen: list[tuple[bool, bool]] = []
    head = v.model.classifier if model_name == "bert" else v.model.out
    hook = v.model.register_forward_pre_hook(
        lambda m, i: seen.append((v.embedding.weight.requires_grad, head.weight.requires_grad)) if m.training else None
    )
    try:
        patched, names_patched = grads_written(v.model, run)
    finally:
        hook.remove()
    assert identical(shipped, patched)
    embedding_name = next(n for n, p in v.model.named_parameters() if p is v.embedding.weight)
    assert len(names_shipped) > 5 and embedding_name in names_shipped
    assert names_patched == [embedding_name]
    assert seen and all(s == (True, False) for s in seen)  # get_grad: embedding live (TextAttack's doing), head frozen
    assert v.embedding.weight.requires_grad and head.weight.requires_grad
    assert freeze.held_count() == 0


def test_user_frozen_embedding_stays_frozen():
    """get_grad sets the weight live and puts back what it found; sbpatch never owned a weight the user froze."""
    v = victim("bert", "textattack")
    x, y = texts(v, 1)
    run = CASES["EmbeddingSwapGradientWIR"](v, x, y, STEPS)
    v.embedding.weight.requires_grad_(False)
    try:
        with sbpatch.paused():
            expected = run()
        assert identical(run(), expected)
        assert v.embedding.weight.requires_grad is False
    finally:
        v.embedding.weight.requires_grad_(True)
    assert v.model.classifier.weight.requires_grad and not v.model.bert.pooler.dense.bias.requires_grad


def test_attacker_attack_dataset_identical():
    """The usual entry point: Attacker.attack_dataset over a Dataset, each example through Attack.attack."""
    v = victim("bert", "textattack")
    x, y = texts(v)
    attack = textattack.Attack(*_parts(v))
    dataset = textattack.datasets.Dataset(list(zip(x, y)))
    args = textattack.AttackArgs(num_examples=len(x), silent=True, disable_stdout=True, random_seed=0)

    def run() -> list:
        attack.clear_cache()
        results = textattack.Attacker(attack, dataset, args).attack_dataset()
        return [(type(r).__name__, r.perturbed_result.attacked_text.text, r.perturbed_result.num_queries)
                for r in results]

    outcome = compare("textattack", "Attacker.attack_dataset", v.model, grad_guard(v.model, v.embedding, run), "bert")
    assert outcome.result == "identical"


def _parts(v: Any) -> tuple[Any, ...]:
    from textattack.constraints.pre_transformation import RepeatModification, StopwordModification
    from textattack.goal_functions import UntargetedClassification
    from textattack.search_methods import GreedyWordSwapWIR
    from textattack.transformations import WordSwapEmbedding

    from sbpatch.contrib.textattack import _word_embedding

    wrapper = model_wrapper(v)
    transformation = WordSwapEmbedding(max_candidates=4, embedding=_word_embedding(v))
    return (UntargetedClassification(wrapper), [RepeatModification(), StopwordModification()], transformation,
            GreedyWordSwapWIR("gradient"))


def test_recipe_runner_clears_caches():
    """Two calls of one case query the model alike (TextAttack caches model outputs per attack)."""
    v = victim("lstm", "textattack")
    x, y = texts(v, 1)
    run = runner(textattack.Attack(*_parts(v)), x, y)
    forwards: list[int] = []
    hook = v.model.register_forward_pre_hook(lambda m, i: forwards.append(1))
    try:
        first = run()
        n = len(forwards)
        second = run()
    finally:
        hook.remove()
    assert identical(first, second)
    assert n > 0 and len(forwards) == 2 * n


def test_status_row():
    s = sbpatch.status()["textattack"]
    assert s.installed and s.enabled and s.version == "0.3.11" and s.calls > 0
    assert "textattack.attack.Attack.attack" in s.patched
    assert "textattack.Trainer" in s.excluded


def test_sbpatch_env_before_an_attacker_run(tmp_path):
    """SBPATCH=all in a fresh interpreter: TextAttack patched on import, an Attacker run frozen and identical."""
    script = tmp_path / "attack.py"
    script.write_text(
        """
import sys
import sbpatch
from sbpatch import registry
from sbpatch.bench.text import bert_victim
import textattack
from textattack.attack import Attack
from sbpatch.patching import SbpatchWrapper
from sbpatch.contrib.textattack import cases
assert isinstance(Attack.__dict__["attack"], SbpatchWrapper), "not patched on import"
v = bert_victim(train_steps=40)
run = cases()["EmbeddingSwapGradientWIR"](v, v.texts[:2], v.labels[:2], 2)
with sbpatch.paused():
    expected = run()
got = run()
from sbpatch.verify import identical
print("calls", registry.counters("textattack").calls, "identical", identical(got, expected))
"""
    )
    out = run_python(args=[str(script)], env={"SBPATCH": "all"}, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "calls 2 identical True" in out.stdout, out.stdout + out.stderr[-3000:]


def test_verify_accepts_a_text_victim():
    """sbpatch.verify on a text victim runs the text libraries only (an image library named is skipped, noted)."""
    v = victim("lstm", "textattack")
    x, y = texts(v, 1)
    report = sbpatch.verify(v, x, y, libraries=["textattack", "torchattacks"], attacks=["DeepWordBugGao2018"],
                            progress=False)
    assert [(r.library, r.attack, r.result) for r in report] == [("textattack", "DeepWordBugGao2018", "identical")]
    assert report.ok and any("skipped torchattacks" in n for n in report.notes)


def test_bench_cli_with_a_text_model(tmp_path, capsys):
    """sbpatch bench --model lstm: the three columns on a text victim, identical, written as JSON."""
    import json

    from sbpatch.bench import cli

    out = tmp_path / "bench.json"
    argv = ["--model", "lstm", "--libraries", "textattack", "--attacks", "EmbeddingSwapGradientWIR", "--repeats", "1",
            "--batch-size", "1", "--steps", "2", "--json", str(out)]
    assert cli.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["library"], r["attack"], r["identical"], r["engaged"]) for r in rows] == [
        ("textattack", "EmbeddingSwapGradientWIR", True, True)
    ]
    assert rows[0]["params_with_grad"]["sbpatch"] == 1 < rows[0]["params_with_grad"]["shipped"]
    assert "| textattack | EmbeddingSwapGradientWIR |" in capsys.readouterr().out
