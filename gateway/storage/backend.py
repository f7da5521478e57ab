"""Store URLs: the one place that reads ``[store].url`` (and ``[idempotency].store_url``).

``open_backend(url)`` turns a URL into a :data:`Backend`, which the receipt, idempotency, job, channel, ledger,
override and deny-list stores and the settlement journal are built on (``receipt_store_on``,
``idempotency_store_on``, ``job_store_on``, ``channel_store_on``, ``ledger_store_on``, ``settlement_journal_on``,
...)::

    sqlite:///relative/path.db     one file shared by the gateway processes of one host
    sqlite:////absolute/path.db
    redis://[user:password@]host:port/db   rediss://...   unix:///path/to/redis.sock
                                   shared by gateway instances on several hosts
    redis+sentinel://[user:password@]h1:26379,h2:26379,h3:26379/<service>[/<db>]   rediss+sentinel://...
                                   a master that Redis Sentinel fails over to a replica
    redis+cluster://[user:password@]h1:7000,h2:7001,h3:7002/                     rediss+cluster://...
                                   a Redis Cluster (the hosts are seeds)
    any Redis URL + ?min_replicas_acked=N[&replica_ack_timeout_ms=M]
                                   money-critical writes wait for N replicas (gateway.storage.redis_topology)

The stores share the storage, never a connection: on SQLite each keeps its own table (``receipts``,
``idempotency``, ``jobs``, ``settlements``, ``channels``, ``ledger``, ``route_overrides``, ``denylist``) and worker
thread; on Redis its own key prefix (``x402:``, ``x402:idem:``, ``x402:{jobs}:``, ``x402:{settle}:``,
``x402:{chan}:``, ``x402:{ledger}:``, ``x402:{rt}:``, ``x402:{deny}:``) and client. Nothing is connected here:
``await store.ping()`` at start-up fails fast.

A URL that names no usable storage is a :class:`gateway.errors.ConfigError` (a start-up error, never an HTTP
answer), and its message never shows a password: :func:`redact_url` stands in for the URL.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from redis.asyncio.connection import parse_url

from gateway.errors import ConfigError
from gateway.storage.redis_client import redact_url
from gateway.storage.redis_topology import TOPOLOGY_SCHEMES, parse_redis_url, refuse_raw_userinfo

__all__ = ["Backend", "RedisBackend", "SqliteBackend", "open_backend"]

SQLITE_PREFIX = "sqlite:///"
REDIS_SCHEMES = ("redis", "rediss", "unix")


@dataclass(frozen=True, slots=True)
class SqliteBackend:
    """One SQLite file on a local disk (WAL needs memory shared between the processes: never NFS/SMB)."""

    path: str


@dataclass(frozen=True, slots=True, repr=False)
class RedisBackend:
    """One Redis server (or socket). ``url`` may carry a password: the repr shows it redacted."""

    url: str

    def __repr__(self) -> str:
        return f"RedisBackend(url={redact_url(self.url)!r})"


Backend = SqliteBackend | RedisBackend


def open_backend(url: str, *, config_key: str = "store.url") -> Backend:
    """The storage named by ``url``; ``ConfigError(config_key, ...)`` for anything else."""
    shown = redact_url(url)
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "sqlite":
        if not url.startswith(SQLITE_PREFIX):
            raise ConfigError(
                config_key, f"expected sqlite:///relative/path.db or sqlite:////abs/path.db, got {shown!r}"
            )
        path = url[len(SQLITE_PREFIX) :]
        if not path or path.endswith("/") or path == ":memory:" or "?" in path:
            # An in-memory store forgets every claim on restart and is not shared between processes.
            raise ConfigError(config_key, f"a sqlite store needs a file path, got {shown!r}")
        return SqliteBackend(path)
    if scheme in REDIS_SCHEMES or scheme in TOPOLOGY_SCHEMES:
        # Fixed messages, raised ``from None``: a raw "/", "?" or "#" in a password moves where the URL seems to
        # split, and urllib's own errors (a chained cause a traceback prints) quote the piece they could not read.
        try:
            refuse_raw_userinfo(url)
        except ValueError as exc:
            raise ConfigError(config_key, str(exc)) from None
    if scheme in REDIS_SCHEMES:
        try:
            parts = urlsplit(url)
            _ = parts.port  # raises ValueError on a malformed port
        except ValueError:
            raise ConfigError(config_key, "malformed redis url: its host or port cannot be read") from None
        if scheme != "unix" and not parts.hostname:
            raise ConfigError(config_key, "redis url without a host")
        try:
            client_url = parse_redis_url(url).client_url
        except ValueError as exc:  # our parser's messages are fixed text
            raise ConfigError(config_key, f"invalid redis url: {exc}") from None
        try:
            parse_url(client_url)  # what the pools will read (db number, query options)
        except ValueError as exc:  # "Invalid value for '<name>' ...": only names of redis-py's own options
            raise ConfigError(config_key, f"invalid redis url: {exc}") from None
        return RedisBackend(url)
    if scheme in TOPOLOGY_SCHEMES:
        try:
            parse_redis_url(url)
        except ValueError as exc:
            raise ConfigError(config_key, f"invalid redis url: {exc}") from None
        return RedisBackend(url)
    raise ConfigError(
        config_key,
        "unsupported store scheme: use sqlite:///, redis://, rediss://, unix://, redis+sentinel:// or redis+cluster://",
    )
