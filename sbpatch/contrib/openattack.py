"""OpenAttack: every attacker's ``__call__`` and ``attack``; the victim is the ``Classifier`` they are given.

What is wrapped: ``Attacker.__call__`` and ``Attacker.attack``, and the override of each in every subclass
(``ClassificationAttacker.__call__``, and ``attack`` of PWWS, Genetic, PSO, FD, HotFlip, UAT, DeepWordBug, TextBugger,
VIPER, BERTAttack, BAE, TextFooler, GAN, SCPN, and of any attacker the user defines later). ``AttackEval.eval`` and
``ieval`` run every example through ``attacker(victim, data)``, so they are covered (with ``num_workers > 0`` the
examples run in worker processes, which are patched only if they start with ``SBPATCH`` set). The victim's modules:
``victim.model`` (``TransformersClassifier``), or every ``nn.Module`` attribute of a user's own ``Classifier``; the
attacker's own masked language model (``mlm_model`` of BERTAttack and BAE, which it runs with gradients on) too.

Why it pays: ``TransformersClassifier`` answers every query, even a plain prediction, through ``get_grad``: a forward
pass with gradients and ``(-loss).backward()``. As shipped that computes every weight gradient of the victim (and
leaves them accumulating in ``param.grad``); frozen, only the input-side backward runs.

The embedding (the choice, and why): ``get_grad`` reads the gradient at the output of the word-embedding layer, which
a forward hook of OpenAttack's (``HookCloser``) keeps with ``retain_grad()``. With every parameter frozen that output
needs no gradient and ``retain_grad()`` raises ("can't retain_grad on Tensor that has requires_grad=False"). Keeping
the word-embedding weight live would fix it, but then every query computes and accumulates a dense vocabulary x hidden
weight gradient. sbpatch instead freezes everything and, for the duration of the call, puts a forward hook *in front
of* OpenAttack's on ``victim.embedding_layer`` that makes the (leaf) embedding output require grad: the same
gradient reaches ``get_grad``, no parameter gradient is computed at all, and the adversarial examples are identical.
The hook acts only where the output would have required grad as shipped (grad mode on, embedding weight trainable when
the call began); it is removed when the last overlapping call on that layer ends.

Not wrapped: ``UATAttacker.get_triggers`` (see ``excluded``). Nothing in OpenAttack trains the victim.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import Any

from sbpatch.locate import NotTorch
from sbpatch.patching import Integration, Target

MODALITY = "text"  # cases() take a text victim (sbpatch.bench.text.TextVictim), texts and labels


def _victim(args: tuple, kwargs: dict) -> Any:
    if args:
        return args[0]
    return kwargs.get("victim", kwargs.get("clsf"))


def _modules_of(victim: Any) -> list[Any]:
    import torch

    module_type = torch.nn.Module
    model = getattr(victim, "model", None)
    if isinstance(model, module_type):
        return [model]
    try:
        values = list(vars(victim).values())
    except TypeError:
        return []
    found: list[Any] = []
    for v in values:
        if isinstance(v, module_type) and all(v is not m for m in found):
            found.append(v)
    return found


def _locate(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> list[Any]:
    """The victim classifier's modules, and the attacker's own masked language model (BERTAttack, BAE)."""
    import torch

    modules = _modules_of(_victim(args, kwargs))
    if not modules:  # a victim of another framework, or an API: nothing to freeze, nothing to warn about
        return NotTorch()
    mlm = getattr(instance, "mlm_model", None)
    if isinstance(mlm, torch.nn.Module):
        modules.append(mlm)
    return modules


_hooks_lock = threading.Lock()
_hooks: dict[int, list[Any]] = {}  # id(embedding layer) -> [overlapping calls, hook handle or None]


def _require_grad(module: Any, inputs: Any, output: Any) -> None:
    import torch

    if isinstance(output, torch.Tensor) and torch.is_grad_enabled() and not output.requires_grad and output.is_leaf:
        output.requires_grad_()


@contextlib.contextmanager
def _embedding_output_requires_grad(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Iterator[None]:
    """While the call runs, the victim's word-embedding output requires grad although its weight is frozen."""
    layer = getattr(_victim(args, kwargs), "embedding_layer", None)
    weight = getattr(layer, "weight", None)
    if weight is None or not hasattr(layer, "register_forward_hook"):
        yield
        return
    key = id(layer)
    with _hooks_lock:
        entry = _hooks.get(key)
        if entry is None:
            # Trainable when the first call arrives: as shipped its output requires grad. A weight the user froze is
            # left alone (OpenAttack then fails as it does unpatched).
            handle = layer.register_forward_hook(_require_grad, prepend=True) if weight.requires_grad else None
            entry = _hooks[key] = [0, handle]
        entry[0] += 1
    try:
        yield
    finally:
        with _hooks_lock:
            entry[0] -= 1
            if not entry[0]:
                del _hooks[key]
                if entry[1] is not None:
                    entry[1].remove()


