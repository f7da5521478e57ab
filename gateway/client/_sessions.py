"""Paying through ``batch-settlement`` channels (``pay_with="session"``): one deposit, then a signed voucher per
request and no transaction (docs/sessions.md).

For each (server origin, network, payTo, asset) this wallet keeps one channel in its :class:`SessionStore`:

1. no channel yet, or the next voucher (charged + price) would exceed the balance: the payment carries a deposit
   (``SessionSettings.deposit``, else the offer's ``minDeposit``; never less than either nor than the voucher
   needs). The channel's record, with its random salt, is written before the deposit leaves.
2. The voucher ``maxClaimableAmount = charged + price`` is signed and sent. The answer's ``PAYMENT-RESPONSE``
   advances ``charged`` only when its ``chargedCumulativeAmount`` equals the previous one plus its
   ``chargedAmount``; otherwise ours is kept and the next request resynchronises.
3. A corrective 402 (``…cumulative_amount_mismatch``) resynchronises to the server's cumulative only if this
   wallet provably owed that much *before the call began* (its record then, the 402's ``voucherState`` whose
   signature recovers to this wallet for an amount this call did not sign itself, or what the chain says was
   claimed) and, with an RPC, never below what was claimed on chain; then the request is paid again. A voucher
   this call signed is no evidence that it was charged before: else a server could refuse it, call it charged,
   and have the same request paid again on top of it, once per resynchronisation (:class:`SessionCall`).
   ``…channel_busy`` is retried after a short backoff. Every loop is bounded.

Requests on one channel go one at a time (the server takes one per channel): concurrent calls of this client
wait for each other here instead of collecting busy 402s.

Spend controls: the price (each voucher's step) and each deposit are payments, so ``max_per_payment`` applies to
both. The budget counts a deposit when it is made (the money leaves the wallet), and each request's charge unless
this client's own deposits already covered it; a refund gives back what it returned of those deposits.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
from eth_account.signers.local import LocalAccount

from gateway.client._channels import SessionChannel, SessionStore
from gateway.client._config import SessionSettings
from gateway.client._errors import ApiError, PaymentFailed, PaymentRefused, X402ClientError
from gateway.client._onchain import ChannelReader, OnchainChannel
from gateway.client._spend import Budget, SpendControls
from gateway.client.session import (
    CorrectiveState,
    SessionOffer,
    channel_config,
    corrective_state,
    new_salt,
    session_header,
    session_offers,
    session_receipt,
    sign_deposit,
    sign_voucher,
    signed_by,
)
from gateway.money import format_usd
from gateway.x402 import reasons
from gateway.x402.codec import decode_header
from gateway.x402.sessions import channel_id

__all__ = ["SessionCall", "SessionPayer", "SessionRefund", "origin_of"]

log = logging.getLogger("gateway.client")

Send = Callable[..., Awaitable[tuple[httpx.Response, bool]]]
ErrorOf = Callable[[httpx.Response], tuple[str | None, str]]

_RESYNC = frozenset({reasons.SESSION_CUMULATIVE_MISMATCH, reasons.SESSION_CUMULATIVE_BELOW_CLAIMED})
# Refused after the deposit was executed: the money may be in the channel although the request was refused.
_AFTER_DEPOSIT = frozenset({reasons.SESSION_CUMULATIVE_EXCEEDS_BALANCE, reasons.SESSION_WITHDRAWING})
_MAX_RESYNCS = 2
_MAX_COVER_RETRIES = 1


def origin_of(url: httpx.URL) -> str:
    port = f":{url.port}" if url.port is not None else ""
    return f"{url.scheme}://{url.host}{port}"


def _payment_required(response: httpx.Response) -> Any:
    try:
        return decode_header(response.headers.get("payment-required") or "")
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class SessionRefund:
    """A cooperative refund: ``amount`` came back to the wallet in ``tx_hash``; ``channel`` is the record after."""

    channel: SessionChannel
    amount: int
    tx_hash: str


class SessionCall:
    """What one logical call (one ``Idempotency-Key``, whatever number of 402s and presentations it takes) signed on
    each channel, and what the channel's record said this wallet had signed when the call first used it.

    One call buys one request, so it signs at most one price beyond what was owed before it: a corrective 402 is
    believed only up to that (docs/sessions.md). Signatures are deterministic, so a ``voucherState`` for an amount
    this call signed proves nothing another presentation did: it may be this call's own refused voucher, echoed."""

    def __init__(self) -> None:
        self._before: dict[str, int] = {}
        self._signed: dict[str, set[int]] = {}

    def signing(self, channel: SessionChannel, max_claimable: int) -> None:
        self._before.setdefault(channel.channel_id, channel.signed_max)
        self._signed.setdefault(channel.channel_id, set()).add(max_claimable)

    def owed_before(self, channel: SessionChannel) -> int:
        """The highest voucher this wallet had signed on the channel when the call began (its record)."""
        return self._before.get(channel.channel_id, channel.signed_max)

    def signed(self, channel_id: str, max_claimable: int) -> bool:
        return max_claimable in self._signed.get(channel_id, ())


