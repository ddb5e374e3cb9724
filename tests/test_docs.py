"""The docs stay current: the coverage table lists every attack, the README documents every library and value."""

from __future__ import annotations

import importlib
import re
import subprocess
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
        row = f"| {'ART' if name == 'art' else name}"
        assert row in README or f'`"{name}"`' in README or f"(`{name}`) |" in README, name
    for value in ("all", "1", "true", "0", "false", "none"):
        assert value in config.ALL_VALUES + config.OFF_VALUES
        assert f"`{value}`" in README


# --- the repository stands alone --------------------------------------------------------------------------------------

OUTSIDE = "../" + "shared"  # spelt in two parts so that this file does not match itself
LEAD_NOTES = "DESIGN" + ".md"
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|!\[[^\]]*\]\(([^)\s]+)\)")


def tracked_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [ROOT / name for name in out.split("\0") if name and (ROOT / name).is_file()]


def test_no_tracked_file_points_outside_the_repository():
    offenders = []
    for path in tracked_files():
        try:
            text = path.read_text()
        except UnicodeDecodeError:  # binary (plots)
            continue
        if OUTSIDE in text or LEAD_NOTES in text:
            offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, f"{offenders} refer to {OUTSIDE} or {LEAD_NOTES}, which a clone lacks: link docs/ instead"


def markdown_pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "benchmarks").glob("*.md"))]


@pytest.mark.parametrize("page", markdown_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code blocks hold no links
    broken = []
    for match in LINK.finditer(text):
        target = (match.group(1) or match.group(2)).split("#", 1)[0]
        if not target or re.match(r"^[a-z][a-z0-9+.-]*:", target):  # an anchor, https:, mailto:
            continue
        if not (page.parent / target).exists():
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)}: links to missing files {broken}"


def test_docs_pages_are_linked_from_the_readme():
    for name in ("docs/architecture.md", "docs/facts.md", "docs/coverage.md"):
        assert f"]({name})" in README, name
