"""Fixtures for the client SDK and CLI tests: a real gateway (uvicorn, anvil, SQLite) serving a job API of
style A in runner mode in front of a slow agent that reports progress, with the list call enabled."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.client import RetryPolicy
from gateway.dev.chain import DevChain
from tests.jobs.helpers import jobs_gateway
from tests.support.gateway import GatewayUnderTest, sqlite_url
from tests.support.jobs_upstreams import SlowAgent

STEPS = ("Thinking...", "Checking sources...", "Writing the answer...")
FAST_RETRY = RetryPolicy(attempts=4, backoff=0.05, max_backoff=0.2)
POLL = {"interval": 0.02, "timeout": 20.0}


@pytest.fixture
def agent_gateway(base_chain: DevChain, tmp_path: Path) -> Iterator[GatewayUnderTest]:
    """``POST /agent/prompt`` costs $0.02; status/cancel at ``/agent/job/{id}``, list at ``GET /agent/jobs``."""
    agent = SlowAgent(steps=STEPS, step_delay=0.3)
    with jobs_gateway(
        base_chain,
        store_url=sqlite_url(tmp_path),
        upstream=agent,
        mode="runner",
        style="agent",
        list="GET /agent/jobs",
    ) as gw:
        yield gw


class RecordingTransport(httpx.AsyncBaseTransport):
    """The real network transport, keeping (request headers, status, body) of every exchange: to see what the
    client sent on each attempt."""

    def __init__(self) -> None:
        self._inner = httpx.AsyncHTTPTransport()
        self.exchanges: list[tuple[httpx.Headers, int, bytes]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self._inner.handle_async_request(request)
        body = await response.aread()
        self.exchanges.append((request.headers, response.status_code, body))
        return httpx.Response(response.status_code, headers=response.headers, content=body, request=request)

    async def aclose(self) -> None:
        await self._inner.aclose()

    def paid(self, header: str) -> list[tuple[httpx.Headers, int, bytes]]:
        return [e for e in self.exchanges if header in e[0]]
