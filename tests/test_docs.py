"""The README stays a short page and every local link in it and in docs/ points at a file that exists.

The README is the index: it keeps the two commands CI and users run, and links every page of docs/."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))
README_MAX_LINES = 230

# Kept exactly as written: .ci/run and users follow them.
QUICK_START = "pip install torch==2.13.0 && pip install -e . && python train.py"
TEST_COMMAND = 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest -q'

FENCE = re.compile(r"^```.*?^```", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
# [text](target) and ![alt](target); the text may span lines, the target may carry a "title"
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def local_targets(markdown: str) -> list[str]:
    """Link and image targets of ``markdown`` that name a file of this repository (no URL, no
    bare #anchor), outside code blocks and code spans, without their #anchor."""
    text = INLINE_CODE.sub("", FENCE.sub("", markdown))
    targets = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue
        targets.append(target.split("#", 1)[0])
    return targets


def broken_links(page: Path) -> list[str]:
    """The local targets of ``page`` that do not exist, relative to the page's folder."""
    return [t for t in local_targets(page.read_text(encoding="utf-8"))
            if not (page.parent / t).exists()]


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: str(p.relative_to(ROOT)))
def test_local_links_resolve(page: Path) -> None:
    assert broken_links(page) == [], f"{page.relative_to(ROOT)} links to missing files"


def test_checker_finds_a_broken_link_and_ignores_code_and_urls(tmp_path: Path) -> None:
    (tmp_path / "there.md").write_text("x")
    page = tmp_path / "page.md"
    page.write_text("[ok](there.md#part) ![img](missing.png) [web](https://example.org/x.md)\n"
                    "[a link whose text\nspans lines](gone.md) [anchor](#top) `[code](no.md)`\n"
                    "```\n[fenced](no-either.md)\n```\n")
    assert broken_links(page) == ["missing.png", "gone.md"]


def test_readme_is_short() -> None:
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move reference material to docs/"


def test_readme_keeps_the_two_commands() -> None:
    text = README.read_text(encoding="utf-8")
    assert QUICK_START in text
    assert TEST_COMMAND in text


def test_readme_links_every_docs_page() -> None:
    linked = {(README.parent / t).resolve() for t in local_targets(README.read_text(encoding="utf-8"))}
    orphans = [p.name for p in PAGES if p.resolve() not in linked]
    assert orphans == [], "give each docs page its line and link in README.md"

