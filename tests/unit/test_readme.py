"""The user documentation stays short, self-contained and free of project-internal references.

README.md is for users: it has a length budget, its links and those of docs/*.md resolve inside
the repository (a fresh clone has nothing next to it), and neither names issue numbers (users
cannot look them up).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
USER_DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
MAX_README_LINES = 420

FENCE = re.compile(r"^```.*?^```", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
# [text](target) and [label]: target; images too.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REF_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?\s*$", re.M)
ISSUE_NUMBER = re.compile(r"\bissues?\s*(?:no\.?\s*)?#?\d+|(?<![\w&/#])#\d+\b", re.I)


def _prose(text: str) -> str:
    """The text without code: links and anchors are only read from prose."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def links(text: str) -> list[str]:
    prose = _prose(text)
    return LINK.findall(prose) + REF_LINK.findall(prose)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*$", text, re.M)}


def link_problem(doc: Path, target: str) -> str | None:
    """Why a link of doc is not a link into the repository, or None when it is one."""
    if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):
        return None  # a URL (https:, mailto:): not a path into a clone
    path_part, _, anchor = target.partition("#")
    dest = (doc.parent / path_part).resolve() if path_part else doc
    if path_part.startswith("/") or not dest.is_relative_to(ROOT):
        return f"{target!r} leads outside the repository"
    if not dest.exists():
        return f"{target!r}: {dest.relative_to(ROOT)} does not exist"
    if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
        return f"{target!r}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}"
    return None


def test_readme_stays_short() -> None:
    n = len(README.read_text().splitlines())
    assert n <= MAX_README_LINES, (
        f"README.md has {n} lines, the budget is {MAX_README_LINES}: move details to docs/")


@pytest.mark.parametrize("doc", USER_DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_stay_inside_the_repository(doc: Path) -> None:
    found = links(doc.read_text())
    problems = [p for t in found if (p := link_problem(doc, t))]
    assert not problems, f"{doc.relative_to(ROOT)}: " + "; ".join(problems)


@pytest.mark.parametrize("doc", USER_DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_issue_numbers(doc: Path) -> None:
    hits = [
        f"{doc.relative_to(ROOT)}:{n}: {m.group(0)!r}"
        for n, line in enumerate(doc.read_text().splitlines(), 1)
        for m in ISSUE_NUMBER.finditer(line)
    ]
    assert not hits, "issue numbers in user documentation: " + "; ".join(hits)


def test_readme_python_examples_are_python() -> None:
    blocks = re.findall(r"^```python\n(.*?)^```", README.read_text(), re.S | re.M)
    assert blocks, "README.md has no python examples"
    for i, block in enumerate(blocks, 1):
        compile(block, f"README.md python block {i}", "exec")


def test_skip_reasons_point_at_a_readme_section() -> None:
    # tests/thirdparty.py tells a user whose clone lacks third-party files to read this section.
    assert "see README, Running the tests" in (ROOT / "tests" / "thirdparty.py").read_text()
    assert "running-the-tests" in anchors(README)


@pytest.mark.parametrize(("text", "bad"), [
    ("see issue 7 for it", True), ("Issue #12 says", True), ("fixed in #15.", True),
    ("issues 3 and 4", True), ("#: nodes.a = { };", False), ("a 1 GiB guest", False),
    ("tap#1", False), ("the issue that asked", False),
])
def test_issue_number_pattern(text: str, bad: bool) -> None:
    assert bool(ISSUE_NUMBER.search(text)) is bad


@pytest.mark.parametrize(("target", "ok"), [
    ("docs/ci.md", True), ("docs/threat-model.md", True), ("#node-options", True),
    ("../shared/DESIGN.md", False), ("/etc/passwd", False), ("docs/missing.md", False),
    ("#no-such-heading", False), ("https://example.org/x", True),
])
def test_link_check(target: str, ok: bool) -> None:
    assert (link_problem(README, target) is None) is ok
