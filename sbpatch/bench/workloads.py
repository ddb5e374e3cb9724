"""What the benchmark runs: the victim models, the per-library attack names, and the hand-written "limit" attack.

The library attacks come from each contrib module's ``cases()`` (the same builders the tests and ``sbpatch verify``
use): ``cases()[name](model, x, y, steps)`` returns a zero-argument call of one attack. ``PGD`` is an alias resolved
per library through :data:`PGD_NAMES`, the one place that maps it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sbpatch import registry

Builder = Callable[[Any, Any, Any, int], Callable[[], Any]]

# The generic name "PGD" in each library's cases(): the first key present wins.
PGD_NAMES: dict[str, tuple[str, ...]] = {
    "torchattacks": ("PGD",),
    "art": ("ProjectedGradientDescent", "ProjectedGradientDescentPyTorch"),
    "foolbox": ("LinfPGD", "LinfProjectedGradientDescentAttack"),
    "advertorch": ("LinfPGDAttack",),
    "deeprobust": ("PGD",),
    "cleverhans": ("projected_gradient_descent",),
    "torchattack": ("PGD",),
    "secmlt": ("PGD-native",),
    "adv_lib": ("pgd_linf",),
}

# Attacks where freezing matters in torchattacks (they call loss.backward()); its PGD uses autograd.grad.
DEFAULT_EXTRA: tuple[tuple[str, str], ...] = (("torchattacks", "CW"), ("torchattacks", "DeepFool"))

MODELS: tuple[str, ...] = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "vit_b_16", "cnn")
LIBRARIES: tuple[str, ...] = tuple(registry.INTEGRATIONS)
NUM_CLASSES = 10


def modality(library: str) -> str:
    """``"image"`` or what the contrib module declares in ``MODALITY`` (``"text"``: its cases take a text victim)."""
    return getattr(importlib.import_module(registry.INTEGRATIONS[library]), "MODALITY", "image")


def image_libraries() -> list[str]:
    """The libraries whose cases() attack an image model: what ``bench`` and ``verify`` run by default."""
    return [name for name in registry.INTEGRATIONS if modality(name) == "image"]


def library_cases(library: str) -> tuple[dict[str, Builder], str]:
    """The contrib module's ``cases()`` for ``library``, and a note when there are none (missing, failed import)."""
    module = importlib.import_module(registry.INTEGRATIONS[library])
    cases = getattr(module, "cases", None)
    if cases is None:
        return {}, f"sbpatch.contrib.{library} has no cases() yet"
    try:
        return dict(cases()), ""
    except Exception as exc:  # the library is missing or does not import on this stack
        return {}, f"{library} cases() failed: {type(exc).__name__}: {exc}"[:200]


@dataclass
class Row:
    """One benchmark row: an attack of one library (``case`` is the key in that library's cases())."""

    library: str
    attack: str
    case: str | None
    note: str = ""


def resolve_rows(libraries: list[str], attacks: list[str] | None, cases: dict[str, dict[str, Builder]]) -> list[Row]:
    """The rows for the requested libraries and attacks.

    ``attacks=None``: PGD in every library plus :data:`DEFAULT_EXTRA`. ``PGD`` maps through :data:`PGD_NAMES`;
    any other name is a key of a library's cases() and gives a row for each requested library that has it.
    A library whose cases() lacks PGD gets a row with ``case=None`` and a note (reported, not measured).
    """
    rows: list[Row] = []
    wanted = attacks if attacks is not None else ["PGD"]
    for attack in wanted:
        for lib in libraries:
            lib_cases = cases.get(lib, {})
            if attack == "PGD":
                pgd = PGD_NAMES.get(lib, ("PGD",))
                case = next((n for n in pgd if n in lib_cases), None)
                note = "" if case else f"{lib}'s cases() has no PGD ({' / '.join(pgd)}); skipped"
                rows.append(Row(lib, "PGD", case, note))
            elif attack in lib_cases:
                rows.append(Row(lib, attack, attack))
    if attacks is None:
        rows += [Row(lib, a, a) for lib, a in DEFAULT_EXTRA if lib in libraries and a in cases.get(lib, {})]
    return rows


def attack_choices(cases: dict[str, dict[str, Builder]]) -> list[str]:
    """Every valid ``--attacks`` name for these libraries: ``PGD`` and each case name."""
    names = {n for lib_cases in cases.values() for n in lib_cases}
    return ["PGD", *sorted(names - {"PGD"}, key=str.lower)]
