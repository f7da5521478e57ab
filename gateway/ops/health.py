"""Readiness: can this instance take paid traffic right now? (Liveness needs no check: answering is the proof.)

Each dependency is checked concurrently with a short deadline: the receipt store (``ping``), each network's RPC
(``eth_chainId`` answers and is the configured chain: a misrouted RPC must not look healthy), and the upstream (a
TCP connect, or a GET of ``upstream.health_path``). Results are fixed words (``ok``, ``timeout``,
``unavailable``, ``wrong_chain``, ``http_503``), never an exception text: those can carry an RPC URL and its key.

Concurrent probes share one check, and a result is reused for :data:`CACHE_SECONDS`, so hammering ``/readyz``
cannot turn into a flood of RPC calls (paid for per call at most providers) or store round trips.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable

import aiohttp
from yarl import URL

from gateway.chain.network import Network
from gateway.chain.rpc import hex_int
from gateway.config import UpstreamConfig
from gateway.engine.engine import PaymentEngine

log = logging.getLogger("gateway.health")

CACHE_SECONDS = 1.0
OK = "ok"


class Readiness:
    def __init__(self, engine: PaymentEngine, upstream: UpstreamConfig, *, timeout: float) -> None:
        self._engine = engine
        self._upstream = upstream
        self._timeout = timeout
        self._lock = asyncio.Lock()
        self._cached: tuple[float, dict[str, str]] | None = None
        self._session: aiohttp.ClientSession | None = None

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def check(self) -> dict[str, str]:
        """``{"store": "ok", "rpc:base": "ok", "upstream": "timeout"}``."""
        async with self._lock:
            now = time.monotonic()
            if self._cached is not None and now - self._cached[0] < CACHE_SECONDS:
                return dict(self._cached[1])
            checks: dict[str, Awaitable[str]] = {"store": self._store()}
            for name, net in self._engine.networks.items():
                checks[f"rpc:{name}"] = self._rpc(net)
            checks["upstream"] = self._upstream_check()
            results = await asyncio.gather(*(self._bounded(name, c) for name, c in checks.items()))
            answer = dict(zip(checks, results, strict=True))
            self._cached = (time.monotonic(), answer)
            return dict(answer)

    async def _bounded(self, name: str, check: Awaitable[str]) -> str:
        try:
            async with asyncio.timeout(self._timeout):
                return await check
        except TimeoutError:
            return "timeout"
        except Exception as exc:
            log.info("readiness check failed", extra={"check": name, "error": type(exc).__name__})
            return "unavailable"

    async def _store(self) -> str:
        await self._engine.store.ping()
        return "identity_lost" if self._engine.identity.lost else OK

    @staticmethod
    async def _rpc(net: Network) -> str:
        answer = await net.rpc.request("eth_chainId", [])
        return OK if hex_int(answer) == net.config.chain_id else "wrong_chain"

    async def _upstream_check(self) -> str:
        url = URL(self._upstream.url)
        if self._upstream.health_path is None:
            host, port = url.host or "127.0.0.1", url.port or (443 if url.scheme == "https" else 80)
            _, writer = await asyncio.open_connection(host, port)
            writer.close()
            await writer.wait_closed()
            return OK
        if self._session is None:
            self._session = aiohttp.ClientSession(trust_env=False, cookie_jar=aiohttp.DummyCookieJar())
        # Without the URL's user info: aiohttp would send it as Authorization: Basic, and health_path is a free path
        # (the proxy adds upstream credentials only where [upstream] inject_headers_on allows).
        target = str(url.with_user(None)).rstrip("/") + self._upstream.health_path
        async with self._session.get(target, allow_redirects=False) as resp:
            return OK if resp.status < 500 else f"http_{resp.status}"


__all__ = ["CACHE_SECONDS", "Readiness"]
