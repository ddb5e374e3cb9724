"""The integration table, enable/disable/status, and the post-import hooks that patch a library when it is imported.

The registry knows each library only by the name of its contrib module (``INTEGRATIONS``); a contrib module is
imported when the library is enabled or its status is asked for, and it never imports its library.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import logging
import sys
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any

import wrapt
from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from sbpatch import compat, config
from sbpatch._table import format_table
from sbpatch.errors import DidNotEnable, SbpatchWarning
from sbpatch.patching import AppliedTarget, Counters, Integration

log = logging.getLogger("sbpatch")

# sbpatch name -> contrib module. A new library is one file in sbpatch/contrib/ plus one line here.
INTEGRATIONS: dict[str, str] = {
    "torchattacks": "sbpatch.contrib.torchattacks",
    "art": "sbpatch.contrib.art",
    "foolbox": "sbpatch.contrib.foolbox",
    "advertorch": "sbpatch.contrib.advertorch",
    "deeprobust": "sbpatch.contrib.deeprobust",
    "cleverhans": "sbpatch.contrib.cleverhans",
    "openattack": "sbpatch.contrib.openattack",
    "textattack": "sbpatch.contrib.textattack",
    "torchattack": "sbpatch.contrib.torchattack",
    "secmlt": "sbpatch.contrib.secmlt",
    "adv_lib": "sbpatch.contrib.adv_lib",
    "nanogcg": "sbpatch.contrib.nanogcg",
}


@dataclass
class LibraryStatus:
    """What sbpatch did to one library."""

    name: str
    installed: bool = False
    version: str | None = None
    supported: str = ""
    enabled: bool = False
    patched: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)  # declared targets patched when their module is imported
    skipped: dict[str, str] = field(default_factory=dict)
    excluded: dict[str, str] = field(default_factory=dict)
    shims: list[str] = field(default_factory=list)
    calls: int = 0
    unlocated: int = 0
    passed: int = 0
    note: str = ""


class StatusReport(dict):
    """``status()``'s result: a dict name -> LibraryStatus that prints as a table.

    ``held``: the parameters sbpatch held (frozen or kept aside) when the report was made; non-zero only while a
    frozen call runs, or after one was cut short in a way sbpatch could not finish restoring.
    """

    held: int = 0

    def __str__(self) -> str:
        from sbpatch import freeze

        headers = ("library", "installed", "supported", "enabled", "patched", "skipped", "calls", "unlocated")
        rows = []
        for s in self.values():
            rows.append(
                (
                    s.name,
                    s.version or "no",
                    s.supported,
                    "yes" if s.enabled else "no",
                    _patched_cell(s),
                    str(len(s.skipped)),
                    str(s.calls),
                    str(s.unlocated),
                )
            )
        lines = format_table(headers, rows)
        if self.held:
            lines.append(
                f"held now: {self.held} parameters frozen or set aside by sbpatch; if no attack call is running, "
                "sbpatch.release_all() gives them back"
            )
        for s in self.values():
            for target, reason in s.skipped.items():
                lines.append(f"skipped {target}: {reason}")
            if s.note:
                lines.append(f"{s.name}: {s.note}")
        lines.append("kept live (kernel-preserving rules, applied at run time):")
        lines += [f"  {k if ' ' in k else k.rsplit('.', 1)[-1]}: {v}" for k, v in freeze.builtin_rules().items()]
        lines += [f"  {k} (user rule): {', '.join(v)}" for k, v in freeze.keep_rules().items()]
        kept = freeze.kept_live()
        if kept:
            lines.append(f"parameters kept live so far ({len(kept)}):")
            shown = list(kept.items())[-20:]
            if len(kept) > len(shown):
                lines.append(f"  ... {len(kept) - len(shown)} earlier ones (sbpatch.freeze.kept_live() has them all)")
            lines += [f"  {name}: {why}" for name, why in shown]
        return "\n".join(lines)


def _patched_cell(s: LibraryStatus) -> str:
    """The ``patched`` column: the count so far, and "when imported" for targets whose module is not imported yet."""
    if not s.pending:
        return str(len(s.patched))
    return f"{len(s.patched)}, rest when imported" if s.patched else "when imported"


class _State:
    def __init__(self, integration: Integration) -> None:
        self.integration = integration
        self.counters = Counters()
        self.applied: dict[str, AppliedTarget] = {}
        self.skipped: dict[str, str] = {}
        self.shims: list[str] = []
        self.note = ""


_lock = threading.RLock()
_states: dict[str, _State] = {}
_hooked: set[str] = set()  # module names with a post-import hook registered (hooks cannot be unregistered)
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, SbpatchWarning, stacklevel=3)


PLUGIN_GROUP = "sbpatch.integrations"
_plugins: dict[str, str] = {}  # plug-in name -> its entry point ("package.module:OBJECT")
_plugins_loaded = False


def _load_plugins() -> None:
    """Read the ``sbpatch.integrations`` entry points once: each object must be an :class:`Integration`. A broken
    plug-in (it does not load, is not an Integration, takes a built-in name) is warned about once and shown in
    ``status()`` with the reason, never raised. Called under ``_lock`` by the registry's entry points."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    try:
        points = list(importlib.metadata.entry_points(group=PLUGIN_GROUP))
    except Exception as exc:  # a broken metadata directory must not break the program
        _warn_once(f"plugins:{PLUGIN_GROUP}", f"sbpatch: reading the {PLUGIN_GROUP} entry points failed: {exc!r}")
        return
    for point in points:
        name = point.name.strip().lower()
        if name in INTEGRATIONS or name in _plugins or name == "targets":
            message = f"sbpatch: plug-in {point.value} ignored: the name {name!r} is taken"
            _warn_once(f"plugin:{name}:{point.value}", message)
            continue
        _plugins[name] = point.value
        try:
            integ = point.load()
            if not isinstance(integ, Integration):
                raise TypeError(f"{point.value} is a {type(integ).__name__}, not an sbpatch.patching.Integration")
            if integ.name.lower() != name:
                raise ValueError(f"{point.value} is named {integ.name!r}; its entry point says {name!r}")
        except Exception as exc:
            reason = f"plug-in {point.value} is broken: {type(exc).__name__}: {exc}"
            _warn_once(f"plugin:{name}:{point.value}", f"sbpatch: {reason}")
            broken = _states[name] = _State(Integration(name, "", "", "", ()))
            broken.note = reason
            continue
        _states[name] = _State(integ)


