"""Headless Chromium (Debian's, `make install-browser`) on a page of MLflow's UI: the page's
text once every needle has rendered (the UI is a React app), and a screenshot either way."""

from __future__ import annotations

from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def page_text(
    url: str, needles: list[str], shot: Path, viewport=(1400, 900), timeout_ms: int = 60_000
) -> str:
    """The body text of ``url`` once it shows every one of ``needles``; fails with the text
    the page had when they did not all render within ``timeout_ms``."""
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is needed (make install-browser installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
        page.goto(url, wait_until="domcontentloaded", timeout=60_000)
        try:
            page.wait_for_function(
                "needles => needles.every(n => document.body.innerText.includes(n))",
                arg=needles,
                timeout=timeout_ms,
            )
        except Exception as exc:
            raise AssertionError(
                f"not all of {needles} rendered; page text:\n{page.inner_text('body')[:8000]}"
            ) from exc
        finally:
            page.screenshot(path=str(shot), full_page=True)
        text = page.inner_text("body")
        browser.close()
    return text
