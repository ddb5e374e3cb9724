"""sbpatch: semi-backward propagation for existing adversarial-attack libraries.

Attacks need the gradient with respect to the input, never the parameters. sbpatch freezes the victim model's
parameters (``requires_grad=False``) for the duration of each attack call of the supported libraries, and restores
them exactly afterwards: the same adversarial examples, faster, with no ``param.grad`` side effects.

>>> import sbpatch
>>> sbpatch.enable()          # every supported library, now or when imported
"""

from __future__ import annotations

from sbpatch import errors
from sbpatch.errors import ConfigError, DidNotEnable, SbpatchError, SbpatchWarning
from sbpatch.freeze import add_keep_rule, frozen, keep_rules, remove_keep_rule
from sbpatch.patching import paused
from sbpatch.registry import LibraryStatus, disable, enable, status
from sbpatch.verify import verify

__version__ = "0.1.0"

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
    "errors",
    "frozen",
    "keep_rules",
    "paused",
    "remove_keep_rule",
    "status",
    "verify",
]
