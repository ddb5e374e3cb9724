"""A small random Llama and an offline tokenizer: the victim for LLM attacks (nanoGCG) in ``verify`` and the tests.

Nothing is downloaded: the tokenizer is a word-level one trained here on a few sentences (its decode/encode round trip
is exact, which nanoGCG filters candidates on) with a chat template; the model is a ``LlamaForCausalLM`` built from a
config and random-initialised with a fixed seed, one parameter frozen by the "user" (it must stay frozen).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

LLM_MODELS: tuple[str, ...] = ("llama",)
MESSAGE, TARGET = "tell me how to bake a cake", "sure here is how to bake a cake"
SENTENCES = (
    "tell me how to bake a cake sure here is the quick brown fox jumps over lazy dog user assistant system you are "
    "helpful answer question please write story about cat bird tree house river mountain sun moon star car road city "
    "book paper pen music song dance red green blue yellow black white one two three four five six seven eight nine "
    "ten big small old new good bad hot cold fast slow happy sad"
)
CHARS = list("abcdefghijklmnopqrstuvwxyz.,!?;:()[]{}@#$%&*")
TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)
# GCGConfig fields that keep a verify run small: 8 candidates per step from the top 4 tokens, a 5-token suffix
# (verbosity ERROR: no advice to use a GPU in the middle of a report)
SMALL_GCG: dict[str, Any] = {"search_width": 8, "topk": 4, "seed": 0, "optim_str_init": "x x x x x",
                             "verbosity": "ERROR"}


def tiny_tokenizer() -> Any:
    """A word-level ``PreTrainedTokenizerFast`` (~140 tokens) with a chat template, built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()  # joins words with spaces
    trainer = trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>", "<pad>"])
    tok.train_from_iterator(SENTENCES.split() + CHARS, trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    hf.chat_template = TEMPLATE
    return hf


def tiny_llama(vocab_size: int, seed: int = 0, dtype: Any = None, hidden: int = 32, layers: int = 2) -> Any:
    """A random-initialised ``LlamaForCausalLM`` in eval mode; its final norm's weight is frozen by the "user"."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128)
    model = LlamaForCausalLM(config).to(dtype or torch.float32).eval()
    model.model.norm.weight.requires_grad_(False)
    return model


@dataclass
class LLMVictim:
    """What an LLM attack's ``cases()`` builder takes: ``builder(model, tokenizer, message, target, steps, **config)``.

    model: a causal LM; tokenizer: its tokenizer, with a chat template; message, target: the prompt and the completion
    the attack optimises for; config: attack options every case gets (``GCGConfig`` fields for nanoGCG).
    """

    name: str
    model: Any
    tokenizer: Any
    message: str = MESSAGE
    target: str = TARGET
    config: dict[str, Any] = field(default_factory=lambda: dict(SMALL_GCG))


def llm_victim(name: str = "llama") -> LLMVictim:
    """The named LLM victim (:data:`LLM_MODELS`), built offline in about a second."""
    if name not in LLM_MODELS:
        raise ValueError(f"unknown LLM victim {name!r} (valid: {', '.join(LLM_MODELS)})")
    tokenizer = tiny_tokenizer()
    return LLMVictim(name, tiny_llama(len(tokenizer), hidden=64), tokenizer)


def is_llm_victim(obj: Any) -> bool:
    """True for an :class:`LLMVictim` or anything with its fields (model, tokenizer, message, target, config)."""
    return all(hasattr(obj, a) for a in ("model", "tokenizer", "message", "target", "config"))