def plugins() -> dict[str, str]:
    """The third-party integrations found (``sbpatch.integrations`` entry points): name -> entry point."""
    with _lock:
        _load_plugins()
        return dict(_plugins)


def _names(targets: bool = False) -> list[str]:
    """Every library name: built-in, then plug-ins (and the named targets when ``targets``)."""
    _load_plugins()
    return [*INTEGRATIONS, *_plugins, *(["targets"] if targets and "targets" in _states else [])]


def _state(name: str) -> _State:
    state = _states.get(name)
    if state is None:
        module = importlib.import_module(INTEGRATIONS[name])
        state = _states[name] = _State(module.INTEGRATION)
    return state


def _requested(libraries: tuple[Any, ...] | list[Any]) -> list[str] | None:
    """The names asked for (None: every library): the vocabulary of :func:`sbpatch.config.library_names`."""
    if not libraries:
        return None
    with _lock:
        return config.library_names(libraries, _names(targets=True))


def check_names(names: tuple[Any, ...] | list[Any]) -> list[str]:
    """Validate and normalise library names (case-insensitive, ``"all"`` for every library, lists accepted).

    Raises :class:`ConfigError` (TypeError for a non-string) naming the valid choices.
    """
    with _lock:
        valid = _names()
    requested = config.library_names(names, valid)
    return valid if requested is None else requested


