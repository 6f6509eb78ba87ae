"""The documents a user reads after cloning: every relative link points at a file in the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = sorted(
    [REPO / "README.md", REPO / "BENCHMARKS.md", *REPO.joinpath("docs").glob("*.md"),
     *REPO.joinpath("td_components").glob("*.md")]
)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def relative_links(text: str) -> list[str]:
    """Targets of Markdown links that are not web addresses or anchors, without their anchor."""
    targets = [match.group(1) for match in LINK.finditer(text)]
    return [target.split("#", 1)[0] for target in targets if not re.match(r"[a-z]+:|#", target)]


def test_links_are_found():
    text = "see [a](docs/a.md), [b](https://x.org/y), [c](#here), [d](../x.md#part) and ![e](e.png)"
    assert relative_links(text) == ["docs/a.md", "../x.md", "e.png"]


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: str(path.relative_to(REPO)))
def test_every_relative_link_is_a_file_in_the_repository(document: Path):
    """The README linked ../shared/DESIGN.md, a file outside the repository: a dead link for
    anyone who clones it."""
    for target in relative_links(document.read_text(encoding="utf-8")):
        resolved = (document.parent / target).resolve()
        assert resolved.is_relative_to(REPO), f"{document.name}: {target} points outside the repository"
        assert resolved.exists(), f"{document.name}: {target} does not exist"
