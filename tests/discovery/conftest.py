"""Discovery fixtures: a gateway behind https://api.example.com with one route of every shape."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.dev.chain import DevChain
from tests.support.gateway import GatewayUnderTest, running_gateway, sqlite_url

PUBLIC = "https://api.example.com"
PROMPT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"prompt": {"type": "string", "minLength": 1}, "temperature": {"type": "number"}},
    "required": ["prompt"],
}
ANSWER_SCHEMA: dict[str, Any] = {"type": "object", "properties": {"answer": {"type": "string"}}}
UNITS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"units": {"type": "string", "enum": ["metric", "imperial"]}},
    "required": ["units"],
}
DISCOVERY: dict[str, Any] = {
    "service_name": "Lisbon Weather Agent",
    "description": "Weather and answers, paid per request in USDC",
    "tags": ["weather", "agents"],
    "icon_url": "https://cdn.example.com/icon.png",
}
ROUTES: list[dict[str, Any]] = [
    {
        "route": "POST /agent/prompt",
        "price": "0.10",
        "description": "Ask the agent one question",
        "input_schema": PROMPT_SCHEMA,
        "input_example": {"prompt": "Will it rain?"},
        "output_schema": ANSWER_SCHEMA,
        "output_example": {"answer": "No."},
    },
    {
        "route": "GET /weather/{city}",
        "price": "0.01",
        "description": "Current weather in a city",
        "example_path": "/weather/lisbon",
        "input_schema": UNITS_SCHEMA,
        "input_example": {"units": "metric"},
    },
    {"route": "* /any", "price": "0.05", "description": "Priced for every method"},
    {"route": "GET|HEAD /report", "price": "0.02"},  # no schema at all
    {"route": "GET /files/**", "price": "0.01"},  # wildcard, no example: only in the OpenAPI document
    {"route": "GET /internal", "price": "0.01", "discoverable": False},
]
# What each listed resource is priced for: every method a body-less probe may use.
PRICED_METHODS = {
    "/agent/prompt": ["POST"],
    "/weather/lisbon": ["GET", "HEAD"],
    "/any": ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"],
    "/report": ["GET", "HEAD"],
}


@pytest.fixture
def gw(base_chain: DevChain, tmp_path: Path) -> Iterator[GatewayUnderTest]:
    with running_gateway(
        base_chain,
        store_url=sqlite_url(tmp_path),
        routes=ROUTES,
        server={"public_url": PUBLIC},
        discovery=DISCOVERY,
    ) as gw:
        yield gw
