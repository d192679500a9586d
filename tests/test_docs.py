"""The README and docs/ link to each other: every relative link names a file that exists, and a
heading in it where it names one (as GitHub makes a heading's anchor)."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "profiles" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (hyphens and underscores
    kept), each space a hyphen."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # a comment in code is no heading
    return {anchor(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


def test_anchor_is_githubs():
    assert anchor("Where train.py differs from nanoGPT's") == "where-trainpy-differs-from-nanogpts"
    assert anchor("Choosing a backend: `--kernels`") == "choosing-a-backend---kernels"
    assert anchor("First GPU run: NVIDIA H200, 2026-12-04") == "first-gpu-run-nvidia-h200-2026-12-04"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(page):
    links = [t for t in LINK.findall(page.read_text()) if not re.match(r"[a-z]+:", t)]
    assert page.name != "README.md" or page.parent != ROOT or links, "the README links to docs/"
    for target in links:
        path, _, fragment = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.is_file(), f"{page.name}: {target}: no such file"
        if fragment:
            assert fragment in anchors(linked), f"{page.name}: {target}: no such heading"
