"""The documentation holds together: the README is a front page (<= 16 KB), every relative link
of the README and of docs/ resolves (file and heading), every section of a docs page that code,
tests or configs cite by name is a heading there, and nothing cites a document the repository
lacks."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.rglob("*.md"))]
TEXT_DIRS = ["src", "tests", "docs", "benchmarks", "configs", "studies", "scripts", ".ci"]
# The sections of docs/method.md that code and tests cite by name.
METHOD_SECTIONS = [
    "The KL convention",
    "The D2R loss",
    "CAG",
    "Baselines",
    "Paper and released code",
    "Recipe",
    "Architectures",
    "Evaluation protocol",
    "Paper targets",
]

FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CITATION = re.compile(r"(docs/[\w./-]+\.md),((?:\s*\"[^\"]+\",?)+)")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def headings(path: Path) -> list[str]:
    """Heading texts (without the #s, backticks dropped), outside code blocks."""
    found = []
    for line in prose_lines(path.read_text(encoding="utf-8")):
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            found.append(match.group(1).replace("`", ""))
    return found


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, every character but letters, digits,
    underscores, hyphens and spaces dropped, spaces turned into hyphens."""
    text = unicodedata.normalize("NFC", heading).lower()
    text = "".join(c for c in text if c.isalnum() or c in "-_ ")
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's slug, with GitHub's -1, -2, ... for repeated ones."""
    seen: dict[str, int] = {}
    out = set()
    for heading in headings(path):
        base = slug(heading)
        n = seen.get(base, 0)
        out.add(base if n == 0 else f"{base}-{n}")
        seen[base] = n + 1
    return out


def relative_links(path: Path) -> list[str]:
    links = []
    for line in prose_lines(path.read_text(encoding="utf-8")):
        for target in LINK.findall(line):
            if not re.match(r"^(https?:|mailto:)", target):
                links.append(target)
    return links


def broken_links(path: Path) -> list[str]:
    broken = []
    for target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            broken.append(f"{target}: no file {dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.name}")
    return broken


def text_files() -> list[Path]:
    files = [README, ROOT / "pyproject.toml"]
    for name in TEXT_DIRS:
        files += [p for p in (ROOT / name).rglob("*") if p.is_file()]
    out = []
    for path in files:
        if "__pycache__" in path.parts or any(part.endswith(".egg-info") for part in path.parts):
            continue  # build output (pip install -e copies the README it was built from)
        try:
            path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # binary (a figure) or unreadable: not text
        out.append(path)
    return out


def test_readme_is_a_front_page_of_at_most_16_kb():
    size = README.stat().st_size
    assert size <= 16 * 1024, f"README.md is {size} bytes; move manual sections into docs/"


def test_the_link_checker_sees_links_and_headings():
    # A checker that found nothing would pass every page: make sure it reads both.
    assert "docs/method.md" in relative_links(README)
    assert slug("Tables and curves: `d2r report`".replace("`", "")) == (
        "tables-and-curves-d2r-report"
    )
    assert "paper-and-released-code" in anchors(DOCS / "method.md")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    assert broken_links(page) == []


def test_a_broken_link_or_anchor_is_caught(tmp_path):
    (tmp_path / "other.md").write_text("# A heading\n\n```bash\n# not a heading\n```\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](other.md#a-heading) [gone](missing.md) [bad](other.md#not-a-heading) "
        "[web](https://example.com/x.md) ![img](other.md)\n"
    )
    assert [b.split(":")[0] for b in broken_links(page)] == [
        "missing.md",
        "other.md#not-a-heading",
    ]


def test_method_page_has_the_cited_sections():
    assert set(METHOD_SECTIONS) <= set(headings(DOCS / "method.md"))


def cited_sections() -> list[tuple[Path, str, str]]:
    """(citing file, cited page, section) for every docs page cited with a quoted section name
    after it (the page, a comma, then one or more quoted names)."""
    cited = []
    for path in text_files():
        text = re.sub(r"\s+", " ", path.read_text(encoding="utf-8"))  # across line breaks
        for page, names in CITATION.findall(text):
            cited += [(path, page, name) for name in re.findall(r"\"([^\"]+)\"", names)]
    return cited


def test_every_cited_section_exists():
    cited = cited_sections()
    assert any(page == "docs/method.md" for _, page, _ in cited)  # the scan finds citations
    missing = []
    for path, page, name in cited:
        target = ROOT / page
        # a section may be cited without its heading's trailing parenthesis
        found = headings(target) if target.is_file() else []
        names = set(found) | {re.sub(r"\s*\(.*\)$", "", h) for h in found}
        if name not in names:
            missing.append(f"{path.relative_to(ROOT)} cites {page}, {name!r}")
    assert missing == []


def test_nothing_cites_a_document_the_repository_lacks():
    spec, design = "SP" + "EC", "DES" + "IGN"
    forbidden = [spec + ".md", design + ".md", spec + " section", spec + " §"]
    hits = [
        f"{path.relative_to(ROOT)}: {word!r}"
        for path in text_files()
        for word in forbidden
        if word in path.read_text(encoding="utf-8")
    ]
    assert hits == []