def _target(path: str) -> Target:
    return Target("OpenAttack.attackers.base", path, _locate, subclasses=True, context=_embedding_output_requires_grad)


INTEGRATION = Integration(
    name="openattack",
    distribution="OpenAttack",
    module="OpenAttack",
    supported=">=2.1,<3",
    targets=(_target("Attacker.__call__"), _target("Attacker.attack")),
    excluded={
        "OpenAttack.attackers.UATAttacker.get_triggers": "not wrapped: its trigger search always loads OpenAttack's "
        "default NLTK tokenizer (a download, pickled, which NLTK >= 3.9 refuses to load), so it cannot be tested "
        "here; UAT attacks with given triggers are frozen",
    },
)

# Attackers sbpatch wraps but cannot run offline: what each needs (cases() has every other exported attacker).
OFFLINE_UNAVAILABLE: dict[str, str] = {
    "TextFooler": "needs the Universal Sentence Encoder (tensorflow, tensorflow_hub and a download) in its constructor",
    "BAE": "needs the Universal Sentence Encoder (tensorflow, tensorflow_hub and a download) and OpenAttack's NLTK "
    "POS tagger (a download)",
    "GAN": "needs OpenAttack's pretrained GAN, autoencoder and inverter (AttackAssist.GAN/SGAN: a download)",
    "SCPN": "needs OpenAttack's pretrained SCPN paraphraser and a Stanford constituency parser (downloads)",
    "SememePSO": "PSO with its default HowNet sememe substitute needs OpenAttack's HowNet data (a download); PSO runs "
    "here with an embedding substitute",
    "GEO": "not exported by OpenAttack 2.1.1 (its import of torch.autograd.gradcheck.zero_gradients is commented out)",
}

Builder = Callable[[Any, Any, Any, int], Callable[[], Any]]


