"""Find the ``nn.Module`` objects behind an attack's model argument.

Attack libraries hold the victim model in many shapes: the module itself, a DDP/FSDP wrapper, a bound method
(``model.forward``), a ``functools.partial``, a lambda or closure over the module (``lambda x: net(x)``,
``lambda x: self.net(x)``, ``lambda x, m=net: m(x)``), a ``__wrapped__`` decorator chain, a callable object that keeps
the module in an attribute (``Normalized(net)`` with ``self.net`` and ``__call__``), or a library wrapper object.
:func:`find_modules` looks through them all, following only what the call's code uses:

* a function's closure cells and default arguments, and the globals its code loads *as globals* (``LOAD_GLOBAL``,
  read with :mod:`dis`), never a global that merely shares a name with an attribute (``self.net`` is not ``net``);
* on an object, only the instance attributes that the code reaching it loads (``self.net`` in the lambda, or in the
  object's own ``__call__`` and the methods it calls, ``forward`` for instance): an unused attribute (a teacher
  model, an EMA copy) is never frozen. Containers (list, tuple, dict values) pass the same names on.

The walk is bounded (depth and node count), so a library object's whole graph is never traversed.

The locators built by :func:`argument` and :func:`attribute` warn once per patched function (an
:class:`~sbpatch.errors.SbpatchWarning`) when they find no module: such a call runs unpatched.
"""

from __future__ import annotations

import dis
import functools
import inspect
import itertools
import threading
import types
import warnings
import weakref
from collections.abc import Callable, Iterable
from typing import Any

from sbpatch.errors import SbpatchWarning

_MAX_DEPTH = 6  # attribute / closure / container hops from the argument
_MAX_NODES = 256  # objects examined per call, at most
_MAX_ITEMS = 64  # items of one container examined, at most

_SCALARS = (str, bytes, bytearray, int, float, complex, bool, range, types.ModuleType, type)
_ATTR_OPS = frozenset({"LOAD_ATTR", "LOAD_METHOD", "LOAD_SUPER_ATTR"})
_GLOBAL_OPS = frozenset({"LOAD_GLOBAL", "LOAD_NAME"})


@functools.lru_cache(maxsize=4096)
def code_names(code: types.CodeType) -> tuple[frozenset[str], frozenset[str]]:
    """(names loaded as globals, attribute names loaded) by ``code`` and the code objects nested in it."""
    globals_: set[str] = set()
    attrs: set[str] = set()
    stack = [code]
    while stack:
        c = stack.pop()
        for ins in dis.get_instructions(c):
            if ins.opname in _GLOBAL_OPS:
                globals_.add(ins.argval)
            elif ins.opname in _ATTR_OPS:
                attrs.add(ins.argval)
        stack.extend(k for k in c.co_consts if isinstance(k, types.CodeType))
    return frozenset(globals_), frozenset(attrs)


def _codes(attr: Any) -> list[types.CodeType]:
    """The code objects behind a class attribute: function, static/class method, property accessors."""
    if isinstance(attr, (staticmethod, classmethod)):
        attr = attr.__func__
    if isinstance(attr, property):
        return [f.__code__ for f in (attr.fget, attr.fset) if hasattr(f, "__code__")]
    code = getattr(attr, "__code__", None)
    return [code] if isinstance(code, types.CodeType) else []


# class -> {starting names -> every attribute name the class's code reached from them loads}; weak, so a class (and
# anything its class attributes hold) is never kept alive by this cache.
_class_names: weakref.WeakKeyDictionary[type, dict[frozenset[str], frozenset[str]]] = weakref.WeakKeyDictionary()
_class_lock = threading.Lock()


def class_names(cls: type, start: frozenset[str]) -> frozenset[str]:
    """``start`` plus the attribute names loaded by the methods of ``cls`` named in it, transitively.

    ``start={"__call__"}`` gives what calling an instance can touch: ``__call__`` loads ``self.net`` and calls
    ``self.forward``, whose own loads are added, and so on (every class of the MRO that defines a name counts, so
    ``super().forward()`` is covered).
    """
    try:
        per_class = _class_names.get(cls)
    except TypeError:  # not weak-referenceable
        per_class = None
    if per_class is not None and start in per_class:
        return per_class[start]
    names = set(start)
    todo = list(start)
    mro = [k for k in getattr(cls, "__mro__", (cls,)) if k is not object]
    while todo:
        name = todo.pop()
        for klass in mro:
            attr = vars(klass).get(name)
            if attr is None:
                continue
            for code in _codes(attr):
                new = code_names(code)[1] - names
                names |= new
                todo.extend(new)
    result = frozenset(names)
    with _class_lock:
        try:
            _class_names.setdefault(cls, {})[start] = result
        except TypeError:
            pass
    return result


