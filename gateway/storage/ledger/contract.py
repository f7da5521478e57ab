"""The ledger: every settled payment, recorded once, durably, for the operator (docs/operating.md).

One :class:`LedgerEntry` per payment that paid for a served request, whatever its kind: an ``exact`` authorization,
a tx-hash proof, a session charge (one entry per charged request), and the operator's refunds (an entry of kind
``refund`` with a negative amount, linked to the payment it refunds). ``key`` makes recording idempotent: the
payment's own identity (exact: its claim key; tx-hash: the transfer's effect key; a session charge:
``session:<channel id>:<cumulative after it>``; a refund: ``refund:<refunded entry's key>``), so a payment recorded
twice is one row, and a second refund of one payment is refused by the store itself.

A payment whose settlement the finality tracker counted lost (a reorg dropped it and it could not be settled again,
docs/threat-model.md T28) is marked, by its key, whether or not its entry is recorded yet: the merchant never
received that money, so it is never refunded (docs/operating.md, "Refunds"). A mark goes with the retention purge.

Queries are what an operator asks on day one: payments by payer, route, time range or tx hash (newest first,
paginated by ``before``), revenue by route / network / day, and exports (CSV, JSON Lines).

Fail closed: any backend failure raises :class:`gateway.errors.StoreUnavailable`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Literal, Protocol, runtime_checkable

__all__ = [
    "DAY",
    "KINDS",
    "MAX_AMOUNT",
    "REFUND_PREFIX",
    "Group",
    "Kind",
    "LedgerEntry",
    "LedgerQuery",
    "LedgerStore",
    "Revenue",
    "day_of",
    "normalised",
]

Kind = Literal["exact", "txhash", "batch-settlement", "refund"]
KINDS: tuple[Kind, ...] = ("exact", "txhash", "batch-settlement", "refund")
Group = Literal["route", "network", "day"]

DAY = 86_400
# Per entry, at most 2**53 - 1 atomic units (~9e9 USDC): a JSON reader (JSON Lines export) and a Lua number hold it
# exactly, and sums stay far inside the signed 64-bit integers SQLite and Redis (HINCRBY) add with.
MAX_AMOUNT = 2**53 - 1
REFUND_PREFIX = "refund:"  # a refund's key: this prefix and the refunded entry's key


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    key: str  # the payment's identity (see above): unique
    at: float  # epoch seconds when the request was served (a refund: when it was sent)
    route: str  # the route's pattern
    method: str
    resource: str  # the resource URL the 402 advertised
    amount: int  # atomic units charged (a refund: negative)
    network: str  # configured network name
    asset: str  # token contract
    payer: str  # lowercase address
    pay_to: str
    kind: Kind
    tx_hash: str  # the settlement (exact, tx-hash), the deposit or claim if any (session: "" until claimed)
    block: int | None  # where tx_hash was mined, when known
    request_id: str
    job_id: str | None = None
    upstream_status: int = 0
    refund_of: str | None = None  # a refund: the key of the entry it refunds


@dataclass(frozen=True, slots=True)
class LedgerQuery:
    payer: str | None = None
    route: str | None = None
    tx_hash: str | None = None
    since: float | None = None  # at >= since
    until: float | None = None  # at < until
    before: float | None = None  # pagination: entries strictly older than this ``at``
    limit: int = 100
    # Pagination without gaps: with ``before``, the last page's last ``key``. Entries are ordered by (``at``, ``key``),
    # so one that shares its ``at`` with the last row of a page is on the next page, never skipped.
    before_key: str | None = None


@dataclass(frozen=True, slots=True)
class Revenue:
    group: str  # the route, the network, or the day (YYYY-MM-DD, UTC)
    amount: int  # net of refunds
    payments: int


def day_of(at: float) -> str:
    """The UTC day of ``at`` (``YYYY-MM-DD``): the ``day`` revenue group."""
    return time.strftime("%Y-%m-%d", time.gmtime(at))


def normalised(entry: LedgerEntry) -> LedgerEntry:
    """``entry`` as every backend stores it: the payer and the tx hash lowercase (queries compare them so), an empty
    job id or refund link as none. Raises ``ValueError`` for an entry no backend should keep: an unknown kind, a
    refund that links to nothing or a payment that links to something, an amount out of range."""
    if entry.kind not in KINDS:
        raise ValueError(f"ledger: unknown kind {entry.kind!r}")
    if (entry.kind == "refund") != (entry.refund_of is not None):
        raise ValueError("ledger: a refund (and only a refund) names the entry it refunds")
    if not isinstance(entry.amount, int) or abs(entry.amount) > MAX_AMOUNT:
        raise ValueError("ledger: the amount must be an integer number of atomic units below 2**53")
    if not entry.key:
        raise ValueError("ledger: an entry needs a key")
    return replace(
        entry,
        payer=entry.payer.lower(),
        tx_hash=entry.tx_hash.lower(),
        job_id=entry.job_id or None,
        refund_of=entry.refund_of or None,
    )


@runtime_checkable
class LedgerStore(Protocol):
    async def record(self, entry: LedgerEntry) -> bool:
        """Store ``entry`` unless one with its key exists; True if it was new. A refund whose ``refund_of`` already
        has a refund is refused (False)."""
        ...

    async def get(self, key: str) -> LedgerEntry | None: ...

    async def mark_settlement_lost(self, key: str, *, at: float) -> bool:
        """Mark the payment under ``key`` as one whose settlement was lost (counted so at ``at``), whether or not
        its entry is recorded yet; True if it was not marked before."""
        ...

    async def settlement_lost_at(self, key: str) -> float | None:
        """When the payment under ``key`` was marked lost; None when it was not."""
        ...

    async def find(self, query: LedgerQuery) -> list[LedgerEntry]:
        """Newest first."""
        ...

    async def revenue(
        self, by: Literal["route", "network", "day"], *, since: float | None = None, until: float | None = None
    ) -> list[Revenue]:
        """Net amount and payments (refunds excluded from the count) per group, of the entries with
        ``since <= at < until``, ordered by group."""
        ...

    def export(self, query: LedgerQuery) -> AsyncIterator[LedgerEntry]:
        """Every matching entry, oldest first, without a limit (streamed in pages)."""
        ...

    async def purge(self, *, older_than: float) -> int:
        """Drop entries older than ``older_than`` (the retention setting), and the lost marks made before it; returns
        how many entries."""
        ...

    async def ping(self) -> None: ...

    async def aclose(self) -> None: ...
