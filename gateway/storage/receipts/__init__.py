"""Receipt stores: where a payment is claimed exactly once, by any number of gateway processes.

contract.py   the claim life cycle (ClaimState, ClaimRecord) and the ReceiptStore protocol
sqlite.py     table ``receipts`` in one SQLite file
redis.py      one hash per payment under ``x402:``, every transition one Lua script
"""

from __future__ import annotations

from gateway.storage.backend import Backend, SqliteBackend
from gateway.storage.receipts.contract import ClaimRecord, ClaimState, Effect, ReceiptStore, link_owner
from gateway.storage.receipts.redis import RedisReceiptStore
from gateway.storage.receipts.sqlite import SQLiteReceiptStore

__all__ = [
    "ClaimRecord",
    "ClaimState",
    "Effect",
    "ReceiptStore",
    "RedisReceiptStore",
    "SQLiteReceiptStore",
    "link_owner",
    "receipt_store_on",
]


def receipt_store_on(backend: Backend) -> ReceiptStore:
    """A receipt store (its own connection) on ``backend``."""
    if isinstance(backend, SqliteBackend):
        return SQLiteReceiptStore(backend.path)
    return RedisReceiptStore(backend.url)
