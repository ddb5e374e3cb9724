"""Named targets: freeze around functions and methods of code that is not a supported library.

Research code is often a script or a fork (every llm-attacks-derived GCG has its own ``token_gradients(model, ...)``
that calls ``loss.backward()``). ``SBPATCH_TARGETS="package.module:function,other.module:Class.method"`` (or
:func:`sbpatch.enable_targets`, or ``sbpatch run --target``) wraps each named function or method when its module is
imported (at once if it already is), and freezes each call around the first ``nn.Module`` among its positional
arguments, then its keyword arguments, then the bound instance's attributes.

Imported at interpreter start when ``SBPATCH_TARGETS`` is set (``sbpatch._startup``): parsing only, no import but
``sbpatch.errors``; :func:`integration` (used by the registry) imports the patching machinery.
"""

from __future__ import annotations

from sbpatch.errors import ConfigError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable
    from typing import Any

    from sbpatch.patching import Integration

ENV_VAR = "SBPATCH_TARGETS"
NAME = "targets"  # the status() row of the named targets
_FORM = "'package.module:function' or 'package.module:Class.method' (comma-separated)"


def _dotted(text: str) -> bool:
    return bool(text) and all(part.isidentifier() for part in text.split("."))


def parse(names: Iterable[object]) -> list[tuple[str, str]]:
    """``(module, path)`` pairs from strings like ``"pkg.mod:func, pkg.mod:Class.method"`` (lists accepted), in order,
    without repeats. Raises :class:`ConfigError` (TypeError for a non-string) showing the expected form."""
    out: list[tuple[str, str]] = []
    for item in names:
        parts = item if isinstance(item, (list, tuple)) else (item,)
        for part in parts:
            if not isinstance(part, str):
                raise TypeError(f"named targets must be strings, not {type(part).__name__} {part!r}; use {_FORM}")
            for word in (w.strip() for w in part.split(",")):
                if not word:
                    continue
                module, sep, path = word.partition(":")
                if not sep or not _dotted(module.strip()) or not _dotted(path.strip()):
                    raise ConfigError(f"bad named target {word!r}; use {_FORM}")
                pair = (module.strip(), path.strip())
                if pair not in out:
                    out.append(pair)
    if not out:
        raise ConfigError(f"no named target given; use {_FORM}")
    return out


def first_module(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> list[Any]:
    """The locator of a named target: the first ``nn.Module`` among the positional arguments, then the keyword
    arguments, then (for a method) what the bound instance holds; ``[]`` (and one warning) when there is none."""
    import torch

    from sbpatch.locate import find_modules, warn_unlocated

    module_type = torch.nn.Module
    for value in (*args, *kwargs.values()):
        if isinstance(value, module_type):
            return [value]
    if instance is not None:
        held = list(getattr(instance, "__dict__", {}).values())
        for value in held:
            if isinstance(value, module_type):
                return [value]
        found = find_modules(instance) or find_modules(held)  # through wrappers, partials, closures
        if found:
            return found[:1]
    warn_unlocated(wrapped, "the arguments", args[0] if args else instance)
    return []


def integration(pairs: Iterable[tuple[str, str]]) -> Integration:
    """The :class:`Integration` that wraps ``pairs``: no distribution, no version range; functions are also rebound
    where their own package imported them by name."""
    from sbpatch.patching import Integration, Target

    targets = tuple(Target(module, path, first_module, rebind="." not in path) for module, path in pairs)
    return Integration(NAME, "", "", "", targets)
