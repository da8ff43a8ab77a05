"""Every local link and picture in the README and docs/ points at a file that is there: a relock can
rename a report's files (an atom gallery is named by the atom that ranks first) under a doc that
shows them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def local_targets(doc: Path) -> list[str]:
    """The link targets of a markdown file that name a file of this repository (not a URL, not an
    anchor of the same page), anchors stripped."""
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)  # code blocks hold commands, not links
    return [t.split("#", 1)[0] for t in LINK.findall(text)
            if not re.match(r"[a-z]+:", t) and not t.startswith("#")]


def test_local_targets_reads_markdown_links(tmp_path):
    doc = tmp_path / "d.md"
    doc.write_text("![a](x/y.png) [b](docs/z.md#part) [c](https://e.org/f) [d](#here)\n```\n[e](g)\n```\n")
    assert local_targets(doc) == ["x/y.png", "docs/z.md"]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_local_link_exists(doc):
    missing = [t for t in local_targets(doc) if not (doc.parent / t).exists()]
    assert not missing, f"{doc.relative_to(ROOT)} links to files that are not there: {missing}"
