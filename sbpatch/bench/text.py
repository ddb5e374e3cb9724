"""Small text victims built offline, for the text-attack tests, ``sbpatch verify``/``bench`` and ``benchmarks/table4``.

Nothing is downloaded: :func:`offline` points NLTK, TextAttack and Hugging Face at a folder this module writes (the
English stop-words TextAttack reads at import, from scikit-learn's list; TextAttack's post-install marker, so its
first import does not fetch NLTK packages) and sets ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE``. Call it before
``textattack`` is imported; it never overrides a variable the user set.

The victims are sentiment classifiers over a made-up vocabulary (:data:`POSITIVE`, :data:`NEGATIVE`, neutral word
pairs), trained for a few steps so that word substitutions flip them:

* :func:`bert_victim`: ``BertForSequenceClassification`` from a ``BertConfig`` and a ``BertTokenizer`` over a
  ``vocab.txt`` written here;
* :func:`lstm_victim`: TextAttack's own ``LSTMForClassification``, its GloVe layer replaced by TextAttack's
  ``EmbeddingLayer`` over a local embedding (GloVe is a download), with its ``GloveTokenizer``.

Each comes as a :class:`TextVictim`: the module, its tokenizer and word-embedding layer, and a local word embedding
(:attr:`TextVictim.words`, :attr:`TextVictim.vectors`) in which every sentiment word sits next to its antonym, so the
embedding-based substitutes of both libraries have something to find.
"""

from __future__ import annotations

import os
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

POSITIVE = ("good", "great", "fine", "nice", "happy", "brilliant", "lovely", "superb", "excellent", "pleasant")
NEGATIVE = ("bad", "awful", "poor", "sad", "terrible", "dull", "boring", "weak", "horrible", "unpleasant")
NEUTRAL = (
    ("movie", "film"),
    ("story", "plot"),
    ("actor", "actress"),
    ("scene", "moment"),
    ("the", "a"),
    ("was", "is"),
    ("this", "that"),
    ("really", "very"),
    ("music", "score"),
    ("ending", "finale"),
    ("cast", "crew"),
    ("script", "dialogue"),
)
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
WORDS: tuple[str, ...] = (*POSITIVE, *NEGATIVE, *(w for pair in NEUTRAL for w in pair))
MAX_LENGTH = 24  # tokens, [CLS] and [SEP] included: sentences of 8 words, 3 triggers, some word pieces
TEXT_MODELS: tuple[str, ...] = ("bert", "lstm")


def default_cache() -> Path:
    """Where :func:`offline` writes by default: ``$SBPATCH_TEXT_CACHE``, else a folder in the temp directory."""
    return Path(os.environ.get("SBPATCH_TEXT_CACHE") or Path(tempfile.gettempdir()) / "sbpatch-text")


def offline(cache: str | os.PathLike[str] | None = None) -> Path:
    """Make NLTK, TextAttack and Hugging Face work offline with files written under ``cache``; returns it.

    Sets (unless already set) ``NLTK_DATA``, ``TA_CACHE_DIR``, ``HF_HUB_OFFLINE=1`` and ``TRANSFORMERS_OFFLINE=1``;
    writes NLTK's English stop-words (scikit-learn's list) where NLTK finds no stop-words, and TextAttack's
    post-install marker in a cache folder of ours. Must run before ``textattack`` is imported.
    """
    root = Path(cache) if cache is not None else default_cache()
    root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    nltk_dir = root / "nltk_data"
    stopwords = nltk_dir / "corpora" / "stopwords" / "english"
    if not stopwords.exists():
        from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

        stopwords.parent.mkdir(parents=True, exist_ok=True)
        tmp = stopwords.with_suffix(f".{os.getpid()}")
        tmp.write_text("\n".join(sorted(ENGLISH_STOP_WORDS)) + "\n")
        tmp.replace(stopwords)
    paths = os.environ.get("NLTK_DATA", "")
    if str(nltk_dir) not in paths.split(os.pathsep):
        os.environ["NLTK_DATA"] = os.pathsep.join(p for p in (paths, str(nltk_dir)) if p)
    import sys

    if "nltk" in sys.modules and str(nltk_dir) not in sys.modules["nltk"].data.path:
        sys.modules["nltk"].data.path.append(str(nltk_dir))
    if "TA_CACHE_DIR" not in os.environ and "textattack" not in sys.modules:
        os.environ["TA_CACHE_DIR"] = str(root / "textattack")
    if os.environ.get("TA_CACHE_DIR") == str(root / "textattack"):
        marker = root / "textattack" / "post_install_check_3"  # TextAttack 0.3.x: NLTK downloads done
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    return root


