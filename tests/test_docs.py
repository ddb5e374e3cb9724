"""The docs stay current: the coverage table lists every attack, the README documents every library and value."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

from sbpatch import config, registry

ROOT = Path(__file__).parent.parent
COVERAGE = (ROOT / "docs" / "coverage.md").read_text()
README = (ROOT / "README.md").read_text()


@pytest.mark.parametrize("library", list(registry.INTEGRATIONS))
def test_coverage_table_lists_every_attack(library: str):
    section = COVERAGE.split(f"## {library}\n", 1)[1].split("\n## ", 1)[0]
    rows = set(re.findall(r"^\| ([^|]+?) \|", section, re.M)) - {"attack", "---"}
    cases = set(importlib.import_module(registry.INTEGRATIONS[library]).cases())
    missing = cases - rows
    assert not missing, f"docs/coverage.md is stale for {library}: run python docs/make_coverage.py ({missing})"


def test_readme_documents_every_library_and_env_value():
    assert "docs/coverage.md" in README
    for name in registry.INTEGRATIONS:
        assert f"| {'ART' if name == 'art' else name}" in README or f"`\"{name}\"`" in README
    for value in ("all", "1", "true", "0", "false", "none"):
        assert value in config.ALL_VALUES + config.OFF_VALUES
        assert f"`{value}`" in README
