"""Table 4: OpenAttack attackers on a BERT victim (TextFooler, PWWS, Genetic, SememePSO, BERT-Attack, FD, DeepWordBug,
VIPER), as shipped / one-liner / sbpatch.

The victim is built offline (``sbpatch.bench.text``): a ``BertForSequenceClassification`` from a ``BertConfig`` over a
made-up vocabulary, trained a few steps so that word substitutions flip it; the attackers come from
``sbpatch.contrib.openattack.cases()`` (a whitespace tokenizer and an embedding substitute over a local embedding
stand in for OpenAttack's downloaded defaults; BERT-Attack gets a small random masked LM). Columns, interleaved per
round in rotated order after a warm-up, medians: **as shipped** (``sbpatch.paused()``), the **one-liner**
(every parameter frozen by hand, except the word-embedding weight: with it frozen too, OpenAttack's ``retain_grad``
fails at the first query), **sbpatch**. Ratios are as shipped / column. OpenAttack answers every query through
``get_grad`` (a forward and a backward pass), so every attacker, black-box ones included, pays the weight gradients.

CPU default: 4 layers, hidden 256, 4 heads, 4 texts, 3 rounds. ``--full`` (a GPU): BERT-base size (12 layers, hidden
768, 12 heads), 8 texts. Run: ``python benchmarks/table4.py``; results in ``benchmarks/results/table4.{json,md}``.
A row that cannot run offline says why.
"""

from __future__ import annotations

import os
import time

import _common

# The paper's rows in order: (row, cases() name or None if it cannot run offline, note or OFFLINE_UNAVAILABLE key).
ROWS: tuple[tuple[str, str | None, str], ...] = (
    ("TextFooler", None, "TextFooler"),
    ("PWWS", "PWWS", ""),
    ("Genetic", "Genetic", ""),
    ("SememePSO", "PSO", "PSO with an embedding substitute: SememePSO's HowNet sememes are a download"),
    ("BERT-Attack", "BERTAttack", "masked LM: a small random BERT saved locally (bert-base-uncased is a download)"),
    ("FD", "FD", ""),
    ("DeepWordBug", "DeepWordBug", ""),
    ("VIPER", "VIPER", ""),
)
def main() -> int:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--texts", type=int, default=None, help="texts attacked per call (default 4, --full 8)")
    args = p.parse_args()
    meta = _common.setup(args)

    from sbpatch.bench.text import bert_victim, measure_text, offline, text_markdown

    offline()
    import sbpatch
    from sbpatch.contrib.openattack import OFFLINE_UNAVAILABLE, cases

    sbpatch.enable("openattack")
    layers, hidden, heads, texts, steps, repeats = (12, 768, 12, 8, 5, 5) if args.full else (4, 256, 4, 4, 3, 3)
    texts, repeats = args.texts or texts, args.repeats or repeats
    start = time.perf_counter()
    victim = bert_victim(layers=layers, hidden=hidden, heads=heads, train_steps=80, device=args.device)
    print(f"victim: BERT {layers}x{hidden}, accuracy {victim.accuracy:.2f} on held-out texts "
          f"({time.perf_counter() - start:.0f} s to build)")
    builders = cases()
    x, y = victim.texts[:texts], victim.labels[:texts]
    rows = []
    metric = "cpu" if args.device == "cpu" else "wall"
    for attack, case, note in ROWS:
        if case is None:
            note = f"cannot run offline: {OFFLINE_UNAVAILABLE[note]}"
            rows.append({"library": "openattack", "attack": attack, "case": None, "note": note})
            print(f"{attack}: not run ({note})")
            continue
        start = time.perf_counter()
        run = builders[case](victim, x, y, steps)
        result = measure_text(victim, run, "openattack", repeats, args.device)
        rows.append({"library": "openattack", "attack": attack, "case": case, "note": note, **result})
        t = {c: v[metric] for c, v in result["median_s"].items()}
        print(f"{attack}: as shipped {t['shipped']:.3f} s, sbpatch {t['shipped'] / t['sbpatch']:.2f}x, one-liner "
              f"{t['shipped'] / t['oneliner']:.2f}x, identical {result['identical']} "
              f"({time.perf_counter() - start:.0f} s)")
    data = {
        "meta": meta,
        "experiment": "table4",
        "full": args.full,
        "metric": metric,
        "config": {"layers": layers, "hidden": hidden, "heads": heads, "texts": texts, "steps": steps,
                   "repeats": repeats, "accuracy": victim.accuracy},
        "rows": rows,
    }
    name = "table4_full" if args.full else "table4"
    _common.write(args, name, data)
    path = os.path.join(args.out, f"{name}.md")
    description = (
        f"BERT {layers} layers, hidden {hidden}, {heads} heads (trained offline, accuracy {victim.accuracy:.2f}), "
        f"{texts} texts per call, {steps} steps; {repeats} interleaved rounds after a warm-up, medians of {metric} "
        f"time; torch {meta['torch']}, {meta['device']}, {meta['threads']} thread(s). Ratio = as shipped / column; "
        "the one-liner freezes every parameter but the word-embedding weight (with it frozen too, OpenAttack's "
        "retain_grad fails at the first query)."
    )
    table = text_markdown("Table 4: OpenAttack attackers on BERT, as shipped / one-liner / sbpatch", description,
                          rows, metric)
    with open(path, "w") as f:
        f.write(table + "\nThe paper (arXiv 2211.04973, Table 4): 1.34x on average, BERT-base on a GPU.\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
