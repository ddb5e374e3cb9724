"""The freeze ledger: set ``requires_grad=False`` on parameters for the duration of a call, and restore exactly.

This module knows nothing about attack libraries. It imports torch lazily, so ``import sbpatch`` stays cheap.

Rules (DESIGN.md section 4):

* a reference-counted ledger keyed by parameter identity, guarded by one lock: the first holder of a parameter that
  requires grad sets it to False, the last holder to leave sets it back to True;
* a parameter that does not require grad when a holder arrives (frozen by the user) is never touched;
* kernel-preserving rules: parameters whose ``requires_grad`` changes the kernel PyTorch picks stay live
  (``nn.MultiheadAttention``'s in-projections, see :func:`add_keep_rule`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections.abc import Callable, Iterable
from typing import Any

log = logging.getLogger("sbpatch")

_lock = threading.Lock()
# id(param) -> [param, holders]. Holding the parameter keeps its id unique while it is in the ledger.
_ledger: dict[int, list[Any]] = {}
# id(param) -> [param, holders, saved .grad]: live parameters (kernel-preserving rules) whose .grad is set aside.
_guards: dict[int, list[Any]] = {}

# Module type (or "module.QualName" string) -> parameter names on that module that must stay live.
_keep_rules: dict[Any, frozenset[str]] = {
    "torch.nn.modules.activation.MultiheadAttention": frozenset(
        {"in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"}
    ),
}
_rule_cache: dict[type, frozenset[str]] = {}

# Per root module: (generation, params to freeze). The generation moves whenever any module anywhere registers a
# parameter or a submodule (torch's global registration hooks) or a keep rule changes.
_generation = 0
_param_cache: weakref.WeakKeyDictionary[Any, tuple[int, tuple[Any, ...]]] = weakref.WeakKeyDictionary()
_hooks_installed = False
_torch: Any = None


def _bump(*_: Any) -> None:
    global _generation
    _generation += 1


def _ensure_torch() -> Any:
    global _torch, _hooks_installed
    if _torch is None:
        import torch
        import torch.nn.modules.module as tmm

        if not _hooks_installed:
            for name in ("register_module_parameter_registration_hook", "register_module_module_registration_hook"):
                register = getattr(tmm, name, None)
                if register is not None:
                    register(_bump)
            _hooks_installed = hasattr(tmm, "register_module_parameter_registration_hook")
        _torch = torch
    return _torch


def add_keep_rule(module_type: type | str, *parameter_names: str) -> None:
    """Keep ``parameter_names`` of every ``module_type`` (or subclass) live whenever sbpatch freezes a model.

    ``module_type`` is a class or its ``"module.QualName"``. Use it for any layer whose kernel choice depends on
    whether a weight requires grad (check a suspect with ``sbpatch verify``).
    """
    if not parameter_names:
        raise ValueError("add_keep_rule needs at least one parameter name")
    with _lock:
        _keep_rules[module_type] = _keep_rules.get(module_type, frozenset()) | frozenset(parameter_names)
        _rule_cache.clear()
    _bump()


def remove_keep_rule(module_type: type | str) -> None:
    """Drop every keep rule registered for ``module_type``."""
    with _lock:
        _keep_rules.pop(module_type, None)
        _rule_cache.clear()
    _bump()


def keep_rules() -> dict[str, list[str]]:
    """The kernel-preserving rules in force: module type -> parameter names that always stay live."""
    return {_type_name(k): sorted(v) for k, v in _keep_rules.items()}


def _type_name(t: Any) -> str:
    return t if isinstance(t, str) else f"{t.__module__}.{t.__qualname__}"


def _kept_names(cls: type) -> frozenset[str]:
    names = _rule_cache.get(cls)
    if names is None:
        names = frozenset()
        for base in cls.__mro__:
            names |= _keep_rules.get(base, frozenset()) | _keep_rules.get(_type_name(base), frozenset())
        _rule_cache[cls] = names
    return names


def _module_params(module: Any) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """(parameters to freeze, parameters the rules keep live) of ``module``, de-duplicated, cached per module."""
    cached = _param_cache.get(module)
    if cached is not None and cached[0] == _generation and _hooks_installed:
        return cached[1]
    generation = _generation
    seen: set[int] = set()
    frozen_: list[Any] = []
    kept_: list[Any] = []
    for sub in module.modules():
        kept = _kept_names(type(sub))
        for name, p in sub._parameters.items():
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            (kept_ if name in kept else frozen_).append(p)
    result = (tuple(frozen_), tuple(kept_))
    try:
        _param_cache[module] = (generation, result)
    except TypeError:  # not weak-referenceable
        pass
    return result


def _resolve_keep(roots: list[Any], keep: Iterable[Any]) -> set[int]:
    torch = _ensure_torch()
    ids: set[int] = set()
    for item in keep:
        if isinstance(item, str):
            found = False
            for root in roots:
                if not isinstance(root, torch.nn.Module):
                    continue
                named = dict(root.named_parameters(remove_duplicate=False))
                if item in named:
                    ids.add(id(named[item]))
                    found = True
                    continue
                mods = dict(root.named_modules(remove_duplicate=False))
                if item in mods:
                    ids.update(id(p) for p in mods[item].parameters())
                    found = True
            if not found:
                raise ValueError(f"keep={item!r} names no parameter or submodule of the frozen modules")
        elif isinstance(item, torch.nn.Module):
            ids.update(id(p) for p in item.parameters())
        elif isinstance(item, torch.Tensor):
            ids.add(id(item))
        else:
            ids.update(id(p) for p in item)
    return ids


def collect(targets: Iterable[Any], keep: Iterable[Any] = ()) -> tuple[list[Any], list[Any]]:
    """(parameters to freeze, parameters kept live by the kernel-preserving rules) for ``targets``.

    ``targets``: modules (DDP/FSDP wrappers included), parameters, or iterables of parameters. ``keep``: parameters,
    modules, or names (relative to a target module) of parameters or submodules that stay live.
    """
    torch = _ensure_torch()
    roots: list[Any] = []
    for t in targets:
        if isinstance(t, (torch.nn.Module, torch.Tensor)):
            roots.append(t)
        elif isinstance(t, Iterable):
            roots.extend(t)
        else:
            raise TypeError(f"cannot freeze {type(t).__name__}: pass nn.Modules, parameters or iterables of them")
    params: list[Any] = []
    guarded: list[Any] = []
    seen: set[int] = set()
    for r in roots:
        group, kept = _module_params(r) if isinstance(r, torch.nn.Module) else ((r,), ())
        for p in group:
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
        for p in kept:
            if id(p) not in seen:
                seen.add(id(p))
                guarded.append(p)
    if keep:
        kept_ids = _resolve_keep(roots, keep)
        params = [p for p in params if id(p) not in kept_ids]
    return params, guarded


def acquire(params: Iterable[Any], held: list[list[Any]], guarded: Iterable[Any] = ()) -> None:
    """Freeze ``params`` for one holder, appending each ledger entry it now holds to ``held``.

    ``guarded``: parameters the kernel-preserving rules keep live. They still receive weight gradients from a
    ``backward()``, so their ``.grad`` is set aside (the same tensor object, untouched) and put back on release.
    ``held`` is filled as it goes, so a caller that releases it in ``finally`` restores even after an interruption.
    """
    with _lock:
        for p in params:
            key = id(p)
            entry = _ledger.get(key)
            if entry is not None:
                entry[1] += 1
                held.append(entry)
            elif p.requires_grad:
                entry = [p, 1]
                held.append(entry)
                _ledger[key] = entry
                p.requires_grad = False
        for p in guarded:
            key = id(p)
            entry = _guards.get(key)
            if entry is not None:
                entry[1] += 1
                held.append(entry)
            elif p.requires_grad:
                entry = [p, 1, p.grad]
                held.append(entry)
                _guards[key] = entry
                p.grad = None


def release(held: list[list[Any]]) -> None:
    """Give back what :func:`acquire` took; the last holder restores ``requires_grad=True`` (or the saved grad)."""
    with _lock:
        while held:
            entry = held.pop()
            entry[1] -= 1
            if entry[1] == 0:
                p = entry[0]
                if len(entry) == 2:
                    if _ledger.get(id(p)) is entry:
                        del _ledger[id(p)]
                    p.requires_grad = True
                else:
                    if _guards.get(id(p)) is entry:
                        del _guards[id(p)]
                    p.grad = entry[2]


def held_count() -> int:
    """Number of parameters sbpatch holds right now, frozen or guarded (0 when no frozen call is running)."""
    return len(_ledger) + len(_guards)


def call_frozen(targets: Iterable[Any], keep: Iterable[Any], fn: Callable[..., Any], args: Any, kwargs: Any) -> Any:
    """Call ``fn(*args, **kwargs)`` with ``targets`` frozen. A failure to freeze runs ``fn`` unfrozen, never raises."""
    held: list[list[Any]] = []
    try:
        try:
            params, guarded = collect(targets, keep)
            acquire(params, held, guarded)
        except Exception:  # never break the user's call because freezing failed
            log.warning("sbpatch could not freeze the model; running the call unpatched", exc_info=True)
            release(held)
        return fn(*args, **kwargs)
    finally:
        release(held)


class frozen(contextlib.ContextDecorator):
    """Freeze the parameters of ``modules`` inside a ``with`` block or a decorated function, then restore them.

    >>> with sbpatch.frozen(model):
    ...     x_adv = my_attack(model, x, y)

    ``modules``: ``nn.Module`` objects (DDP/FSDP wrappers included), parameters or iterables of parameters.
    ``keep``: parameters, modules, or names relative to a given module (``"embeddings.word_embeddings"``) that stay
    live. Parameters already frozen by the user stay frozen; nesting and threads are safe; restoration happens even
    on an exception or KeyboardInterrupt. The kernel-preserving rules (:func:`keep_rules`) apply.
    """

    def __init__(self, *modules: Any, keep: Iterable[Any] = ()) -> None:
        self._targets = modules
        self._keep = tuple(keep) if not isinstance(keep, str) else (keep,)
        self._local = threading.local()

    def __enter__(self) -> frozen:
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        held: list[list[Any]] = []
        stack.append(held)
        try:
            params, guarded = collect(self._targets, self._keep)
            acquire(params, held, guarded)
        except BaseException:
            release(held)
            stack.pop()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        release(self._local.stack.pop())

    def _recreate_cm(self) -> frozen:  # ContextDecorator: each decorated call gets its own holder stack entry
        return self
