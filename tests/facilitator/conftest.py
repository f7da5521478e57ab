"""Fixtures: the x402 package's facilitator served over HTTP on the session Base chain, and our client to it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest

from gateway.chain.facilitator import FacilitatorClient
from gateway.config import Secret
from gateway.dev.chain import DevChain
from tests.support.facilitator import FacilitatorControl, run_x402_facilitator


@pytest.fixture(scope="module")
def facilitator_control() -> FacilitatorControl:
    return FacilitatorControl()


@pytest.fixture(scope="module")
def facilitator_url(base_chain: DevChain, facilitator_control: FacilitatorControl) -> Iterator[str]:
    with run_x402_facilitator(base_chain, control=facilitator_control) as url:
        yield url


@pytest.fixture(autouse=True)
def _fresh_control(facilitator_control: FacilitatorControl) -> Iterator[None]:
    facilitator_control.reset()
    yield
    facilitator_control.reset()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def client(http: aiohttp.ClientSession, facilitator_url: str) -> FacilitatorClient:
    c = FacilitatorClient(Secret(facilitator_url), timeout=30.0)
    await c.start(http)
    return c
