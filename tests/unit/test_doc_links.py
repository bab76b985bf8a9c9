"""Every relative link of README.md and docs/ lands on a file, and on a heading.

The README is a front door into docs/, and the pages link into each other by
heading; a page renamed or a heading reworded would otherwise leave readers at a
404 or the top of a page. Links inside code blocks are examples, not links.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def headings(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return {slug(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def relative_links(page: Path) -> list[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]


def test_every_relative_link_resolves() -> None:
    checked = 0
    for page in pages():
        for target in relative_links(page):
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(ROOT)} links to {target}"
            assert dest.exists(), f"{where}: no such file"
            if anchor and dest.suffix == ".md":
                assert anchor in headings(dest), f"{where}: no such heading"
            checked += 1
    assert checked > 50, "too few links found: the check would be vacuous"


def test_headings_and_links_are_read_as_github_renders_them(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n## A section (`x`)\n\n```\n# not a heading\n```\n")
    assert headings(page) == {"title", "a-section-x"}
    page.write_text("[ok](#title) [example](#nope)\n```\n[ignored](missing.md)\n```\n")
    assert relative_links(page) == ["#title", "#nope"]
