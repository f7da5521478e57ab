"""The receipt store: one interface, several backends (SQLite embedded, Redis shared).

The store claims the *money*, not the request. A key names one payment, normalised from decoded fields
(``exact:<chain_id>:<asset>:<from>:<nonce>`` or ``tx:<chain_id>:<tx_hash>:<log_index>``, lowercase hex), and
every state change is one atomic operation in shared storage, so two gateway processes cannot both win.

Life of a claim::

    (absent) --claim--> PENDING --mark_paid--> PAID --finish(served=True)--> CONSUMED (final)
                           |                     '---finish(served=False)--> UNSERVED --claim--> PAID (resumed)
                           '--release--> (absent)      (money moved, request failed: retry without paying again)

* ``PENDING``: claimed by ``owner``; the money has not been seen to move. ``record_tx`` stores the settlement
  transaction hash *before* it is broadcast, so a crash can always be reconciled by hash and nothing is ever
  broadcast twice.
* ``PAID``: the money is on chain; ``owner`` is serving a request with it.
* ``UNSERVED``: the money is on chain but the request it paid for failed (upstream 5xx, unreachable); the next
  presentation of the same payment resumes it without paying again (the client paid once; it is owed one answer).
* ``CONSUMED``: one request succeeded with it; every later presentation is a replay.

A PENDING or PAID claim whose ``lease_until`` has passed belongs to a gateway that died; ``claim`` hands it to
the new owner with ``resumed=True`` and its state unchanged, and the caller reconciles (by ``tx_hash``).

Fail closed: any backend failure raises :class:`gateway.errors.StoreUnavailable`; a store that cannot answer
cannot tell a first presentation from a replay.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


class ClaimState(enum.StrEnum):
    PENDING = "pending"
    PAID = "paid"
    UNSERVED = "unserved"
    CONSUMED = "consumed"


@dataclass(frozen=True, slots=True)
class ClaimRecord:
    key: str
    state: ClaimState
    owner: str
    tx_hash: str | None
    lease_until: float
    expires_at: float | None  # epoch seconds; None keeps the record for ever
    updated_at: float
    resumed: bool = False  # set on the record ``claim`` returns when it took over an existing claim


@dataclass(frozen=True, slots=True)
class Effect:
    """Something on chain a payment's money spent (the transfer it arrived in, the authorization it executed, the
    sender's transaction slot), as a store key, and how long it is kept."""

    key: str
    expires_at: float | None


def link_owner(key: str, owner: str) -> str:
    """The owner recorded on an effect key taken by claim ``(key, owner)``: only that very claim may take it again."""
    return f"link:{key}:{owner}"


@runtime_checkable
class ReceiptStore(Protocol):
    """Atomic claims on payments. Every method raises ``StoreUnavailable`` when the backend cannot answer."""

    # Whether the store can lose its records under a running gateway (a Redis restarted empty, or failed over to a
    # replica without the last writes); an open SQLite file cannot (docs/threat-model.md T30).
    may_forget: bool

    async def claim(
        self,
        key: str,
        owner: str,
        *,
        now: float,
        lease: float,
        expires_at: float | None,
        take_over_from: str | None = None,
    ) -> ClaimRecord:
        """Claim ``key`` for ``owner``.

        absent (or expired) -> PENDING(owner); UNSERVED -> PAID(owner, resumed); PENDING/PAID with a lapsed
        lease -> same state, new owner, resumed. Raises ``PaymentReplayed`` for CONSUMED and
        ``PaymentInFlight`` (with ``holder`` = its owner) for a PENDING/PAID claim whose lease is live, unless
        that owner is ``take_over_from``: then the claim is taken over as if the lease had lapsed (its owner's
        process is known to be gone).
        """
        ...

    async def record_tx(self, key: str, owner: str, tx_hash: str, *, now: float, lease: float) -> None:
        """Store the settlement tx hash on ``owner``'s PENDING claim (before broadcasting it) and renew the
        lease. Raises ``PaymentInFlight`` if ``owner`` no longer holds the claim."""
        ...

    async def mark_paid(
        self,
        key: str,
        owner: str,
        tx_hash: str | None,
        *,
        now: float,
        lease: float,
        effects: tuple[Effect, ...] = (),
    ) -> None:
        """PENDING(owner) -> PAID(owner). Raises ``PaymentInFlight`` if ``owner`` lost the claim.

        ``effects``: the keys of what this money spent on chain (the transfer it arrived in,
        ``tx:<chain>:<tx>:<log index>``, the key a tx-hash proof of the same transfer claims; the authorization it
        executed; the sender's transaction slot). In the same atomic step they are all taken for this claim; if any
        is already held by anything else (a tx-hash proof, an earlier claim of the same authorization, a replaced
        transaction), the money was already spent here: this claim becomes CONSUMED, none is taken, and
        ``PaymentReplayed`` is raised (one transfer pays once, whichever way it is presented: docs/threat-model.md
        T26, T28)."""
        ...

    async def finish(
        self, key: str, owner: str, *, served: bool, now: float, expires_at: float | None, delivered: bool = False
    ) -> bool:
        """PAID(owner) -> CONSUMED when ``served`` else UNSERVED; ``expires_at`` replaces the record's expiry
        (None: keep for ever). A lost claim is not an error here: the caller has nothing left to undo.

        When the call fails (``StoreUnavailable``) the request is refused; a store that may have written the
        CONSUMED record anyway (a Redis write whose reply or replica acknowledgement did not come) turns that very
        write back into UNSERVED, so that the refused request's retry is served — unless ``delivered``: the app
        already acted on the payment (e.g. created the payer's job), which then stays consumed.

        Returns whether ``owner`` still held the claim. A caller about to serve must not when it did not: the
        claim was taken over, and the request that took it is the one the payment pays for."""
        ...

    async def release(self, key: str, owner: str) -> None:
        """Delete ``owner``'s PENDING claim: the money did not move. No-op if ``owner`` lost it."""
        ...

    async def get(self, key: str, *, now: float) -> ClaimRecord | None:
        """The live record for ``key`` (None if absent or expired)."""
        ...

    async def identity(self) -> str | None:
        """The store's identity marker (None when absent: a new store, or one that lost its data)."""
        ...

    async def set_identity(self, value: str, *, only_if_absent: bool) -> str:
        """Write the identity marker (``only_if_absent``: unless there is one) and return the marker now stored."""
        ...

    async def lapse(self, key: str, owner: str, *, now: float) -> None:
        """End the lease of ``owner``'s PENDING/PAID claim (its request is over, its outcome recorded by hash), so
        the next presentation takes it over and reconciles at once. No-op if ``owner`` lost it. The lease is ended
        outright (0), not set to ``now``: a clock that steps back afterwards must not make it live again."""
        ...

    async def heartbeat(self, instance: str, *, now: float, ttl: float) -> None:
        """Gateway process ``instance`` is alive for ``ttl`` more seconds."""
        ...

    async def alive(self, instance: str, *, now: float) -> bool:
        """Whether ``instance`` proved it is alive recently (its last heartbeat has not lapsed)."""
        ...

    async def add_relayers(self, addresses: Iterable[str]) -> None:
        """Record ``addresses`` (lowercase) as relayers of the gateways sharing this store (never removed)."""
        ...

    async def relayers(self) -> frozenset[str]:
        """Every relayer address recorded by :meth:`add_relayers` (gateway/engine/relayers.py)."""
        ...

    async def ping(self) -> None:
        """Raise ``StoreUnavailable`` unless the backend answers."""
        ...

    async def aclose(self) -> None: ...
