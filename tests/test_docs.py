"""The documentation holds together: a short README, and links that resolve.

README.md is the front door (at most about 10 KB); the topic pages live in docs/. Every
relative link and image in README.md, ARCHITECTURE.md and docs/*.md must name an existing
file, and an `#anchor` into a markdown file must match one of its headings by GitHub's
slug rule. No network: links with a scheme (https:, mailto:) are not followed.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_BYTES = 10_500
PAGES = [ROOT / "README.md", ROOT / "ARCHITECTURE.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^\s*(`{3,}|~{3,})")
_INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
_LINK = re.compile(
    r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^()\s<>]*(?:\([^()\s]*\)[^()\s<>]*)*)>?"
    r"(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)"
)
_REF_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
_HTML_ATTR = re.compile(r"<(?:a|img)\b[^>]*?\b(?:href|src)\s*=\s*[\"']([^\"']+)[\"']", re.I)
_HTML_ID = re.compile(r"<[a-z]+\b[^>]*?\b(?:id|name)\s*=\s*[\"']([^\"']+)[\"']", re.I)
_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
_SCHEME = re.compile(r"^(?:[a-z][a-z0-9+.-]*:|//)", re.I)


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks, inline code spans blanked."""
    out, fence = [], None
    for number, line in enumerate(text.splitlines(), 1):
        m = _FENCE.match(line)
        if fence is None and m:
            fence = m.group(1)[0] * len(m.group(1))
            continue
        if fence is not None:
            if line.strip().startswith(fence) and not line.strip().strip(fence[0]):
                fence = None
            continue
        out.append((number, _INLINE_CODE.sub("code", line)))
    return out


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation removed,
    spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images: their text
    text = re.sub(r"<[^>]+>", "", text)  # HTML tags
    text = text.replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor GitHub makes in a markdown file (duplicates get -1, -2, ...)."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    text = path.read_text(encoding="utf-8")
    for _, line in prose_lines(text):
        found.update(_HTML_ID.findall(line))
    # Headings keep their inline code (it counts towards the slug), so read the raw lines.
    raw = text.splitlines()
    for number, _ in prose_lines(text):
        m = _HEADING.match(raw[number - 1])
        if not m:
            continue
        slug = github_slug(m.group(2))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        found.add(slug if n == 0 else f"{slug}-{n}")
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link, image and reference definition in prose."""
    out = []
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        targets = _LINK.findall(line) + _HTML_ATTR.findall(line)
        m = _REF_DEF.match(line)
        if m:
            targets.append(m.group(1))
        out.extend((number, t) for t in targets)
    return out


def broken_links(path: Path) -> list[str]:
    problems = []
    cache: dict[Path, set[str]] = {}
    for number, target in links(path):
        if not target or _SCHEME.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / unquote(file_part)).resolve() if file_part else path
        where = f"{path.name}:{number}: {target}"
        if not dest.exists():
            problems.append(f"{where} (no such file)")
            continue
        if anchor and dest.suffix.lower() == ".md":
            if dest not in cache:
                cache[dest] = anchors(dest)
            if unquote(anchor).lower() not in cache[dest]:
                problems.append(f"{where} (no heading with that anchor)")
    return problems


def test_readme_is_short():
    size = (ROOT / "README.md").stat().st_size
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes; move detail into docs/"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path):
    assert page.is_file()
    assert broken_links(page) == []


def test_every_docs_page_is_reachable_from_the_readme():
    linked = set()
    for page in (ROOT / "README.md", ROOT / "docs" / "README.md"):
        for _, target in links(page):
            file_part = target.partition("#")[0]
            if file_part and not _SCHEME.match(target):
                linked.add((page.parent / unquote(file_part)).resolve())
    orphans = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if p.resolve() not in linked]
    assert orphans == []


def test_docs_pages_open_with_a_title_and_a_lead():
    for page in sorted((ROOT / "docs").glob("*.md")):
        lines = page.read_text(encoding="utf-8").splitlines()
        assert lines and lines[0].startswith("# "), page.name
        lead = next((line for line in lines[1:] if line.strip()), "")
        assert lead and not lead.startswith(("#", "|", "```", "-", "!")), page.name


def test_readme_gives_the_commands_ci_runs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "pip install -e '.[dev,bench]' && python -m pytest -n 2 --dist loadfile" in readme
    assert "pip install --quiet -e '.[dev,bench]'" in ci
    assert "python -m pytest -n 2 --dist loadfile" in ci


def test_the_checker_itself():
    assert github_slug("The `.ddcm` format") == "the-ddcm-format"
    assert (
        github_slug("Safety: hostile and careless inputs") == "safety-hostile-and-careless-inputs"
    )
    assert github_slug("Kodak crops: this model against small-v1") == (
        "kodak-crops-this-model-against-small-v1"
    )
    assert github_slug("FLUX.1 models") == "flux1-models"
    lines = prose_lines("a [x](y.md) `[no](link)`\n```\n[no](fenced.md)\n```\n![i](p.png)")
    found = [t for _, line in lines for t in _LINK.findall(line)]
    assert found == ["y.md", "p.png"]


def test_the_checker_finds_broken_links(tmp_path: Path):
    (tmp_path / "b.md").write_text("# Top\n\n## The `.ddcm` format\n\n## Top\n", encoding="utf-8")
    page = tmp_path / "a.md"
    page.write_text(
        "# A\n\n[ok](b.md#the-ddcm-format) [ok](b.md#top-1) [ok](#a) [ok](https://x.invalid/y)\n"
        "[bad](missing.md) ![bad](missing.png) [bad](b.md#nowhere) [bad](#nor-here)\n",
        encoding="utf-8",
    )
    assert [p.split(": ", 1)[1] for p in broken_links(page)] == [
        "missing.md (no such file)",
        "missing.png (no such file)",
        "b.md#nowhere (no heading with that anchor)",
        "#nor-here (no heading with that anchor)",
    ]
