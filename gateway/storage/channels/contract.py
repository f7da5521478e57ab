"""The channel store: the state of every ``batch-settlement`` payment channel, and the :class:`ChannelStore` protocol.

A channel is an on-chain escrow the payer deposited into; every paid request on it carries a cumulative voucher
(docs/sessions.md). What the store keeps per channel:

* the channel's configuration (who pays, who receives, the token, the withdrawal delay, the salt);
* a mirror of its on-chain state (``balance``, ``total_claimed``, ``withdraw_requested_at``, ``refund_nonce``) as
  the gateway last read it (``synced_at``);
* what we charged on it (``charged``: the cumulative sum of every committed charge) and the voucher that covers it
  (``signed_max`` >= ``charged``, with its ``signature``): the claimer claims ``charged`` with that voucher;
* the one request in flight (``holder`` until ``held_until``), with the voucher it presented (``pending_max``,
  ``pending_signature``) and, once its answer is on its way out, the charge it is provisionally served for
  (``pending_charge``).

Life of a request on a channel (every step one atomic operation, across every gateway instance on the store)::

    begin(holder, expected_charged, voucher)   lock the channel; refuse if another live request holds it
                                               (ChannelBusy) or the voucher's base is not ``charged``
                                               (ChannelMismatch, carrying the stored channel)
    served(holder, charge)                     the answer is about to leave: a crash from here on charges ``charge``
    commit(holder, charge)                     charged += charge, the voucher is stored, the lock released
    release(holder)                            nothing served: nothing charged, the lock released

Crash safety: a lock whose holder vanished (``held_until`` passed, or ``begin(take_over_from=holder)`` after the
engine saw the holder's process dead) is taken over; if that request had reached ``served``, its charge is
committed first (``fold``), so a request whose answer may have left is never forgotten, and one that never reached
``served`` is never charged. ``charged`` never decreases, and never falls below ``total_claimed``.

Fail closed: any backend failure raises :class:`gateway.errors.StoreUnavailable`.

Amounts: every integer the store keeps (amounts, times, nonces) is at most :data:`MAX_AMOUNT` (2**53 - 1), and
never negative; anything else is refused with ``ValueError`` before it reaches the backend (:func:`check_amount`).
Redis scripts compute in Lua numbers, which are doubles: exact up to 2**53 and no further. That bound is 9e9 USDC
(6 decimals) in one channel; a token with 18 decimals would need a wider representation. Callers that take an
amount from a client (the voucher's cumulative maximum) refuse a larger one as an invalid payload first.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

from gateway.errors import GatewayError
from gateway.x402 import reasons

__all__ = ["MAX_AMOUNT", "Channel", "ChannelBusy", "ChannelMismatch", "ChannelStore", "OnChainState", "check_amount"]

MAX_AMOUNT = 2**53 - 1  # the largest integer every backend stores and computes with exactly (see above)


def check_amount(name: str, value: int) -> int:
    """``value`` if it is an int in ``[0, MAX_AMOUNT]``; ``ValueError`` naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"channel store: {name} must be an int, got {type(value).__name__}")
    if not 0 <= value <= MAX_AMOUNT:
        raise ValueError(
            f"channel store: {name} = {value} is outside [0, 2**53 - 1], the range the store keeps exactly"
        )
    return value


@dataclass(frozen=True, slots=True)
class OnChainState:
    """A channel's state as read from the settlement contract (atomic token units, epoch seconds)."""

    balance: int
    total_claimed: int
    withdraw_requested_at: int = 0
    refund_nonce: int = 0


@dataclass(frozen=True, slots=True)
class Channel:
    channel_id: str  # 0x + 64 lower-case hex
    chain_id: int
    payer: str  # checksummed addresses
    payer_authorizer: str
    receiver: str
    receiver_authorizer: str
    token: str
    withdraw_delay: int
    salt: str  # 0x + 64 hex
    # on-chain mirror
    balance: int = 0
    total_claimed: int = 0
    withdraw_requested_at: int = 0
    refund_nonce: int = 0
    synced_at: float = 0.0
    # ours
    charged: int = 0
    signed_max: int = 0
    signature: str = ""
    updated_at: float = 0.0
    # the request in flight
    holder: str | None = None
    held_until: float = 0.0
    pending_max: int = 0
    pending_signature: str = ""
    pending_charge: int | None = None
    # Since when the channel owes what it owes (epoch seconds): when it started owing, or when a claim last left it
    # owing; as :meth:`ChannelStore.unclaimed` reports it, None from every other read. Kept across restarts: the age
    # ``claim_after`` bounds.
    owing_since: float | None = None

    @property
    def unclaimed(self) -> int:
        return self.charged - self.total_claimed

    @property
    def available(self) -> int:
        """What further vouchers can still be covered by: the balance minus what we charged."""
        return self.balance - self.charged

    def with_onchain(self, state: OnChainState, *, now: float) -> Channel:
        return replace(
            self,
            balance=state.balance,
            total_claimed=state.total_claimed,
            withdraw_requested_at=state.withdraw_requested_at,
            refund_nonce=state.refund_nonce,
            synced_at=now,
            charged=max(self.charged, state.total_claimed),
        )


