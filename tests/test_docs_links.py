"""Every relative link of the user docs resolves inside the repository: the file, and the heading of a `#anchor`."""
from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted({ROOT / "README.md", *ROOT.glob("docs/**/*.md"), *ROOT.glob("benchmarks/*.md"),
               *ROOT.glob("recipes/*.md")})

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"`+[^`]*`+")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*(\S+)")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:, ...


def _prose_lines(text: str):
    """(line number, line) outside fenced code blocks, inline code removed."""
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield number, INLINE_CODE.sub("", line)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: its text (links reduced to their text), lower case, punctuation dropped."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        match = None if fenced else HEADING.match(line)
        if match:
            base = slug(match.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            out.add(base if count == 0 else f"{base}-{count}")
    return out


def links(path: Path):
    """(line number, target) of every link in the prose of a markdown file."""
    for number, line in _prose_lines(path.read_text(encoding="utf-8")):
        for match in LINK.finditer(line):
            yield number, match.group(1).strip("<>")
        match = REFERENCE.match(line)
        if match:
            yield number, match.group(1).strip("<>")


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """Each relative link of `path` whose file (or heading) does not exist, or that leaves `root`."""
    problems = []
    for number, target in links(path):
        if EXTERNAL.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / unquote(file_part)).resolve() if file_part else path.resolve()
        where = f"{path.relative_to(root)}:{number}: {target}"
        if not resolved.is_relative_to(root.resolve()):
            problems.append(f"{where} (outside the repository)")
        elif not resolved.exists():
            problems.append(f"{where} (no such file)")
        elif anchor and resolved.suffix == ".md" and unquote(anchor) not in anchors(resolved):
            problems.append(f"{where} (no such heading in {resolved.relative_to(root.resolve())})")
    return problems


def test_the_docs_are_found():
    names = {p.relative_to(ROOT).as_posix() for p in DOCS}
    assert {"README.md", "docs/engine.md", "benchmarks/README.md"} <= names


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(path):
    assert broken_links(path) == []


def test_a_broken_link_is_reported(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "there.md").write_text("# A heading, with `code`\n\n## Twice\n\n## Twice\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](sub/there.md) [ok](sub/there.md#a-heading-with-code) [ok](sub/there.md#twice-1) [ok](#top)\n"
        "# Top\n"
        "[web](https://example.com/missing.md) `[in code](missing.md)`\n"
        "```\n[fenced](missing.md)\n```\n"
        "[gone](sub/missing.md) ![img](missing.png) [anchor](sub/there.md#nowhere) [up](../outside.md)\n"
        "[ref]: sub/none.md\n")
    assert broken_links(page, tmp_path) == [
        "page.md:7: sub/missing.md (no such file)",
        "page.md:7: missing.png (no such file)",
        "page.md:7: sub/there.md#nowhere (no such heading in sub/there.md)",
        "page.md:7: ../outside.md (outside the repository)",
        "page.md:8: sub/none.md (no such file)",
    ]
