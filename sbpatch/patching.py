"""Declarative patch targets and the generic patch/unpatch over them (exact mirrors).

A contrib module describes its library as data: an :class:`Integration` holding :class:`Target` records. This
module turns a target into wrapt wrappers around the library's attributes and takes them off again, restoring the
original objects by identity. It knows nothing about any particular library.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import logging
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import wrapt

from sbpatch import freeze
from sbpatch.locate import NotTorch, warn_unlocated

log = logging.getLogger("sbpatch")

# (wrapped, instance, args, kwargs) -> the victim modules; an empty result means "none found": call unpatched, with a
# warning once per function, or, as locate.NotTorch, "a model of another framework": call unpatched silently.
Locator = Callable[[Any, Any, tuple, dict], Iterable[Any]]
# (wrapped, instance, args, kwargs) -> parameters / modules / names that stay live during the call.
Keeper = Callable[[Any, Any, tuple, dict], Iterable[Any]]

_paused: contextvars.ContextVar[bool] = contextvars.ContextVar("sbpatch_paused", default=False)


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """Inside this block (this thread or task only), patched entry points call straight through, unfrozen."""
    token = _paused.set(True)
    try:
        yield
    finally:
        _paused.reset(token)


@dataclass(frozen=True)
class Target:
    """One thing to wrap: a function or a method, found at ``module`` + ``path``.

    path: ``"func"`` or ``"Class.method"``.
    locate: returns the victim modules from ``(wrapped, instance, args, kwargs)``.
    subclasses: for a method, also wrap every subclass that defines ``method`` in its own ``__dict__``, now and
        when defined later (a hook on the class's ``__init_subclass__``; nothing on the call path).
    exclude_class: for ``subclasses``: ``cls -> reason or None``; a class with a reason is never wrapped.
    pass_instance: ``instance -> reason or None``; a call on such an instance is never frozen (for classes that
        inherit a wrapped method but train, e.g. torchattacks' LGV).
    rebind: for a function, also replace the references the library's own modules bound by name
        (``from .fgm import fast_gradient_method``).
    keep: parameters that must stay live during the call.
    context: ``(wrapped, instance, args, kwargs) -> context manager`` entered around each frozen call, before the
        parameters are frozen (it sees them as the caller left them): what a library needs besides frozen
        parameters, e.g. OpenAttack's hooked embedding output made to require grad. If building or entering it
        fails, the call runs unpatched.
    """

    module: str
    path: str
    locate: Locator
    subclasses: bool = False
    exclude_class: Callable[[type], str | None] | None = None
    pass_instance: Callable[[Any], str | None] | None = None
    rebind: bool = False
    keep: Keeper | None = None
    context: Callable[[Any, Any, tuple, dict], contextlib.AbstractContextManager[Any]] | None = None

    @property
    def name(self) -> str:
        return f"{self.module}.{self.path}"


@dataclass(frozen=True)
class Integration:
    """What sbpatch knows about one attack library: pure data, read by the registry."""

    name: str  # sbpatch's name for it, used by enable() and SBPATCH
    distribution: str  # the PyPI distribution, for the installed version
    module: str  # the top-level import name
    supported: str  # PEP 440 specifier of the versions tested
    targets: tuple[Target, ...]
    excluded: Mapping[str, str] = field(default_factory=dict)  # what is never wrapped, and why
    shims: tuple[str, ...] = ()  # names of sbpatch.compat shims applied before the library's import


class Counters:
    """Per-library call counters and the enabled flag read by the wrappers (a few attribute reads per call)."""

    __slots__ = ("enabled", "calls", "unlocated", "passed")

    def __init__(self) -> None:
        self.enabled = False
        self.calls = 0
        self.unlocated = 0
        self.passed = 0


class SbpatchWrapper(wrapt.FunctionWrapper):
    """The wrapt wrapper sbpatch installs; its type marks an attribute as already patched."""


@dataclass
class Patch:
    """One attribute sbpatch replaced: restore ``original`` on ``owner.attr`` while it still holds ``replacement``."""

    owner: Any
    attr: str
    original: Any
    replacement: Any

    def undo(self) -> None:
        current = self.owner.__dict__.get(self.attr) if isinstance(self.owner, type) else getattr(
            self.owner, self.attr, None
        )
        if current is self.replacement:
            setattr(self.owner, self.attr, self.original)


_NO_CONTEXT = contextlib.nullcontext()


def make_wrapper(target: Target, counters: Counters) -> Callable[..., Any]:
    """The wrapt wrapper function for ``target``: gate, locate, freeze, call, restore."""
    locate = target.locate
    keep = target.keep
    pass_instance = target.pass_instance
    context = target.context
    call_frozen = freeze.call_frozen

    def sbpatch_wrapper(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
        if not counters.enabled or _paused.get():
            return wrapped(*args, **kwargs)
        if pass_instance is not None and instance is not None and pass_instance(instance):
            counters.passed += 1
            return wrapped(*args, **kwargs)
        try:
            located = locate(wrapped, instance, args, kwargs)
            modules = located if isinstance(located, NotTorch) else list(located)
            kept = tuple(keep(wrapped, instance, args, kwargs)) if keep is not None else ()
        except Exception:
            log.debug("sbpatch: locating the model for %s failed", target.name, exc_info=True)
            modules = []
        if not modules:
            if counters.unlocated == 0:
                log.debug("sbpatch: no nn.Module found for a call of %s; running it unpatched", target.name)
            counters.unlocated += 1
            if not isinstance(modules, NotTorch):  # once per function (a locator may have said it in its words)
                value = instance if instance is not None else args[0] if args else None
                warn_unlocated(wrapped, "the call's arguments", value)
            return wrapped(*args, **kwargs)
        entered: contextlib.AbstractContextManager[Any] = _NO_CONTEXT
        if context is not None:
            entered = contextlib.ExitStack()
            try:
                entered.enter_context(context(wrapped, instance, args, kwargs))
            except Exception:  # never break the user's call: run it as shipped
                log.warning("sbpatch: preparing %s failed; running it unpatched", target.name, exc_info=True)
                counters.unlocated += 1
                return wrapped(*args, **kwargs)
        counters.calls += 1
        with entered:
            return call_frozen(modules, kept, wrapped, args, kwargs)

    return sbpatch_wrapper


def resolve(module: Any, path: str) -> tuple[Any, str]:
    """(owner, attribute) for ``path`` inside ``module``; raises AttributeError if anything moved."""
    parts = path.split(".")
    owner = module
    for part in parts[:-1]:
        owner = getattr(owner, part)
    if not hasattr(owner, parts[-1]):
        raise AttributeError(f"{module.__name__}.{path} not found")
    return owner, parts[-1]


def wrap_attribute(owner: Any, attr: str, target: Target, counters: Counters) -> Patch | None:
    """Wrap ``owner.attr`` (a class's own ``__dict__`` entry, or a module attribute); None if already wrapped."""
    original = owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)
    if isinstance(original, SbpatchWrapper):
        return None
    replacement = SbpatchWrapper(original, make_wrapper(target, counters))
    setattr(owner, attr, replacement)
    return Patch(owner, attr, original, replacement)


# --- subclasses defined after patching --------------------------------------------------------------------------

_watchers: dict[type, list[Callable[[type], None]]] = {}
_original_init_subclass: dict[type, Any] = {}
_MISSING = object()


def watch_subclasses(base: type, callback: Callable[[type], None]) -> None:
    """Call ``callback(cls)`` for each subclass of ``base`` defined from now on (until :func:`unwatch_subclasses`)."""
    if base not in _watchers:
        _watchers[base] = []
        _original_init_subclass[base] = base.__dict__.get("__init_subclass__", _MISSING)
        original = _original_init_subclass[base]

        def __init_subclass__(cls: type, **kwargs: Any) -> None:
            if original is _MISSING:
                super(base, cls).__init_subclass__(**kwargs)
            else:
                original.__get__(None, cls)(**kwargs)
            for cb in list(_watchers.get(base, ())):
                try:
                    cb(cls)
                except Exception:  # never break the user's class definition
                    log.warning("sbpatch: wrapping subclass %s failed", cls.__qualname__, exc_info=True)

        base.__init_subclass__ = classmethod(__init_subclass__)  # type: ignore[assignment]
    _watchers[base].append(callback)


def unwatch_subclasses(base: type, callback: Callable[[type], None]) -> None:
    callbacks = _watchers.get(base)
    if not callbacks or callback not in callbacks:
        return
    callbacks.remove(callback)
    if not callbacks:
        del _watchers[base]
        original = _original_init_subclass.pop(base)
        if original is _MISSING:
            del base.__init_subclass__
        else:
            base.__init_subclass__ = original


def all_subclasses(cls: type) -> list[type]:
    out, stack, seen = [], list(cls.__subclasses__()), set()
    while stack:
        c = stack.pop()
        if c in seen:
            continue
        seen.add(c)
        out.append(c)
        stack.extend(c.__subclasses__())
    return out


class AppliedTarget:
    """A target as applied: every attribute it replaced, and the subclass watcher it installed."""

    def __init__(self, target: Target, counters: Counters) -> None:
        self.target = target
        self.counters = counters
        self.patches: list[Patch] = []
        self.watch: tuple[type, Callable[[type], None]] | None = None

    def apply(self) -> None:
        """Wrap the target now. Raises AttributeError/ImportError if the library moved it."""
        t = self.target
        module = importlib.import_module(t.module)
        owner, attr = resolve(module, t.path)
        if isinstance(owner, type):
            self._wrap_class(owner, attr, top=True)
            if t.subclasses:
                for sub in all_subclasses(owner):
                    self._wrap_class(sub, attr)
                self.watch = (owner, lambda cls, attr=attr: self._wrap_class(cls, attr))
                watch_subclasses(*self.watch)
        else:
            patch = wrap_attribute(owner, attr, t, self.counters)
            if patch is not None:
                self.patches.append(patch)
                if t.rebind:
                    self._rebind(patch)

    def _wrap_class(self, cls: type, attr: str, top: bool = False) -> None:
        if attr not in cls.__dict__:
            if top:
                raise AttributeError(f"{cls.__qualname__} does not define {attr} itself")
            return
        excluder = self.target.exclude_class
        if not top and excluder is not None and excluder(cls):
            return
        patch = wrap_attribute(cls, attr, self.target, self.counters)
        if patch is not None:
            self.patches.append(patch)

    def _rebind(self, patch: Patch) -> None:
        """Replace the original in the library's own modules that bound it by name."""
        top = self.target.module.split(".")[0]
        for name, mod in list(sys.modules.items()):
            if mod is None or not (name == top or name.startswith(top + ".")):
                continue
            for key, value in list(vars(mod).items()):
                if value is patch.original and mod is not patch.owner:
                    setattr(mod, key, patch.replacement)
                    self.patches.append(Patch(mod, key, patch.original, patch.replacement))

    def names(self) -> list[str]:
        out = []
        for p in self.patches:
            owner = p.owner.__qualname__ if isinstance(p.owner, type) else p.owner.__name__
            module = p.owner.__module__ if isinstance(p.owner, type) else ""
            out.append(f"{module}.{owner}.{p.attr}" if module else f"{owner}.{p.attr}")
        return out

    def undo(self) -> None:
        if self.watch is not None:
            unwatch_subclasses(*self.watch)
            self.watch = None
        while self.patches:
            self.patches.pop().undo()
