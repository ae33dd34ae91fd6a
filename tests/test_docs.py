"""The README and the manuals: every relative link and image resolves, and the README stays short."""

import re

import pytest
from conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted(ROOT.glob("benchmark/results/*/README.md"))]


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_relative_links_and_images_resolve(page):
    targets = re.findall(r"\]\(([^)\s]+)\)", page.read_text())  # [text](target) and ![alt](target)
    local = [t.split("#")[0] for t in targets if not re.match(r"[a-z]+://|mailto:|#", t)]
    missing = [t for t in local if not (page.parent / t).exists()]
    assert not missing, f"{page.relative_to(ROOT)} links to missing files: {missing}"


def test_readme_is_short_and_every_script_has_its_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    for script in sorted(ROOT.glob("lv_*.py")):
        assert (ROOT / "docs" / f"{script.stem}.md").exists() and f"docs/{script.stem}.md" in readme, script.name
