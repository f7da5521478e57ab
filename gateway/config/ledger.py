"""``[ledger]``: every paid-and-served request recorded once, for the operator (docs/operating.md, "Ledger")."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from gateway.config.store import store_url
from gateway.config.table import Table
from gateway.secrets import Secret

__all__ = ["LedgerConfig", "parse_ledger"]


@dataclass(frozen=True, slots=True)
class LedgerConfig:
    enabled: bool = True
    store_url: Secret | None = None  # None: the receipt store's URL ([store].url; table ``ledger`` / own key prefix)
    # Entries older than this are deleted by a periodic purge (every ``purge_interval`` seconds, by every gateway
    # process: each pass is idempotent). 0 keeps every entry for ever; on Redis that grows without bound.
    retention_days: int = 400
    purge_interval: float = 3600.0


_DEFAULT = LedgerConfig()


def parse_ledger(t: Table, env: Mapping[str, str], base_dir: Path) -> LedgerConfig:
    raw_url = t.get("store_url", str, None)  # absent or "": the receipt store's
    url = store_url(raw_url, t.key("store_url"), env, base_dir) if raw_url else _DEFAULT.store_url
    cfg = LedgerConfig(
        enabled=t.get("enabled", bool, _DEFAULT.enabled),
        store_url=url,
        retention_days=t.integer("retention_days", _DEFAULT.retention_days, minimum=0),
        purge_interval=t.number("purge_interval", _DEFAULT.purge_interval, minimum=1.0),
    )
    t.done()
    return cfg
