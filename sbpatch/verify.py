"""Check sbpatch's promise on your own model: run the installed libraries' attacks unpatched and patched.

``sbpatch.verify(model, inputs, labels)`` runs every attack sbpatch knows for each installed library (the contrib
modules' ``cases()``) twice with the same seeds, first straight through (``sbpatch.paused()``), then patched, and
reports per attack: identical or DIFFERENT, and the time ratio unpatched/patched. ``sbpatch verify`` does the same from
the command line on a named model.
"""

from __future__ import annotations

import argparse
import importlib
import random
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from sbpatch import registry
from sbpatch._table import format_table
from sbpatch.freeze import held_count
from sbpatch.patching import paused


def identical(a: Any, b: Any) -> bool:
    """Bitwise equality of tensors, arrays (NaN equal to NaN), numbers and nested tuples/lists/dicts of them."""
    import numpy as np
    import torch

    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        if torch.equal(a, b):
            return True
        if not a.is_floating_point():
            return False
        ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]  # same bits, NaN included
        return torch.equal(a.detach().contiguous().view(ints), b.detach().contiguous().view(ints))
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b, equal_nan=a.dtype.kind in "fc")
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(identical(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(identical(a[k], b[k]) for k in a)
    if hasattr(a, "__dict__") and type(a) is type(b) and not callable(a):
        return identical(vars(a), vars(b))
    return bool(a == b)


def seed_all(seed: int = 0) -> None:
    import numpy as np
    import torch

    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


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
    """``verify()``'s result: a list of :class:`VerifyResult` that prints as a table."""

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
        return "\n".join(lines)

    @property
    def ok(self) -> bool:
        """No attack gave a different result patched."""
        return all(r.result != "DIFFERENT" for r in self)


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
    attacks: Iterable[str] | None = None,
    steps: int = 2,
    seed: int = 0,
    progress: bool = True,
) -> VerifyReport:
    """Run each installed library's attacks on ``model`` unpatched and patched; report identical/DIFFERENT and time.

    ``inputs``: a float tensor in [0, 1] of shape (N, C, H, W); ``labels``: int64 class labels; the model returns
    logits. ``libraries`` defaults to every installed, supported one; ``attacks`` filters by attack name. The model's
    ``requires_grad`` flags, ``.grad`` and train/eval modes are put back as they were after each attack. Libraries
    that were not enabled are enabled for the run and disabled again afterwards.
    """
    names = registry.check_names(list(libraries)) if libraries else list(registry.INTEGRATIONS)
    wanted = set(attacks) if attacks else None
    report = VerifyReport()
    jobs: list[tuple[str, str, Any]] = []
    enabled_here = []
    for name in names:
        if registry.why_not(name) is not None:
            continue
        if not registry.counters(name).enabled:
            registry.enable(name)
            enabled_here.append(name)
        try:
            cases = _cases(name)
        except Exception as exc:  # the library does not import on this stack
            report.append(VerifyResult(name, "*", "library-broken", error=f"{type(exc).__name__}: {exc}"))
            continue
        jobs += [(name, attack, build) for attack, build in sorted(cases.items()) if not wanted or attack in wanted]
    bar = _progress(len(jobs), progress)
    try:
        for library, attack, build in jobs:
            bar.set_description(f"{library} {attack}")
            report.append(_one(library, attack, build, model, inputs, labels, steps, seed))
            bar.update(1)
    finally:
        bar.close()
        for name in enabled_here:
            registry.disable(name)
    return report


def _one(library: str, attack: str, build: Any, model: Any, x: Any, y: Any, steps: int, seed: int) -> VerifyResult:
    state = _state(model)
    try:
        run = build(model, x, y, steps)
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
    return VerifyResult(library, attack, "identical" if same else "DIFFERENT", unpatched, patched)


class _NoBar:
    def set_description(self, _: str) -> None: ...

    def update(self, _: int) -> None: ...

    def close(self) -> None: ...


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, unit="attack", leave=False)


# --- command line ----------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``sbpatch verify``."""
    from sbpatch.bench.workloads import MODELS
    from sbpatch.cli import library_list

    parser.add_argument("--model", choices=MODELS, default="cnn", help="a random-initialised model (default cnn)")
    parser.add_argument("--batch-size", type=_positive, default=4)
    parser.add_argument("--image-size", type=_positive, default=32)
    parser.add_argument("--steps", type=_positive, default=2, help="iterations of iterative attacks (default 2)")
    parser.add_argument("--libraries", type=library_list, default=None, help="comma list (default: all installed)")
    parser.add_argument("--attacks", type=lambda s: [a for a in s.split(",") if a], default=None)
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--threads", type=_positive, default=None, help="torch.set_num_threads")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not valid (valid: an integer >= 1)")
    return value


def run(args: argparse.Namespace) -> int:
    """``sbpatch verify``: exit 0 when every attack is identical (or library-broken), 1 when one differs."""
    import json

    import torch

    from sbpatch.bench.models import build_model, make_data

    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args.model, args.image_size)
    x, y = make_data(args.batch_size, args.image_size)
    report = verify(model, x, y, libraries=args.libraries or None, attacks=args.attacks, steps=args.steps)
    print(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) | {"speedup": r.speedup} for r in report], f, indent=1)
    return 0 if report.ok else 1
