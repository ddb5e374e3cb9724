"""Legacy-import shims for libraries that no longer import on modern torch, scipy or numpy, and the import hook
that applies them.

A shim only adds what is missing, never replaces what exists, and must be in place before the failing import runs
(a post-import hook fires only after a successful import). Shims import torch or scipy, so ``enable()`` does not
apply them: it registers them with :func:`before_import`, a ``sys.meta_path`` finder that runs them just before the
library's top-level module executes (or at once if the library is already imported), so ``SBPATCH=all`` costs
nothing until an attack library is imported. ``status()`` lists the shims applied. If the library was imported
(and failed) before sbpatch was enabled, Python has not cached the failed module: importing it again works.

``SBPATCH=...`` watches the libraries' imports with the same hook (``sbpatch._startup``), so this module is imported
at interpreter start: it imports nothing but ``os``, ``sys``, ``_thread`` and ``sbpatch.errors`` (no importlib,
logging, threading or typing) until a watched library is imported.
"""

from __future__ import annotations

import _thread
import os
import sys

from sbpatch.errors import SbpatchWarning

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at start-up
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any


def _add_missing(module_name: str, name: str, value: Callable[[], Any]) -> bool:
    import importlib

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
        import importlib

        return importlib.import_module("scipy.optimize._optimize")._status_message

    return _add_missing("scipy.optimize.optimize", "_status_message", value)


def gitpython_quiet() -> bool:
    """``GIT_PYTHON_REFRESH=quiet`` unless set: foolbox imports GitPython, which fails without a ``git`` binary."""
    if "GIT_PYTHON_REFRESH" in os.environ:
        return False
    os.environ["GIT_PYTHON_REFRESH"] = "quiet"
    return True


def visdom_stand_in() -> bool:
    """A stand-in ``visdom`` module for adv-lib's own import of it, only if visdom is not installed.

    adv-lib 0.2.x imports visdom at the top of ``adv_lib.utils.visdom_logger`` (imported by most attack modules) but
    uses it only when the user passes a ``VisdomLogger`` as an attack's ``callback`` for live plots. This adds a
    finder at the end of ``sys.meta_path`` that answers ``import visdom`` only when no other finder does and the
    importing module is one of adv-lib's; constructing a ``Visdom`` client from the stand-in raises
    ``ModuleNotFoundError`` saying visdom is missing. The stand-in leaves ``sys.modules`` as soon as
    ``adv_lib.utils.visdom_logger`` has imported it (that module keeps its reference), so ``import visdom`` anywhere
    else fails as it would without sbpatch.
    """
    import importlib.machinery
    import importlib.util
    import types

    if any(getattr(f, "sbpatch_visdom_stand_in", False) for f in sys.meta_path):
        return False
    try:
        if "visdom" in sys.modules or importlib.util.find_spec("visdom") is not None:
            return False
    except (ImportError, ValueError):
        return False

    class Visdom:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise ModuleNotFoundError(
                "visdom is not installed (sbpatch put a stand-in in place so that adv-lib imports): "
                "pip install visdom to plot an attack's progress",
                name="visdom",
            )

    class Loader:
        def create_module(self, spec: Any) -> Any:
            module = types.ModuleType("visdom", "sbpatch stand-in for the missing visdom package (adv-lib imports it).")
            module.Visdom = Visdom  # type: ignore[attr-defined]
            module.__sbpatch_stand_in__ = True  # type: ignore[attr-defined]
            return module

        def exec_module(self, module: Any) -> None:
            return None

    class Finder:
        sbpatch_visdom_stand_in = True

        def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
            if fullname != "visdom":
                return None
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename.startswith("<frozen importlib"):
                frame = frame.f_back
            importer = frame.f_globals.get("__name__", "") if frame is not None else ""
            if not (isinstance(importer, str) and importer.startswith("adv_lib.")):
                return None
            return importlib.machinery.ModuleSpec("visdom", Loader(), origin="sbpatch stand-in")

        def invalidate_caches(self) -> None:
            return None

    def remove(module: Any) -> None:
        if getattr(sys.modules.get("visdom"), "__sbpatch_stand_in__", False):
            del sys.modules["visdom"]

    import wrapt

    sys.meta_path.append(Finder())  # last: a visdom installed later is found first
    wrapt.register_post_import_hook(remove, "adv_lib.utils.visdom_logger")
    return True


SHIMS: dict[str, Callable[[], bool]] = {
    "torch_zero_gradients": torch_zero_gradients,
    "scipy_status_message": scipy_status_message,
    "gitpython_quiet": gitpython_quiet,
    "visdom_stand_in": visdom_stand_in,
}


def apply(name: str) -> bool:
    """Apply one shim by name; True if it added something."""
    return SHIMS[name]()


# --- the import hook ------------------------------------------------------------------------------------------------

