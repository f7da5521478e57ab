"""The shared deny-list: one Redis hash, ``x402:{deny}:payers`` (payer -> the entry as JSON).

``denied`` is one ``HEXISTS`` (one round trip on every paid request); ``deny`` one ``HSETNX``, so of two operators
denying one payer at once the first entry stays. The list is small (addresses an operator typed), so ``entries``
reads the whole hash.
"""

from __future__ import annotations

import json
from typing import Any

from gateway.storage.denylist.contract import DeniedPayer, payer_address
from gateway.storage.redis_client import RedisStore

__all__ = ["PREFIX", "RedisDenyList"]

PREFIX = "x402:{deny}:"


class RedisDenyList(RedisStore):
    """:class:`gateway.storage.denylist.DenyList` on Redis (see the module docstring)."""

    WHAT = "deny-list"
    PREFIX = PREFIX

    @property
    def _hash(self) -> str:
        return f"{self._prefix}payers"

    async def deny(self, entry: DeniedPayer) -> bool:
        doc = json.dumps({"at": entry.at, "note": entry.note, "by": entry.by}, separators=(",", ":"))
        with self._client.guard():
            added: Any = await self._client.redis.hsetnx(self._hash, payer_address(entry.payer), doc)
        return bool(added)

    async def allow(self, payer: str) -> bool:
        with self._client.guard():
            removed: Any = await self._client.redis.hdel(self._hash, payer_address(payer))
        return bool(removed)

    async def denied(self, payer: str) -> bool:
        with self._client.guard():
            found: Any = await self._client.redis.hexists(self._hash, payer.lower())
        return bool(found)

    async def entries(self, *, limit: int) -> list[DeniedPayer]:
        with self._client.guard():
            raw: Any = await self._client.redis.hgetall(self._hash)
        out = []
        for payer, value in dict(raw).items():
            doc = json.loads(value)
            out.append(DeniedPayer(payer=payer, at=float(doc["at"]), note=str(doc["note"]), by=str(doc["by"])))
        out.sort(key=lambda e: (-e.at, e.payer))
        return out[:limit]
