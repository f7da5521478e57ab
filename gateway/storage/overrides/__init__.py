"""Route overrides: run-time price and pause changes every gateway instance on a store applies.

    contract.py   RouteOverride, Overrides and the OverrideStore protocol
    sqlite.py     table ``route_overrides`` in the receipt store's SQLite file
    redis.py      one hash and a version counter under ``x402:{rt}:``

``open_override_store(url)`` takes the receipt store's URL (``[store].url``, see :mod:`gateway.storage.backend`).
The reader is :mod:`gateway.engine.reload`.
"""

from __future__ import annotations

from gateway.storage.backend import Backend, SqliteBackend, open_backend
from gateway.storage.overrides.contract import Overrides, OverrideStore, RouteOverride
from gateway.storage.overrides.redis import RedisOverrideStore
from gateway.storage.overrides.sqlite import SQLiteOverrideStore

__all__ = [
    "OverrideStore",
    "Overrides",
    "RedisOverrideStore",
    "RouteOverride",
    "SQLiteOverrideStore",
    "open_override_store",
    "override_store_on",
]


def override_store_on(backend: Backend) -> OverrideStore:
    """An override store (its own connection) on ``backend``."""
    if isinstance(backend, SqliteBackend):
        return SQLiteOverrideStore(backend.path)
    return RedisOverrideStore(backend.url)


def open_override_store(url: str) -> OverrideStore:
    """The override store on the storage named by ``url``; ``ConfigError("store.url", ...)`` otherwise. Nothing is
    connected here."""
    return override_store_on(open_backend(url, config_key="store.url"))