_lock = _thread.allocate_lock()
_pending: dict[str, Callable[[], None]] = {}  # top-level module name -> callback, run once before it executes
_errors: dict[str, str] = {}  # module -> the error a callback raised (registry callbacks record their own)
_after: dict[str, list[Callable[[], None]]] = {}  # top-level module executing now -> callbacks once it has run


def after_exec(module: str, callback: Callable[[], None]) -> None:
    """Run ``callback`` once the watched top-level ``module``, executing now (its before-import callback is what
    called this), has finished executing: for what needs the module's attributes."""
    _after.setdefault(module, []).append(callback)


class _ChainedLoader:
    """Wraps the real loader of a watched module: runs the callback, puts the real loader back, then executes.

    The callback runs in ``exec_module``, under the module's own import lock only (``find_spec`` runs under the
    interpreter's global import lock: importing torch there could deadlock with another thread's import).
    """

    def __init__(self, loader: Any, name: str) -> None:
        self.loader = loader
        self.name = name

    def create_module(self, spec: Any) -> Any:
        create = getattr(self.loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module: Any) -> None:
        if getattr(module, "__loader__", None) is self:
            module.__loader__ = self.loader
        spec = getattr(module, "__spec__", None)
        if spec is not None and spec.loader is self:
            spec.loader = self.loader
        _run(self.name)
        self.loader.exec_module(module)
        for callback in _after.pop(self.name, ()):
            _call(self.name, callback)

    def __getattr__(self, name: str) -> Any:  # get_resource_reader, is_package, get_code...: the real loader's
        return getattr(self.loader, name)


class _Finder:
    """A ``sys.meta_path`` finder: finds nothing itself; for a watched top-level module, it returns the real spec
    with its loader chained to run the callback first. An unwatched import costs one dictionary lookup."""

    _in_progress: set[str] = set()

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in _pending or fullname in self._in_progress:
            return None
        try:
            import importlib.util  # here, not at start-up: only a watched import pays for it

            self._in_progress.add(fullname)
            try:
                spec = importlib.util.find_spec(fullname)  # the finders after this one
            finally:
                self._in_progress.discard(fullname)
            if spec is None:
                return None  # not installed: keep watching
            loader = getattr(spec, "loader", None)
            if loader is None or not hasattr(loader, "exec_module"):
                _run(fullname)  # no loader to chain (rare): apply now, under the import lock
                return spec
            if not isinstance(loader, _ChainedLoader):
                spec.loader = _ChainedLoader(loader, fullname)
            return spec
        except Exception as exc:  # an import hook never raises into the user's import
            _record(fullname, exc)
            return None

    def invalidate_caches(self) -> None:
        return None


_finder = _Finder()


def _record(name: str, exc: BaseException) -> None:
    import logging
    import warnings

    _errors[name] = f"{type(exc).__name__}: {exc}"
    logging.getLogger("sbpatch").debug("sbpatch: import hook for %s failed", name, exc_info=exc)
    try:
        warnings.warn(f"sbpatch: internal error preparing the import of {name}: {exc!r}", SbpatchWarning, 2)
    except Exception:  # warnings turned into errors (-W error): still never raise into the import
        pass


def _call(name: str, callback: Callable[[], None]) -> None:
    try:
        callback()
    except Exception as exc:  # never raise into the user's import
        _record(name, exc)


def _run(name: str) -> None:
    with _lock:
        callback = _pending.pop(name, None)
    if callback is not None:
        _call(name, callback)


def before_import(module: str, callback: Callable[[], None]) -> None:
    """Run ``callback`` once, just before the top-level ``module`` is first executed; at once if it is already
    imported. Replaces a callback already registered for ``module``. The callback must not raise (errors are
    warned and kept in :func:`errors`)."""
    if "." in module:
        raise ValueError(f"before_import() watches top-level modules only, not {module!r}")
    if module in sys.modules:
        with _lock:
            _pending.pop(module, None)
        _call(module, callback)
        return
    with _lock:
        _pending[module] = callback
        # Outside any find_spec loop (those iterate sys.meta_path itself), so the list can be changed here. The
        # finder stays installed once added: removing it during an import would make Python skip the next finder.
        if not sys.meta_path or sys.meta_path[0] is not _finder:
            if _finder in sys.meta_path:
                sys.meta_path.remove(_finder)
            sys.meta_path.insert(0, _finder)


def cancel(module: str, callback: Callable[[], None] | None = None) -> None:
    """Forget the callback registered for ``module`` (it will not run); with ``callback``, only if it is that one."""
    with _lock:
        if callback is None or _pending.get(module) is callback:
            _pending.pop(module, None)


def pending() -> list[str]:
    """The top-level modules whose callback has not run yet."""
    with _lock:
        return list(_pending)


def errors() -> dict[str, str]:
    """Errors raised inside the import hook, by module (empty unless sbpatch has a bug)."""
    return dict(_errors)