class _Tries:
    def __init__(self, busy: int) -> None:
        self.left = {"resync": _MAX_RESYNCS, "busy": busy, "cover": _MAX_COVER_RETRIES}
        self.busy_waits = 0

    def take(self, kind: str) -> bool:
        if self.left[kind] <= 0:
            return False
        self.left[kind] -= 1
        return True


class SessionPayer:
    """The session half of a paying client: ``send`` is the client's request-with-retries."""

    def __init__(
        self,
        account: LocalAccount,
        settings: SessionSettings,
        store: SessionStore,
        spend: SpendControls,
        budget: Budget,
        send: Send,
        error_of: ErrorOf,
    ) -> None:
        self.account = account
        self.settings = settings
        self.store = store
        self.spend = spend
        self._budget = budget
        self._send = send
        self._error_of = error_of
        self._reader = ChannelReader(settings.rpc_urls) if settings.rpc_urls else None
        self._locks: dict[tuple[str, int, str, str], asyncio.Lock] = {}
        self._escrow: dict[str, int] = {}  # per channel: deposited by this client, not yet charged or refunded

    async def aclose(self) -> None:
        if self._reader is not None:
            await self._reader.aclose()

    # --------------------------------------------------------------------------------------------- channels

    def find(self, offer: SessionOffer, origin: str) -> SessionChannel | None:
        """This wallet's newest channel for the offer's terms at ``origin``."""
        me = self.account.address.lower()
        matches = [
            c
            for c in self.store.channels()
            if c.origin == origin
            and c.chain_id == offer.chain_id
            and c.payer == me
            and c.pay_to == offer.pay_to
            and c.asset == offer.asset
            and c.config.receiver_authorizer == offer.receiver_authorizer
            and c.config.withdraw_delay == offer.withdraw_delay
        ]
        return max(matches, key=lambda c: c.opened_at) if matches else None

    def _lock(self, offer: SessionOffer, origin: str) -> asyncio.Lock:
        return self._locks.setdefault((origin, offer.chain_id, offer.pay_to, offer.asset), asyncio.Lock())

    def _new_channel(self, offer: SessionOffer, origin: str) -> SessionChannel:
        config = channel_config(self.account.address, offer, new_salt())
        now = time.time()
        return SessionChannel(
            channel_id=channel_id(config, offer.chain_id),
            origin=origin,
            network=offer.network,
            chain_id=offer.chain_id,
            config=config,
            opened_at=now,
            updated_at=now,
        )

    def _deposit_for(self, offer: SessionOffer, channel: SessionChannel | None, top_up: int | None) -> int:
        """What this payment deposits (0: none), within ``max_per_payment``."""
        need = offer.amount if channel is None else channel.charged + offer.amount - channel.balance
        if top_up is None and need <= 0:
            return 0
        wanted = top_up if top_up is not None else self.settings.deposit or offer.min_deposit
        amount = max(wanted, offer.min_deposit, need)
        cap = self.spend.max_per_payment
        if cap is not None and amount > cap:
            raise PaymentRefused(
                f"the channel needs a deposit of ${format_usd(amount)}; max_per_payment is ${format_usd(cap)}",
                status=402,
                reason="amount_over_limit",
            )
        return amount

    def _allow(self, offer: SessionOffer) -> None:
        refusal = self.spend.refusal(amount=offer.amount, network=offer.network, asset=offer.asset)
        if refusal is not None:
            refusal.status = 402
            raise refusal

    # ----------------------------------------------------------------------------------------------- paying

    async def pay(
        self,
        offer: SessionOffer,
        origin: str,
        method: str,
        url: str,
        *,
        content: bytes | None,
        params: Mapping[str, str | int] | None,
        headers: Mapping[str, str],
        top_up: int | None = None,
        preemptive: bool = False,
        call: SessionCall | None = None,
    ) -> tuple[httpx.Response, SessionOffer]:
        """Send the request paid through the offer's channel: (the answer, any status but 402; the offer as the
        server last stated it). Raises :class:`PaymentRefused` (spend controls) or :class:`PaymentFailed`.
        ``preemptive``: the offer comes from an earlier 402 of this URL; a 402 that is no session matter is
        returned for the caller to pay afresh. ``call``: the logical call this payment belongs to (a caller that
        may pay one call twice, preemptively then afresh, passes the same one)."""
        call = call if call is not None else SessionCall()
        async with self._lock(offer, origin):
            tries = _Tries(self.settings.busy_retries)
            first = True
            while True:
                self._allow(offer)
                channel = self.find(offer, origin)
                deposit = self._deposit_for(offer, channel, top_up)
                top_up = None
                channel = channel or self._new_channel(offer, origin)
                response, channel = await self._attempt(
                    offer, channel, deposit, call, method, url, content=content, params=params, headers=headers
                )
                if response.status_code != 402:
                    return response, offer
                offer = self._current(offer, response)
                reason, message = self._error_of(response)
                if not await self._recover(reason, response, channel, tries, call):
                    if preemptive and first:
                        return response, offer
                    raise PaymentFailed(f"the server refused the session payment: {message}", status=402, reason=reason)
                first = False

    async def _recover(
        self,
        reason: str | None,
        response: httpx.Response,
        ch: SessionChannel,
        tries: _Tries,
        call: SessionCall,
        *,
        paying: bool = True,
    ) -> bool:
        """Can the payment (or refund) go on after this 402? The channel's record is corrected as the 402 says."""
        if reason in _RESYNC and tries.take("resync"):
            state = corrective_state(_payment_required(response), ch.channel_id)
            self.store.put(await self._resync(ch, state, call))
            return True
        if reason == reasons.SESSION_CHANNEL_BUSY and tries.take("busy"):
            wait = self.settings.busy_backoff * 2**tries.busy_waits
            tries.busy_waits += 1
            await asyncio.sleep(random.uniform(wait / 2, wait))
            return True
        if not paying:
            return False
        if reason == reasons.SESSION_CUMULATIVE_EXCEEDS_BALANCE and tries.take("cover"):
            onchain = await self._onchain(ch)
            balance = onchain.balance if onchain is not None else ch.charged  # unknown: deposit before going on
            self.store.put(ch.replace(balance=min(balance, ch.balance), updated_at=time.time()))
            return True
        if reason == reasons.SESSION_CHANNEL_NOT_FOUND and tries.take("cover"):
            self.store.put(ch.replace(balance=0, updated_at=time.time()))  # our deposit never landed
            return True
        return False

    def _current(self, offer: SessionOffer, response: httpx.Response) -> SessionOffer:
        """The offer as this 402 states it now (the price may have changed): same channel terms, same network."""
        for fresh in session_offers(_payment_required(response)):
            if fresh.same_terms(offer):
                return fresh
        return offer

    async def _attempt(
        self,
        offer: SessionOffer,
        channel: SessionChannel,
        deposit: int,
        call: SessionCall,
        method: str,
        url: str,
        *,
        content: bytes | None,
        params: Mapping[str, str | int] | None,
        headers: Mapping[str, str],
    ) -> tuple[httpx.Response, SessionChannel]:
        """One presentation: reserve, sign, persist, send, and book what the answer says."""
        cid = channel.channel_id
        voucher_max = channel.charged + offer.amount
        escrow = self._escrow.get(cid, 0)
        if deposit:
            self._budget.reserve(deposit)
            escrow += deposit
            self._escrow[cid] = escrow
        fresh = offer.amount - min(offer.amount, escrow)  # the part of the price no deposit of ours covers
        try:
            self._budget.reserve(fresh)
        except PaymentRefused:
            self._give_back(cid, deposit)
            raise
        charge = offer.amount  # until the answer says otherwise: all the voucher allows
        landed: bool | None = None  # did the deposit land? None: not known
        sent = False
        try:
            call.signing(channel, voucher_max)
            voucher = sign_voucher(self.account, cid, voucher_max, offer.chain_id)
            dep = sign_deposit(self.account, offer, cid, deposit) if deposit else None
            channel = channel.replace(signed_max=max(channel.signed_max, voucher_max), updated_at=time.time())
            # Before it leaves: a deposit's salt names its money; and the server holds this voucher whatever becomes
            # of its answer, so a call after a lost answer (or a crash) owes up to it (SessionCall trusts no more).
            self.store.put(channel)
            value = session_header(
                offer, "deposit" if dep is not None else "voucher", channel.config, voucher, deposit=dep
            )
            sent = True
            response, uncertain = await self._send(
                method, url, content=content, params=params, headers={**headers, "PAYMENT-SIGNATURE": value}
            )
            status = response.status_code
            if 200 <= status < 300:
                landed = True if deposit else None
                receipt = session_receipt(response.headers)
                if (
                    receipt is not None
                    and receipt.success
                    and receipt.charged is not None
                    and receipt.charged <= offer.amount
                    and receipt.cumulative == channel.charged + receipt.charged
                ):
                    charge = receipt.charged
                    channel = channel.replace(charged=receipt.cumulative)
            elif not uncertain:  # only a 2xx is charged; an attempt whose fate is unknown may have been
                charge = 0
                reason = self._error_of(response)[0] if status == 402 else None
                if deposit and status == 402 and reason not in _AFTER_DEPOSIT:
                    landed = False  # refused before the deposit was executed
        finally:
            if not sent:  # failed before anything left: nothing was paid
                charge, landed = 0, (False if deposit else None)
            used = min(charge, self._escrow.get(cid, 0))
            self._escrow[cid] = self._escrow.get(cid, 0) - used
            self._budget.refund(fresh - (charge - used))
            if landed is False:
                self._give_back(cid, deposit)
        if landed:
            channel = channel.replace(balance=channel.balance + deposit, deposited=channel.deposited + deposit)
        elif deposit and landed is None:
            onchain = await self._onchain(channel)
            if onchain is not None:
                channel = channel.replace(balance=onchain.balance)
        channel = channel.replace(updated_at=time.time())
        try:
            self.store.put(channel)
        except OSError:
            # The answer is paid for: it is the caller's whatever the file says. The voucher was recorded before it
            # left, so the next call owes up to it and resynchronises from the server's state.
            log.warning("could not record a session channel after its answer", exc_info=True)
        return response, channel

    def _give_back(self, cid: str, deposit: int) -> None:
        if deposit:
            self._escrow[cid] = max(self._escrow.get(cid, 0) - deposit, 0)
            self._budget.refund(deposit)

    # ------------------------------------------------------------------------------------------ resynchronise

    async def _onchain(self, ch: SessionChannel) -> OnchainChannel | None:
        return None if self._reader is None else await self._reader.channel(ch.network, ch.chain_id, ch.channel_id)

    async def _resync(self, ch: SessionChannel, state: CorrectiveState | None, call: SessionCall) -> SessionChannel:
        """The channel as the corrective 402 says, if this wallet provably owed that much before ``call`` began
        (docs/sessions.md)."""
        if state is None:
            raise PaymentFailed(
                "the server's corrective 402 carries no state for this channel", status=402, reason="session_resync"
            )
        # Every voucher signed before this call is claimable: owing up to it is no news. One this call signed is
        # not: the server that refused it may not count it as charged and have the call paid again on top.
        trusted = call.owed_before(ch)
        signed = ch.signed_max
        if (
            state.signed_max is not None
            and state.signature is not None
            and signed_by(ch.config.payer_authorizer, ch.channel_id, state.signed_max, state.signature, ch.chain_id)
        ):
            signed = max(signed, state.signed_max)
            if not call.signed(ch.channel_id, state.signed_max):  # another process's, or one from before the call
                trusted = max(trusted, state.signed_max)
        balance = state.balance if state.balance is not None else ch.balance
        onchain = await self._onchain(ch)
        if onchain is not None:
            if state.charged < onchain.total_claimed:
                raise PaymentFailed(
                    f"the server says {state.charged} was charged, below the {onchain.total_claimed} claimed on chain",
                    status=402,
                    reason="session_resync",
                )
            trusted = max(trusted, onchain.total_claimed)
            balance = onchain.balance
        if state.charged > trusted:
            raise PaymentFailed(
                f"the server says {state.charged} was charged on channel {ch.channel_id}, more than this wallet "
                f"provably owed before this request ({trusted}); not paying on from there",
                status=402,
                reason="session_resync",
            )
        return ch.replace(charged=state.charged, balance=balance, signed_max=signed, updated_at=time.time())

    # ------------------------------------------------------------------------------------ open and refund

    async def probe(
        self, method: str, url: str, headers: Mapping[str, str]
    ) -> tuple[SessionOffer, str, httpx.Response]:
        """Ask ``url`` unpaid for its 402: its first session offer this client may pay, and the server's origin."""
        response, _ = await self._send(method, url, headers=headers)
        if response.status_code != 402:
            raise ApiError(
                f"{method} {url} answered {response.status_code} unpaid, not 402: nothing to pay there",
                status=response.status_code,
                reason="not_a_paid_route",
            )
        offers = session_offers(_payment_required(response))
        allowed = [
            o for o in offers if self.spend.allows_network(o.network) and self.spend.allows_asset(o.network, o.asset)
        ]
        if not allowed:
            raise PaymentRefused(
                "the 402 offers no batch-settlement option this client may pay"
                + (" (its networks or assets are not allowed)" if offers else ""),
                status=402,
                reason="no_session_offer",
            )
        return allowed[0], origin_of(response.request.url), response

    async def refund(
        self, offer: SessionOffer, origin: str, method: str, url: str, *, amount: int | None, headers: Mapping[str, str]
    ) -> SessionRefund:
        """Ask the server to return what the channel holds beyond what it charged (or ``amount`` of it)."""
        if amount is not None and amount <= 0:
            raise ValueError("a refund's amount must be positive")
        call = SessionCall()
        async with self._lock(offer, origin):
            tries = _Tries(self.settings.busy_retries)
            while True:
                ch = self.find(offer, origin)
                if ch is None:
                    raise X402ClientError(
                        f"no channel with {origin} in this client's session store", reason="session_not_found"
                    )
                call.signing(ch, ch.charged)
                voucher = sign_voucher(self.account, ch.channel_id, ch.charged, ch.chain_id)
                value = session_header(offer, "refund", ch.config, voucher, refund_amount=amount)
                response, _ = await self._send(method, url, headers={**headers, "PAYMENT-SIGNATURE": value})
                receipt = session_receipt(response.headers)
                if 200 <= response.status_code < 300 and receipt is not None and receipt.success:
                    returned = receipt.amount or 0
                    ch = ch.replace(
                        balance=max(ch.balance - returned, ch.charged),
                        refunded=ch.refunded + returned,
                        updated_at=time.time(),
                    )
                    self.store.put(ch)
                    self._give_back(ch.channel_id, min(returned, self._escrow.get(ch.channel_id, 0)))
                    return SessionRefund(channel=ch, amount=returned, tx_hash=receipt.transaction)
                reason, message = self._error_of(response)
                if response.status_code == 402:
                    offer = self._current(offer, response)
                    if await self._recover(reason, response, ch, tries, call, paying=False):
                        continue
                raise ApiError(f"the server refused the refund: {message}", status=response.status_code, reason=reason)
