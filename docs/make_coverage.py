"""Produce docs/coverage.md from the adapter tests' own outcomes.

Runs the per-library test modules with SBPATCH_COVERAGE_OUT set (tests/helpers.compare appends one JSON line per
attack and model), then writes library x attack -> identical / library-broken (error) / excluded (reason).

Run: python docs/make_coverage.py    (about 5 minutes on 2 cores)
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import sbpatch  # noqa: E402
from sbpatch import registry  # noqa: E402
from sbpatch.bench.text import offline  # noqa: E402

# the victims each kind of library is tested on (the contrib module's MODALITY)
MODELS: dict[str, tuple[str, ...]] = {"image": ("cnn", "vit"), "text": ("bert", "lstm"), "llm": ("llama",)}


def main() -> int:
    with tempfile.TemporaryDirectory() as out:
        tests = [str(ROOT / "tests" / f"test_{name}.py") for name in registry.INTEGRATIONS]
        env = os.environ | {"SBPATCH_COVERAGE_OUT": out}
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", *tests], cwd=ROOT, env=env)
        outcomes: dict[str, dict[str, dict[str, tuple[str, str]]]] = defaultdict(lambda: defaultdict(dict))
        for name in registry.INTEGRATIONS:
            path = Path(out) / f"{name}.jsonl"
            if not path.exists():
                continue
            for line in path.read_text().splitlines():
                o = json.loads(line)
                outcomes[name][o["attack"]][o["model"]] = (o["result"], o["error"])
    offline()  # the text libraries import (and never download) offline, as in the tests
    sbpatch.enable()  # the compatibility shims, before cases() imports the libraries
    lines = [
        "# Coverage: every attack of every supported library, patched vs unpatched",
        "",
        "Produced by `python docs/make_coverage.py` from the adapter tests (tests/test_<library>.py): each attack runs",
        "unpatched and patched with the same seeds on a tiny CNN and a tiny torchvision ViT; **identical** means",
        "`torch.equal` outputs, `.grad` untouched, `requires_grad` restored (with a user-frozen parameter) and the",
        "train/eval mode the library itself leaves. **library-broken** means the *unpatched* call fails on this stack",
        "(torch 2.14.1, NumPy 2, SciPy 1.17): the library's bug, shown with its error. **excluded** means sbpatch",
        "never freezes it, for the reason given.",
        "",
        "Text libraries (OpenAttack, TextAttack) run offline on a tiny BERT (`BertConfig`, a vocabulary the tests",
        "write) and TextAttack's own LSTM over a local embedding, trained a few steps on made-up data so that attacks",
        "succeed (sbpatch.bench.text). **not run offline** means the attack needs a download (the reason is given): it",
        "is patched like the others, but not tested here.",
        "",
        "LLM attacks (nanoGCG) run offline on a 2-layer random `LlamaForCausalLM` with a word-level tokenizer built",
        "locally (sbpatch.bench.llm).",
        "",
        "Counts are over each library's attacks (the contrib module's `cases()`).",
        "",
        "| library | identical (cnn / vit; text: bert / lstm; LLM: llama) | library-broken | excluded |",
        "| --- | --- | --- | --- |",
    ]
    details = []
    for name, module in registry.INTEGRATIONS.items():
        contrib = importlib.import_module(module)
        integ = contrib.INTEGRATION
        attacks = set(contrib.cases())
        everything = outcomes.get(name, {})
        rows = {a: r for a, r in everything.items() if a in attacks}
        scenarios = sorted(a for a in everything if a not in attacks)
        models = MODELS[getattr(contrib, "MODALITY", "image")]
        ident = {m: sum(1 for r in rows.values() if r.get(m, ("",))[0] == "identical") for m in models}
        broken = sum(1 for r in rows.values() if any(v[0] == "library-broken" for m, v in r.items() if m in models))
        counts = " / ".join(str(ident[m]) for m in models)
        lines.append(f"| {name} | {counts} | {broken} | {len(integ.excluded)} |")
        details += ["", f"## {name}", "", f"| attack | {' | '.join(models)} |", "| --- |" + " --- |" * len(models)]
        for attack in sorted(rows):
            cells = []
            for m in models:
                result, error = rows[attack].get(m, ("not run", ""))
                error = re.sub(r"\S*site-packages/", "", " ".join(error.split()))  # one line, no local paths
                cells.append(f"library-broken: `{error[:90]}`" if result == "library-broken" else result)
            details.append(f"| {attack} | {' | '.join(cells)} |")
        rest = " |" * (len(models) - 1)
        for target, reason in integ.excluded.items():
            details.append(f"| {target} | excluded: {reason} |{rest}")
        for attack, reason in getattr(contrib, "OFFLINE_UNAVAILABLE", {}).items():
            details.append(f"| {attack} | not run offline: {reason} |{rest}")
        elsewhere = sorted((a, m, r[0]) for a, row in rows.items() for m, r in row.items() if m not in models)
        if elsewhere:  # e.g. torchattack's ViT-only attacks, which need timm's module names
            details += ["", "Also on other models: " + ", ".join(f"`{a}` on {m}: {r}" for a, m, r in elsewhere) + "."]
        if scenarios:
            details += ["", "Other scenarios compared the same way (wrappers, user subclasses, call shapes): "
                        + ", ".join(f"`{a}`" for a in scenarios) + "."]
    (ROOT / "docs" / "coverage.md").write_text("\n".join(lines + details) + "\n")
    print("wrote docs/coverage.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
