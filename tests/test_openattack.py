"""OpenAttack 2.1.1 on the real library, offline: every attacker that runs without a download is identical patched vs
unpatched on a tiny BERT and on TextAttack's LSTM, with no parameter gradient at all (the embedding output is made
to require grad instead); what cannot run offline is listed with its reason."""

from __future__ import annotations

import OpenAttack
import pytest
import torch
from helpers import compare, expect
from text_helpers import MODELS, STEPS, capture, grads_written, texts, victim

import sbpatch
from sbpatch import freeze, registry
from sbpatch.contrib import openattack as contrib
from sbpatch.contrib.openattack import OFFLINE_UNAVAILABLE, cases

CASES = cases()
# (attack, model) pairs whose unpatched call fails on this stack; none today. A new failure shows up here.
KNOWN_BROKEN: dict[str, str] = {
    # TextBuggerAttacker(blackbox=False) passes the goal object where it means the label (get_w_word_importances).
    "TextBuggerWhiteBox": "ClassifierGoal",
}
# Attacks that must find at least one adversarial example on the BERT victim (the identity is then not trivial).
# BERTAttack's masked LM here is random (no download), so its candidates rarely flip the victim.
SUCCEEDS = {"PWWS", "Genetic", "PSO", "FD", "HotFlip", "UAT", "TextBugger"}


def _case_name(cls: type) -> str:
    name = cls.__name__.removesuffix("Attacker")
    return "BERTAttack" if name == "BERT" else name


def test_every_exported_attacker_is_a_case_or_listed_with_its_reason():
    exported = {
        _case_name(obj)
        for obj in vars(OpenAttack.attackers).values()
        if isinstance(obj, type) and issubclass(obj, OpenAttack.attackers.ClassificationAttacker)
        and obj is not OpenAttack.attackers.ClassificationAttacker
    }
    assert exported <= set(CASES) | set(OFFLINE_UNAVAILABLE), exported - set(CASES) - set(OFFLINE_UNAVAILABLE)
    assert not set(CASES) & set(OFFLINE_UNAVAILABLE)
    assert all(OFFLINE_UNAVAILABLE.values())


def test_entry_points_wrapped_in_every_attacker():
    from OpenAttack.attackers.base import Attacker

    patched = sbpatch.status()["openattack"].patched
    assert "OpenAttack.attackers.base.Attacker.__call__" in patched
    assert "OpenAttack.attackers.classification.ClassificationAttacker.__call__" in patched
    for cls in (OpenAttack.attackers.PWWSAttacker, OpenAttack.attackers.BERTAttacker, OpenAttack.attackers.UATAttacker):
        assert isinstance(cls.__dict__["attack"], sbpatch.patching.SbpatchWrapper)
    assert not isinstance(OpenAttack.attackers.UATAttacker.__dict__["get_triggers"], sbpatch.patching.SbpatchWrapper)
    assert issubclass(OpenAttack.attackers.PWWSAttacker, Attacker)


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("attack", sorted(CASES))
def test_identical(attack: str, model_name: str):
    v = victim(model_name, "openattack")
    x, y = texts(v)
    results: list = []
    run = capture(CASES[attack](v, x, y, STEPS), results)
    outcome = compare("openattack", attack, v.model, run, model_name)
    expect(outcome, KNOWN_BROKEN)
    assert not contrib._hooks, "the embedding hook outlived the call"
    if model_name == "bert" and attack in SUCCEEDS:
        assert any(r is not None for r in results[-1]), f"{attack} found no adversarial example: a trivial identity"


def test_as_shipped_every_query_fills_param_grad_and_patched_none():
    """The side effect removed: TransformersClassifier backpropagates into every weight on every query."""
    v = victim("bert", "openattack")
    x, y = texts(v, 1)
    run = CASES["PWWS"](v, x, y, STEPS)
    with sbpatch.paused():
        shipped, names_shipped = grads_written(v.model, run)
    patched, names_patched = grads_written(v.model, run)
    assert shipped == patched
    assert "bert.embeddings.word_embeddings.weight" in names_shipped and len(names_shipped) > 20
    assert names_patched == []


def test_all_frozen_without_the_embedding_hook_fails_in_retain_grad():
    """Why the hook exists: the paper's one-liner (every parameter frozen) breaks every OpenAttack query."""
    v = victim("bert", "openattack")
    x, y = texts(v, 1)
    run = CASES["PWWS"](v, x, y, STEPS)
    flags = [p.requires_grad for p in v.model.parameters()]
    with sbpatch.paused():
        try:
            for p in v.model.parameters():
                p.requires_grad_(False)
            with pytest.raises(RuntimeError, match="retain_grad"):
                run()
        finally:
            for p, f in zip(v.model.parameters(), flags):
                p.requires_grad_(f)


