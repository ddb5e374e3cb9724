"""The freeze ledger: set ``requires_grad=False`` on parameters for the duration of a call, and restore exactly.

This module knows nothing about attack libraries. It imports torch lazily, so ``import sbpatch`` stays cheap.

Rules (DESIGN.md section 4):

* a reference-counted ledger keyed by parameter identity, guarded by one lock: the first holder of a parameter that
  requires grad sets it to False, the last holder to leave sets it back to True;
* the parameters of a module are a cached :class:`Group`; a call whose group is already held (nested attacks,
  a library's gradient method inside its own ``generate``) only counts itself, so the hot path stays cheap;
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
from itertools import repeat
from typing import Any

log = logging.getLogger("sbpatch")

_lock = threading.Lock()
# id(param) -> holders, for every parameter sbpatch set to False. A holding Group keeps the parameter alive, so its
# id stays unique while it is counted here.
_ledger: dict[int, int] = {}
# id(param) -> [holders, saved .grad]: live parameters (kernel-preserving rules) whose .grad is set aside.
_guards: dict[int, list[Any]] = {}
_active = 0  # groups with at least one holder
# The only active group, while it is alone: its parameters are not written to the ledger (the hot path: one attack
# call at a time). A second group arriving writes them first.
_exclusive: Group | None = None

# "module.QualName" of a module type -> parameter names on that module (or a subclass) that must stay live.
_keep_rules: dict[str, frozenset[str]] = {
    "torch.nn.modules.activation.MultiheadAttention": frozenset(
        {"in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"}
    ),
}
_rule_cache: dict[type, frozenset[str]] = {}

# Per root module: (generation, its Group). The generation moves whenever any module anywhere registers a
# parameter or a submodule (torch's global registration hooks) or a keep rule changes.
_generation = 0
_param_cache: weakref.WeakKeyDictionary[Any, tuple[int, Group]] = weakref.WeakKeyDictionary()
_hooks_installed = False
_freeze_failed = False  # warned once
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
    key = _type_name(module_type)
    with _lock:
        _keep_rules[key] = _keep_rules.get(key, frozenset()) | frozenset(parameter_names)
        _rule_cache.clear()
    _bump()


def remove_keep_rule(module_type: type | str) -> None:
    """Drop every keep rule registered for ``module_type`` (a class or its ``"module.QualName"``)."""
    with _lock:
        _keep_rules.pop(_type_name(module_type), None)
        _rule_cache.clear()
    _bump()


def keep_rules() -> dict[str, list[str]]:
    """The kernel-preserving rules in force: module type -> parameter names that always stay live."""
    return {k: sorted(v) for k, v in _keep_rules.items()}


def _type_name(t: Any) -> str:
    return t if isinstance(t, str) else f"{t.__module__}.{t.__qualname__}"


def _kept_names(cls: type) -> frozenset[str]:
    names = _rule_cache.get(cls)
    if names is None:
        names = frozenset()
        for base in cls.__mro__:
            names |= _keep_rules.get(_type_name(base), frozenset())
        _rule_cache[cls] = names
    return names


class Group:
    """Parameters frozen together (one module's, cached), and what the current holders of the group own."""

    __slots__ = ("count", "guarded", "owned", "params", "saved")

    def __init__(self, params: tuple[Any, ...], guarded: tuple[Any, ...]) -> None:
        self.params = params  # to freeze
        self.guarded = guarded  # kept live by the kernel-preserving rules: .grad set aside
        self.count = 0  # holders of this group right now
        self.owned: list[Any] = []  # parameters this group counted in the ledger
        self.saved: list[Any] = []  # guarded parameters this group counted in _guards


def _module_group(module: Any) -> Group:
    """The cached :class:`Group` of ``module``: its parameters, de-duplicated, split by the keep rules."""
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
    group = Group(tuple(frozen_), tuple(kept_))
    try:
        _param_cache[module] = (generation, group)
    except TypeError:  # not weak-referenceable
        pass
    return group


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


def collect(targets: Iterable[Any], keep: Iterable[Any] = ()) -> list[Group]:
    """The groups of parameters that freezing ``targets`` concerns (before looking at their current flags).

    ``targets``: modules (DDP/FSDP wrappers included), parameters, or iterables of parameters. ``keep``: parameters,
    modules, or names (relative to a target module) of parameters or submodules that stay live. Plain modules with
    no ``keep`` give their cached group; anything else gives one new group.
    """
    torch = _ensure_torch()
    module_type = torch.nn.Module
    if not keep and all(isinstance(t, module_type) for t in targets):
        return [_module_group(t) for t in targets]
    roots: list[Any] = []
    for t in targets:
        if isinstance(t, (module_type, torch.Tensor)):
            roots.append(t)
        elif isinstance(t, Iterable):
            roots.extend(t)
        else:
            raise TypeError(f"cannot freeze {type(t).__name__}: pass nn.Modules, parameters or iterables of them")
    params: list[Any] = []
    guarded: list[Any] = []
    seen: set[int] = set()
    for r in roots:
        if isinstance(r, module_type):
            group = _module_group(r)
            members, kept = group.params, group.guarded
        else:
            members, kept = (r,), ()
        for p in members:
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
    return [Group(tuple(params), tuple(guarded))]


def acquire(groups: Iterable[Group], held: list[Group]) -> None:
    """Freeze ``groups`` for one holder, appending each group it now holds to ``held``.

    A group already held only counts the new holder. Otherwise each of its parameters that requires grad is set to
    False (or, if another group froze it, counted). Guarded parameters (kernel-preserving rules) stay live but still
    receive weight gradients from a ``backward()``, so their ``.grad`` is set aside (the same tensor object,
    untouched) and put back on release. ``held`` is filled as it goes, so a caller that releases it in ``finally``
    restores even after an interruption.
    """
    global _active, _exclusive
    with _lock:
        for group in groups:
            held.append(group)
            group.count += 1
            if group.count > 1:
                continue
            owned = group.owned
            if not _active:  # nothing else frozen: no ledger needed
                _exclusive = group
                owned.extend([p for p in group.params if p.requires_grad])
                for p in owned:
                    p.requires_grad = False
            else:
                if _exclusive is not None:
                    _ledger.update(zip(map(id, _exclusive.owned), repeat(1)))
                    _exclusive = None
                _acquire_counted(group.params, owned)
            _active += 1
            for p in group.guarded:
                key = id(p)
                entry = _guards.get(key)
                if entry is not None:
                    entry[0] += 1
                    group.saved.append(p)
                elif p.requires_grad:
                    _guards[key] = [1, p.grad]
                    group.saved.append(p)
                    p.grad = None


def _acquire_counted(params: tuple[Any, ...], owned: list[Any]) -> None:
    ledger = _ledger
    for p in params:
        key = id(p)
        holders = ledger.get(key)
        if holders is not None:
            ledger[key] = holders + 1
            owned.append(p)
        elif p.requires_grad:
            ledger[key] = 1
            owned.append(p)
            p.requires_grad = False


def release(held: list[Group]) -> None:
    """Give back what :func:`acquire` took; the last holder of a parameter restores ``requires_grad=True``."""
    global _active, _exclusive
    ledger = _ledger
    with _lock:
        while held:
            group = held.pop()
            group.count -= 1
            if group.count:
                continue
            _active -= 1
            owned, group.owned = group.owned, []
            if group is _exclusive or not _active:  # alone: every parameter it owns is held once, by it
                _exclusive = None
                ledger.clear()
                for p in owned:
                    p.requires_grad = True
                owned = []
            for p in owned:
                key = id(p)
                holders = ledger[key] - 1
                if holders:
                    ledger[key] = holders
                else:
                    del ledger[key]
                    p.requires_grad = True
            saved, group.saved = group.saved, []
            for p in saved:
                entry = _guards[id(p)]
                entry[0] -= 1
                if not entry[0]:
                    del _guards[id(p)]
                    p.grad = entry[1]


def held_count() -> int:
    """Number of parameters sbpatch holds right now, frozen or guarded (0 when no frozen call is running)."""
    with _lock:
        exclusive = len(_exclusive.owned) if _exclusive is not None else 0
        return len(_ledger) + exclusive + len(_guards)


def call_frozen(targets: Iterable[Any], keep: Iterable[Any], fn: Callable[..., Any], args: Any, kwargs: Any) -> Any:
    """Call ``fn(*args, **kwargs)`` with ``targets`` frozen. A failure to freeze runs ``fn`` unfrozen, never raises."""
    global _freeze_failed
    held: list[Group] = []
    try:
        try:
            acquire(collect(targets, keep), held)
        except Exception:  # never break the user's call because freezing failed
            if not _freeze_failed:
                _freeze_failed = True
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
        held: list[Group] = []
        stack.append(held)
        try:
            acquire(collect(self._targets, self._keep), held)
        except BaseException:
            release(held)
            stack.pop()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        release(self._local.stack.pop())

    def _recreate_cm(self) -> frozen:  # ContextDecorator: each decorated call gets its own holder stack entry
        return self
