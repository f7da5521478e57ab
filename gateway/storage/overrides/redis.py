"""Route overrides on Redis: one hash and a counter, both changed in one MULTI/EXEC (under the hash tag ``{rt}``)::

    x402:{rt}:routes     hash: p:<route> -> price (atomic units), s:<route> -> "1"/"0", t:<route> -> updated_at
    x402:{rt}:version    the change counter every instance polls

Nothing expires: an override stands until the operator clears it.
"""

from __future__ import annotations

from gateway.storage.overrides.contract import Overrides, RouteOverride
from gateway.storage.redis_client import RedisStore, script_number

__all__ = ["PREFIX", "RedisOverrideStore"]

PREFIX = "x402:{rt}:"


class RedisOverrideStore(RedisStore):
    """:class:`gateway.storage.overrides.OverrideStore` on Redis (see the module docstring)."""

    WHAT = "route override store"
    PREFIX = PREFIX

    @property
    def _hash(self) -> str:
        return f"{self._prefix}routes"

    @property
    def _counter(self) -> str:
        return f"{self._prefix}version"

    async def version(self) -> int:
        with self._client.guard():
            value = await self._client.redis.get(self._counter)
        return int(value or 0)

    async def read(self) -> Overrides:
        with self._client.guard():
            async with self._client.redis.pipeline(transaction=True) as pipe:
                pipe.get(self._counter)
                pipe.hgetall(self._hash)
                version, fields = await pipe.execute()
        prices: dict[str, int] = {}
        paused: dict[str, bool] = {}
        times: dict[str, float] = {}
        for name, value in fields.items():
            kind, _, route = name.partition(":")
            if kind == "p":
                prices[route] = int(value)
            elif kind == "s":
                paused[route] = value == "1"
            elif kind == "t":
                times[route] = float(value)
        routes = {
            r: RouteOverride(r, prices.get(r), paused.get(r), times.get(r, 0.0)) for r in sorted({*prices, *paused})
        }
        return Overrides(int(version or 0), routes)

    async def _set(self, field: str, value: str | None, now: float) -> int:
        with self._client.guard():
            async with self._client.redis.pipeline(transaction=True) as pipe:
                if value is None:
                    pipe.hdel(self._hash, field)
                else:
                    pipe.hset(self._hash, field, value)
                pipe.hset(self._hash, "t:" + field[2:], script_number(now))
                pipe.incr(self._counter)
                results = await pipe.execute()
        return int(results[-1])

    async def set_price(self, route: str, price: int | None, *, now: float) -> int:
        return await self._set("p:" + route, None if price is None else str(price), now)

    async def set_paused(self, route: str, paused: bool | None, *, now: float) -> int:
        return await self._set("s:" + route, None if paused is None else ("1" if paused else "0"), now)
