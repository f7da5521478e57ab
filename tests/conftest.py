"""Shared fixtures: a private Redis server and local anvil chains impersonating Base and Polygon.

Nothing here skips: a missing anvil or redis-server fails the tests that need it, with the fix in the message.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

# The package is not installed into the venv (no editable install): make the repo root importable for every test.
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from gateway.dev.chain import BASE_USDC, POLYGON_USDC, DevChain, RedisServer, start_dev_chain  # noqa: E402
from tests.support.redis_topology import cluster_url, redis_cluster, sentinel_group  # noqa: E402, F401 (fixtures)

# --------------------------------------------------------------------------------------------------------- Redis


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One persistent (AOF, fsync always) redis-server on a private port for the whole session.

    Tests may stop()/start() it to simulate an outage; the port stays the same. A test that leaves it stopped is
    repaired by `_redis_server_left_running` before the next test that uses it.
    """
    try:
        server = RedisServer(persistent=True)
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture(autouse=True)
def _redis_server_left_running(request: pytest.FixtureRequest) -> Iterator[None]:
    # Only tests that use the session server pay for this (a poll() on the process handle when it is running).
    if "redis_server" not in request.fixturenames:
        yield
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    server.start()
    yield
    server.start()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """URL of the session Redis, running and empty (FLUSHALL) at the start of the test."""
    redis_server.start()
    client = redis.Redis.from_url(redis_server.url)
    try:
        client.flushall()
    finally:
        client.close()
    yield redis_server.url


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A store URL, once per backend: a SQLite file of this test's, or the session Redis, flushed for it."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'receipts.db'}"  # as tests.support.gateway.sqlite_url
    url: str = request.getfixturevalue("redis_url")
    return url


# --------------------------------------------------------------------------------------------------------- chains


@pytest.fixture
def private_chain() -> Iterator[DevChain]:
    """A chain of this test's own (automining, with the session contracts): for tests that reorganise it or move
    its clock, which the session chains must never see."""
    chain = start_dev_chain(8453)
    try:
        yield chain
    finally:
        chain.stop()


def _start_chain(chain_id: int, usdc_at: str) -> DevChain:
    try:
        return start_dev_chain(chain_id, usdc_at=usdc_at)
    except FileNotFoundError as exc:  # anvil missing: say how to get it instead of a traceback
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def base_chain() -> Iterator[DevChain]:
    """anvil with chain id 8453 and TestUSDC ("USD Coin" / "2") at Base's canonical USDC address.

    Shared by the whole session: do not move its clock (use a private start_dev_chain() for that).
    """
    chain = _start_chain(8453, BASE_USDC)
    try:
        yield chain
    finally:
        chain.stop()


@pytest.fixture(scope="session")
def polygon_chain() -> Iterator[DevChain]:
    """anvil with chain id 137 and TestUSDC ("USD Coin" / "2") at Polygon's canonical USDC address."""
    chain = _start_chain(137, POLYGON_USDC)
    try:
        yield chain
    finally:
        chain.stop()
