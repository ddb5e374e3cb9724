"""Text victims for the OpenAttack and TextAttack tests: a tiny BERT and TextAttack's LSTM, built offline once.

Both come from :mod:`sbpatch.bench.text` (the same victims ``sbpatch verify``/``bench`` and ``benchmarks/table4.py``
use): a made-up sentiment vocabulary, a ``BertTokenizer`` over a ``vocab.txt`` written there, a few training steps so
that word substitutions flip the prediction, one user-frozen parameter, and a local word embedding in which each
sentiment word sits next to its antonym (the substitutes of both libraries read it). ``conftest.py`` has already
made NLTK, TextAttack and Hugging Face offline for the whole session.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from sbpatch.bench import text
from sbpatch.bench.text import TextVictim

MODELS = ("bert", "lstm")
N_TEXTS = 4  # examples per attack call: enough to see successes and failures, fast on 2 cores
STEPS = 2


@functools.cache
def victim(name: str, library: str) -> TextVictim:
    """The session's victim ``name`` for ``library`` (``"bert"``: 2 layers, hidden 32; ``"lstm"``: TextAttack's
    LSTM, hidden 32). One per library: an OpenAttack classifier leaves a forward hook on the embedding layer for good
    (its ``retain_grad``, which then fails in any ``no_grad`` forward, TextAttack's queries included)."""
    v = text.text_victim(name, train_steps=60)
    assert v.accuracy > 0.9, f"the {name} victim did not learn the made-up task ({v.accuracy:.2f})"
    assert v.model.training is False
    return v


def texts(v: TextVictim, n: int = N_TEXTS) -> tuple[list[str], list[int]]:
    return v.texts[:n], v.labels[:n]


def capture(run: Callable[[], Any], into: list[Any]) -> Callable[[], Any]:
    """``run`` that also appends each result to ``into``."""

    def wrapped() -> Any:
        result = run()
        into.append(result)
        return result

    return wrapped


def grads_written(model: torch.nn.Module, run: Callable[[], Any]) -> tuple[Any, list[str]]:
    """Run ``run`` with every ``.grad`` set to None; the result and the names of the parameters it left a ``.grad``."""
    model.zero_grad(set_to_none=True)
    result = run()
    names = [n for n, p in model.named_parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    return result, names
