"""sbpatch's exception and warning types."""

from __future__ import annotations


class SbpatchError(Exception):
    """Base class of every error sbpatch raises."""


class ConfigError(SbpatchError, ValueError):
    """A bad library name, environment value or option; the message names the valid choices."""


class DidNotEnable(SbpatchError):
    """A library the user named explicitly cannot be patched (missing, unsupported version)."""


class SbpatchWarning(UserWarning):
    """One-time notices: a target skipped, a library of an unsupported version, an internal error."""
