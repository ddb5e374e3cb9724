"""Check sbpatch's promise on your own model: run the installed libraries' attacks unpatched and patched.

``sbpatch.verify(model, inputs, labels)`` runs attacks of each installed library (the contrib modules' ``cases()``)
with the same seeds, first straight through (``sbpatch.paused()``), then patched twice (a later call with the same
arguments may skip the operand mode: both are compared), and reports per attack:
identical or DIFFERENT, and the time ratio unpatched/patched. By default it runs a representative set per library
(:data:`REPRESENTATIVE`: PGD, an attack that calls ``backward()``, a query-only attack); ``attacks="all"`` runs every
one. ``sbpatch verify`` does the same from the command line on a random-initialised model.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from sbpatch import registry
from sbpatch._table import format_table
from sbpatch.compare import identical, seed_all
from sbpatch.errors import ConfigError
from sbpatch.freeze import held_count, kept_in
from sbpatch.patching import paused


@dataclass
class VerifyResult:
    """One attack on the user's model: ``result`` is "identical", "DIFFERENT" or "library-broken"."""

    library: str
    attack: str
    result: str
    unpatched_s: float = 0.0
    patched_s: float = 0.0
    error: str = ""

    @property
    def speedup(self) -> float:
        return self.unpatched_s / self.patched_s if self.patched_s > 0 else 0.0


class VerifyReport(list):
    """``verify()``'s result: a list of :class:`VerifyResult` that prints as a table.

    ``notes``: lines printed under the table (what was run, how to run the rest). ``kept_live``: parameters that
    sbpatch kept trainable during the attacks, name -> why (printed under the table when not empty).
    """

    def __init__(self, results: Iterable[VerifyResult] = ()) -> None:
        super().__init__(results)
        self.notes: list[str] = []
        self.kept_live: dict[str, str] = {}

    def __str__(self) -> str:
        headers = ("library", "attack", "result", "unpatched s", "patched s", "speed-up")
        rows = [
            (r.library, r.attack, r.result, f"{r.unpatched_s:.3f}", f"{r.patched_s:.3f}", f"{r.speedup:.2f}x")
            if r.result != "library-broken"
            else (r.library, r.attack, r.result, "-", "-", r.error[:60])
            for r in self
        ]
        lines = format_table(headers, rows)
        counts = {k: sum(r.result == k for r in self) for k in ("identical", "DIFFERENT", "library-broken")}
        lines.append(", ".join(f"{v} {k}" for k, v in counts.items()))
        if self.kept_live:
            lines.append("kept live (not frozen) during the attacks:")
            lines += [f"  {name}: {why}" for name, why in self.kept_live.items()]
        lines += self.notes
        return "\n".join(lines)

    @property
    def ok(self) -> bool:
        """No attack gave a different result patched."""
        return all(r.result != "DIFFERENT" for r in self)


