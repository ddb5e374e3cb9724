"""Text attacks with sbpatch: a TextAttack ``Attacker`` run and an OpenAttack ``AttackEval`` on a BERT, offline.

The victim is a small ``BertForSequenceClassification`` built here (no download: ``sbpatch.bench.text`` writes its
vocabulary and trains it a few steps on made-up reviews). Each library's attack runs as shipped
(``sbpatch.paused()``) and patched, with the same seeds; the script prints whether the adversarial examples are
identical, which parameters the attack left a ``.grad`` on, and the CPU time.

    python examples/text_attack.py
"""

from __future__ import annotations

import random
import time

import numpy as np
import torch

import sbpatch
from sbpatch.bench.text import bert_victim, offline

offline()  # before TextAttack is imported: NLTK stop-words, TextAttack's cache and Hugging Face, all local
sbpatch.enable()  # OpenAttack and TextAttack are patched when imported

import OpenAttack  # noqa: E402
import textattack  # noqa: E402
from textattack.constraints.pre_transformation import RepeatModification, StopwordModification  # noqa: E402
from textattack.constraints.semantics import WordEmbeddingDistance  # noqa: E402
from textattack.goal_functions import UntargetedClassification  # noqa: E402
from textattack.search_methods import GreedyWordSwapWIR  # noqa: E402
from textattack.transformations import WordSwapEmbedding  # noqa: E402

from sbpatch.contrib import openattack as oa_local  # noqa: E402
from sbpatch.contrib import textattack as ta_local  # noqa: E402

torch.set_num_threads(1)
victim = bert_victim(layers=2, hidden=64, train_steps=60)
model, tokenizer = victim.model, victim.tokenizer
texts, labels = victim.texts[:4], victim.labels[:4]


def seeded(run):
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    model.zero_grad(set_to_none=True)
    start = time.process_time()
    out = run()
    seconds = time.process_time() - start
    with_grad = sum(p.grad is not None for p in model.parameters())
    model.zero_grad(set_to_none=True)
    return out, seconds, with_grad


def compare(name, run):
    with sbpatch.paused():  # the library as shipped
        shipped, t_shipped, g_shipped = seeded(run)
    patched, t_patched, g_patched = seeded(run)
    print(f"{name}: identical: {shipped == patched}")
    print(f"  parameters with .grad left by the attack: as shipped {g_shipped}, with sbpatch {g_patched}")
    print(f"  CPU time: as shipped {t_shipped:.2f} s, with sbpatch {t_patched:.2f} s ({t_shipped / t_patched:.2f}x)")
    return patched


# TextAttack: word importance from the gradient at the embedding (get_grad), then embedding swaps. The local word
# embedding stands in for the counter-fitted vectors TextAttack would download.
embedding = ta_local._word_embedding(victim)
attack = textattack.Attack(
    UntargetedClassification(textattack.models.wrappers.HuggingFaceModelWrapper(model, tokenizer)),
    [RepeatModification(), StopwordModification(), WordEmbeddingDistance(embedding=embedding, min_cos_sim=0.5)],
    WordSwapEmbedding(max_candidates=4, embedding=embedding),
    GreedyWordSwapWIR("gradient"),
)
dataset = textattack.datasets.Dataset(list(zip(texts, labels)))
args = textattack.AttackArgs(num_examples=len(texts), silent=True, disable_stdout=True, random_seed=0)


def textattack_run():
    attack.clear_cache()
    results = textattack.Attacker(attack, dataset, args).attack_dataset()
    return [r.perturbed_result.attacked_text.text for r in results]


adversarial = compare("TextAttack", textattack_run)
print(f"  e.g. {texts[0]!r} -> {adversarial[0]!r}")

# OpenAttack: PWWS through AttackEval. A whitespace tokenizer and the local embedding stand in for OpenAttack's
# NLTK tokenizer and WordNet substitute (downloads).
classifier = OpenAttack.classifiers.TransformersClassifier(model, tokenizer, model.bert.embeddings.word_embeddings)
pwws = OpenAttack.attackers.PWWSAttacker(tokenizer=oa_local.english_tokenizer(), substitute=oa_local.substitute(victim))
evaluation = OpenAttack.AttackEval(pwws, classifier, tokenizer=oa_local.english_tokenizer())


def openattack_run():
    data = [{"x": t, "y": y} for t, y in zip(texts, labels)]
    return [r["result"] for r in evaluation.ieval(data)]


compare("OpenAttack", openattack_run)
print(f"frozen attack calls: TextAttack {sbpatch.status()['textattack'].calls}, "
      f"OpenAttack {sbpatch.status()['openattack'].calls}")