def make_texts(n: int, seed: int = 0, length: int = 8) -> tuple[list[str], list[int]]:
    """``n`` made-up reviews of ``length`` words and their labels (1: one or two positive words, 0: negative)."""
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        label = i % 2
        words = [rng.choice(rng.choice(NEUTRAL)) for _ in range(length)]
        for pos in rng.sample(range(length), rng.choice((1, 2))):
            words[pos] = rng.choice(POSITIVE if label else NEGATIVE)
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels


def word_vectors(dim: int = 16, seed: int = 0) -> Any:
    """The local word embedding (float32, one row per word of :data:`WORDS`): each positive word and its antonym,
    and each neutral pair, share a random centre (distance about 0.15 between them, about 5.5 to any other)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    vectors = {}
    groups = [*zip(POSITIVE, NEGATIVE), *NEUTRAL]
    for group in groups:
        centre = rng.standard_normal(dim)
        for w in group:
            vectors[w] = centre + 0.1 * rng.standard_normal(dim) / np.sqrt(dim) * 2
    return np.stack([vectors[w] for w in WORDS]).astype("float32")


@dataclass
class TextVictim:
    """A text classifier ready for both libraries.

    model: the ``nn.Module`` (eval mode; one parameter frozen by the "user", as real models often have);
    tokenizer: a Hugging Face tokenizer (BERT) or the model's own ``GloveTokenizer`` (LSTM);
    embedding: the word-embedding ``nn.Embedding`` whose output the gradient attacks read;
    words, vectors: the local word embedding used by the embedding-based substitutes;
    texts, labels: a few held-out inputs the model classifies correctly.
    """

    name: str
    model: Any
    tokenizer: Any
    embedding: Any
    words: tuple[str, ...] = WORDS
    vectors: Any = None
    max_length: int = MAX_LENGTH
    texts: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    accuracy: float = 0.0  # on 64 held-out texts


def _vocab_file(cache: Path) -> Path:
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces = [*letters, *(f"##{c}" for c in letters), *"0123456789", ".", ",", "!", "?", "'"]
    vocab = list(dict.fromkeys([*SPECIALS, *WORDS, *pieces]))  # "a" is a word and a letter: once
    path = cache / "bert-vocab.txt"
    text = "\n".join(vocab) + "\n"
    if not path.exists() or path.read_text() != text:
        tmp = path.with_suffix(f".{os.getpid()}")
        tmp.write_text(text)
        tmp.replace(path)
    return path


def bert_tokenizer(cache: str | os.PathLike[str] | None = None, max_length: int = MAX_LENGTH) -> Any:
    """A ``BertTokenizer`` over the made-up vocabulary (written to ``cache``)."""
    from transformers import BertTokenizer

    root = offline(cache)
    return BertTokenizer(str(_vocab_file(root)), do_lower_case=True, model_max_length=max_length)


def bert_victim(
    layers: int = 2,
    hidden: int = 32,
    heads: int = 2,
    intermediate: int | None = None,
    train_steps: int = 60,
    seed: int = 0,
    cache: str | os.PathLike[str] | None = None,
    device: str = "cpu",
) -> TextVictim:
    """A ``BertForSequenceClassification`` of the given size, trained ``train_steps`` steps on :func:`make_texts`."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    tokenizer = bert_tokenizer(cache)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer.vocab),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate or 4 * hidden,
        max_position_embeddings=MAX_LENGTH,
        num_labels=2,
    )
    model = BertForSequenceClassification(config).to(device)

    def batch(texts: list[str]) -> dict[str, Any]:
        enc = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        return {k: v.to(device) for k, v in enc.items()}

    def loss_of(texts: list[str], labels: list[int]) -> Any:
        return model(**batch(texts), labels=torch.tensor(labels, device=device)).loss

    _train(model, loss_of, train_steps, seed, lr=3e-3 * min(1.0, 64 / hidden))  # wider models need a smaller step
    model.bert.pooler.dense.bias.requires_grad_(False)  # a user-frozen parameter: must stay frozen
    victim = TextVictim("bert", model, tokenizer, model.bert.embeddings.word_embeddings, vectors=word_vectors())
    _pick_examples(victim, lambda texts: model(**batch(texts)).logits)
    return victim


