"""Rate limits (docs/threat-model.md T20: challenge flooding) with the ``limits`` library, behind the middleware's
``Limiter``.

Three kinds of bucket, each per route:

* ``challenge``: per client IP, consulted before a 402 challenge is built for an unpaid request;
* ``paid``: per payer address, consulted once a payment verified (a payer hammering a cheap route);
* ``invalid``: per client IP, spent only by payments that turned out invalid (docs/threat-model.md T41). A
  verified payment never spends it, so genuine payers behind one address (a NAT, a proxy, an agent platform) do
  not use up each other's budget; and an address over it is not refused: its payments are verified one at a time
  (:meth:`RateLimiter.verifying`), which bounds the verification work made-up payments can cost to one
  verification's latency, while a genuine payer behind that address still gets through.

The sliding-window-counter strategy keeps two integers per (kind, route, key) and window, expiring with the
window: the memory (or Redis) footprint is bounded by the number of distinct clients in one window, never by the
number of requests. ``memory://`` counts per process; a ``redis://`` storage URL shares the counters between
gateway instances.

A storage that cannot answer lets the request through (with a throttled warning): rate limiting protects
capacity, it does not guard money, and failing closed here would turn a Redis hiccup into a full outage. Money
stays fail-closed in the receipt store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from limits import RateLimitItem, parse_many
from limits.aio.storage import MemoryStorage, RedisClusterStorage, RedisSentinelStorage, RedisStorage, Storage
from limits.aio.strategies import SlidingWindowCounterRateLimiter

from gateway.config import GatewayConfig, RateLimitConfig
from gateway.errors import ConfigError
from gateway.storage.redis_topology import RedisTopology, parse_redis_url

log = logging.getLogger("gateway.ratelimit")

Kind = Literal["challenge", "paid", "invalid"]
_WARN_EVERY = 10.0  # seconds between "storage unavailable" warnings while it stays down
# An address over its invalid-payment budget: its payments wait for the one verification slot it has (in this
# process) at most this long, at most this many at once; beyond either, 429 with the budget's Retry-After.
_SLOT_WAIT = 5.0
_SLOT_QUEUE = 16
DEFAULT_PORT = 6379  # a Redis URL without a port: redis-py's default, which limits does not assume


_KEY = "rate_limits.storage_url"
_REFUSED = "limits cannot use this Redis URL (a host, port or option it cannot read)"


def open_storage(url: str) -> Storage:
    """``memory://`` or any Redis store URL (one server, Sentinel or Cluster: gateway.storage.redis_topology) as a
    ``limits`` async storage; ``ConfigError("rate_limits.storage_url", ...)`` for a URL that names none.

    The URL is read by our parser, never handed to ``limits`` whole: ``limits`` quotes the whole URL (its password
    too) in its errors and refuses a host without a port. What it gets is rebuilt from the parts, with the port
    (6379 by default) and without the credentials, which go as keyword arguments. Its errors become a fixed
    message, raised ``from None`` (a traceback would print the chained cause)."""
    scheme = url.partition("://")[0]
    if scheme == "memory":
        return MemoryStorage()
    try:
        topology = parse_redis_url(url)
    except ValueError as exc:  # fixed messages: they quote nothing of the URL
        raise ConfigError(_KEY, f"invalid redis url: {exc}") from None
    try:
        return _redis_storage(topology, scheme)
    except ConfigError:
        raise
    except Exception:
        raise ConfigError(_KEY, _REFUSED) from None


def _redis_storage(topology: RedisTopology, scheme: str) -> Storage:
    # redis-py (already a dependency for the receipt store) rather than limits' default coredis.
    # Short socket timeouts: a stalled Redis must not hold requests (they pass unlimited, see above).
    common: dict[str, Any] = {
        "implementation": "redispy",
        "key_prefix": "x402-gateway-limits",
        "socket_timeout": 1.0,
        "socket_connect_timeout": 1.0,
    }
    hosts = ",".join(f"{_host(host)}:{port}" for host, port in topology.nodes)
    auth: dict[str, Any] = {
        k: v for k, v in (("username", topology.username), ("password", topology.password)) if v is not None
    }
    auth.update(topology.tls_options())  # ssl and the URL's CA / client certificate, as the stores use them
    if topology.kind == "sentinel":
        sentinel_auth = {
            k: v
            for k, v in (("username", topology.sentinel_username), ("password", topology.sentinel_password))
            if v is not None
        }
        return RedisSentinelStorage(
            f"async+redis+sentinel://{hosts}/{topology.service}",
            use_replicas=False,  # counters read from a lagging replica would let a burst through
            sentinel_kwargs={**sentinel_auth, **topology.tls_options()},
            db=topology.db,
            **auth,
            **common,
        )
    if topology.kind == "cluster":
        return RedisClusterStorage(f"async+redis+cluster://{hosts}", **auth, **common)
    # One server: redis-py reads the path (db) and the query (TLS and socket options) of the URL; the user info
    # goes as keyword arguments (a query's password=, if any, still wins in redis-py).
    try:
        parts = urlsplit(topology.client_url)
        port = parts.port
    except ValueError:
        raise ConfigError(_KEY, "malformed redis url: its host or port cannot be read") from None
    credentials: dict[str, Any] = {
        k: unquote(v) for k, v in (("username", parts.username), ("password", parts.password)) if v
    }
    tail = parts.path + (f"?{parts.query}" if parts.query else "")
    if scheme == "unix":
        return RedisStorage(f"async+redis+unix://{tail}", **credentials, **common)
    if not parts.hostname:
        raise ConfigError(_KEY, "redis url without a host")
    netloc = f"{_host(parts.hostname)}:{port or DEFAULT_PORT}"
    return RedisStorage(f"async+{parts.scheme}://{netloc}{tail}", **credentials, **common)


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host  # an IPv6 address


class Verification:
    """One payment's verification under :meth:`RateLimiter.verifying`: refused (``retry_after``), or admitted;
    :meth:`invalid` spends the client address's budget when the payment turned out invalid."""

    __slots__ = ("_key", "_limiter", "_route", "retry_after")

    def __init__(self, limiter: RateLimiter | None, key: str, route: str) -> None:
        self._limiter = limiter
        self._key = key
        self._route = route
        self.retry_after: float | None = None

    async def invalid(self) -> None:
        if self._limiter is not None:
            await self._limiter.spend("invalid", self._key, self._route)


