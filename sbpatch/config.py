"""The ``SBPATCH`` environment variable: parsing and validation."""

from __future__ import annotations

from sbpatch.errors import ConfigError

ENV_VAR = "SBPATCH"
ALL_VALUES = ("all", "1", "true", "yes", "on")
OFF_VALUES = ("", "0", "false", "no", "off", "none")


def parse_libraries(value: str | None, valid: list[str]) -> list[str] | None:
    """What ``SBPATCH=value`` asks for: None (nothing), ``[]`` (every library) or the named libraries.

    Raises :class:`ConfigError` naming the valid values for anything else.
    """
    if value is None:
        return None
    text = value.strip().lower()
    if text in OFF_VALUES:
        return None
    if text in ALL_VALUES:
        return []
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in valid]
    if bad or not names:
        raise ConfigError(
            f"invalid {ENV_VAR}={value!r}: use 'all' (or 1, true), nothing (unset, 0, false, none), "
            f"or a comma-separated list of: {', '.join(valid)}"
        )
    return list(dict.fromkeys(names))