# The default set per library: PGD (mapped through sbpatch.bench.workloads.PGD_NAMES), an attack that calls
# backward() with live parameters (where freezing changes the most), and a query-only attack (frozen forward passes
# without an input gradient: the fused attention path), each one that runs on the CLI's random model (boundary and
# HopSkipJump attacks fail to initialise there). About 10 s in all with the CLI defaults on 2 cores (9 s measured);
# attacks="all" (`sbpatch verify --all`) runs every case.
REPRESENTATIVE: dict[str, tuple[str, ...]] = {
    "torchattacks": ("PGD", "CW", "Square"),
    "art": ("PGD", "CarliniL2Method", "SimBA"),
    "foolbox": ("PGD", "L2CarliniWagnerAttack", "SaltAndPepperNoiseAttack"),
    "advertorch": ("PGD", "CarliniWagnerL2Attack", "LinfSPSAAttack"),
    "deeprobust": ("PGD", "DeepFool", "FGSM"),  # its query-only attacks (Onepixel, NATTACK) break on this stack
    "cleverhans": ("PGD", "carlini_wagner_l2", "spsa"),
    "torchattack": ("PGD", "NAA", "DeepFool"),  # NAA: a feature-level attack with its own hooks
    "secmlt": ("PGD", "CW-foolbox", "HopSkipJump-foolbox"),
    "adv_lib": ("PGD", "ddn", "fmn"),  # autograd.grad throughout: no time gain, less memory saved for backward
    "nanogcg": ("run", "probe sampling"),  # an LLM victim (sbpatch.bench.llm.LLMVictim): verify --model llama
    # Text libraries (a text victim, sbpatch.bench.text.TextVictim): a gradient attack, a search, a black-box one.
    "openattack": ("FD", "PWWS", "DeepWordBug"),
    "textattack": ("EmbeddingSwapGradientWIR", "EmbeddingSwapGreedyWIR", "DeepWordBugGao2018"),
}
# What `sbpatch verify --all` costs (cnn, batch 4, 2 steps, 2 threads), measured on 2 cores: 15 s at 8 px; at 32 px
# ART's FeatureAdversariesNumpy took 23 min, VirtualAdversarialMethod 5 min, deeprobust's LBFGS over 50 min (each
# takes finite-difference gradients over every pixel: 3072 forwards per gradient), the other 188 attacks 6 min.
# So --all runs those three only on inputs of at most FD_MAX_FEATURES values per sample (16x16 RGB: 4x fewer
# forwards than 32 px); above that they are listed as not run, and naming one (--attacks LBFGS) runs it at any size.
FD_CASES = frozenset({("deeprobust", "LBFGS"), ("art", "FeatureAdversariesNumpy"), ("art", "VirtualAdversarialMethod")})
FD_MAX_FEATURES = 3 * 16 * 16
FULL_SET_DURATION = (
    "about 15 s with --image-size 8, about 6 minutes at 32 px, where the three attacks that take finite-difference "
    "gradients over every input value (deeprobust LBFGS, ART FeatureAdversariesNumpy and VirtualAdversarialMethod: "
    "over an hour together at 32 px) run only on inputs of at most 16x16x3 values"
)


def select(library: str, cases: dict[str, Any], attacks: Iterable[str] | str | None) -> list[str]:
    """The case names of ``library`` to run: ``None`` the representative set, ``"all"`` every case, or the named
    attacks present in this library (``PGD`` mapped to the library's own PGD)."""
    if attacks == "all":
        return sorted(cases)
    wanted = REPRESENTATIVE.get(library, ("PGD",)) if attacks is None else attacks
    out: list[str] = []
    for name in wanted:
        case = pgd_case(library, cases) if name == "PGD" else name if name in cases else None
        if case is not None and case not in out:
            out.append(case)
    return out


def pgd_case(library: str, cases: dict[str, Any]) -> str | None:
    """The case that ``PGD`` means in ``library`` (the mapping ``sbpatch bench`` uses)."""
    from sbpatch.bench.workloads import PGD_NAMES

    return next((n for n in PGD_NAMES.get(library, ("PGD",)) if n in cases), None)


def _check_attacks(attacks: list[str], cases: dict[str, dict[str, Any]]) -> None:
    """Raise ConfigError naming the valid attacks when a name matches no selected library."""
    known = {n for c in cases.values() for n in c} | {"PGD"}
    bad = [a for a in attacks if a not in known]
    if not bad:
        return
    per_library = "\n".join(f"  {lib}: {', '.join(sorted(c, key=str.lower))}" for lib, c in cases.items())
    raise ConfigError(
        f"unknown attack {', '.join(map(repr, bad))}; valid: PGD (each library's own PGD), 'all', or a name of:\n"
        f"{per_library}"
    )


def _cases(library: str) -> dict[str, Any]:
    module = importlib.import_module(registry.INTEGRATIONS[library])
    return dict(module.cases()) if hasattr(module, "cases") else {}


