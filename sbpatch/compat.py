"""Legacy-import shims for libraries that no longer import on modern torch, scipy or numpy.

A shim only adds what is missing, never replaces what exists, and must be in place before the failing import runs
(a post-import hook fires only after a successful import). The registry applies an integration's shims when the
library is enabled; ``status()`` lists those applied. If the library was imported (and failed) before sbpatch was
enabled, Python has not cached the failed module: importing it again after ``enable()`` works.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from typing import Any


def _add_missing(module_name: str, name: str, value: Callable[[], Any]) -> bool:
    module = importlib.import_module(module_name)  # the attribute torch.autograd.gradcheck is a function: use import
    if hasattr(module, name):
        return False
    setattr(module, name, value())
    return True


def _zero_gradients() -> Any:
    import torch

    def zero_gradients(x: Any) -> None:
        """The helper torch removed in 1.9 (advertorch 0.2.3 imports it): zero ``x.grad`` or each one of a tuple."""
        if isinstance(x, torch.Tensor):
            if x.grad is not None:
                x.grad.detach_()
                x.grad.zero_()
        else:
            for elem in x:
                zero_gradients(elem)

    return zero_gradients


def torch_zero_gradients() -> bool:
    """``torch.autograd.gradcheck.zero_gradients`` (removed from torch; advertorch imports it)."""
    return _add_missing("torch.autograd.gradcheck", "zero_gradients", _zero_gradients)


def scipy_status_message() -> bool:
    """``scipy.optimize.optimize._status_message`` (moved to ``scipy.optimize._optimize``; deeprobust imports it)."""

    def value() -> Any:
        return importlib.import_module("scipy.optimize._optimize")._status_message

    return _add_missing("scipy.optimize.optimize", "_status_message", value)


def gitpython_quiet() -> bool:
    """``GIT_PYTHON_REFRESH=quiet`` unless set: foolbox imports GitPython, which fails without a ``git`` binary."""
    if "GIT_PYTHON_REFRESH" in os.environ:
        return False
    os.environ["GIT_PYTHON_REFRESH"] = "quiet"
    return True


SHIMS: dict[str, Callable[[], bool]] = {
    "torch_zero_gradients": torch_zero_gradients,
    "scipy_status_message": scipy_status_message,
    "gitpython_quiet": gitpython_quiet,
}


def apply(name: str) -> bool:
    """Apply one shim by name; True if it added something."""
    return SHIMS[name]()
