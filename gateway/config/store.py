"""``[store]``: where payment claims and receipts live (and, by default, idempotency records and jobs)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from gateway.config.table import Table
from gateway.config.values import expand_env
from gateway.errors import ConfigError
from gateway.secrets import Secret, redact_url

__all__ = ["StoreConfig", "parse_store", "store_url"]

_DEFAULT_URL = "sqlite:///x402-gateway.db"


@dataclass(frozen=True, slots=True)
class StoreConfig:
    url: Secret = field(default_factory=lambda: Secret(_DEFAULT_URL, _DEFAULT_URL))  # a Redis URL may hold a password
    lease_seconds: float = 120.0
    # Each gateway process proves it is alive in the store this often (a third of it, in fact); a claim held by a
    # process whose proof lapsed is taken over at once instead of after its lease (docs/threat-model.md T31).
    heartbeat_seconds: float = 6.0


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
    elif scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(key, "must start with sqlite:///, redis://, rediss:// or unix://")
    return Secret(url, redact_url(url))


def parse_store(t: Table, env: Mapping[str, str], base_dir: Path) -> StoreConfig:
    cfg = StoreConfig(
        url=store_url(t.get("url", str, _DEFAULT.url.reveal()), t.key("url"), env, base_dir),
        lease_seconds=t.number("lease_seconds", _DEFAULT.lease_seconds, minimum=1.0),
        heartbeat_seconds=t.number("heartbeat_seconds", _DEFAULT.heartbeat_seconds, minimum=1.0),
    )
    t.done()
    return cfg