_class_info: weakref.WeakKeyDictionary[type, tuple[bool, frozenset[str]]] = weakref.WeakKeyDictionary()


def _info(cls: type) -> tuple[bool, frozenset[str]]:
    """(calling an instance runs a Python ``__call__`` of the class, the class's ``__slots__`` names); cached."""
    try:
        return _class_info[cls]
    except (KeyError, TypeError):
        pass
    python_call = bool(_codes(inspect.getattr_static(cls, "__call__", None)))
    slots = frozenset(
        name
        for klass in getattr(cls, "__mro__", (cls,))
        for name, attr in vars(klass).items()
        if isinstance(attr, types.MemberDescriptorType)
    )
    info = (python_call, slots)
    try:
        _class_info[cls] = info
    except TypeError:
        pass
    return info


def _attribute_values(o: Any, names: Iterable[str], slots: frozenset[str]) -> list[Any]:
    """The instance attributes ``names`` of ``o``, read without running properties or ``__getattr__``."""
    try:
        own = vars(o)
    except TypeError:
        own = {}
    out = []
    for name in names:
        if name in own:
            out.append(own[name])
        elif name in slots:
            slot = inspect.getattr_static(type(o), name, None)
            try:
                out.append(slot.__get__(o, type(o)))
            except AttributeError:  # an empty slot
                pass
    return out


def _safe_getattr(o: Any, name: str) -> Any:
    try:
        return getattr(o, name, None)
    except Exception:  # a hostile __getattr__
        return None


def find_modules(obj: Any, attributes: Iterable[str] = (), depth: int = _MAX_DEPTH) -> list[Any]:
    """The distinct ``nn.Module`` objects that calling ``obj`` can use (outermost first), or ``[]``.

    ``attributes``: attribute names to follow on any object besides those its code loads (for example
    ``("model", "_model")`` for a library's wrapper class). A module found stops the search on that branch: its own
    parameters cover its children.
    """
    import torch

    module_type = torch.nn.Module
    tensor_type = torch.Tensor
    found: list[Any] = []
    seen: set[int] = set()
    extra = tuple(attributes)
    budget = [_MAX_NODES]

    def visit(o: Any, d: int, names: frozenset[str]) -> None:
        if o is None or d < 0 or id(o) in seen or budget[0] <= 0:
            return
        seen.add(id(o))
        budget[0] -= 1
        if isinstance(o, module_type):
            found.append(o)
            return
        if isinstance(o, (*_SCALARS, tensor_type)):
            return
        if isinstance(o, functools.partial):
            visit(o.func, d - 1, names)
            for a in o.args[:_MAX_ITEMS]:
                visit(a, d - 1, names)
            for a in itertools.islice(o.keywords.values(), _MAX_ITEMS):
                visit(a, d - 1, names)
            return
        if isinstance(o, (list, tuple, set, frozenset)):
            for a in itertools.islice(o, _MAX_ITEMS):
                visit(a, d - 1, names)
            return
        if isinstance(o, dict):
            for a in itertools.islice(o.values(), _MAX_ITEMS):
                visit(a, d - 1, names)
            return
        wrapped = _safe_getattr(o, "__wrapped__")  # decorators, wrapt proxies
        if wrapped is not None:
            visit(wrapped, d - 1, names)
        func = o if isinstance(o, types.FunctionType) else _safe_getattr(o, "__func__")
        if func is not None:  # a function, a bound method (also a wrapt-bound one), a static/class method
            code = _safe_getattr(func, "__code__")
            loaded_globals, loaded_attrs = code_names(code) if isinstance(code, types.CodeType) else ((), frozenset())
            self_ = _safe_getattr(o, "__self__")  # bound method (also of a wrapt proxy)
            if self_ is not None:
                own = class_names(type(self_), loaded_attrs) if not isinstance(self_, type) else loaded_attrs
                visit(self_, d - 1, own)
            for cell in _safe_getattr(func, "__closure__") or ():
                try:
                    visit(cell.cell_contents, d - 1, loaded_attrs)
                except ValueError:  # empty cell
                    pass
            for a in _safe_getattr(func, "__defaults__") or ():  # lambda x, m=net: m(x)
                visit(a, d - 1, loaded_attrs)
            for a in (_safe_getattr(func, "__kwdefaults__") or {}).values():
                visit(a, d - 1, loaded_attrs)
            code_globals = _safe_getattr(func, "__globals__")
            if code_globals is not None:  # a lambda naming a global model: `lambda x: net(x)`
                for name in loaded_globals:
                    value = code_globals.get(name)
                    if value is not None:
                        visit(value, d - 1, loaded_attrs)
            return
        self_ = _safe_getattr(o, "__self__")  # a builtin method, a method-wrapper
        if self_ is not None and not isinstance(o, type):
            visit(self_, d - 1, names)
        python_call, slots = _info(type(o))
        follow = names
        if python_call:  # a callable object: what its __call__ (and the methods it calls) loads
            follow = class_names(type(o), names | {"__call__"})
        elif names:
            follow = class_names(type(o), names)
        for value in _attribute_values(o, sorted(follow), slots):
            visit(value, d - 1, follow)
        for name in extra:
            try:
                value = getattr(o, name, None)
            except Exception:
                continue
            visit(value, d - 1, names)

    visit(obj, depth, frozenset())
    return found


