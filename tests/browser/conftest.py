"""Browser fixtures: Debian's chromium (``tests/browser/install-chromium`` installs it) driven by Playwright.

Playwright's own driver comes with the ``playwright`` wheel; the browser is the system's, started with a
fresh profile under the test's temp dir. Nothing is downloaded at run time (``playwright install`` is
never called). The stack is the e2e one: a real ``noetl-edge up`` (NATS, kernel, worker pool, edge).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import BrowserContext, Page, async_playwright

from tests.e2e.conftest import stack  # noqa: F401  (the module's ``noetl-edge up``)

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[BrowserContext]:
    assert os.access(CHROMIUM, os.X_OK), f"{CHROMIUM} is missing: run tests/browser/install-chromium (README command 2 does)"
    async with async_playwright() as p:
        context = await p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=ARGS,
            viewport={"width": 1400, "height": 1000},
        )
        try:
            yield context
        finally:
            await context.close()


@pytest.fixture
async def page(browser: BrowserContext) -> AsyncIterator[Page]:
    """A tab that fails the test on an uncaught script error or a blocked (CSP) resource."""
    tab = await browser.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
    tab.on("console", lambda m: errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
    tab.on("response", lambda r: errors.append(f"HTTP {r.status} {r.request.method} {r.url}") if r.status >= 400 else None)
    yield tab
    assert not [e for e in errors if "Content Security Policy" in e or e.startswith("pageerror")], errors
