"""The user docs hold together: links resolve, anchors exist, the README stays short,
and the pointers from leangen's code to the docs land on a real heading."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
USER_DOCS = [README, ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
# What leangen's code cites: docs/X.md, docs/X.md#anchor, README, README.md#anchor, README "Section".
CODE_REF = re.compile(r'(docs/[\w-]+\.md)(?:#([\w-]+))?|README(?:\.md)?(?:#([\w-]+)| "([^"]+)")?')


def prose_lines(path: Path) -> list[str]:
    """The file's lines outside fenced code blocks."""
    lines, fenced = [], False
    for line in path.read_text().splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found, seen = set(), {}
    for line in prose_lines(path):
        m = HEADING.match(line)
        if m:
            base = slug(m.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def check_target(target: Path, anchor: str | None, where: str) -> None:
    assert target.exists(), f"{where}: {target.relative_to(ROOT)} does not exist"
    if anchor:
        assert target.suffix == ".md", f"{where}: an anchor into a non-markdown file"
        assert anchor in anchors(target), (
            f"{where}: no heading '#{anchor}' in {target.relative_to(ROOT)}; "
            f"it has {sorted(anchors(target))}")


def test_slug_follows_github():
    assert slug("Threads and busy machines") == "threads-and-busy-machines"
    assert slug("`load_tensors` and `open_checkpoint`") == "load_tensors-and-open_checkpoint"
    assert slug("q and k as stored") == "q-and-k-as-stored"
    assert slug("Low RAM: a 7B model under a memory cap") == "low-ram-a-7b-model-under-a-memory-cap"


@pytest.mark.parametrize("doc", USER_DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    links = [m.group(1) for line in prose_lines(doc) for m in LINK.finditer(line)]
    for link in links:
        if re.match(r"[a-z]+:", link):  # https:, mailto:
            continue
        path, _, anchor = link.partition("#")
        target = (doc.parent / path).resolve() if path else doc
        check_target(target, anchor or None, f"{doc.relative_to(ROOT)} links '{link}'")


def test_code_references_to_docs_resolve():
    refs = []
    for source in sorted((ROOT / "leangen").rglob("*")):
        if source.suffix not in {".py", ".yaml", ".yml"}:
            continue
        for m in CODE_REF.finditer(source.read_text()):
            where = f"{source.relative_to(ROOT)} cites '{m.group(0)}'"
            if m.group(1):
                check_target(ROOT / m.group(1), m.group(2), where)
            else:
                section = m.group(3) or (slug(m.group(4)) if m.group(4) else None)
                check_target(README, section, where)
            refs.append(m.group(0))
    assert refs, "leangen's code points users to no docs page at all"


def test_readme_is_a_five_minute_read():
    assert len(README.read_text().splitlines()) < 300


def test_readme_links_every_docs_page():
    text = README.read_text()
    missing = [p.name for p in (ROOT / "docs").glob("*.md") if f"docs/{p.name}" not in text]
    assert not missing, f"README.md does not link {missing}"


def test_quickstart_block_has_exactly_two_commands():
    # .ci/run executes these two lines on a fresh machine.
    block = re.search(r"<!-- quickstart -->\n```bash\n(.*?)```", README.read_text(), re.S)
    assert block, "README.md lost its <!-- quickstart --> block"
    assert len([line for line in block.group(1).splitlines() if line.strip()]) == 2


@pytest.mark.parametrize("doc", USER_DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_speak_to_users_not_about_project_history(doc):
    history = re.compile(r"\b(issues?|sessions?|this machine|this project|load averages?)\b", re.I)
    hits = [line.strip() for line in doc.read_text().splitlines() if history.search(line)]
    assert not hits, f"{doc.relative_to(ROOT)}: {hits}"
