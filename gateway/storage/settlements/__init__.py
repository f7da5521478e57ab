"""The settlement journal: served settlements watched until final, so a reorg cannot leave a request unpaid.

    contract.py   the entry (JournalEntry) and the SettlementJournal protocol
    sqlite.py     table ``settlements`` in the receipt store's SQLite file
    redis.py      one hash per entry under ``x402:{settle}:``, every change one Lua script

``open_settlement_journal(url)`` takes the receipt store's URL (``[store].url``, see :mod:`gateway.storage.backend`).
The finality tracker that reads it is :mod:`gateway.chain.finality` (docs/threat-model.md T28).
"""

from __future__ import annotations

from gateway.storage.backend import Backend, SqliteBackend, open_backend
from gateway.storage.settlements.contract import JournalEntry, SettlementJournal
from gateway.storage.settlements.redis import RedisSettlementJournal
from gateway.storage.settlements.sqlite import SQLiteSettlementJournal

__all__ = [
    "JournalEntry",
    "RedisSettlementJournal",
    "SQLiteSettlementJournal",
    "SettlementJournal",
    "open_settlement_journal",
    "settlement_journal_on",
]


def settlement_journal_on(backend: Backend) -> SettlementJournal:
    """A settlement journal (its own connection) on ``backend``."""
    if isinstance(backend, SqliteBackend):
        return SQLiteSettlementJournal(backend.path)
    return RedisSettlementJournal(backend.url)


def open_settlement_journal(url: str) -> SettlementJournal:
    """The journal on the storage named by ``url``; ``ConfigError("store.url", ...)`` otherwise. Nothing is
    connected here."""
    return settlement_journal_on(open_backend(url, config_key="store.url"))
