"""Storage: payment claims, idempotent answers and job records, on one SQLite file or one Redis.

    backend.py        open_backend(url): the one place that reads a store URL
    sqlite_file.py    one SQLite file behind one worker thread (WAL, fsync per commit, group commit)
    redis_client.py   one Redis client (short timeouts, one retry, blocking pool)
    receipts/         a payment is claimed exactly once (``open_store``)
    idempotency/      a paid answer kept for the retry whose response was lost (``open_idempotency_store``)
    jobs/             job records, answered by any gateway instance (``open_job_store``)
    channels/         batch-settlement payment channels: one request at a time each (``open_channel_store``)
    settlements/      served settlements watched until final (``open_settlement_journal``)
    ledger/           every settled payment, for the operator (``open_ledger_store``)
    overrides/        prices and paused routes changed at run time, shared by every instance
    denylist/         payer addresses the operator refuses

Every store fails closed: a backend that cannot answer raises :class:`gateway.errors.StoreUnavailable`.
"""

from __future__ import annotations

from gateway.storage.backend import open_backend
from gateway.storage.receipts import (
    ClaimRecord,
    ClaimState,
    ReceiptStore,
    RedisReceiptStore,
    SQLiteReceiptStore,
    receipt_store_on,
)
from gateway.storage.redis_client import redact_url

__all__ = [
    "ClaimRecord",
    "ClaimState",
    "ReceiptStore",
    "RedisReceiptStore",
    "SQLiteReceiptStore",
    "open_store",
    "redact_url",
]


def open_store(url: str) -> ReceiptStore:
    """The receipt store named by ``url`` (see :mod:`gateway.storage.backend`); ``ConfigError("store.url", ...)``
    for anything else. Nothing is connected here: call ``await store.ping()`` at start-up to fail fast."""
    return receipt_store_on(open_backend(url, config_key="store.url"))