def cases() -> dict[str, Builder]:
    """One builder per OpenAttack attacker that runs offline: ``builder(victim, texts, labels, steps)`` -> a call.

    ``victim``: a :class:`sbpatch.bench.text.TextVictim` (``model``, ``tokenizer``, ``embedding``, and a local word
    embedding ``words``/``vectors`` for the substitutes). The call attacks each text and returns the adversarial
    texts (None where the attack failed). Attackers need English tags on the tokenizer and substitute, so a
    whitespace tokenizer and an embedding substitute over ``words``/``vectors`` stand in for OpenAttack's defaults
    (NLTK and WordNet downloads); BERTAttack gets a small masked language model saved locally.
    """
    import OpenAttack as oa

    oa.DataManager.setAutoDownload(False)  # a missing resource raises instead of downloading
    tokenizer = english_tokenizer()

    def simple(make: Callable[[Any, int], Any]) -> Builder:
        def build(victim: Any, texts: Any, labels: Any, steps: int) -> Callable[[], Any]:
            attacker = make(victim, steps)
            classifier = _classifier(victim)

            def run() -> list[Any]:
                with attached(classifier):
                    return [_attack(attacker, classifier, t, y) for t, y in zip(texts, labels)]

            return run

        return build

    def bert_attack(victim: Any, steps: int) -> Any:
        with tempfile.TemporaryDirectory() as path:
            _save_masked_lm(victim, path)
            return oa.attackers.BERTAttacker(mlm_path=path, k=4, use_bpe=False, device=_device(victim))

    return {
        "PWWS": simple(lambda v, s: oa.attackers.PWWSAttacker(tokenizer=tokenizer, substitute=substitute(v))),
        "Genetic": simple(
            lambda v, s: oa.attackers.GeneticAttacker(
                pop_size=4, max_iters=s, tokenizer=tokenizer, substitute=substitute(v)
            )
        ),
        "PSO": simple(
            lambda v, s: oa.attackers.PSOAttacker(
                pop_size=4, max_iters=s, tokenizer=tokenizer, substitute=substitute(v)
            )
        ),
        "FD": simple(
            lambda v, s: oa.attackers.FDAttacker(substitute=substitute(v), tokenizer=tokenizer, max_iter=5 * s)
        ),
        "HotFlip": simple(lambda v, s: oa.attackers.HotFlipAttacker(substitute=substitute(v), tokenizer=tokenizer)),
        "UAT": simple(lambda v, s: oa.attackers.UATAttacker(triggers=["bad", "awful", "the"], tokenizer=tokenizer)),
        "DeepWordBug": simple(lambda v, s: oa.attackers.DeepWordBugAttacker(power=2, tokenizer=tokenizer)),
        "TextBugger": simple(
            lambda v, s: oa.attackers.TextBuggerAttacker(blackbox=True, tokenizer=tokenizer, substitute=substitute(v))
        ),
        "TextBuggerWhiteBox": simple(
            lambda v, s: oa.attackers.TextBuggerAttacker(blackbox=False, tokenizer=tokenizer, substitute=substitute(v))
        ),
        "VIPER": simple(lambda v, s: oa.attackers.VIPERAttacker(generations=2 * s)),
        "BERTAttack": simple(bert_attack),
    }


_LOCAL_TYPES: dict[str, type] = {}


def _local_types() -> dict[str, type]:
    """A whitespace tokenizer and an embedding substitute tagged English (OpenAttack checks languages by tags)."""
    if not _LOCAL_TYPES:
        from OpenAttack.attack_assist.substitute.word import EmbedBasedSubstitute
        from OpenAttack.tags import TAG_English
        from OpenAttack.text_process.tokenizer import Tokenizer

        class WhitespaceTokenizer(Tokenizer):
            TAGS = {TAG_English}

            def do_tokenize(self, x: str, pos_tagging: bool) -> Any:
                tokens = x.split()
                return [(t, "noun") for t in tokens] if pos_tagging else tokens

            def do_detokenize(self, x: list[str]) -> str:
                return " ".join(x)

        class LocalSubstitute(EmbedBasedSubstitute):
            TAGS = {TAG_English}

        _LOCAL_TYPES.update(tokenizer=WhitespaceTokenizer, substitute=LocalSubstitute)
    return _LOCAL_TYPES


def english_tokenizer() -> Any:
    """An OpenAttack ``Tokenizer`` that splits on whitespace (OpenAttack's default needs NLTK downloads)."""
    return _local_types()["tokenizer"]()


def substitute(victim: Any, k: int = 6, threshold: float = 1.0) -> Any:
    """An OpenAttack word substitute over the victim's local embedding (``victim.words``, ``victim.vectors``): the
    ``k`` nearest words within Euclidean distance ``threshold`` (OpenAttack's defaults are downloads)."""
    import numpy as np
    import torch

    word2id = {w: i for i, w in enumerate(victim.words)}
    return _local_types()["substitute"](word2id, torch.tensor(np.asarray(victim.vectors)), k=k, threshold=threshold)


def _attack(attacker: Any, classifier: Any, text: str, label: int) -> Any:
    return attacker(classifier, {"x": text, "y": label})


def _device(victim: Any) -> Any:
    return next(victim.model.parameters()).device


