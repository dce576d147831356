"""The Markdown pages: every relative link and image points at a file (and a heading) that
exists, and the front page stays a front page."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = sorted(p for p in REPO.rglob("*.md")
               if not {".venv", "runs", "data", ".pytest_cache"} & set(p.relative_to(REPO).parts))
LINK = re.compile(r"\]\(([^)\s]+)\)")


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower()
    text = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {github_anchor(m.group(2)) for m in re.finditer(r"^(#+) (.*)$", page.read_text(), re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target} (no file)")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target} (no heading #{anchor})")
    assert not broken, f"{page.relative_to(REPO)}: {broken}"


def test_the_front_page_is_short_and_links_every_chapter():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    for chapter in sorted(p.parent.name for p in REPO.glob("0*/train.py")):
        assert f"({chapter}/README.md)" in text, chapter
        assert (REPO / chapter / "README.md").is_file(), chapter
