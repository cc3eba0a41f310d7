"""The documentation stands on its own: every relative link in README.md and docs/*.md
resolves to a file inside the repository (and to a heading, where it names one), and the
sections that code comments cite as `docs/design.md §N` exist."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")
INLINE = re.compile(r"!?\[(?:[^\]\n]|\][^(\n])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]\n]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.M)
HREF = re.compile(r"""(?:href|src)\s*=\s*["']([^"']+)["']""")
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # https:, mailto:, opc.tcp: ...


def _prose(text: str) -> str:
    """The text without fenced code blocks and code spans (a `[x](y)` in code is not a link)."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def links(path: Path) -> list[str]:
    text = _prose(path.read_text(encoding="utf-8"))
    return [m.group(1) for rx in (INLINE, REFERENCE, HREF) for m in rx.finditer(text)]


def slugs(path: Path) -> set[str]:
    """Heading anchors as GitHub makes them: lower case, punctuation dropped, spaces to '-',
    repeats numbered."""
    out: set[str] = set()
    seen: dict[str, int] = {}
    for line in FENCE.sub("", path.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_the_docs_exist_and_have_links():
    assert (REPO / "docs" / "design.md").is_file()
    assert len(DOCS) >= 8
    assert sum(len(links(p)) for p in DOCS) > 30  # the parser finds links at all


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves_inside_the_repository(doc: Path):
    bad = []
    root = REPO.resolve()
    for target in links(doc):
        if EXTERNAL.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        if file_part.startswith("/"):
            bad.append(f"{target}: absolute path (a clone has no such file; link relative to {doc.name})")
            continue
        dest = (doc.parent / file_part).resolve() if file_part else doc.resolve()
        if not dest.is_relative_to(root):
            bad.append(f"{target}: points outside the repository ({dest})")
        elif not dest.exists():
            bad.append(f"{target}: no such file {dest.relative_to(root)}")
        elif anchor and dest.suffix == ".md" and anchor not in slugs(dest):
            bad.append(f"{target}: {dest.relative_to(root)} has no heading #{anchor}")
    assert not bad, f"{doc.relative_to(REPO)}:\n  " + "\n  ".join(bad)


def test_the_link_checker_catches_what_it_must(tmp_path, monkeypatch):
    """The checks above can fail: a page with each kind of broken link is reported."""
    page = tmp_path / "page.md"
    page.write_text("# Top\n[a](../shared/DESIGN.md) [b](missing.md) [c](#nowhere) [d](#top)\n"
                    "`[e](in-code.md)`\n```\n[f](in-fence.md)\n```\n[g]: /abs/path.md\n"
                    "<a href=\"other.md\">h</a> [i](https://example.org/x.md)\n", encoding="utf-8")
    assert set(links(page)) == {"../shared/DESIGN.md", "missing.md", "#nowhere", "#top", "/abs/path.md",
                                "other.md", "https://example.org/x.md"}
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    with pytest.raises(AssertionError) as info:
        test_every_relative_link_resolves_inside_the_repository(page)
    msg = str(info.value)
    for expected in ("../shared/DESIGN.md: points outside the repository", "missing.md: no such file",
                     "#nowhere: page.md has no heading #nowhere", "/abs/path.md: absolute path",
                     "other.md: no such file"):
        assert expected in msg, msg
    assert "#top" not in msg and "example.org" not in msg and "in-code" not in msg and "in-fence" not in msg


def test_heading_slugs_follow_github():
    p = REPO / "docs" / "design.md"
    s = slugs(p)
    assert {"1-vocabulary-units-and-signs", "2-what-optimal-means", "24-the-seed-example",
            "2b-energy-across-time"} <= s


def _texts():
    for pattern in ("*.md", "*.py", "*.yaml", "*.toml"):
        for p in REPO.rglob(pattern):
            rel = p.relative_to(REPO)
            if rel.parts[0].startswith(".") or rel.parts[0].endswith(".egg-info") or "__pycache__" in rel.parts:
                continue
            yield p


def test_nothing_refers_to_design_notes_outside_the_repository():
    this = Path(__file__).resolve()
    bad = [f"{p.relative_to(REPO)}:{n}: {line.strip()}"
           for p in _texts() if p.resolve() != this
           for n, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
           if "shared/" in line and ".md" in line or re.search(r"(?<![/\w])DESIGN(\.md)?\b", line)]
    assert not bad, "\n".join(bad)


def test_cited_design_sections_exist():
    """`docs/design.md §N` in code and docs names a numbered section of docs/design.md."""
    headings = [m.group(1) for m in re.finditer(r"^#{2,3} (\d+b?(?:\.\d+)?)\.? ",
                                                (REPO / "docs" / "design.md").read_text(encoding="utf-8"), re.M)]
    assert {"1", "2", "2.4", "2.6", "2b", "3", "4", "5", "6"} <= set(headings), headings
    cited = {}
    for p in _texts():
        for m in re.finditer(r"design\.md[^\n§]{0,3}§\s?(\d+b?(?:\.\d+)?)", p.read_text(encoding="utf-8", errors="replace")):
            cited.setdefault(m.group(1), []).append(str(p.relative_to(REPO)))
    assert len(cited) >= 4, cited
    missing = {sec: where for sec, where in cited.items() if sec not in headings}
    assert not missing, missing
