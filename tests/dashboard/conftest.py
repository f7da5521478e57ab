"""Dashboard fixtures: a headless Chromium per browser test (the paywall's CDP client, tests/paywall/cdp.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.paywall.cdp import Chromium, find_chromium


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[Chromium]:
    try:
        find_chromium()
    except FileNotFoundError as exc:
        pytest.fail(str(exc), pytrace=False)
    async with Chromium.launch(tmp_path / "chromium-profile") as chromium:
        yield chromium
