"""The documentation: the site in docs/ builds with mkdocs --strict (a broken link or anchor, or
a page missing from the navigation, fails the build), and every link of the README, the front
door, reaches a file of the repository and, with an anchor, a heading of the built page."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MKDOCS = [sys.executable, "-m", "mkdocs", "build", "--strict"]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def build(root: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*MKDOCS, "-f", str(root / "mkdocs.yml"), "-d", str(site)],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("site")
    built = build(ROOT, site)
    assert built.returncode == 0, built.stderr
    return site


def test_the_site_builds_strictly(site):
    assert (site / "index.html").exists()
    pages = sorted(p.stem for p in (ROOT / "docs").glob("*.md"))
    built = sorted("index" if p.parent == site else p.parent.name
                   for p in site.rglob("index.html") if p.parent.name != "404")
    assert set(pages) <= set(built)


def test_a_broken_link_fails_the_build(tmp_path):
    """The strict build is what catches a dead link: a copy with one fails."""
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    page = tmp_path / "docs" / "cli.md"
    page.write_text(page.read_text() + "\nSee [nowhere](no-such-page.md).\n")
    built = build(tmp_path, tmp_path / "site")
    assert built.returncode != 0 and "no-such-page.md" in built.stderr


def test_the_readmes_links_reach_files_and_headings(site):
    links = [link for link in LINK.findall((ROOT / "README.md").read_text())
             if not link.startswith(("http://", "https://"))]
    assert len(links) > 10  # the front door links onward
    for link in links:
        path, _, anchor = link.partition("#")
        target = ROOT / path
        assert target.exists(), link
        if anchor:
            assert target.suffix == ".md" and target.parent.name == "docs", link
            html = (site / target.stem / "index.html").read_text()
            assert f'id="{anchor}"' in html, link