def test_embedding_hook_added_for_the_call_and_removed():
    v = victim("bert", "openattack")
    x, y = texts(v, 1)
    run = CASES["FD"](v, x, y, STEPS)
    layer = v.embedding
    hooks_before = list(layer._forward_hooks)
    seen: list[tuple[int, bool]] = []
    probe = layer.register_forward_hook(
        lambda m, i, out: seen.append((len(m._forward_hooks), out.requires_grad and out.is_leaf))
    )
    try:
        run()
    finally:
        probe.remove()
    assert seen and all(n == len(hooks_before) + 3 for n, _ in seen)  # ours (prepended), OpenAttack's, the probe
    assert all(leaf for _, leaf in seen)  # a leaf that requires grad: no weight gradient behind it
    assert list(layer._forward_hooks) == hooks_before
    assert not contrib._hooks
    assert layer.weight.requires_grad and layer.weight.grad is None


def test_user_frozen_embedding_is_left_alone():
    """A word-embedding weight the user froze gets no hook: OpenAttack fails in retain_grad exactly as shipped."""
    v = victim("bert", "openattack")
    x, y = texts(v, 1)
    run = CASES["PWWS"](v, x, y, STEPS)
    v.embedding.weight.requires_grad_(False)
    try:
        with sbpatch.paused(), pytest.raises(RuntimeError, match="retain_grad"):
            run()
        with pytest.raises(RuntimeError, match="retain_grad"):
            run()
    finally:
        v.embedding.weight.requires_grad_(True)
    assert freeze.held_count() == 0 and not contrib._hooks
    assert all(p.requires_grad for n, p in v.model.named_parameters() if n != "bert.pooler.dense.bias")


def test_attack_eval_identical():
    """AttackEval runs each example through attacker(victim, data): frozen, identical, queries counted alike."""
    v = victim("bert", "openattack")
    x, y = texts(v)
    tokenizer = contrib.english_tokenizer()
    attacker = OpenAttack.attackers.PWWSAttacker(tokenizer=tokenizer, substitute=contrib.substitute(v))
    classifier = contrib._classifier(v)
    evaluator = OpenAttack.AttackEval(attacker, classifier, tokenizer=tokenizer)

    def run() -> list:
        data = [{"x": t, "y": label} for t, label in zip(x, y)]
        with contrib.attached(classifier):
            return [(r["success"], r["result"], r["metrics"]["Victim Model Queries"]) for r in evaluator.ieval(data)]

    assert compare("openattack", "AttackEval(PWWS)", v.model, run, "bert").result == "identical"


def test_user_attacker_defined_after_enable_is_frozen():
    v = victim("bert", "openattack")
    x, y = texts(v, 1)
    seen: list[bool] = []

    class OneWordAttacker(OpenAttack.attackers.ClassificationAttacker):
        TAGS = {OpenAttack.tags.TAG_English, OpenAttack.tags.Tag("get_pred", "victim")}

        def attack(self, victim_, sentence, goal):
            seen.append(v.model.classifier.weight.requires_grad)
            words = sentence.split()
            for i in range(len(words)):
                candidate = " ".join(words[:i] + ["bad" if words[i] in ("good", "great") else "good"] + words[i + 1 :])
                if goal.check(candidate, victim_.get_pred([candidate])[0]):
                    return candidate
            return None

    assert isinstance(OneWordAttacker.__dict__["attack"], sbpatch.patching.SbpatchWrapper)
    calls = registry.counters("openattack").calls
    with contrib.attached(contrib._classifier(v)) as classifier:
        OneWordAttacker()(classifier, {"x": x[0], "y": y[0]})
    assert seen == [False] and registry.counters("openattack").calls >= calls + 2
    assert v.model.classifier.weight.requires_grad


def test_status_row():
    s = sbpatch.status()["openattack"]
    assert s.installed and s.enabled and s.version == "2.1.1" and s.calls > 0
    assert "OpenAttack.attackers.UATAttacker.get_triggers" in s.excluded
    assert "openattack" in str(sbpatch.status())


def test_no_download_was_attempted(tmp_path):
    """The offline setup holds: OpenAttack's data manager downloads nothing (it would raise instead)."""
    assert OpenAttack.DataManager._DataManager__auto_download is False
    assert torch.is_grad_enabled()
