"""The settlement journal: served settlements that are not final yet, and the :class:`SettlementJournal` protocol.

A settlement the gateway confirmed (mined, its Transfer to us seen) paid for a request that was then served; a
reorganisation can still drop it, and then the authorization is valid and unused again. The journal keeps what is
needed to notice that and to settle it again (docs/threat-model.md T28): the signed ``transferWithAuthorization``
call (target and calldata), where the settlement was seen mined (block number and hash), the authorization's
``validBefore`` and the payment's claim key. The finality tracker (:mod:`gateway.chain.finality`) reads it.

An entry's ``kind`` says what it watches (docs/threat-model.md T28):

* ``exact``: a settlement our relayer sent; ``calldata`` is its signed call, which may be settled again;
* ``transfer``: a payer's own transaction served as a tx-hash proof, and ``deposit``: our relayer's transaction of a
  session deposit. Both are watched only (nobody may send their call again as a new transaction); ``calldata``
  holds what identifies the watched transaction (:class:`gateway.chain.finality.Watched`, JSON), and
  ``valid_before`` the moment (epoch seconds, chain time) after which one that is not mined again is lost.

Entries written before ``kind`` existed read as ``exact`` (the SQLite table gains the column, default ``exact``,
the first time a journal object touches it; a Redis hash without the field is an ``exact`` one).

Life of an entry::

    (absent) --add--> entry(owner) --update--> entry (new tx hash, or where it was seen mined)
                          '--remove--> (absent)      (final, or reported lost)

An entry belongs to the tracker that holds its lease (``owner``, ``lease_until``): ``take`` hands a tracker its own
entries and every entry whose lease lapsed (its gateway died), so several gateway instances on one store never
watch, or re-submit, one settlement twice. Entries are durable: a restarted gateway finds what it was watching.

Fail closed: any backend failure raises :class:`gateway.errors.StoreUnavailable`; the tracker keeps what it could
not write and tries again on its next pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = ["GC_SECONDS", "KINDS", "JournalEntry", "SettlementJournal"]

KINDS = ("exact", "transfer", "deposit")  # see the module docstring

# An entry is resolved within minutes (final, re-submitted or lost). One that is not after this long belongs to a
# network no longer configured: the storage drops it then, so nothing accumulates for ever.
GC_SECONDS = 7 * 24 * 3600.0


@dataclass(frozen=True, slots=True)
class JournalEntry:
    key: str  # the payment's claim key (exact:<chain id>:<asset>:<payer>:<nonce>, tx:<chain id>:<hash>:<log>, ...)
    network: str  # the configured network's name
    tx_hash: str  # the transaction that executed (or, re-submitted, should execute) the authorization
    asset: str  # the token contract the call goes to
    calldata: bytes  # the signed transferWithAuthorization call, as it was sent (``exact``; see above otherwise)
    valid_before: int  # the authorization's validBefore, epoch seconds (chain time); see above for other kinds
    block_number: int | None  # where tx_hash was seen mined; None: not seen yet (new, or re-submitted)
    block_hash: str | None
    owner: str  # the tracker holding the lease
    lease_until: float
    created_at: float
    updated_at: float
    kind: str = "exact"  # one of KINDS


@runtime_checkable
class SettlementJournal(Protocol):
    """Every method raises ``StoreUnavailable`` when the backend cannot answer. ``now`` is epoch seconds."""

    async def add(
        self,
        key: str,
        network: str,
        tx_hash: str,
        asset: str,
        calldata: bytes,
        valid_before: int,
        *,
        owner: str,
        now: float,
        lease: float,
        kind: str = "exact",
    ) -> None:
        """Record a confirmed settlement (or a watched transaction, ``kind``) for ``owner``, not yet placed in a
        block. An entry already under ``key`` (the same payment settled again) is replaced."""
        ...

    async def take(
        self, network: str, owner: str, *, now: float, lease: float, limit: int, newest: bool = False
    ) -> list[JournalEntry]:
        """Up to ``limit`` entries of ``network`` that ``owner`` holds or whose lease lapsed, oldest first (or
        ``newest`` first); each is (re)leased to ``owner`` until ``now + lease``."""
        ...

    async def update(
        self,
        key: str,
        owner: str,
        *,
        tx_hash: str,
        block_number: int | None,
        block_hash: str | None,
        now: float,
    ) -> bool:
        """Set where the settlement is (a new transaction, or the block it was seen in); False when ``owner`` no
        longer holds the entry (nothing written)."""
        ...

    async def remove(self, key: str, owner: str) -> bool:
        """Delete ``owner``'s entry (final, or reported lost); False if ``owner`` does not hold it."""
        ...

    async def release(self, network: str, owner: str) -> int:
        """Give up ``owner``'s leases on ``network``'s entries (a tracker shutting down): any other instance takes
        them at its next pass instead of after the lease. Returns how many were released."""
        ...

    async def pending(self, network: str, *, limit: int) -> list[JournalEntry]:
        """Up to ``limit`` entries of ``network``, oldest first, as they are: read only (no lease is taken), for the
        operator's view of settlements not yet final (the admin API)."""
        ...

    async def ping(self) -> None: ...

    async def aclose(self) -> None: ...
