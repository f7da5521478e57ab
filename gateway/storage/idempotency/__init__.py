"""Idempotency stores: where a paid answer is kept for the retry whose response was lost.

    contract.py   the life of a record (Begun, StoredResponse) and the IdempotencyStore protocol
    sqlite.py     table ``idempotency``, in the receipt store's SQLite file unless configured apart
    redis.py      one hash per record under ``x402:idem:``, every transition one Lua script

``open_idempotency_store(url)`` takes the receipt store's URL forms (:mod:`gateway.storage.backend`).
"""

from __future__ import annotations

from gateway.storage.backend import Backend, SqliteBackend, open_backend
from gateway.storage.idempotency.contract import Begun, IdempotencyStore, Outcome, StoredResponse
from gateway.storage.idempotency.redis import RedisIdempotencyStore
from gateway.storage.idempotency.sqlite import SQLiteIdempotencyStore

__all__ = [
    "Begun",
    "IdempotencyStore",
    "Outcome",
    "RedisIdempotencyStore",
    "SQLiteIdempotencyStore",
    "StoredResponse",
    "idempotency_store_on",
    "open_idempotency_store",
]


def idempotency_store_on(backend: Backend) -> IdempotencyStore:
    """An idempotency store (its own connection) on ``backend``."""
    if isinstance(backend, SqliteBackend):
        return SQLiteIdempotencyStore(backend.path)
    return RedisIdempotencyStore(backend.url)


def open_idempotency_store(url: str, *, config_key: str = "idempotency.store_url") -> IdempotencyStore:
    """The store named by ``url``; ``ConfigError(config_key, ...)`` otherwise. Nothing is connected here:
    ``await store.ping()`` at start-up to fail fast."""
    return idempotency_store_on(open_backend(url, config_key=config_key))
