"""Paywall fixtures: a headless Chromium per test (about 1.5 s to start) and the routes the pages are built from."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.paywall.cdp import Chromium, find_chromium

OUTPUT = Path(__file__).resolve().parents[2] / "test-output"  # git-ignored; screenshots land here

# Markup and script in a description an operator copied from somewhere: it must reach the page as text.
HOSTILE = '</script><script>window.__xss = 1</script><img src=x onerror="window.__xss = 2"> & "quotes"'

PROMPT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"prompt": {"type": "string", "description": "what to ask"}},
    "required": ["prompt"],
}

ROUTES: list[dict[str, Any]] = [
    {"route": "GET /report", "price": "0.01", "description": "Today's weather report for Lisbon"},
    {
        "route": "POST /agent/prompt",
        "price": "0.10",
        "description": "Ask the agent one question",
        "input_schema": PROMPT_SCHEMA,
        "input_example": {"prompt": "hello from the paywall"},
    },
    {"route": "GET /hostile", "price": "0.02", "description": HOSTILE},
]


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[Chromium]:
    try:
        find_chromium()
    except FileNotFoundError as exc:
        pytest.fail(str(exc), pytrace=False)
    async with Chromium.launch(tmp_path / "chromium-profile") as chromium:
        yield chromium
