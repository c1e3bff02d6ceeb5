"""The user documentation: the site builds with `mkdocs build --strict` (no warning at all),
every internal link and #anchor of docs/ and README.md resolves, and README links the docs.

mkdocs.yml turns broken links, broken anchors and pages missing from the nav into warnings,
so the strict build fails on them; a second build of a deliberately broken copy proves that.
"""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess
import sys

import pytest
from markdown.extensions.toc import slugify

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
README = REPO / "README.md"

_FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"(?<!!)\[(?P<text>[^\]\n]*)\]\((?P<target>[^)\s]+)\)")
_HEADING = re.compile(r"^#{1,6}\s+(?P<title>.+?)\s*#*\s*$", re.M)


def mkdocs_build(config_file: pathlib.Path, site_dir: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config_file),
         "--site-dir", str(site_dir)],
        cwd=config_file.parent, capture_output=True, text=True, timeout=120,
    )


def prose(markdown: str) -> str:
    """The text outside fenced blocks and inline code, where links are live."""
    return _INLINE_CODE.sub("", _FENCE.sub("", markdown))


def anchors(page: pathlib.Path) -> set[str]:
    """The heading ids mkdocs' toc extension gives a page (duplicates get _1, _2, ...)."""
    seen: set[str] = set()
    for match in _HEADING.finditer(_FENCE.sub("", page.read_text(encoding="utf-8"))):
        title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", match.group("title")).replace("`", "")
        base = slugify(title, "-")
        slug, n = base, 0
        while slug in seen:
            n += 1
            slug = f"{base}_{n}"
        seen.add(slug)
    return seen


def broken_links(page: pathlib.Path) -> list[str]:
    """`target (why)` for every relative link of `page` whose file or #anchor does not exist."""
    problems = []
    for match in _LINK.finditer(prose(page.read_text(encoding="utf-8"))):
        target = match.group("target")
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            problems.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{target} (no heading with id {anchor!r} in {dest.name})")
    return problems


def test_site_builds_strict_without_warnings(tmp_path):
    proc = mkdocs_build(REPO / "mkdocs.yml", tmp_path / "site")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert "WARNING" not in output, output[-3000:]
    for page in DOCS.glob("*.md"):
        built = tmp_path / "site" / ("index.html" if page.stem == "index" else f"{page.stem}/index.html")
        assert built.is_file(), f"{page.name} was not rendered"


def test_strict_build_fails_on_a_broken_link_and_anchor(tmp_path):
    """The build check can fail: a copy of the docs with one broken link and one broken anchor."""
    shutil.copy(REPO / "mkdocs.yml", tmp_path / "mkdocs.yml")
    shutil.copytree(DOCS, tmp_path / "docs")
    with open(tmp_path / "docs" / "index.md", "a", encoding="utf-8") as f:
        f.write("\nSee [gone](no_such_page.md) and [the formulas](objectives.md#no-such-section).\n")
    proc = mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site")
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "no_such_page.md" in output and "no-such-section" in output, output[-3000:]


@pytest.mark.parametrize("page", sorted(DOCS.glob("*.md")) + [README], ids=lambda p: p.name)
def test_every_internal_link_and_anchor_resolves(page):
    assert broken_links(page) == []


def test_the_link_checker_sees_a_broken_anchor(tmp_path):
    (tmp_path / "a.md").write_text("# A\n\n## Two words\n\n## Two words\n", encoding="utf-8")
    (tmp_path / "b.md").write_text(
        "[ok](a.md#two-words) [dup](a.md#two-words_1) [code `x`](a.md) `[not a link](zz.md)`\n"
        "[bad](a.md#three) [missing](c.md)\n```\n[in a fence](zz.md)\n```\n", encoding="utf-8")
    assert broken_links(tmp_path / "b.md") == [
        "a.md#three (no heading with id 'three' in a.md)", "c.md (no such file)"]


def test_readme_keeps_its_two_commands_and_links_the_docs():
    text = README.read_text(encoding="utf-8")
    first_section = text.split("\n## ", 1)[0]
    assert "make demo   #" in first_section and "make test   #" in first_section
    assert "\n## Documentation\n" in text
    docs_section = text.split("\n## Documentation\n", 1)[1].split("\n## ", 1)[0]
    linked = {m.group("target").split("#")[0] for m in _LINK.finditer(docs_section)}
    for page in ("docs/index.md", "docs/training.md", "docs/configuration.md", "docs/differences.md"):
        assert page in linked, page
    assert "make docs" in docs_section
