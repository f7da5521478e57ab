"""Channel stores: the state of every ``batch-settlement`` payment channel, shared by every gateway instance.

    contract.py   the channel (Channel, OnChainState), ChannelBusy, ChannelMismatch and the ChannelStore protocol
    sqlite.py     table ``channels`` in the receipt store's SQLite file
    redis.py      one hash per channel under ``x402:{chan}:``, every change one Lua script

``open_channel_store(url)`` takes the receipt store's URL (``[store].url``, see :mod:`gateway.storage.backend`).
"""

from __future__ import annotations

from gateway.storage.backend import Backend, SqliteBackend, open_backend
from gateway.storage.channels.contract import (
    MAX_AMOUNT,
    Channel,
    ChannelBusy,
    ChannelMismatch,
    ChannelStore,
    OnChainState,
    check_amount,
)
from gateway.storage.channels.redis import RedisChannelStore
from gateway.storage.channels.sqlite import SQLiteChannelStore

__all__ = [
    "MAX_AMOUNT",
    "Channel",
    "ChannelBusy",
    "ChannelMismatch",
    "ChannelStore",
    "OnChainState",
    "RedisChannelStore",
    "SQLiteChannelStore",
    "channel_store_on",
    "check_amount",
    "open_channel_store",
]


def channel_store_on(backend: Backend) -> ChannelStore:
    """A channel store (its own connection) on ``backend``."""
    if isinstance(backend, SqliteBackend):
        return SQLiteChannelStore(backend.path)
    return RedisChannelStore(backend.url)


def open_channel_store(url: str) -> ChannelStore:
    """The channel store on the storage named by ``url``; ``ConfigError("store.url", ...)`` otherwise. Nothing is
    connected here: ``await store.ping()`` at start-up fails fast."""
    return channel_store_on(open_backend(url, config_key="store.url"))
