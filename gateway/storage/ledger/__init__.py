"""The ledger: every settled payment that paid for a served request, recorded once, for the operator.

    contract.py   the entry (LedgerEntry), queries (LedgerQuery, Revenue) and the LedgerStore protocol
    sqlite.py     table ``ledger`` in the receipt store's SQLite file
    redis.py      one JSON string per entry under ``x402:{ledger}:``, indexes and revenue totals kept by one script
    export.py     CSV and JSON Lines, and the CSV reader (pure functions over entries)

``open_ledger_store(url)`` takes the store's URL (``[ledger].store_url``, by default ``[store].url``; see
:mod:`gateway.storage.backend`). What is recorded when, and the retention purge: docs/operating.md ("Ledger").
"""

from __future__ import annotations

from gateway.storage.backend import Backend, SqliteBackend, open_backend
from gateway.storage.ledger.contract import LedgerEntry, LedgerQuery, LedgerStore, Revenue
from gateway.storage.ledger.redis import RedisLedgerStore
from gateway.storage.ledger.sqlite import SQLiteLedgerStore

__all__ = [
    "LedgerEntry",
    "LedgerQuery",
    "LedgerStore",
    "RedisLedgerStore",
    "Revenue",
    "SQLiteLedgerStore",
    "ledger_store_on",
    "open_ledger_store",
]


def ledger_store_on(backend: Backend, *, synced_by_payments: bool = False) -> LedgerStore:
    """A ledger store (its own connection) on ``backend``. ``synced_by_payments``: the backend is the receipt
    store's, whose synced payment writes make a SQLite entry durable (:class:`SQLiteLedgerStore`)."""
    if isinstance(backend, SqliteBackend):
        return SQLiteLedgerStore(backend.path, synced_by_payments=synced_by_payments)
    return RedisLedgerStore(backend.url)


def open_ledger_store(
    url: str, *, config_key: str = "ledger.store_url", synced_by_payments: bool = False
) -> LedgerStore:
    """The ledger on the storage named by ``url``; ``ConfigError(config_key, ...)`` otherwise. Nothing is
    connected here: ``await store.ping()`` at start-up fails fast."""
    return ledger_store_on(open_backend(url, config_key=config_key), synced_by_payments=synced_by_payments)
