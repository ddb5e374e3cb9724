"""Finding, on the CPU the tests run on, a shape where the paper's freeze-everything one-liner changes the numbers.

Which shapes round differently when a weight is frozen (``mm`` on a folded copy vs ``bmm`` on an expanded weight,
a fused attention path vs the unfused one) depends on the CPU: on one AMD EPYC ``nn.Linear(C, 10)`` on a transposed
input differs, on one Intel Xeon only ``nn.Linear(C, 1)``, on another most widths below 16. A test that needs a
kernel-sensitive case therefore searches for one at run time (:func:`find_sensitive`) instead of asserting a CPU's
rounding. When this machine has none, the test says so (a :class:`NoSensitiveShape` warning in pytest's summary) and
still asserts sbpatch's identity on the first candidate.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

from sbpatch.verify import identical

WIDTHS = tuple(range(1, 17))


class NoSensitiveShape(UserWarning):
    """No candidate shape rounds differently under the one-liner on this CPU: the identity is asserted anyway."""


def freeze_all(model: nn.Module) -> list[nn.Parameter]:
    """The one-liner: every live parameter set to ``requires_grad=False``; returns those it changed."""
    live = [p for p in model.parameters() if p.requires_grad]
    for p in live:
        p.requires_grad_(False)
    return live


def one_liner_result(model: nn.Module, probe: Callable[[], Any]) -> Any:
    """``probe()`` with every parameter frozen, restored afterwards."""
    live = freeze_all(model)
    try:
        return probe()
    finally:
        for p in live:
            p.requires_grad_(True)


def find_sensitive(
    make: Callable[[int], tuple[nn.Module, Any]],
    probe: Callable[[nn.Module, Any], Any],
    widths: Iterable[int] = WIDTHS,
    what: str = "",
) -> tuple[nn.Module, Any, bool]:
    """The first ``make(width)`` whose ``probe`` result the one-liner changes on this CPU: ``(model, inputs, True)``.

    ``make(width)`` builds a fresh model and its inputs; ``probe(model, inputs)`` returns tensors (logits, input
    gradient). With no sensitive width, warns :class:`NoSensitiveShape` and returns the first width's model with
    ``False``: the caller still asserts sbpatch's identity there.
    """
    widths = tuple(widths)
    for width in widths:
        model, inputs = make(width)
        expected = probe(model, inputs)
        if not identical(expected, one_liner_result(model, functools.partial(probe, model, inputs))):
            return make(width) + (True,)
    model, inputs = make(widths[0])
    warnings.warn(
        f"{what or 'this case'}: on this CPU the one-liner rounds alike at every width {widths[0]}..{widths[-1]}; "
        "sbpatch's identity is still asserted",
        NoSensitiveShape,
        stacklevel=2,
    )
    return model, inputs, False
