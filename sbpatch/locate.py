"""Find the ``nn.Module`` objects behind an attack's model argument.

Attack libraries hold the victim model in many shapes: the module itself, a DDP/FSDP wrapper, a bound method
(``model.forward``), a ``functools.partial``, a lambda or closure over the module, a ``__wrapped__`` decorator chain,
or a library wrapper object that keeps the module in an attribute. :func:`find_modules` looks through them all.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

_MAX_DEPTH = 4


def find_modules(obj: Any, attributes: Iterable[str] = (), depth: int = _MAX_DEPTH) -> list[Any]:
    """The distinct ``nn.Module`` objects reachable from ``obj`` (outermost first), or ``[]``.

    ``attributes``: extra attribute names to follow on plain objects (for example ``("model", "_model")`` for a
    library's wrapper class). A module found stops the search on that branch: its own parameters cover its children.
    """
    import torch

    module_type = torch.nn.Module
    found: list[Any] = []
    seen: set[int] = set()
    names = tuple(attributes)

    def visit(o: Any, d: int) -> None:
        if o is None or id(o) in seen or d < 0:
            return
        seen.add(id(o))
        if isinstance(o, module_type):
            found.append(o)
            return
        if isinstance(o, (str, bytes, int, float, bool, torch.Tensor)):
            return
        if isinstance(o, functools.partial):
            visit(o.func, d - 1)
            for a in o.args:
                visit(a, d - 1)
            for a in o.keywords.values():
                visit(a, d - 1)
            return
        if isinstance(o, (list, tuple)):
            for a in o:
                visit(a, d - 1)
            return
        self_ = getattr(o, "__self__", None)  # bound method (also of a wrapt proxy)
        if self_ is not None and not isinstance(o, type):
            visit(self_, d - 1)
        wrapped = getattr(o, "__wrapped__", None)
        if wrapped is not None:
            visit(wrapped, d - 1)
        func = getattr(o, "__func__", o)
        closure = getattr(func, "__closure__", None)
        if closure:
            for cell in closure:
                try:
                    visit(cell.cell_contents, d - 1)
                except ValueError:  # empty cell
                    pass
        code_globals = getattr(func, "__globals__", None)
        code = getattr(func, "__code__", None)
        if code_globals is not None and code is not None:  # a lambda naming a global model: `lambda x: net(x)`
            for name in code.co_names:
                value = code_globals.get(name)
                if isinstance(value, module_type):
                    visit(value, d - 1)
        for name in names:
            try:
                value = getattr(o, name, None)
            except Exception:
                continue
            visit(value, d - 1)

    visit(obj, depth)
    return found


def argument(position: int, name: str, attributes: Iterable[str] = ()) -> Callable[[Any, Any, tuple, dict], list[Any]]:
    """A locator for a call whose model is its argument ``name`` (at ``position`` when passed positionally)."""
    follow = tuple(attributes)

    def locate(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> list[Any]:
        value = args[position] if len(args) > position else kwargs.get(name)
        return find_modules(value, follow)

    locate.__name__ = f"argument_{name}"
    return locate


def attribute(*names: str, attributes: Iterable[str] = ()) -> Callable[[Any, Any, tuple, dict], list[Any]]:
    """A locator for a method whose model is held in attributes ``names`` of the instance (``self.model``)."""
    follow = tuple(attributes)

    def locate(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> list[Any]:
        return find_modules([getattr(instance, n, None) for n in names], follow)

    locate.__name__ = f"attribute_{'_'.join(names)}"
    return locate
