"""A real browser for the wall tests: Debian's Chromium driven by Playwright (never ``playwright
install``)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path("/usr/bin/chromium")
LAUNCH_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def chromium_or_skip() -> Path:
    """Install Debian's chromium when missing and we may (root + apt-get, as in CI); otherwise skip
    with the reason, or fail where GENDERLENS_REQUIRE_BROWSER=1 (.ci/run) says the tests must run."""
    if not CHROMIUM.exists() and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            subprocess.run(["apt-get", "update", "-qq"], env=env, timeout=300, capture_output=True)
            subprocess.run(
                ["apt-get", "install", "-y", "-qq", "chromium"], env=env, timeout=900, capture_output=True
            )
    if not CHROMIUM.exists():
        reason = (
            f"browser tests need Debian's chromium at {CHROMIUM} (apt-get install chromium); "
            "it is missing and could not be installed here"
        )
        if os.environ.get("GENDERLENS_REQUIRE_BROWSER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as exc:
        pytest.fail(f"the dev dependencies lack playwright: {exc}")
    return CHROMIUM


@contextlib.contextmanager
def launched_chromium() -> Iterator[Any]:
    """A headless Chromium (Playwright's ``Browser``), closed on exit."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=LAUNCH_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def new_page(browser: Any, width: int = 1366, height: int = 800) -> Any:
    """A page in a fresh context with the given viewport; waits time out after 15 s."""
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    page.set_default_timeout(15_000)
    return page
