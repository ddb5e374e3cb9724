"""Run at interpreter start by ``sbpatch.pth`` when ``SBPATCH`` is set to anything but an off value (``0``, ``false``,
``none``...: the .pth line checks those itself and imports nothing): enable the libraries it names, lazily.

``SBPATCH_TARGETS`` (named functions and methods, :mod:`sbpatch.targets`) is read the same way, even when ``SBPATCH``
is unset: its modules' top-level packages are watched too.

Start-up only reads the variable and asks :func:`sbpatch.compat.before_import` to watch the named libraries' top-level
imports: it imports nothing but ``os``, ``sys``, ``_thread`` and sbpatch's small ``config``/``errors``/``compat``
modules (no wrapt, packaging, torch, numpy or scipy). The first time one of them is about to execute, or the registry
is first imported (``sbpatch.status()``, ``enable()``...), :func:`enable_requested` calls ``registry.enable`` for
the libraries named, before that library's module runs, so its shims and post-import hooks are in place; then the
other watches are dropped.

Never raises: a bad value prints one line to stderr at start-up and patches nothing; a named library that cannot be
enabled (missing, unsupported version) prints one line when the enabling happens and the others are enabled; the
program runs on.
"""

from __future__ import annotations

import _thread
import os
import sys

# sbpatch name -> the library's top-level import name: registry.INTEGRATIONS' contrib modules' ``module`` fields,
# repeated here because importing the registry is what start-up avoids (tests/test_startup.py keeps them equal).
LIBRARIES: dict[str, str] = {
    "torchattacks": "torchattacks",
    "art": "art",
    "foolbox": "foolbox",
    "advertorch": "advertorch",
    "deeprobust": "deeprobust",
    "cleverhans": "cleverhans",
    "openattack": "OpenAttack",
    "textattack": "textattack",
    "torchattack": "torchattack",
    "secmlt": "secmlt",
    "adv_lib": "adv_lib",
    "nanogcg": "nanogcg",
}

_lock = _thread.RLock()
_requested: list[str] | None = None  # what SBPATCH names ([]: every library) until enable_requested() runs
_targets: str | None = None  # what SBPATCH_TARGETS names until enable_requested() runs
TARGETS_VAR = "SBPATCH_TARGETS"  # sbpatch.targets.ENV_VAR (not imported here unless the variable is set)


def _report(message: str) -> None:
    try:
        print(message, file=sys.stderr)
    except Exception:  # no usable stderr (a daemon, pythonw): stay silent rather than break the program
        pass


def start() -> None:
    """Read ``SBPATCH`` and ``SBPATCH_TARGETS``; watch the named libraries' and target modules' top-level imports
    (or enable at once what is already imported)."""
    global _requested, _targets
    watched: set[str] = set()
    try:
        from sbpatch import config

        libraries = config.parse_libraries(os.environ.get(config.ENV_VAR), list(LIBRARIES))
        if libraries is not None:
            _requested = libraries
            watched.update(LIBRARIES[name] for name in libraries or LIBRARIES)
    except Exception as exc:  # never break the user's program at start-up
        _report(f"sbpatch: {exc}")
    raw = os.environ.get(TARGETS_VAR, "").strip()
    if raw:
        try:
            from sbpatch import targets

            watched.update(module.split(".")[0] for module, _ in targets.parse([raw]))
            _targets = raw
        except Exception as exc:
            _report(f"sbpatch: {TARGETS_VAR}: {exc}")
    if not watched:
        return
    try:
        from sbpatch import compat

        for module in watched:
            compat.before_import(module, enable_requested)  # runs it at once if already imported
        if "sbpatch.registry" in sys.modules:  # imported after the registry (not via the .pth): enable now
            enable_requested()
    except Exception as exc:
        _report(f"sbpatch: {exc}")


def enable_requested() -> None:
    """Enable what ``SBPATCH`` and ``SBPATCH_TARGETS`` named, once (later calls do nothing); drop the remaining
    import watches.

    Called by the import hook just before a watched module executes, and by the registry when it is first imported.
    Never raises. Holds a lock while enabling, so a library imported by another thread meanwhile waits for its shims.
    """
    global _requested, _targets
    with _lock:
        libraries, _requested = _requested, None
        named, _targets = _targets, None
        if libraries is None and named is None:
            return
        try:
            from sbpatch import compat, config, registry

            for module in compat.pending():
                compat.cancel(module, enable_requested)  # the libraries with shims get registry's own watch
            if libraries == []:
                registry.enable()
            for name in libraries or ():
                try:
                    registry.enable(name)
                except registry.DidNotEnable as exc:
                    _report(f"sbpatch: {config.ENV_VAR}: {exc}")
            if named is not None:
                registry.enable_targets(named)
        except Exception as exc:  # never raise into the user's import
            _report(f"sbpatch: {exc}")


start()
