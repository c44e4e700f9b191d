"""The documentation's links: every relative link in the README, CONTRIBUTING, CHANGELOG and docs/ names a file
that exists, and every page under docs/ can be reached from the README by following them."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def pages() -> list[Path]:
    return [ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").rglob("*.md"))]


def relative_links(page: Path) -> list[tuple[str, Path]]:
    text = FENCE.sub("", page.read_text())  # a link inside a code block is text, not a link
    found = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue  # http(s), mailto and in-page anchors
        found.append((target, (page.parent / target.split("#")[0]).resolve()))
    return found


def test_every_relative_link_names_a_file_that_exists():
    broken = [
        f"{page.relative_to(ROOT)}: {target}"
        for page in pages()
        for target, path in relative_links(page)
        if not path.exists()
    ]
    assert not broken, broken


def test_every_docs_page_is_reachable_from_the_readme():
    seen, todo = set(), [(ROOT / "README.md").resolve()]
    while todo:
        page = todo.pop()
        if page in seen or page.suffix != ".md" or not page.exists():
            continue
        seen.add(page)
        todo += [path for _, path in relative_links(page)]
    unreachable = [str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*.md") if p.resolve() not in seen]
    assert not unreachable, unreachable
