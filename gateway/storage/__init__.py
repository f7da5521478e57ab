"""Receipt stores: where a payment is claimed exactly once (THREATS 1, 2, 17).

``open_store(url)`` picks the backend from the URL::

    sqlite:///relative/path.db     one file shared by the gateway processes of one host
    sqlite:////absolute/path.db
    redis://[user:password@]host:port/db   rediss://...   unix:///path/to/redis.sock
                                   shared by gateway instances on several hosts
"""

from __future__ import annotations

from urllib.parse import urlsplit

from gateway.errors import ConfigError
from gateway.storage.receipts import ClaimRecord, ClaimState, ReceiptStore
from gateway.storage.receipts_redis import RedisReceiptStore, redact_url
from gateway.storage.receipts_sqlite import SQLiteReceiptStore

__all__ = [
    "ClaimRecord",
    "ClaimState",
    "ReceiptStore",
    "RedisReceiptStore",
    "SQLiteReceiptStore",
    "open_store",
    "redact_url",
]

_SQLITE_PREFIX = "sqlite:///"
_REDIS_SCHEMES = ("redis", "rediss", "unix")


def open_store(url: str) -> ReceiptStore:
    """The receipt store named by ``url``; ``ConfigError("store.url", ...)`` for anything else.

    Nothing is connected here: call ``await store.ping()`` at start-up to fail fast.
    """
    shown = redact_url(url)
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "sqlite":
        if not url.startswith(_SQLITE_PREFIX):
            raise ConfigError(
                "store.url", f"expected sqlite:///relative/path.db or sqlite:////abs/path.db, got {shown!r}"
            )
        path = url[len(_SQLITE_PREFIX) :]
        if not path or path.endswith("/") or path == ":memory:" or "?" in path:
            # An in-memory store forgets every claim on restart and is not shared between processes.
            raise ConfigError("store.url", f"a sqlite store needs a file path, got {shown!r}")
        return SQLiteReceiptStore(path)
    if scheme in _REDIS_SCHEMES:
        try:
            parts = urlsplit(url)
            _ = parts.port  # raises ValueError on a malformed port
        except ValueError as exc:
            raise ConfigError("store.url", f"malformed redis url {shown!r}") from exc
        if scheme != "unix" and not parts.hostname:
            raise ConfigError("store.url", f"redis url without a host: {shown!r}")
        try:
            return RedisReceiptStore(url)
        except Exception as exc:
            raise ConfigError("store.url", f"invalid redis url {shown!r}") from exc
    raise ConfigError("store.url", f"unsupported store scheme {scheme!r}: use sqlite:/// or redis://")
