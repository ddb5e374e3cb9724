"""TextAttack: ``Attack.attack`` (every example of every recipe, ``Attacker.attack_dataset`` and adversarial training's
example generation goes through it); the victim is the model wrapper's ``model``.

What freezing changes: TextAttack's model wrappers already query under ``torch.no_grad()``, so black-box recipes
(DeepWordBug, Pruthi, TextFooler...) gain nothing but lose nothing either. Gradient-based parts (``get_grad``: the
``"gradient"`` word-importance ranking, ``WordSwapGradientBased``, HotFlip) run a backward pass: as shipped it computes
every weight gradient of the victim; frozen, only the word-embedding weight's (below) and the input-side backward.

The embedding: ``get_grad`` sets ``embedding.weight.requires_grad = True`` itself (and switches the model to
``train()`` and back to ``eval()``), reads the gradient at the embedding output with a backward hook, and then puts
the flag back to what it found. sbpatch therefore keeps the word-embedding weight live (``keep``) and freezes the rest:
TextAttack needs that weight's gradient anyway, its queries run under ``no_grad`` (a live weight costs them nothing),
and its save/restore of the flag then finds, and restores, ``True`` as it does unpatched. So the word-embedding
weight's gradient is still computed (TextAttack insists), nothing else's, and every ``requires_grad`` is as before the
call (a weight the user froze stays frozen: TextAttack restores ``False``). ``get_grad`` also calls
``model.zero_grad()``: as shipped the call leaves every ``param.grad`` cleared and refilled; with sbpatch cleared, and
refilled only for the word-embedding weight. The attack results are identical.

A model wrapper with no ``nn.Module`` behind it (scikit-learn, TensorFlow, a remote API) runs unpatched.
``Attacker.attack_dataset`` with ``parallel=True`` attacks in worker processes: they are patched only if they start
with ``SBPATCH`` set. The adversarial-training ``Trainer`` is never frozen; its example generation is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sbpatch.locate import NotTorch
from sbpatch.patching import Integration, Target

MODALITY = "text"  # cases() take a text victim (sbpatch.bench.text.TextVictim), texts and labels


def _modules_of(wrapper: Any) -> list[Any]:
    import torch

    module_type = torch.nn.Module
    model = getattr(wrapper, "model", None)
    if isinstance(model, module_type):
        return [model]
    if isinstance(wrapper, module_type):
        return [wrapper]
    return []


def _locate(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> list[Any]:
    """The module behind the goal function's model wrapper; NotTorch for a wrapper of another framework
    (scikit-learn, TensorFlow)."""
    return _modules_of(getattr(getattr(instance, "goal_function", None), "model", None)) or NotTorch()


def _keep_embedding(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> list[Any]:
    """The word-embedding layer ``get_grad`` sets live itself (``model.get_input_embeddings()``), if any."""
    for model in _locate(wrapped, instance, args, kwargs):
        get = getattr(model, "get_input_embeddings", None)
        layer = get() if callable(get) else None
        if layer is not None and getattr(layer, "weight", None) is not None:
            return [layer.weight]
    return []


INTEGRATION = Integration(
    name="textattack",
    distribution="textattack",
    module="textattack",
    supported=">=0.3.8,<0.4",
    targets=(Target("textattack.attack", "Attack.attack", _locate, subclasses=True, keep=_keep_embedding),),
    excluded={
        "textattack.Trainer": "adversarial training trains the model: never frozen (the attacks generating its "
        "adversarial examples are)",
        "textattack.Augmenter": "augmentation queries no victim: not wrapped",
    },
)

# Recipes (textattack.attack_recipes) that cannot run offline, and why: every other recipe is in cases().
OFFLINE_UNAVAILABLE: dict[str, str] = {
    "A2TYoo2021": "counter-fitted word embeddings, NLTK POS tagger and a sentence-BERT model (downloads)",
    "BAEGarg2019": "bert-base-uncased masked LM and the Universal Sentence Encoder (downloads; tensorflow_hub)",
    "BERTAttackLi2020": "bert-base-uncased masked LM and the Universal Sentence Encoder (downloads; tensorflow_hub)",
    "CheckList2020": "flair's NER tagger (a download)",
    "CLARE2020": "distilroberta-base masked LM and the Universal Sentence Encoder (downloads; tensorflow_hub)",
    "FasterGeneticAlgorithmJia2019": "counter-fitted word embeddings and the Google one-billion-words language "
    "model (downloads)",
    "GeneticAlgorithmAlzantot2018": "counter-fitted word embeddings and the Google language model (downloads)",
    "HotFlipEbrahimi2017": "counter-fitted word embeddings and NLTK's POS tagger (downloads); its gradient word "
    "swap runs here as a built attack (GradientSwapBeam)",
    "IGAWang2019": "counter-fitted word embeddings (a download); its embedding swap runs here in built attacks",
    "LEAP2023": "NLTK WordNet (a download)",
    "Kuleshov2017": "counter-fitted word embeddings (also behind its thought-vector constraint) and GPT-2 "
    "(downloads)",
    "MorpheusTan2020": "flair's upos-fast POS tagger (a download); its BLEU goal is for translation victims",
    "PSOZang2020": "HowNet sememes (OpenHowNet, a download)",
    "PWWSRen2019": "NLTK WordNet (a download)",
    "Seq2SickCheng2018BlackBox": "counter-fitted word embeddings (a download); a sequence-to-sequence victim",
    "TextBuggerLi2018": "counter-fitted word embeddings and the Universal Sentence Encoder (downloads; "
    "tensorflow_hub)",
    "TextFoolerJin2019": "counter-fitted word embeddings, NLTK's POS tagger and the Universal Sentence Encoder "
    "(downloads; tensorflow_hub); its search and embedding swap run here as a built attack",
    "ChineseRecipe": "Chinese HowNet, word embeddings and a Chinese masked LM (downloads)",
    "FrenchRecipe": "French word embeddings and a multilingual sentence encoder (downloads)",
    "SpanishRecipe": "Spanish word embeddings and a multilingual sentence encoder (downloads)",
}

Builder = Callable[[Any, Any, Any, int], Callable[[], Any]]


def cases() -> dict[str, Builder]:
    """One builder per offline-runnable recipe and per attack built from components (a local word embedding for the
    embedding swaps): ``builder(victim, texts, labels, steps)`` -> a call that attacks each ``(text, label)`` with
    ``Attack.attack`` and returns, per example, the result type, perturbed text, query count, output and score.

    ``victim``: a :class:`sbpatch.bench.text.TextVictim`. Each call first clears the attack's caches, so that two
    calls query the model alike.
    """
    import textattack
    from textattack import attack_recipes as recipes
    from textattack.constraints.overlap import MaxWordsPerturbed
    from textattack.constraints.pre_transformation import RepeatModification, StopwordModification
    from textattack.constraints.semantics import WordEmbeddingDistance
    from textattack.goal_functions import UntargetedClassification
    from textattack.search_methods import (
        AlzantotGeneticAlgorithm,
        BeamSearch,
        GreedySearch,
        GreedyWordSwapWIR,
        ParticleSwarmOptimization,
    )
    from textattack.transformations import (
        CompositeTransformation,
        WordSwapEmbedding,
        WordSwapGradientBased,
        WordSwapNeighboringCharacterSwap,
        WordSwapRandomCharacterDeletion,
    )

    def recipe(cls: Any) -> Builder:
        def build(victim: Any, texts: Any, labels: Any, steps: int) -> Callable[[], Any]:
            return _runner(cls.build(_wrapper(victim)), texts, labels)

        return build

    def built(make: Callable[[Any, Any, int], tuple[Any, list[Any], Any]]) -> Builder:
        """``make(wrapper, embedding, steps) -> (transformation, constraints, search method)``, built on the first
        call (a construction error is then the call's, reported as the library's)."""

        def build(victim: Any, texts: Any, labels: Any, steps: int) -> Callable[[], Any]:
            def attack() -> Any:
                wrapper = _wrapper(victim)
                transformation, constraints, search = make(wrapper, _word_embedding(victim), steps)
                return textattack.Attack(UntargetedClassification(wrapper), constraints, transformation, search)

            return _lazy_runner(attack, texts, labels)

        return build

    def bad_characters(victim: Any, steps: int, kind: str) -> Any:
        return recipes.BadCharacters2021.build(
            _wrapper(victim), "targeted_classification", kind, popsize=4, maxiter=steps, target_class=0
        )

    def base() -> list[Any]:
        return [RepeatModification(), StopwordModification()]

    def embedding_swap(embedding: Any) -> Any:
        return WordSwapEmbedding(max_candidates=4, embedding=embedding)

    def near(embedding: Any) -> list[Any]:
        return [*base(), WordEmbeddingDistance(embedding=embedding, min_cos_sim=0.5)]

    return {
        "DeepWordBugGao2018": recipe(recipes.DeepWordBugGao2018),
        "Pruthi2019": recipe(recipes.Pruthi2019),
        "InputReductionFeng2018": recipe(recipes.InputReductionFeng2018),
        # Untargeted in effect: every example is attacked towards class 0 (examples of class 0 are skipped). The
        # default perturbation (homoglyphs) reads a data file the 0.3.11 wheel lacks: built inside the call, so the
        # failure shows as the library's; the deletions variant runs.
        "BadCharacters2021": lambda v, t, y, s: _lazy_runner(lambda: bad_characters(v, s, "homoglyphs"), t, y),
        "BadCharacters2021-deletions": lambda v, t, y, s: _runner(bad_characters(v, s, "deletions"), t, y),
        # TextFooler's search and substitution, without its downloaded sentence encoder and POS tagger.
        "EmbeddingSwapGreedyWIR": built(lambda w, e, s: (embedding_swap(e), near(e), GreedyWordSwapWIR("delete"))),
        # Word importance by the gradient at the embedding (get_grad), then embedding swaps.
        "EmbeddingSwapGradientWIR": built(
            lambda w, e, s: (embedding_swap(e), near(e), GreedyWordSwapWIR("gradient"))
        ),
        # HotFlip (Ebrahimi 2017) without its POS constraint: gradient-based word swap, beam search. TextAttack
        # allows it on its own word-level LSTM only (on BERT it raises, as shipped).
        "GradientSwapBeam": built(
            lambda w, e, s: (WordSwapGradientBased(w, top_n=2), [*base(), MaxWordsPerturbed(max_num_words=2)],
                             BeamSearch(beam_width=2))
        ),
        # Alzantot 2018 / Jia 2019 without their downloaded language model.
        "EmbeddingSwapGenetic": built(
            lambda w, e, s: (embedding_swap(e), near(e),
                             AlzantotGeneticAlgorithm(pop_size=4, max_iters=s, post_crossover_check=False))
        ),
        # Zang 2020 with embedding swaps instead of HowNet sememes.
        "EmbeddingSwapPSO": built(
            lambda w, e, s: (embedding_swap(e), near(e), ParticleSwarmOptimization(pop_size=4, max_iters=s))
        ),
        "CharSwapGreedy": built(
            lambda w, e, s: (CompositeTransformation([WordSwapNeighboringCharacterSwap(),
                                                      WordSwapRandomCharacterDeletion()]), base(), GreedySearch())
        ),
    }


def _wrapper(victim: Any) -> Any:
    import transformers
    from textattack.models.wrappers import HuggingFaceModelWrapper, PyTorchModelWrapper

    if isinstance(victim.model, transformers.PreTrainedModel):
        return HuggingFaceModelWrapper(victim.model, victim.tokenizer)
    return PyTorchModelWrapper(victim.model, victim.tokenizer)


def _word_embedding(victim: Any) -> Any:
    """TextAttack's ``WordEmbedding`` over the victim's local word vectors, nearest neighbours precomputed."""
    import numpy as np
    from textattack.shared import WordEmbedding

    vectors = np.asarray(victim.vectors, dtype="float32")
    distances = ((vectors[:, None, :] - vectors[None, :, :]) ** 2).sum(-1)
    nn_matrix = np.argsort(distances, axis=1, kind="stable")
    words = list(victim.words)
    return WordEmbedding(vectors, {w: i for i, w in enumerate(words)}, dict(enumerate(words)), nn_matrix)


def _runner(attack: Any, texts: Any, labels: Any) -> Callable[[], Any]:
    def run() -> list[tuple[Any, ...]]:
        attack.clear_cache()
        return [_summary(attack.attack(t, y)) for t, y in zip(texts, labels)]

    return run


def _lazy_runner(make: Callable[[], Any], texts: Any, labels: Any) -> Callable[[], Any]:
    """A runner whose attack is built on the first call (a construction error is then the call's)."""
    built: list[Any] = []

    def run() -> list[tuple[Any, ...]]:
        if not built:
            built.append(make())
        return _runner(built[0], texts, labels)()

    return run


def _summary(result: Any) -> tuple[Any, ...]:
    """The deterministic content of an ``AttackResult``."""
    import numpy as np

    perturbed = result.perturbed_result
    output = perturbed.raw_output
    if hasattr(output, "detach"):
        output = output.detach().cpu().numpy()
    return (
        type(result).__name__,
        perturbed.attacked_text.text,
        perturbed.num_queries,
        perturbed.output,
        np.float64(perturbed.score),
        np.asarray(output),
    )
