"""Rate limits (docs/threat-model.md T20: challenge flooding) with the ``limits`` library, behind the middleware's
``Limiter``.

Two kinds of bucket, each per route:

* ``challenge``: per client IP, consulted before a 402 challenge is built for an unpaid request;
* ``paid``: per payer address, consulted once a payment verified (a payer hammering a cheap route).

The sliding-window-counter strategy keeps two integers per (kind, route, key) and window, expiring with the
window: the memory (or Redis) footprint is bounded by the number of distinct clients in one window, never by the
number of requests. ``memory://`` counts per process; a ``redis://`` storage URL shares the counters between
gateway instances.

A storage that cannot answer lets the request through (with a throttled warning): rate limiting protects
capacity, it does not guard money, and failing closed here would turn a Redis hiccup into a full outage. Money
stays fail-closed in the receipt store.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Literal

from limits import RateLimitItem, parse_many
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import SlidingWindowCounterRateLimiter

from gateway.config import GatewayConfig, RateLimitConfig

log = logging.getLogger("gateway.ratelimit")

Kind = Literal["challenge", "paid"]
_WARN_EVERY = 10.0  # seconds between "storage unavailable" warnings while it stays down


def open_storage(url: str) -> Storage:
    """``memory://`` or a Redis URL (``redis://``, ``rediss://``, ``unix://``) as a ``limits`` async storage."""
    scheme = url.partition("://")[0]
    if scheme == "memory":
        return MemoryStorage()
    async_url = "async+redis+unix://" + url.partition("://")[2] if scheme == "unix" else "async+" + url
    # redis-py (already a dependency for the receipt store) rather than limits' default coredis.
    # Short socket timeouts: a stalled Redis must not hold requests (they pass unlimited, see above).
    return RedisStorage(
        async_url,
        implementation="redispy",
        key_prefix="x402-gateway-limits",
        socket_timeout=1.0,
        socket_connect_timeout=1.0,
    )


class RateLimiter:
    """Implements :class:`gateway.ops.events.Limiter`."""

    def __init__(self, limits: RateLimitConfig, per_route: dict[str, tuple[str | None, str | None]]) -> None:
        self._defaults: dict[Kind, list[RateLimitItem]] = {
            "challenge": parse_many(limits.challenge),
            "paid": parse_many(limits.paid),
        }
        self._routes: dict[tuple[Kind, str], list[RateLimitItem]] = {}
        for route, (challenge, paid) in per_route.items():
            if challenge is not None:
                self._routes[("challenge", route)] = parse_many(challenge)
            if paid is not None:
                self._routes[("paid", route)] = parse_many(paid)
        self.storage = open_storage(limits.storage_url.reveal())
        self._strategy = SlidingWindowCounterRateLimiter(self.storage)
        self._last_warning = 0.0

    @classmethod
    def from_config(cls, config: GatewayConfig) -> RateLimiter:
        per_route: dict[str, tuple[str | None, str | None]] = {}
        for r in config.routes:
            per_route.setdefault(r.route, (r.rate_limit_challenge, r.rate_limit_paid))  # first match wins
        return cls(config.rate_limits, per_route)

    def items(self, kind: Kind, route: str) -> list[RateLimitItem]:
        return self._routes.get((kind, route)) or self._defaults[kind]

    async def retry_after(self, kind: Kind, key: str, route: str) -> float | None:
        wait: float | None = None
        try:
            for item in self.items(kind, route):
                if not await self._strategy.hit(item, kind, route, key):
                    stats = await self._strategy.get_window_stats(item, kind, route, key)
                    seconds = max(stats.reset_time - time.time(), 1.0)
                    wait = seconds if wait is None else max(wait, seconds)
        except Exception as exc:  # storage down: let the request through (see the module docstring)
            now = time.monotonic()
            if now - self._last_warning > _WARN_EVERY:
                self._last_warning = now
                log.warning("rate limit storage unavailable; not limiting", extra={"error": type(exc).__name__})
            return None
        return None if wait is None else float(math.ceil(wait))

    async def aclose(self) -> None:
        if isinstance(self.storage, RedisStorage):
            client = getattr(self.storage.bridge, "storage", None)  # the redis.asyncio client
            try:
                if client is not None:
                    await client.aclose()
            except Exception:
                log.debug("rate limit storage did not close cleanly")

    def __repr__(self) -> str:
        return f"RateLimiter(challenge={self._defaults['challenge']}, paid={self._defaults['paid']})"


__all__ = ["RateLimiter", "open_storage"]
