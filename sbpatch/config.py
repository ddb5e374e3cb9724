"""One vocabulary for naming libraries, shared by ``enable()``/``disable()`` and the ``SBPATCH`` variable.

Names are case-insensitive and may be comma-separated; ``"all"`` means every supported library. The variable also
takes on/off switches: ``ALL_VALUES`` (every library) and ``OFF_VALUES`` (nothing), matched after stripping spaces
and lower-casing; :func:`accepted_values` words both for messages and docs. ``OFF_VALUES`` is repeated in
``sbpatch.pth`` (which must import nothing); tests/test_startup.py keeps the two equal.

Imported at interpreter start when ``SBPATCH`` is set (``sbpatch._startup``): pure strings, no import but
``sbpatch.errors``.
"""

from __future__ import annotations

from sbpatch.errors import ConfigError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at start-up
if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

ENV_VAR = "SBPATCH"
ALL = "all"
ALL_VALUES = (ALL, "1", "true", "yes", "on")
OFF_VALUES = ("", "0", "false", "no", "off", "none")
_SEQUENCES = (list, tuple, set, frozenset)


def _choices(valid: Sequence[str]) -> str:
    return f"'{ALL}' or any of: {', '.join(valid)}"


def library_names(libraries: Iterable[object], valid: Sequence[str], what: str = "library names") -> list[str] | None:
    """Normalise names given as strings (``"art"``, ``"Art, foolbox"``) or lists/tuples of strings.

    Returns the valid names in the order given without repeats, or None when ``"all"`` is among them. Raises
    :class:`ConfigError` (a ValueError) for an unknown or empty name, TypeError for anything but strings and
    lists/tuples of strings; both messages name the valid choices.
    """
    words: list[str] = []
    for item in libraries:
        parts = item if isinstance(item, _SEQUENCES) else (item,)
        for part in parts:
            if not isinstance(part, str):
                raise TypeError(
                    f"{what} must be strings or lists/tuples of strings, not {type(part).__name__} {part!r}; "
                    f"use {_choices(valid)}"
                )
            words.extend(w.strip().lower() for w in part.split(","))
    names = [w for w in words if w]
    if not names:
        raise ConfigError(f"no library named in {what}; use {_choices(valid)}")
    if ALL in names:
        return None
    bad = [n for n in names if n not in valid]
    if bad:
        raise ConfigError(f"unknown library {', '.join(map(repr, bad))}; valid names: {_choices(valid)}")
    return list(dict.fromkeys(names))


def accepted_values() -> tuple[str, str]:
    """On-values and off-values as the parser takes them, in words: ``("all, 1, ...", "unset, empty, ...")``."""
    on = ", ".join(ALL_VALUES)
    off = ", ".join(["unset"] + [v if v else "empty" for v in OFF_VALUES])
    return on, off


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
    try:
        names = library_names([text], valid)
    except ConfigError:
        on, off = accepted_values()
        raise ConfigError(
            f"invalid {ENV_VAR}={value!r}: use {on} (every library); {off} (nothing); "
            f"or a comma-separated list of: {', '.join(valid)} (any case)"
        ) from None
    return [] if names is None else names