def _state(model: Any) -> tuple[list[bool], list[Any], list[bool]]:
    return (
        [p.requires_grad for p in model.parameters()],
        [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        [m.training for m in model.modules()],
    )


def _reset(model: Any, state: tuple[list[bool], list[Any], list[bool]]) -> None:
    flags, grads, modes = state
    for p, f, g in zip(model.parameters(), flags, grads):
        p.requires_grad_(f)
        p.grad = None if g is None else g.clone()
    for m, t in zip(model.modules(), modes):
        m.training = t


def verify(
    model: Any,
    inputs: Any,
    labels: Any,
    libraries: Iterable[str] | None = None,
    attacks: Iterable[str] | str | None = None,
    steps: int = 2,
    seed: int = 0,
    progress: bool = True,
) -> VerifyReport:
    """Run installed libraries' attacks on ``model`` unpatched and patched; report identical/DIFFERENT and time.

    ``inputs``: a float tensor in [0, 1] of shape (N, C, H, W); ``labels``: int64 class labels; the model returns
    logits. For the text libraries (OpenAttack, TextAttack) ``model`` is a text victim
    (:class:`sbpatch.bench.text.TextVictim`: the module, its tokenizer and word-embedding layer, and a word embedding
    for the substitutes), ``inputs`` a list of texts and ``labels`` a list of ints. For LLM attacks (nanoGCG)
    ``model`` is an LLM victim (:class:`sbpatch.bench.llm.LLMVictim`: a causal LM, its tokenizer and attack options),
    ``inputs`` the user message and ``labels`` the target completion. ``libraries`` defaults to every
    installed, supported one of the model's kind. ``attacks``: None for a representative set per library
    (:data:`REPRESENTATIVE`), ``"all"`` for every attack, or names (``"PGD"`` means each library's own PGD);
    a name no selected library has raises :class:`~sbpatch.errors.ConfigError` naming the valid ones. ``progress``:
    a progress bar on a terminal, otherwise one line per attack on stderr as it finishes. The model's
    ``requires_grad`` flags, ``.grad`` and train/eval modes are put back as they were after each attack. Libraries
    that were not enabled are enabled for the run and disabled again afterwards.
    """
    from sbpatch.bench.llm import is_llm_victim
    from sbpatch.bench.workloads import image_libraries, modality

    _check_model(model)
    # The libraries of the model's kind: a text victim (sbpatch.bench.text.TextVictim: .model, .tokenizer,
    # .embedding, .words, .vectors) goes to the text libraries, anything else to the image ones.
    kind = "text" if _is_text_victim(model) else "llm" if is_llm_victim(model) else "image"
    names = registry.check_names(list(libraries)) if libraries else image_libraries()
    if kind != "image" and not libraries:
        names = [n for n in registry.INTEGRATIONS if modality(n) == kind]
    other = [n for n in names if modality(n) != kind]
    names = [n for n in names if n not in other]
    if isinstance(attacks, str) and attacks != "all":
        attacks = [attacks]
    wanted = None if attacks is None or attacks == "all" else list(attacks)
    report = VerifyReport()
    if other:
        report.notes.append(f"skipped {', '.join(other)}: not {kind} attack libraries")
    cases: dict[str, dict[str, Any]] = {}
    enabled_here = []
    import torch

    # nanoGCG's run(seed=...) turns on deterministic algorithms for the rest of the process: put the flags back
    deterministic = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        for name in names:
            if registry.why_not(name) is not None:
                continue
            if not registry.counters(name).enabled:
                registry.enable(name)
                enabled_here.append(name)
            try:
                cases[name] = _cases(name)
            except Exception as exc:  # the library does not import on this stack
                report.append(VerifyResult(name, "*", "library-broken", error=f"{type(exc).__name__}: {exc}"))
        if wanted is not None:
            _check_attacks(wanted, cases)
        jobs = [
            (name, attack, lib_cases[attack])
            for name, lib_cases in cases.items()
            for attack in select(name, lib_cases, "all" if attacks == "all" else wanted)
        ]
        if attacks == "all":
            jobs, capped = _cap_finite_differences(jobs, inputs)
            if capped:
                report.notes.append(
                    f"not run: {', '.join(capped)}: finite-difference gradients over every one of the "
                    f"{_features(inputs)} input values per sample (over {FD_MAX_FEATURES}); run one by naming it "
                    f"(--attacks {capped[0].split()[-1]})"
                )
        if attacks is None:
            total = sum(len(c) for c in cases.values())
            report.notes.append(
                f"ran a representative set: {len(jobs)} of {total} attacks; every attack: attacks='all' "
                f"(sbpatch verify --all, on 2 cores: {FULL_SET_DURATION})"
            )
        bar = _progress(len(jobs), progress)
        try:
            for library, attack, build in jobs:
                bar.start(f"{library} {attack}")
                result = _one(library, attack, build, model, inputs, labels, steps, seed)
                report.append(result)
                bar.done(result)
        finally:
            bar.close()
        module = _module(model)
        if hasattr(module, "named_parameters"):
            report.kept_live = kept_in(module)
    finally:
        for name in enabled_here:
            registry.disable(name)
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
    return report


def _features(inputs: Any) -> int:
    """Values per sample of an image batch (0 for text or LLM inputs)."""
    shape = getattr(inputs, "shape", None)
    if not shape or len(shape) < 2:
        return 0
    count = 1
    for size in shape[1:]:
        count *= int(size)
    return count


def _cap_finite_differences(jobs: list[tuple[str, str, Any]], inputs: Any) -> tuple[list, list[str]]:
    """``jobs`` without the finite-difference attacks when the inputs are larger than FD_MAX_FEATURES per sample,
    and the names of those left out."""
    if _features(inputs) <= FD_MAX_FEATURES:
        return jobs, []
    kept = [job for job in jobs if (job[0], job[1]) not in FD_CASES]
    return kept, [f"{lib} {attack}" for lib, attack, _ in jobs if (lib, attack) in FD_CASES]


def _check_model(model: Any) -> None:
    """Raise a TypeError naming what verify() accepts unless ``model`` is an ``nn.Module`` or a text victim of one."""
    import torch

    module = _module(model)
    if not isinstance(module, torch.nn.Module):
        what = f"{type(model).__name__} {model!r:.80}"
        if module is not model:
            what = f"a text victim whose .model is {type(module).__name__} {module!r:.80}"
        raise TypeError(
            f"verify() needs the model as a torch.nn.Module returning logits (or, for the text libraries, a text "
            f"victim such as sbpatch.bench.text.TextVictim whose .model is an nn.Module), not {what}"
        )


def _is_text_victim(model: Any) -> bool:
    return all(hasattr(model, a) for a in ("model", "tokenizer", "embedding", "words", "vectors"))


def _module(victim: Any) -> Any:
    """The ``nn.Module`` inside a text or LLM victim, or the model itself."""
    from sbpatch.bench.llm import is_llm_victim

    return victim.model if _is_text_victim(victim) or is_llm_victim(victim) else victim


def _build(build: Any, victim: Any, x: Any, y: Any, steps: int) -> Any:
    from sbpatch.bench.llm import is_llm_victim

    if is_llm_victim(victim):  # builder(model, tokenizer, message, target, steps, **config)
        return build(victim.model, victim.tokenizer, x, y, steps, **victim.config)
    return build(victim, x, y, steps)


def _one(library: str, attack: str, build: Any, victim: Any, x: Any, y: Any, steps: int, seed: int) -> VerifyResult:
    model = _module(victim)  # the nn.Module whose state is checked
    state = _state(model)
    try:
        run = _build(build, victim, x, y, steps)
        seed_all(seed)
        start = time.perf_counter()
        with paused():
            expected = run()
        unpatched = time.perf_counter() - start
    except Exception as exc:
        _reset(model, state)
        return VerifyResult(library, attack, "library-broken", error=f"{type(exc).__name__}: {exc}"[:300])
    _reset(model, state)
    seed_all(seed)
    start = time.perf_counter()
    try:
        got = run()
    except Exception as exc:
        _reset(model, state)
        return VerifyResult(library, attack, "DIFFERENT", error=f"patched call raised {type(exc).__name__}: {exc}")
    patched = time.perf_counter() - start
    same = identical(expected, got) and [p.requires_grad for p in model.parameters()] == state[0]
    same = same and held_count() == 0
    _reset(model, state)
    if same:  # again: a later call with the same arguments may run without the operand mode (README, the rules)
        seed_all(seed)
        try:
            again = run()
        except Exception as exc:
            _reset(model, state)
            return VerifyResult(library, attack, "DIFFERENT",
                                error=f"second patched call raised {type(exc).__name__}: {exc}")
        same = identical(expected, again) and [p.requires_grad for p in model.parameters()] == state[0]
        _reset(model, state)
    return VerifyResult(library, attack, "identical" if same else "DIFFERENT", unpatched, patched)


class _Progress:
    """Progress of a verify run: nothing, a tqdm bar on a terminal, or one line per attack on stderr (CI logs)."""

    def __init__(self, total: int, mode: str) -> None:
        self.total, self.mode, self.count, self.bar = total, mode, 0, None
        self.started = time.perf_counter()
        if mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="attack", leave=False, file=sys.stderr)

    def start(self, label: str) -> None:
        if self.bar is not None:
            self.bar.set_description(label)

    def done(self, r: VerifyResult) -> None:
        self.count += 1
        if self.bar is not None:
            self.bar.update(1)
        elif self.mode == "lines":
            times = f"{r.unpatched_s:.2f} s unpatched, {r.patched_s:.2f} s patched" if r.patched_s else r.error[:80]
            elapsed = time.perf_counter() - self.started
            print(f"[{self.count}/{self.total} {elapsed:.0f} s] {r.library} {r.attack}: {r.result} ({times})",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _progress(total: int, enabled: bool) -> _Progress:
    if not enabled:
        return _Progress(total, "off")
    if sys.stderr.isatty():
        try:
            import tqdm  # noqa: F401
        except ImportError:
            return _Progress(total, "lines")
        return _Progress(total, "bar")
    return _Progress(total, "lines")


# --- command line ----------------------------------------------------------------------------------------------


DESCRIPTION = (
    "Check sbpatch's promise on a random-initialised model: run the installed libraries' attacks unpatched, then "
    "patched with the same seeds, and report per attack identical or DIFFERENT and the time ratio. By default a "
    "representative set per library (its PGD, an attack that calls backward(), a query-only attack; about 10 s "
    f"on 2 cores); --all runs every attack ({FULL_SET_DURATION}). Exit status: 0 all identical (or library-broken), "
    "1 an attack differs, 2 a bad option. On your own model call sbpatch.verify(model, inputs, labels) from Python."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``sbpatch verify``."""
    from sbpatch.bench.llm import LLM_MODELS
    from sbpatch.bench.text import TEXT_MODELS
    from sbpatch.bench.workloads import MODELS
    from sbpatch.cli import library_list

    parser.add_argument("--model", choices=MODELS + TEXT_MODELS + LLM_MODELS, default="cnn",
                        help="a random-initialised image model, a small text classifier trained offline for a "
                        "few seconds (bert, lstm: the text libraries' attacks), or a small random Llama with an "
                        "offline tokenizer (llama: nanoGCG)")
    parser.add_argument("--batch-size", type=_positive, default=4, help="images (texts) per attack call")
    parser.add_argument("--image-size", type=_positive, default=32, help="pixels (vit_b_16: a multiple of 16)")
    parser.add_argument("--steps", type=_positive, default=2, help="iterations of iterative attacks")
    parser.add_argument("--libraries", type=library_list, default=None, metavar="LIB[,LIB]",
                        help=f"comma list of: {', '.join(registry.INTEGRATIONS)} (default: every installed one)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--attacks", type=_names, default=None, metavar="NAME[,NAME]",
                       help="attacks to run: PGD (each library's own) or a library's attack name, e.g. CW, "
                       "DeepFool (default: a representative set per library)")
    group.add_argument("--all", action="store_true", help=f"run every attack of every library ({FULL_SET_DURATION})")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON (default: none)")
    parser.add_argument("--threads", type=_positive, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--quiet", action="store_true", help="no progress (bar on a terminal, else a line per attack)")


def _names(text: str) -> list[str]:
    names = [a.strip() for a in text.split(",") if a.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected one or more attack names")
    return names


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not valid (valid: an integer >= 1)")
    return value


def run(args: argparse.Namespace) -> int:
    """``sbpatch verify``: exit 0 when every attack is identical (or library-broken), 1 when one differs, 2 on a bad
    option."""
    import json

    if args.model == "vit_b_16" and args.image_size % 16:
        print(f"sbpatch verify: error: --image-size {args.image_size}: vit_b_16 needs a multiple of 16",
              file=sys.stderr)
        return 2

    import torch

    from sbpatch.bench.models import build_model, make_data

    if args.threads:
        torch.set_num_threads(args.threads)
    from sbpatch.bench.llm import LLM_MODELS
    from sbpatch.bench.text import TEXT_MODELS

    if args.model in LLM_MODELS:
        from sbpatch.bench.llm import llm_victim

        model = llm_victim(args.model)
        x, y = model.message, model.target  # --batch-size and --image-size do not apply
    elif args.model in TEXT_MODELS:
        from sbpatch.bench.text import offline, text_victim

        offline()  # the text libraries import without any download
        model = text_victim(args.model)
        x, y = model.texts[: args.batch_size], model.labels[: args.batch_size]
    else:
        model = build_model(args.model, args.image_size)
        x, y = make_data(args.batch_size, args.image_size)
    attacks = "all" if getattr(args, "all", False) else args.attacks
    try:
        report = verify(model, x, y, libraries=args.libraries or None, attacks=attacks, steps=args.steps,
                        progress=not getattr(args, "quiet", False))
    except ConfigError as exc:
        print(f"sbpatch verify: error: {exc}", file=sys.stderr)
        return 2
    print(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) | {"speedup": r.speedup} for r in report], f, indent=1)
    return 0 if report.ok else 1
