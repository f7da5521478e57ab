"""``[idempotency]``: ``Idempotency-Key`` on paid requests, so that a retry whose answer was lost gets that answer."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from gateway.config.store import store_url
from gateway.config.table import Table
from gateway.errors import ConfigError
from gateway.secrets import Secret

__all__ = ["IdempotencyConfig", "parse_idempotency"]


@dataclass(frozen=True, slots=True)
class IdempotencyConfig:
    """``Idempotency-Key`` on paid requests: a retry of a paid request whose answer was lost gets that answer."""

    enabled: bool = True
    store_url: Secret | None = None  # None: the receipt store's URL (separate table / key prefix)
    ttl: float = 86_400.0
    lease: float = 600.0
    max_stored_body_bytes: int = 1024 * 1024


_DEFAULT = IdempotencyConfig()


def parse_idempotency(t: Table, env: Mapping[str, str], base_dir: Path, min_lease: float) -> IdempotencyConfig:
    """``min_lease``: upstream.read_timeout + payment.settle_timeout, the longest a paid request may take."""
    raw_url = t.get("store_url", str, None)  # absent or "": the receipt store's
    url = store_url(raw_url, t.key("store_url"), env, base_dir) if raw_url else _DEFAULT.store_url
    cfg = IdempotencyConfig(
        enabled=t.get("enabled", bool, _DEFAULT.enabled),
        store_url=url,
        ttl=t.number("ttl", _DEFAULT.ttl, minimum=1.0),
        lease=t.number("lease", _DEFAULT.lease, minimum=1.0),
        max_stored_body_bytes=t.integer("max_stored_body_bytes", _DEFAULT.max_stored_body_bytes, minimum=0),
    )
    if cfg.lease < min_lease:
        # A retry must not take over a request that is still settling or waiting for the upstream.
        raise ConfigError(
            t.key("lease"), f"must be at least upstream.read_timeout + payment.settle_timeout ({min_lease:g})"
        )
    t.done()
    return cfg