class ChannelBusy(GatewayError):
    """Another request on this channel is in flight (one at a time per channel, across every instance)."""

    status = 402
    default_reason = reasons.SESSION_CHANNEL_BUSY

    def __init__(self, message: str = "", *, holder: str | None = None) -> None:
        super().__init__(message)
        self.holder = holder  # who holds it (``<instance>.<request>``): a dead instance's lock is taken over


class ChannelMismatch(GatewayError):
    """The voucher's base is not what we charged: the client must resynchronise from ``channel``."""

    status = 402
    default_reason = reasons.SESSION_CUMULATIVE_MISMATCH

    def __init__(self, message: str, channel: Channel) -> None:
        super().__init__(message)
        self.channel = channel


@runtime_checkable
class ChannelStore(Protocol):
    """Every method raises ``StoreUnavailable`` when the backend cannot answer. ``now`` is epoch seconds; every
    amount an int of atomic token units."""

    async def get(self, channel_id: str) -> Channel | None: ...

    async def open(self, channel: Channel, *, now: float) -> Channel:
        """Create the channel's record from ``channel`` (its config and on-chain mirror) unless one exists; return
        the stored record either way (an existing record's ``charged`` and voucher are kept).

        A new record takes ``channel``'s ``charged`` (raised to ``total_claimed``) and voucher, and no holder."""
        ...

    async def sync(self, channel_id: str, state: OnChainState, *, now: float) -> Channel | None:
        """Store a fresh read of the channel's on-chain state; ``charged`` is raised to ``total_claimed`` if it was
        below (a store that lost writes never claims less than the chain says was claimed). None if unknown.

        The read is stored as it is, ``total_claimed`` too: a lower one than stored means a reorganisation undid a
        claim, and the money is unclaimed again (``charged`` stays)."""
        ...

    async def begin(
        self,
        channel_id: str,
        holder: str,
        *,
        expected_charged: int,
        voucher_max: int,
        signature: str,
        now: float,
        lease: float,
        take_over_from: str | None = None,
    ) -> Channel:
        """Lock the channel for ``holder`` until ``now + lease`` with the presented voucher as pending.

        First folds a lapsed holder (``held_until <= now``, or ``take_over_from`` names the current holder): its
        ``pending_charge``, if set, is committed. Then raises ``ChannelBusy`` (with ``holder``) if a holder still
        holds it (``holder`` itself too: a holder names one request, and a live lock is never entered twice),
        ``ChannelMismatch`` (with the stored channel) if ``expected_charged != charged``, ``KeyError`` if the
        channel is unknown. Returns the locked channel.

        The fold is written even when ``ChannelMismatch`` follows it (the channel it carries is the folded one, the
        base the client resynchronises to)."""
        ...

    async def served(self, channel_id: str, holder: str, charge: int, *, now: float) -> bool:
        """Mark ``holder``'s request as served for ``charge`` (provisional, committed by ``fold`` if the holder
        vanishes). False (nothing written) if ``holder`` no longer holds the channel. True also after the lease
        lapsed as long as nobody folded it: the next fold then commits ``charge``. ``ValueError`` (nothing written)
        if the pending voucher does not cover it (``charge > pending_max - charged``)."""
        ...

    async def commit(self, channel_id: str, holder: str, charge: int, *, now: float) -> Channel | None:
        """``charged += charge``; the pending voucher becomes the stored one; the lock is released. ``charge`` must be
        <= ``pending_max - charged`` (``ValueError``, nothing written, otherwise). None (nothing written) if
        ``holder`` no longer holds the channel, which includes a repeated commit whose first call landed (a reply
        lost to a store timeout): a charge is committed at most once."""
        ...

    async def release(self, channel_id: str, holder: str) -> bool:
        """Drop ``holder``'s lock without charging; False if it does not hold it."""
        ...

    async def fold(self, channel_id: str, *, now: float) -> Channel | None:
        """Resolve a lapsed holder (commit its provisional charge, or drop its lock); return the channel (None if
        unknown). A fold never charges beyond the pending voucher: if ``charged`` rose under the holder (``sync`` or
        ``record_claimed`` after lost writes), it commits ``min(pending_charge, pending_max - charged)``, and
        nothing (the stored voucher kept) if the pending voucher no longer covers ``charged``."""
        ...

    async def unclaimed(self, chain_id: int, *, now: float, limit: int) -> list[Channel]:
        """Up to ``limit`` channels on ``chain_id`` with ``charged > total_claimed`` or a lapsed holder that reached
        ``served`` (with a charge above 0), the longest-unclaimed first (since the channel last went from fully
        claimed to not, or a claim, by ``record_claimed`` or seen by ``sync``, left it owing), each with
        ``owing_since`` set to that moment. Read only: a lapsed holder's charge is in
        ``pending_charge``, folded by ``fold``."""
        ...

    async def record_claimed(self, channel_id: str, total_claimed: int, *, now: float) -> Channel | None:
        """A claim of ``total_claimed`` landed on chain: raise the mirror's ``total_claimed`` (never lowers it), and
        ``charged`` with it if it was below. None if unknown."""
        ...

    async def ping(self) -> None: ...

    async def aclose(self) -> None: ...