class _Slot:
    """The one verification at a time of an address over its invalid-payment budget."""

    __slots__ = ("lock", "waiting")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.waiting = 0


class RateLimiter:
    """Implements :class:`gateway.ops.events.Limiter`."""

    def __init__(self, limits: RateLimitConfig, per_route: dict[str, tuple[str | None, str | None]]) -> None:
        self._defaults: dict[Kind, list[RateLimitItem]] = {
            "challenge": parse_many(limits.challenge),
            "paid": parse_many(limits.paid),
            "invalid": parse_many(limits.invalid_payments),
        }
        self._slots: dict[str, _Slot] = {}  # addresses over budget with a verification running or waiting
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

    async def retry_after(self, kind: Kind, key: str, route: str, *, spend: bool = True) -> float | None:
        """None to let the request through, else the seconds to wait. ``spend=False``: only look (the bucket is
        full or not), without counting this request."""
        wait: float | None = None
        try:
            for item in self.items(kind, route):
                admitted = await (self._strategy.hit if spend else self._strategy.test)(item, kind, route, key)
                if not admitted:
                    stats = await self._strategy.get_window_stats(item, kind, route, key)
                    seconds = max(stats.reset_time - time.time(), 1.0)
                    wait = seconds if wait is None else max(wait, seconds)
        except Exception as exc:  # storage down: let the request through (see the module docstring)
            self._storage_down(exc)
            return None
        return None if wait is None else float(math.ceil(wait))

    async def spend(self, kind: Kind, key: str, route: str) -> None:
        """Count one request in ``kind``'s buckets, whatever they say."""
        try:
            for item in self.items(kind, route):
                await self._strategy.hit(item, kind, route, key)
        except Exception as exc:
            self._storage_down(exc)

    @contextlib.asynccontextmanager
    async def verifying(self, key: str, route: str) -> AsyncIterator[Verification]:
        """Around the verification of a payment presented by client address ``key`` (see the module docstring):
        under the address's invalid-payment budget at once; over it, in the address's one slot."""
        verification = Verification(self, key, route)
        over = await self.retry_after("invalid", key, route, spend=False)
        if over is None:
            yield verification
            return
        slot = self._slots.setdefault(key, _Slot())
        if slot.waiting >= _SLOT_QUEUE:
            verification.retry_after = over
            yield verification
            return
        slot.waiting += 1
        try:
            async with asyncio.timeout(_SLOT_WAIT):
                await slot.lock.acquire()
        except TimeoutError:
            verification.retry_after = over
        finally:
            slot.waiting -= 1
        if verification.retry_after is not None:
            self._drop_slot(key, slot)
            yield verification
            return
        try:
            yield verification
        finally:
            slot.lock.release()
            self._drop_slot(key, slot)

    def _drop_slot(self, key: str, slot: _Slot) -> None:
        if not slot.waiting and not slot.lock.locked() and self._slots.get(key) is slot:
            del self._slots[key]

    def _storage_down(self, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._last_warning > _WARN_EVERY:
            self._last_warning = now
            log.warning("rate limit storage unavailable; not limiting", extra={"error": type(exc).__name__})

    async def aclose(self) -> None:
        if isinstance(self.storage, RedisStorage):
            client = getattr(self.storage.bridge, "storage", None)  # the redis.asyncio client
            try:
                if client is not None:
                    await client.aclose()
            except Exception:
                log.debug("rate limit storage did not close cleanly")

    def __repr__(self) -> str:
        return (
            f"RateLimiter(challenge={self._defaults['challenge']}, paid={self._defaults['paid']}, "
            f"invalid={self._defaults['invalid']})"
        )


__all__ = ["RateLimiter", "Verification", "open_storage"]
