"""The deny-list: payer addresses every gateway instance refuses (403 ``payer_denied``), set through the admin API.

    contract.py   the entry (DeniedPayer) and the DenyList protocol
    sqlite.py     table ``denylist`` in the receipt store's SQLite file
    redis.py      one hash under ``x402:{deny}:``

``open_denylist(url)`` takes the receipt store's URL (``[store].url``, see :mod:`gateway.storage.backend`).
"""

from __future__ import annotations

from gateway.storage.backend import Backend, SqliteBackend, open_backend
from gateway.storage.denylist.contract import DeniedPayer, DenyList, payer_address
from gateway.storage.denylist.redis import RedisDenyList
from gateway.storage.denylist.sqlite import SQLiteDenyList

__all__ = [
    "DeniedPayer",
    "DenyList",
    "RedisDenyList",
    "SQLiteDenyList",
    "denylist_on",
    "open_denylist",
    "payer_address",
]


def denylist_on(backend: Backend) -> DenyList:
    """A deny-list (its own connection) on ``backend``."""
    if isinstance(backend, SqliteBackend):
        return SQLiteDenyList(backend.path)
    return RedisDenyList(backend.url)


def open_denylist(url: str) -> DenyList:
    """The deny-list on the storage named by ``url``; ``ConfigError("store.url", ...)`` otherwise. Nothing is
    connected here."""
    return denylist_on(open_backend(url, config_key="store.url"))