def _classifier(victim: Any) -> Any:
    """The OpenAttack classifier over ``victim``, cached on it, without its embedding hook: use it inside
    :func:`attached`. (OpenAttack's classifier registers a ``retain_grad`` hook on the embedding layer for good, after
    which any ``no_grad`` forward of the model fails: the victim would be unusable by the other library.)"""
    cached = getattr(victim, "_openattack_classifier", None)
    if cached is not None:
        return cached
    import OpenAttack as oa
    import transformers

    if isinstance(victim.model, transformers.PreTrainedModel):
        classifier = oa.classifiers.TransformersClassifier(
            victim.model, victim.tokenizer, victim.embedding, device=_device(victim), max_length=victim.max_length
        )
    else:
        classifier = _torch_classifier_type()(victim.model, victim.tokenizer, victim.embedding)
    classifier.hook.remove()
    try:
        victim._openattack_classifier = classifier
    except AttributeError:
        pass
    return classifier


@contextlib.contextmanager
def attached(classifier: Any) -> Iterator[Any]:
    """OpenAttack's embedding hook (``HookCloser``) on ``classifier.embedding_layer`` for the duration of the block."""
    from OpenAttack.utils import HookCloser

    handle = classifier.embedding_layer.register_forward_hook(HookCloser(classifier))
    try:
        yield classifier
    finally:
        handle.remove()


_TORCH_CLASSIFIER: list[type] = []


def _torch_classifier_type() -> type:
    """A user-style OpenAttack ``Classifier`` for a plain PyTorch word classifier: ``model(ids) -> logits``, with a
    word-level ``tokenizer(list of texts) -> padded ids`` (TextAttack's ``GloveTokenizer`` for its LSTM).

    It follows ``TransformersClassifier``: every query runs with gradients, and the gradient at the embedding output
    is read through OpenAttack's own ``HookCloser`` (``retain_grad``).
    """
    if _TORCH_CLASSIFIER:
        return _TORCH_CLASSIFIER[0]
    import torch
    from OpenAttack import Classifier
    from OpenAttack.attack_assist.word_embedding import WordEmbedding
    from OpenAttack.utils import HookCloser

    class TorchClassifier(Classifier):
        def __init__(self, model: Any, tokenizer: Any, embedding_layer: Any) -> None:
            self.model = model
            self.tokenizer = tokenizer
            self.embedding_layer = embedding_layer
            self.curr_embedding = None
            self.hook = embedding_layer.register_forward_hook(HookCloser(self))  # as TransformersClassifier does

        def get_pred(self, input_: list[str]) -> Any:
            return self.get_prob(input_).argmax(axis=1)

        def get_prob(self, input_: list[str]) -> Any:
            return self.get_grad([s.split() for s in input_], [0] * len(input_))[0]

        def get_grad(self, input_: list[list[str]], labels: list[int]) -> Any:
            device = next(self.model.parameters()).device
            ids = torch.tensor(self.tokenizer([" ".join(sent) for sent in input_]), device=device)
            logits = self.model(ids)
            loss = -torch.nn.functional.cross_entropy(logits, torch.tensor(labels, device=device))
            loss.backward()
            grad = self.curr_embedding.grad.clone()
            if grad.shape[0] != len(input_):  # embedded as (length, batch)
                grad = grad.transpose(0, 1)
            self.curr_embedding.grad.zero_()
            self.curr_embedding = None
            width = max(len(sent) for sent in input_)  # one id per word: the positions of the words
            return torch.softmax(logits, -1).detach().cpu().numpy(), grad[:, :width].cpu().numpy()

        def get_embedding(self) -> Any:
            return WordEmbedding(self.tokenizer.get_vocab(), self.embedding_layer.weight.detach().cpu().numpy())

    _TORCH_CLASSIFIER.append(TorchClassifier)
    return TorchClassifier


def _save_masked_lm(victim: Any, path: str) -> None:
    """A small random ``BertForMaskedLM`` and a ``BertTokenizer`` over the victim's words, saved at ``path``."""
    import torch
    from transformers import BertConfig, BertForMaskedLM, BertTokenizer

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = list(dict.fromkeys(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *victim.words, *letters,
                                *(f"##{c}" for c in letters)]))
    vocab_file = os.path.join(path, "vocab.txt")
    with open(vocab_file, "w") as f:
        f.write("\n".join(vocab) + "\n")
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=64,
    )
    BertForMaskedLM(config).save_pretrained(path)
    torch.random.set_rng_state(state)
    BertTokenizer(vocab_file, do_lower_case=True).save_pretrained(path)