def lstm_victim(
    hidden: int = 32, train_steps: int = 60, seed: int = 0, cache: str | os.PathLike[str] | None = None
) -> TextVictim:
    """TextAttack's ``LSTMForClassification`` over the local embedding, trained ``train_steps`` steps."""
    offline(cache)
    import numpy as np
    import torch
    from textattack.models.helpers import lstm_for_classification as lstm_module
    from textattack.models.helpers.glove_embedding_layer import EmbeddingLayer

    vectors = word_vectors()
    # TextAttack 0.3.11's WordLevelTokenizer writes its vocabulary to a temporary file without flushing it: a
    # vocabulary whose JSON fits in the 8 KiB write buffer reads back empty. Real vocabularies are far larger; ours
    # gets filler words (never used in the texts) to get past the bug.
    fillers = [f"w{i:04d}" for i in range(800)]
    rows = np.random.default_rng(seed).standard_normal((len(fillers), vectors.shape[1])).astype("float32")

    def local_layer(emb_layer_trainable: bool = True) -> Any:  # what GloveEmbeddingLayer builds, from our words
        layer = EmbeddingLayer(embedding_matrix=np.concatenate([vectors, rows]), word_list=[*WORDS, *fillers])
        layer.embedding.weight.requires_grad = emb_layer_trainable
        return layer

    torch.manual_seed(seed)
    glove = lstm_module.GloveEmbeddingLayer
    lstm_module.GloveEmbeddingLayer = local_layer  # only while the constructor runs
    try:
        model = lstm_module.LSTMForClassification(hidden_size=hidden, depth=1, max_seq_length=MAX_LENGTH)
    finally:
        lstm_module.GloveEmbeddingLayer = glove
    tokenizer = model.tokenizer

    def logits_of(texts: list[str]) -> Any:
        return model(torch.tensor(tokenizer(texts)))

    def loss_of(texts: list[str], labels: list[int]) -> Any:
        return torch.nn.functional.cross_entropy(logits_of(texts), torch.tensor(labels))

    _train(model, loss_of, train_steps, seed)
    model.out.bias.requires_grad_(False)  # a user-frozen parameter: must stay frozen
    victim = TextVictim("lstm", model, tokenizer, model.get_input_embeddings(), vectors=vectors)
    _pick_examples(victim, logits_of)
    return victim


def text_victim(name: str, **kwargs: Any) -> TextVictim:
    """:func:`bert_victim` or :func:`lstm_victim` by name (:data:`TEXT_MODELS`)."""
    if name == "bert":
        return bert_victim(**kwargs)
    if name == "lstm":
        return lstm_victim(**{k: v for k, v in kwargs.items() if k in ("hidden", "train_steps", "seed", "cache")})
    raise ValueError(f"unknown text model {name!r}; valid: {', '.join(TEXT_MODELS)}")


def _train(model: Any, loss_of: Any, steps: int, seed: int, lr: float = 3e-3, batch_size: int = 32) -> None:
    import torch

    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        texts, labels = make_texts(batch_size, seed=1000 + step)
        optimizer.zero_grad()
        loss_of(texts, labels).backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.eval()


def _pick_examples(victim: TextVictim, logits_of: Any, n: int = 8) -> None:
    """Keep ``n`` held-out texts the model classifies correctly (attacks then have a label to flip)."""
    import torch

    texts, labels = make_texts(64, seed=7)
    with torch.no_grad():
        pred = logits_of(texts).argmax(-1).tolist()
    good = [(t, y) for t, y, p in zip(texts, labels, pred) if p == y]
    victim.accuracy = len(good) / len(texts)
    victim.texts = [t for t, _ in good[:n]]
    victim.labels = [y for _, y in good[:n]]


# --- timing: as shipped / one-liner / sbpatch (sbpatch bench with a text model, benchmarks/table4.py) -------------