# --- locators ------------------------------------------------------------------------------------------------------

_warned: set[str] = set()


def target_name(wrapped: Any) -> str:
    """``module.qualname`` of a patched function or method."""
    func = getattr(wrapped, "__func__", wrapped)
    module = getattr(func, "__module__", None) or "?"
    return f"{module}.{getattr(func, '__qualname__', None) or type(func).__qualname__}"


class NotTorch(list):
    """An empty locator result that means "this call's model is not a PyTorch one" (an ART TensorFlow or black-box
    estimator, a foolbox NumPy model, a TextAttack scikit-learn wrapper): the call runs unpatched, without the
    no-model warning that an empty ``[]`` gets."""


def warn_unlocated(wrapped: Any, what: str, value: Any) -> None:
    """Warn once per patched function that a call found no ``nn.Module`` and runs unpatched, saying how to fix it."""
    name = target_name(wrapped)
    if name in _warned:
        return
    _warned.add(name)
    warnings.warn(
        f"sbpatch: no torch.nn.Module found in {what} ({type(value).__name__}) of {name}: this call, and any like it, "
        "runs unpatched (parameters not frozen). Pass the nn.Module itself (or a bound method, lambda, partial or "
        "callable object that holds it in a closure, default argument or attribute), or wrap the call in "
        "`with sbpatch.frozen(model):`.",
        SbpatchWarning,
        stacklevel=4,
    )


def argument(position: int, name: str, attributes: Iterable[str] = ()) -> Callable[[Any, Any, tuple, dict], list[Any]]:
    """A locator for a call whose model is its argument ``name`` (at ``position`` when passed positionally)."""
    follow = tuple(attributes)

    def locate(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> list[Any]:
        value = args[position] if len(args) > position else kwargs.get(name)
        found = find_modules(value, follow)
        if not found:
            warn_unlocated(wrapped, f"argument {name!r}", value)
        return found

    locate.__name__ = f"argument_{name}"
    return locate


def attribute(*names: str, attributes: Iterable[str] = ()) -> Callable[[Any, Any, tuple, dict], list[Any]]:
    """A locator for a method whose model is held in attributes ``names`` of the instance (``self.model``)."""
    follow = tuple(attributes)

    def locate(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> list[Any]:
        values = [getattr(instance, n, None) for n in names]
        found = find_modules(values, follow)
        if not found:
            value = values[0] if len(values) == 1 else values
            warn_unlocated(wrapped, f"{type(instance).__name__}.{'/'.join(names)}", value)
        return found

    locate.__name__ = f"attribute_{'_'.join(names)}"
    return locate
