"""sbpatch: semi-backward propagation for existing adversarial-attack libraries.

Attacks need the gradient with respect to the input, never the parameters. sbpatch freezes the victim model's
parameters (``requires_grad=False``) for the duration of each attack call of the supported libraries, and restores
them exactly afterwards: the same adversarial examples, faster, with no ``param.grad`` side effects.

>>> import sbpatch
>>> sbpatch.enable()          # every supported library, now or when imported

The public names are imported on first use (PEP 562): ``SBPATCH=all`` imports this package at interpreter start,
which must cost nothing (no wrapt, packaging or torch) until an attack library is imported.
"""

from __future__ import annotations

import sys

__version__ = "0.1.0"

# public name -> the module that defines it ("errors" is the submodule itself)
_EXPORTS: dict[str, str] = {
    "ConfigError": "sbpatch.errors",
    "DidNotEnable": "sbpatch.errors",
    "SbpatchError": "sbpatch.errors",
    "SbpatchWarning": "sbpatch.errors",
    "add_keep_rule": "sbpatch.rules",
    "frozen": "sbpatch.freeze",
    "keep_rules": "sbpatch.rules",
    "release_all": "sbpatch.freeze",
    "remove_keep_rule": "sbpatch.rules",
    "paused": "sbpatch.patching",
    "LibraryStatus": "sbpatch.registry",
    "disable": "sbpatch.registry",
    "enable": "sbpatch.registry",
    "enable_targets": "sbpatch.registry",
    "status": "sbpatch.registry",
    "verify": "sbpatch.verify",
    "errors": "sbpatch.errors",
}
# submodules an eager ``import sbpatch`` used to bind (``sbpatch.freeze.kept_live()`` after ``import sbpatch``)
_SUBMODULES = ("compat", "config", "errors", "freeze", "patching", "registry")

__all__ = [
    "ConfigError",
    "DidNotEnable",
    "LibraryStatus",
    "SbpatchError",
    "SbpatchWarning",
    "__version__",
    "add_keep_rule",
    "disable",
    "enable",
    "enable_targets",
    "errors",
    "frozen",
    "keep_rules",
    "paused",
    "release_all",
    "remove_keep_rule",
    "status",
    "verify",
]

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at start-up
if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ imports these on first use
    from sbpatch import errors
    from sbpatch.errors import ConfigError, DidNotEnable, SbpatchError, SbpatchWarning
    from sbpatch.freeze import frozen, release_all
    from sbpatch.patching import paused
    from sbpatch.registry import LibraryStatus, disable, enable, enable_targets, status
    from sbpatch.rules import add_keep_rule, keep_rules, remove_keep_rule
    from sbpatch.verify import verify


def __getattr__(name: str) -> object:
    """Import a public name on first access, then keep it as a plain module attribute."""
    module_name = f"{__name__}.{name}" if name in _SUBMODULES else _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    __import__(module_name)  # not importlib: at start-up ``from sbpatch import compat`` comes here
    module = sys.modules[module_name]
    value = module if name in _SUBMODULES else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(type(sys)):  # type: ignore[misc]
    """The package's module type: importing the submodule ``sbpatch.verify`` binds it on the package, as the import
    system does for every submodule; the public ``sbpatch.verify`` stays the function (as an eager import left it)."""

    def __setattr__(self, name: str, value: object) -> None:
        if name == "verify" and isinstance(value, type(sys)):
            value = value.verify
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
