"""The README and docs/ pages stay true: every `make` target, `qlora-kfp` command and
relative link they show exists."""

from __future__ import annotations

import functools
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"(?m)^([a-zA-Z0-9_-]+):", text))


@functools.cache  # one `qlora-kfp --help` (2 s) for every page
def cli_commands() -> frozenset[str]:
    out = subprocess.run(
        [sys.executable, "-m", "qlora_kfp.app.cli", "--help"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    listed = re.search(r"\{([a-z,_-]+)\}", out)
    assert listed, out
    return frozenset(listed.group(1).split(","))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_make_target_shown_exists(page):
    shown = set(re.findall(r"`make ([a-z][a-z0-9-]*)", page.read_text()))
    assert shown - make_targets() == set()


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_cli_command_shown_exists(page):
    shown = set(re.findall(r"qlora-kfp ([a-z][a-z-]*)", page.read_text()))
    assert shown - cli_commands() == set()


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(page):
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
        if "://" in target or target.startswith("mailto:"):
            continue
        assert (page.parent / target).exists(), f"{page.name} links to missing {target}"