TEXT_COLUMNS: tuple[str, ...] = ("shipped", "oneliner", "sbpatch")
# What `sbpatch bench --model bert` runs per text library when no --attacks are given.
TEXT_DEFAULT_ATTACKS: dict[str, tuple[str, ...]] = {
    "openattack": ("PWWS", "FD", "DeepWordBug"),
    "textattack": ("EmbeddingSwapGradientWIR", "DeepWordBugGao2018"),
}


def text_columns(victim: TextVictim, run: Any) -> dict[str, Any]:
    """The three calls of a row. The one-liner freezes every parameter by hand except the word-embedding weight:
    with that frozen too OpenAttack's ``retain_grad`` fails at the first query (and TextAttack sets it live itself)."""
    import sbpatch

    model, embedding = victim.model, victim.embedding.weight

    def shipped() -> Any:
        with sbpatch.paused():
            return run()

    def oneliner() -> Any:
        with sbpatch.paused():
            live = [p for p in model.parameters() if p.requires_grad and p is not embedding]
            for p in live:
                p.requires_grad_(False)
            try:
                return run()
            finally:
                for p in live:
                    p.requires_grad_(True)

    return {"shipped": shipped, "oneliner": oneliner, "sbpatch": run}


def measure_text(victim: TextVictim, run: Any, library: str, repeats: int, device: str = "cpu") -> dict[str, Any]:
    """One row: the columns interleaved in rotated order after a warm-up round (medians of wall and CPU time), the
    outputs compared with as shipped, the parameters left with a ``.grad``, peak memory per column."""
    import statistics
    import time

    import torch

    from sbpatch import registry
    from sbpatch.bench.runner import measure_memory
    from sbpatch.compare import identical, seed_all

    calls = text_columns(victim, run)
    model = victim.model
    counters = registry.counters(library)

    def once(name: str) -> tuple[Any, float, float, int]:
        seed_all(0)
        model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter(), time.process_time()
        out = calls[name]()
        if device == "cuda":
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        with_grad = sum(p.grad is not None for p in model.parameters())
        model.zero_grad(set_to_none=True)
        return out, wall, cpu, with_grad

    outputs, grads = {}, {}
    before = counters.calls
    for name in TEXT_COLUMNS:  # warm-up round: the outputs to compare
        outputs[name], _, _, grads[name] = once(name)
    engaged = counters.calls > before
    times: dict[str, dict[str, list[float]]] = {c: {"wall": [], "cpu": []} for c in TEXT_COLUMNS}
    for r in range(repeats):
        shift = r % len(TEXT_COLUMNS)
        for name in TEXT_COLUMNS[shift:] + TEXT_COLUMNS[:shift]:
            _, wall, cpu, _ = once(name)
            times[name]["wall"].append(wall)
            times[name]["cpu"].append(cpu)
    memory = {name: measure_memory(model, calls[name], device) for name in TEXT_COLUMNS}
    model.zero_grad(set_to_none=True)
    out = outputs["sbpatch"]
    successes = sum(r is not None and (not isinstance(r, tuple) or r[0] == "SuccessfulAttackResult") for r in out)
    return {
        "median_s": {c: {k: statistics.median(v) for k, v in t.items()} for c, t in times.items()},
        "identical": identical(outputs["shipped"], outputs["sbpatch"]),
        "oneliner_identical": identical(outputs["shipped"], outputs["oneliner"]),
        "engaged": engaged,
        "params_with_grad": {"shipped": grads["shipped"], "sbpatch": grads["sbpatch"]},
        "memory_bytes": memory,
        "successes": f"{successes}/{len(out)}",
    }


