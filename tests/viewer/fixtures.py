"""Session fixtures: one OHIF server and one headless Chromium for the whole test session.

Import them into a test module (``from tests.viewer.fixtures import ohif_server, chromium  #
noqa: F401``). Locally a missing npm/OHIF package/Chromium skips; with ``CI`` set it fails (a
viewer test that skips in CI proves nothing).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.peers import in_ci
from tests.viewer.browser import CHROMIUM, CHROMIUM_ARGS
from tests.viewer.ohif import OhifServer, OhifUnavailableError, ohif_dist


def _unavailable(message: str) -> None:
    if in_ci():
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def ohif_server() -> Iterator[OhifServer]:
    """OHIF served from the npm package cache; call ``point_at(orthanc.base_url)`` before use."""
    try:
        dist = ohif_dist()
    except OhifUnavailableError as exc:
        _unavailable(str(exc))
    with OhifServer(dist) as server:
        yield server


@pytest.fixture(scope="session")
def chromium() -> Iterator[Any]:
    """Debian's Chromium through Playwright, with SwiftShader WebGL for cornerstone3D."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed: pip install playwright (never 'playwright install')")
    if shutil.which(CHROMIUM) is None and not Path(CHROMIUM).exists():
        _unavailable(f"{CHROMIUM} not found: apt-get install -y chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()
