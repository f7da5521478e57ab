"""``[store]``: where payment claims and receipts live (and, by default, idempotency records and jobs)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from gateway.config.table import Table
from gateway.config.values import expand_env
from gateway.errors import ConfigError
from gateway.secrets import Secret, redact_url

__all__ = ["REDIS_SCHEMES", "StoreConfig", "parse_store", "store_url"]

_DEFAULT_URL = "sqlite:///x402-gateway.db"
# The bound gateway.storage.redis_topology.MAX_ACK_TIMEOUT_MS puts on a WAIT (config does not import the stores;
# tests/unit/test_redis_store_urls.py keeps the two equal).
MAX_ACK_TIMEOUT_MS = 1000
REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel", "redis+cluster", "rediss+cluster")


@dataclass(frozen=True, slots=True)
class StoreConfig:
    url: Secret = field(default_factory=lambda: Secret(_DEFAULT_URL, _DEFAULT_URL))  # a Redis URL may hold a password
    lease_seconds: float = 120.0
    # Each gateway process proves it is alive in the store this often (a third of it, in fact); a claim held by a
    # process whose proof lapsed is taken over at once instead of after its lease (docs/threat-model.md T31).
    heartbeat_seconds: float = 15.0  # well above the store's own timeouts: two missed beats are not death
    # Where this process remembers the store's identity marker across restarts, so that a store wiped while the
    # gateway was down is noticed at start (docs/threat-model.md T30). Absent: next to a SQLite file
    # ("<file>.identity"), none for Redis (set one on a persistent volume); "" turns it off.
    identity_file: Path | None = None
    # Redis with replicas: every money-critical write waits until this many replicas acknowledged it, and the
    # request is refused (503) when they do not within replica_ack_timeout_ms (docs/scaling.md).
    # Carried to the stores as the URL's query (min_replicas_acked=N&replica_ack_timeout_ms=M).
    min_replicas_acked: int = 0
    replica_ack_timeout_ms: int = 500


_DEFAULT = StoreConfig()


def store_url(raw: str, key: str, env: Mapping[str, str], base_dir: Path) -> Secret:
    """A receipt-store URL (``[store].url``, ``[idempotency].store_url``); a relative SQLite path resolves against
    ``base_dir`` so that the file does not move with the working directory."""
    url = expand_env(raw, key, env)
    scheme = url.partition("://")[0]
    if scheme == "sqlite":
        rel = url.removeprefix("sqlite:///")
        if not rel.startswith("/") and rel != ":memory:":
            url = f"sqlite:///{(base_dir / rel).resolve()}"
    elif scheme not in REDIS_SCHEMES:
        raise ConfigError(
            key,
            "must start with sqlite:///, redis://, rediss://, unix://, redis+sentinel://, rediss+sentinel://, "
            "redis+cluster:// or rediss+cluster://",
        )
    return Secret(url, redact_url(url))


def _with_replica_acks(url: Secret, t: Table) -> tuple[Secret, int, int]:
    """``url`` carrying ``min_replicas_acked`` / ``replica_ack_timeout_ms`` as its query (the stores read them from
    the URL, so every store on ``[store].url`` waits alike). A URL that already names them keeps its own."""
    replicas = t.integer("min_replicas_acked", _DEFAULT.min_replicas_acked)
    timeout_ms = t.integer("replica_ack_timeout_ms", _DEFAULT.replica_ack_timeout_ms, minimum=1)
    if timeout_ms > MAX_ACK_TIMEOUT_MS:
        raise ConfigError(
            t.key("replica_ack_timeout_ms"),
            f"must be <= {MAX_ACK_TIMEOUT_MS}: a WAIT's answer is read under the store's 2 s socket timeout",
        )
    raw = url.reveal()
    if replicas == 0:
        return url, replicas, timeout_ms
    if raw.startswith("sqlite:"):
        raise ConfigError(t.key("min_replicas_acked"), "needs a Redis store with replicas, not a SQLite file")
    if "min_replicas_acked=" in raw:
        raise ConfigError(t.key("min_replicas_acked"), "is also in the store URL's query: say it in one place")
    raw += ("&" if "?" in raw else "?") + f"min_replicas_acked={replicas}&replica_ack_timeout_ms={timeout_ms}"
    return Secret(raw, redact_url(raw)), replicas, timeout_ms


def _identity_file(t: Table, url: str, env: Mapping[str, str], base_dir: Path) -> Path | None:
    raw = t.get("identity_file", str, None)
    if raw is not None:
        path = expand_env(raw, t.key("identity_file"), env)
        return (base_dir / path).resolve() if path else _DEFAULT.identity_file
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        db = Path(url.removeprefix("sqlite:///"))  # absolute: store_url() resolved it
        return db.with_name(db.name + ".identity")
    return _DEFAULT.identity_file


def parse_store(t: Table, env: Mapping[str, str], base_dir: Path) -> StoreConfig:
    url = store_url(t.get("url", str, _DEFAULT.url.reveal()), t.key("url"), env, base_dir)
    url, replicas, ack_timeout_ms = _with_replica_acks(url, t)
    cfg = StoreConfig(
        url=url,
        min_replicas_acked=replicas,
        replica_ack_timeout_ms=ack_timeout_ms,
        lease_seconds=t.number("lease_seconds", _DEFAULT.lease_seconds, minimum=1.0),
        heartbeat_seconds=t.number("heartbeat_seconds", _DEFAULT.heartbeat_seconds, minimum=1.0),
        identity_file=_identity_file(t, url.reveal(), env, base_dir),
    )
    t.done()
    return cfg