def text_markdown(title: str, description: str, rows: list[dict[str, Any]], metric: str) -> str:
    """The markdown table of measured (or skipped, with their note) text rows."""
    import statistics

    lines = [
        f"# {title}",
        "",
        description,
        "",
        "| library | attack | as shipped s | one-liner (embedding live) | sbpatch | identical | params with .grad "
        "shipped -> sbpatch | peak memory shipped -> sbpatch | successes | note |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if "median_s" not in r:
            lines.append(f"| {r['library']} | {r['attack']} | not run | | | | | | | {r.get('note', '')} |")
            continue
        m = r["median_s"]
        shipped = m["shipped"][metric]
        ratio = {c: shipped / m[c][metric] for c in TEXT_COLUMNS}
        mem = r["memory_bytes"]
        grads = r["params_with_grad"]
        cells = [
            r["library"], r["attack"], f"{shipped:.3f}", f"{ratio['oneliner']:.2f}x", f"**{ratio['sbpatch']:.2f}x**",
            "yes" if r["identical"] else "NO", f"{grads['shipped']} -> {grads['sbpatch']}",
            f"{mem['shipped'] / 2**20:.1f} -> {mem['sbpatch'] / 2**20:.1f} MiB", r["successes"], r.get("note", ""),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    measured = [r for r in rows if "median_s" in r]
    if measured:
        mean = statistics.mean(r["median_s"]["shipped"][metric] / r["median_s"]["sbpatch"][metric] for r in measured)
        lines += ["", f"Mean sbpatch speed-up over the {len(measured)} measured rows: **{mean:.2f}x**."]
    return "\n".join(lines) + "\n"


def bench(args: Any) -> int:
    """``sbpatch bench`` with a text model (``--model bert|lstm``) or text libraries: the text rows of each named
    library (``--attacks``, default :data:`TEXT_DEFAULT_ATTACKS`) on a BERT of 4 layers, hidden 256 (or the LSTM),
    trained here; ``--batch-size`` texts per call. Prints a markdown table; ``--json``/``--markdown`` write it."""
    import importlib
    import json
    import sys

    import sbpatch
    from sbpatch import registry
    from sbpatch.bench import report
    from sbpatch.bench.workloads import modality

    offline()
    name = args.model if args.model in TEXT_MODELS else "bert"
    libraries = [lib for lib in (args.libraries or list(registry.INTEGRATIONS)) if modality(lib) == "text"]
    cases: dict[str, dict[str, Any]] = {}
    for lib in libraries:
        try:
            sbpatch.enable(lib)
            cases[lib] = dict(importlib.import_module(registry.INTEGRATIONS[lib]).cases())
        except Exception as exc:  # not installed, unsupported, does not import
            print(f"sbpatch bench: {lib}: {type(exc).__name__}: {exc}", file=sys.stderr)
    if args.attacks:
        bad = [a for a in args.attacks if not any(a in c for c in cases.values())]
        if bad:
            valid = sorted({a for c in cases.values() for a in c}, key=str.lower)
            print(f"sbpatch bench: error: argument --attacks: invalid choice {', '.join(map(repr, bad))} "
                  f"(choose from {', '.join(valid)})", file=sys.stderr)
            return 2
    device = args.device
    victim = bert_victim(layers=4, hidden=256, heads=4, train_steps=80, device=device) if name == "bert" else (
        lstm_victim(hidden=64, train_steps=80))
    texts, labels = victim.texts[: args.batch_size], victim.labels[: args.batch_size]
    metric = args.metric if args.metric in ("wall", "cpu") else ("cpu" if device == "cpu" else "wall")
    rows = []
    for lib, lib_cases in cases.items():
        for attack in args.attacks or TEXT_DEFAULT_ATTACKS.get(lib, ()):
            if attack not in lib_cases:
                continue
            print(f"{lib} {attack} ...", file=sys.stderr, flush=True)
            run = lib_cases[attack](victim, texts, labels, args.steps)
            rows.append({"library": lib, "attack": attack, **measure_text(victim, run, lib, args.repeats, device)})
    meta = report.machine(device, _threads())
    size = "4 layers, hidden 256" if name == "bert" else "TextAttack LSTM, hidden 64"
    description = (
        f"{name} victim ({size}), {len(texts)} texts per call, {args.steps} steps; {args.repeats} interleaved rounds "
        f"after a warm-up, medians of {metric} time; torch {meta['torch']}, {device}, {meta['threads']} thread(s). "
        "Ratio = as shipped / column; the one-liner keeps the word-embedding weight live (OpenAttack needs it)."
    )
    text = text_markdown("sbpatch bench: text attacks", description, rows, metric)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "metric": metric, "model": name, "rows": rows}, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    from sbpatch.bench.cli import verdict

    failed = [f"{r['library']} {r['attack']}: sbpatch output differs from as shipped" for r in rows
              if r.get("identical") is False]
    return verdict(failed, bool(getattr(args, "exit_zero", False)))


def _threads() -> int:
    import torch

    return torch.get_num_threads()