def installed_version(integration: Integration) -> str | None:
    try:
        return importlib.metadata.version(integration.distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def why_not(name: str) -> str | None:
    """Why library ``name`` cannot be enabled (not installed, unsupported version), or None."""
    return _why_not(_state(name).integration)


def _why_not(integration: Integration) -> str | None:
    if not integration.targets and integration.name in _plugins:  # a broken plug-in
        return f"{integration.name}: " + (_states[integration.name].note if integration.name in _states else "broken")
    if not integration.distribution:  # named targets: no package, no version range
        return None
    version = installed_version(integration)
    if version is None:
        return f"{integration.distribution} is not installed"
    try:
        ok = Version(version) in SpecifierSet(integration.supported)
    except InvalidVersion:
        ok = False
    if not ok:
        return (
            f"{integration.distribution} {version} is outside the supported range {integration.supported}; "
            "it is left unpatched"
        )
    return None


def enable(*libraries: str | list[str] | tuple[str, ...]) -> None:
    """Patch the named attack libraries (all supported ones if none is named, or ``"all"``), now or when imported.

    Names are case-insensitive, as in ``SBPATCH``; a list or tuple of names works too. Idempotent. Imports neither
    torch nor the libraries: their compatibility shims are applied by an import hook just before they are imported.
    An unknown name raises :class:`ConfigError`, a non-string TypeError. A named library that is missing or of an
    unsupported version raises :class:`DidNotEnable`; with no names (or ``"all"``), an unsupported version is warned
    once and recorded in :func:`status`, and a library that is not installed is simply recorded there.
    """
    requested = _requested(libraries)
    explicit = requested is not None
    with _lock:
        names = requested if requested is not None else _names()
        problems = {}
        for name in names:
            reason = _why_not(_state(name).integration)
            if reason is not None:
                problems[name] = reason
        if explicit and problems:
            raise DidNotEnable("; ".join(problems.values()))
        for name in names:
            state = _state(name)
            if name in problems:
                if name in _plugins and not state.integration.targets:  # a broken plug-in: warned when loaded
                    continue
                state.note = problems[name]
                if "not installed" not in problems[name]:
                    _warn_once(f"version:{name}", f"sbpatch: {problems[name]}")
                else:
                    log.debug("sbpatch: %s", problems[name])
                continue
            _enable_one(state)


def _enable_one(state: _State) -> None:
    if state.counters.enabled:
        return
    integ = state.integration
    state.counters.enabled = True
    state.note = ""
    if integ.shims:
        # Shims import torch/scipy: apply them just before the library's import (at once if already imported).
        compat.before_import(integ.module, functools.partial(_apply_shims, state))
    for target in integ.targets:
        if target.module in sys.modules:
            _apply(state, target.name)
        elif target.module not in _hooked:
            _hooked.add(target.module)
            wrapt.register_post_import_hook(_make_hook(target.module), target.module)


def _apply_shims(state: _State) -> None:
    """Run from the import hook (never under ``_lock``: the import machinery holds its own locks)."""
    if not state.counters.enabled:
        return
    for shim in state.integration.shims:
        try:
            if compat.apply(shim) and shim not in state.shims:
                state.shims.append(shim)
        except Exception as exc:  # a shim must never break the program
            state.skipped[f"shim {shim}"] = f"{type(exc).__name__}: {exc}"


def _make_hook(module_name: str) -> Any:
    def on_import(module: Any) -> None:
        try:
            with _lock:
                for state in list(_states.values()):
                    if not state.counters.enabled:
                        continue
                    for target in state.integration.targets:
                        if target.module == module_name:
                            _apply(state, target.name)
        except Exception as exc:  # an import hook never raises into the user's import
            _warn_once(f"hook:{module_name}", f"sbpatch: internal error patching {module_name}: {exc!r}")

    return on_import


def _apply_locked(state: _State, target_name: str) -> None:
    with _lock:
        if state.counters.enabled:
            _apply(state, target_name)


def _apply(state: _State, target_name: str) -> None:
    if target_name in state.applied:
        return
    target = next(t for t in state.integration.targets if t.name == target_name)
    applied = AppliedTarget(target, state.counters)
    try:
        applied.apply()
    except Exception as exc:
        applied.undo()
        reason = f"{type(exc).__name__}: {exc}"
        state.skipped[target_name] = reason
        _warn_once(f"skip:{target_name}", f"sbpatch: skipping {target_name} ({reason})")
        return
    state.skipped.pop(target_name, None)
    state.applied[target_name] = applied


def disable(*libraries: str | list[str] | tuple[str, ...]) -> None:
    """Undo :func:`enable` for the named libraries (all if none, or ``"all"``): every patched attribute is the
    original again, and shims not yet applied will not be. Shims already applied stay (they only added what was
    missing)."""
    requested = _requested(libraries)
    with _lock:
        names = requested if requested is not None else _names(targets=True)
        for name in names:
            state = _states.get(name)
            if state is None:
                continue
            state.counters.enabled = False
            if state.integration.shims:
                compat.cancel(state.integration.module)
            while state.applied:
                _, applied = state.applied.popitem()
                applied.undo()
            state.skipped.clear()


def status() -> StatusReport:
    """One :class:`LibraryStatus` per supported library, and ``held`` (see :class:`StatusReport`).

    Imports no attack library: the installed version comes from the package metadata, and an enabled library not
    imported yet lists its declared targets in ``pending`` (printed "when imported").
    """
    from sbpatch import freeze

    report = StatusReport()
    report.held = freeze.held_count()
    with _lock:
        for name in _names(targets=True):
            state = _state(name)
            integ = state.integration
            version = installed_version(integ) if integ.distribution else "-"
            patched = [n for a in state.applied.values() for n in a.names()]
            pending = (
                [t.name for t in integ.targets if t.name not in state.applied and t.name not in state.skipped]
                if state.counters.enabled
                else []
            )
            report[name] = LibraryStatus(
                name=name,
                installed=version is not None,
                version=version,
                supported=integ.supported,
                enabled=state.counters.enabled,
                patched=patched,
                pending=pending,
                skipped=dict(state.skipped),
                excluded=dict(integ.excluded),
                shims=list(state.shims),
                calls=state.counters.calls,
                unlocated=state.counters.unlocated,
                passed=state.counters.passed,
                note=state.note,
            )
    return report


def enable_targets(*names: str | list[str] | tuple[str, ...]) -> list[str]:
    """Wrap named functions or methods of any code (``"package.module:function"``, ``"package.module:Class.method"``,
    comma-separated or as lists), now if their module is imported, else when it is; each call is frozen around the
    first ``nn.Module`` among its arguments, keyword arguments or the bound instance's attributes.

    Returns the targets' qualified names. Idempotent per name. A bad name raises :class:`ConfigError` showing the
    form; a module that is not installed or a name it does not define is warned about once and listed in
    ``status()["targets"].skipped``, never raised. :func:`disable` (no names, or ``"targets"``) undoes them.
    """
    from sbpatch import targets

    pairs = targets.parse(names)
    with _lock:
        state = _states.get(targets.NAME)
        if state is None:
            state = _states[targets.NAME] = _State(targets.integration(()))
        known = {t.name for t in state.integration.targets}
        added = targets.integration(p for p in pairs if f"{p[0]}.{p[1]}" not in known).targets
        state.integration = targets.integration((t.module, t.path) for t in state.integration.targets + added)
        state.counters.enabled = True
        for target in state.integration.targets:
            if target.name in state.applied:
                continue
            loaded = sys.modules.get(target.module)
            if loaded is not None and getattr(getattr(loaded, "__spec__", None), "_initializing", False):
                # executing now (SBPATCH_TARGETS watched it): its functions exist once it has run
                compat.after_exec(target.module, functools.partial(_apply_locked, state, target.name))
            elif loaded is not None:
                _apply(state, target.name)
            else:
                top = target.module.split(".")[0]
                if importlib.util.find_spec(top) is None:
                    reason = f"no module {top!r} on sys.path now (wrapped if {target.module} is imported later)"
                    state.skipped[target.name] = reason
                    _warn_once(f"skip:{target.name}", f"sbpatch: named target {target.name}: {reason}")
                if target.module not in _hooked:
                    _hooked.add(target.module)
                    wrapt.register_post_import_hook(_make_hook(target.module), target.module)
    return [f"{m}:{p}" for m, p in pairs]


def integration(name: str) -> Integration:
    """The declared :class:`Integration` of one library."""
    return _state(name).integration


def counters(name: str) -> Counters:
    """The live counters of one library (tests and the benchmark read them)."""
    return _state(name).counters


# SBPATCH=...: sbpatch._startup waits for a library's import to enable what the variable names; the registry's first
# use (status(), enable(), disable()...) comes first when it happens earlier, as if enabled at start-up.
if "sbpatch._startup" in sys.modules:
    sys.modules["sbpatch._startup"].enable_requested()
