"""The README and docs/ keep their promises: every relative link lands, the README fits on a page
with a table of contents and exactly two set-up commands, and the docs stand on their own."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^```[^\n]*\n.*?^```[ \t]*$", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$", re.M)


def prose(text: str) -> str:
    """The text outside fenced code blocks (a `# comment` in a shell block is no heading)."""
    return FENCE.sub("", text)


def anchors(path: Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces to
    hyphens, a repeated one numbered."""
    seen: Counter[str] = Counter()
    out = set()
    for _, title in HEADING.findall(prose(path.read_text())):
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title)  # a linked heading: its text
        slug = re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")
        out.add(slug if not seen[slug] else f"{slug}-{seen[slug]}")
        seen[slug] += 1
    return out


def links(path: Path) -> list[str]:
    return [t for t in LINK.findall(prose(path.read_text())) if not re.match(r"[a-z]+:", t)]


def section(text: str, title: str) -> str:
    """The body of the `## title` section of a page."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"no section '## {title}'"
    return match[1]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(page: Path) -> None:
    broken = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_readme_has_exactly_two_set_up_commands_install_and_demo_then_tests() -> None:
    blocks = re.findall(r"^```(\w*)\n(.*?)^```", section(README.read_text(), "Set up"), re.S | re.M)
    assert [(lang, body.strip()) for lang, body in blocks] == [
        ("sh", 'pip install -c constraints.txt -e ".[agent]" && thermoscope demo'),
        ("sh", 'pip install -c constraints.txt -e ".[test]" && python -m pytest'),
    ]


def test_the_readme_has_a_table_of_contents_of_its_sections() -> None:
    text = README.read_text()
    sections = [t for level, t in HEADING.findall(prose(text)) if level == "##" and t != "Contents"]
    listed = re.findall(r"^- \[([^\]]+)\]\(#[^)]+\)", section(text, "Contents"), re.M)
    assert listed == sections


def test_the_readme_fits_on_a_page_and_links_every_page_of_the_docs() -> None:
    text = README.read_text()
    assert len(text.encode()) < 12_000, "the README is the pitch; the rest belongs in docs/"
    linked = {Path(t.partition("#")[0]).name for t in links(README) if t.startswith("docs/")}
    assert {p.name for p in PAGES[1:] if p.name != "README.md"} <= linked
    for figure in sorted((ROOT / ".assets").glob("*.png")):
        assert f".assets/{figure.name}" in text, f"the README does not show {figure.name}"


def test_the_docs_stand_on_their_own() -> None:
    """The science is told in docs/science.md: nothing points at a spec outside the repository."""
    for page in [*PAGES, *sorted((ROOT / "deploy").glob("*.md"))]:
        text = page.read_text()
        assert "THEORY" not in text and "../shared" not in text, page.relative_to(ROOT)
