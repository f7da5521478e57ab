"""Sessions: a ``batch-settlement`` payment from the presented header to a committed charge (docs/sessions.md).

:meth:`Sessions.begin` checks the payment without I/O, locks its channel in the channel store (one request per
channel at a time, across every gateway instance), executes a deposit on chain when the payment carries one, and
checks that the channel covers the voucher. The returned :class:`SessionRequest` is the same kind of handle the
HTTP layer gets for any payment: the charge is decided from the answer (the route's price, or a metered one up to
it), committed in the store *before* the answer leaves, and nothing is charged for an answer that is not served.
A cooperative refund never reaches the app: the handle carries the answer.

No RPC call on the hot path: a voucher on a known channel costs two store operations (lock, commit) and one
signature recovery.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from typing import Any

from coincurve import PrivateKey
from eth_account import Account

from gateway.chain.network import Network
from gateway.chain.watched import Watched
from gateway.config import GatewayConfig
from gateway.errors import GatewayError, PaymentInFlight, PaymentRequired, Resynchronise, StoreUnavailable
from gateway.schemes.base import Presented, PricedRoute
from gateway.schemes.batch.check import CheckedPayment, check_session_payment, min_deposit
from gateway.schemes.batch.meter import Meter
from gateway.schemes.batch.onchain import (
    ChannelChain,
    VoucherClaim,
    claim_calldata,
    multicall_calldata,
    refund_calldata,
)
from gateway.storage.channels import Channel, ChannelBusy, ChannelMismatch, ChannelStore
from gateway.x402 import reasons
from gateway.x402.challenge import Requirement
from gateway.x402.codec import RawHeaders, dumps, encode_header
from gateway.x402.sessions import (
    DEPOSIT_COLLECTOR,
    SCHEME,
    SETTLEMENT_CONTRACT,
    ChannelSnapshot,
    claim_batch_digest,
    corrective_extra,
    parse_session_payment,
    refund_digest,
)

log = logging.getLogger("gateway.sessions")

__all__ = ["SessionRequest", "Sessions", "sign_digest"]


def sign_digest(key: PrivateKey, digest: bytes) -> bytes:
    """A 65-byte (r, s, v) signature with v in 27/28, as the contract's ECDSA recovery takes it."""
    sig = key.sign_recoverable(digest, hasher=None)
    return sig[:64] + bytes([sig[64] + 27])


def snapshot(channel: Channel, charged: int | None = None) -> ChannelSnapshot:
    return ChannelSnapshot(
        channel_id=channel.channel_id,
        balance=channel.balance,
        total_claimed=channel.total_claimed,
        withdraw_requested_at=channel.withdraw_requested_at,
        refund_nonce=channel.refund_nonce,
        charged=channel.charged if charged is None else charged,
    )


class Sessions:
    """The session side of the payment engine: one channel store, the authorizer key, a contract per network."""

    def __init__(
        self,
        config: GatewayConfig,
        store: ChannelStore,
        networks: Mapping[str, Network],
        *,
        instance: str,
        lease: float,
        alive: Callable[[str], Awaitable[bool]],
    ) -> None:
        self.config = config
        self.store = store
        self.instance = instance
        self.lease = lease
        self._alive = alive
        # This process's requests that hold (or are taking) a channel lock. A lock of ours whose request is not
        # here ended without reaching the store (its commit or release failed in a store outage): it is taken
        # over at once, as a dead process's would be, instead of blocking the payer for a whole lease.
        self._in_flight: set[str] = set()
        key = config.sessions.authorizer_key
        self._key = None if key is None else PrivateKey(bytes.fromhex(key.reveal().removeprefix("0x")))
        self.authorizer = "" if key is None else str(Account.from_key(key.reveal()).address)
        self.networks = networks
        self.chains: dict[str, ChannelChain] = {}
        for name, net in networks.items():
            if net.relayer is not None:
                self.chains[name] = ChannelChain(
                    net.rpc,
                    net.relayer,
                    net.watcher,
                    timeout=config.payment.settle_timeout,
                    confirmations=net.config.confirmations,
                )
                net.deposit_gone.append(self._deposit_gone)

    def __repr__(self) -> str:
        return f"Sessions(authorizer={self.authorizer or None}, networks={sorted(self.chains)})"

    def sign(self, digest: bytes) -> bytes:
        assert self._key is not None, "sessions are offered only with an authorizer key (checked at load)"
        return sign_digest(self._key, digest)

    def chain_for(self, req: Requirement) -> ChannelChain:
        return self.chains[req.network]

    def watch_deposit(self, checked: CheckedPayment, tx_hash: str, amount: int) -> None:
        """A deposit vouchers will be served on: watched until final by the network's finality tracker, like a
        settlement (docs/threat-model.md T28). Never waits."""
        req = checked.requirement
        what = Watched(
            payer=DEPOSIT_COLLECTOR.lower(),  # the collector forwards the payer's money to the contract:
            pay_to=SETTLEMENT_CONTRACT.lower(),  # that Transfer is the deposit's
            value=amount,
            channel=checked.channel_id,
        )
        key = f"deposit:{req.chain_id}:{tx_hash.lower()}"
        self.networks[req.network].watch_transaction("deposit", key, checked.payment.config.token, tx_hash, what)

    async def _deposit_gone(self, network: str, channel_id: str) -> None:
        """A watched deposit is not on the chain (a reorg dropped it, for a while or for good): the channel's mirror
        takes the chain's state, whose balance lacks it, so vouchers beyond what is really deposited are refused
        (and a refusal reads the chain again: a deposit mined again is found then)."""
        chain = self.chains.get(network)
        if chain is None:
            return
        synced = await self.store.sync(channel_id, await chain.state(channel_id), now=time.time())
        if synced is not None:
            log.warning(
                "a session deposit is not on the chain: the channel's balance is the chain's",
                extra={"network": network, "channel_id": channel_id, "balance": synced.balance},
            )

    # ------------------------------------------------------------------------------------------------- requests

    async def begin(self, route: PricedRoute, presented: Presented) -> SessionRequest:
        now = time.time()
        pay = self.config.payment
        payment = parse_session_payment(presented.value, presented.header)
        checked = check_session_payment(
            payment,
            route.sessions,
            authorizer=self.authorizer,
            withdraw_delay=self.config.sessions.withdraw_delay,
            deposit_floor=min_deposit(self.config, route.config),
            now=now,
            min_validity=pay.min_validity_seconds,
            clock_skew=pay.clock_skew_seconds,
        )
        chain = self.chain_for(checked.requirement)
        # The voucher's base is its cumulative amount less the ceiling it was signed for: the route's price, or a
        # price it had a moment ago that a 402 still being answered showed (gateway/schemes/prices.py).
        ceilings = _ceilings(checked, route, now)
        first = next((c for c in ceilings if _expected(c) >= 0), None)
        if first is None:  # below any base: the client's view is off; tell it ours
            channel = await self.store.get(checked.channel_id) or await self._first_sight(checked, chain, now)
            raise self._mismatch(checked, channel)
        holder = f"{self.instance}.{uuid.uuid4().hex}"
        self._in_flight.add(holder)
        try:
            try:
                checked, locked = await self._lock(first, holder, now, ceilings)
            except KeyError:
                # A channel the store does not know (one read of the chain, then the lock): hot requests never
                # get here.
                await self._first_sight(checked, chain, now)
                checked, locked = await self._lock(first, holder, now, ceilings)
        except BaseException:
            self.ended(holder)
            raise
        request = SessionRequest(self, checked, route, locked, holder)
        try:
            if payment.kind == "deposit":
                await request.deposit(chain, self.config.sessions.withdraw_margin)
            if payment.kind == "refund":
                await request.refund(chain)
            else:
                await request.check_cover(chain, self.config.sessions.withdraw_margin, now)
        except BaseException:
            await request.release_quietly()
            raise
        return request

    async def _first_sight(self, checked: CheckedPayment, chain: ChannelChain, now: float) -> Channel:
        """A channel the store does not know: new (a deposit opens it), or known only to the chain (a store that
        lost it). The record starts from the chain's state, ``charged`` at what was claimed."""
        state = await chain.state(checked.channel_id)
        if checked.payment.kind != "deposit" and state.balance == 0:
            raise PaymentRequired("no such channel: open it with a deposit", reason=reasons.SESSION_CHANNEL_NOT_FOUND)
        cfg = checked.payment.config
        fresh = Channel(
            channel_id=checked.channel_id,
            chain_id=checked.requirement.chain_id,
            payer=cfg.payer,
            payer_authorizer=cfg.payer_authorizer,
            receiver=cfg.receiver,
            receiver_authorizer=cfg.receiver_authorizer,
            token=cfg.token,
            withdraw_delay=cfg.withdraw_delay,
            salt=cfg.salt,
        ).with_onchain(state, now=now)
        return await self.store.open(fresh, now=now)

    async def _lock(
        self, checked: CheckedPayment, holder: str, now: float, ceilings: tuple[CheckedPayment, ...] = ()
    ) -> tuple[CheckedPayment, Channel]:
        """Lock the channel for ``checked``'s voucher; on a base mismatch, once more with the one of ``ceilings``
        (the same payment at an earlier price) whose base is the channel's."""
        voucher = checked.payment.voucher
        args: dict[str, Any] = {
            "expected_charged": _expected(checked),
            "voucher_max": voucher.max_claimable,
            "signature": "0x" + voucher.signature.hex(),
            "lease": self.lease,
        }
        try:
            try:
                return checked, await self.store.begin(checked.channel_id, holder, now=now, **args)
            except ChannelBusy as busy:
                # Held by a request of a gateway process that died, or by one of ours that ended while the store
                # was down: nothing of it will ever finish (T31).
                if busy.holder is None or not await self._holder_is_gone(busy.holder):
                    raise
                log.warning("taking over a session channel whose request is gone")
                return checked, await self.store.begin(
                    checked.channel_id, holder, now=time.time(), take_over_from=busy.holder, **args
                )
        except ChannelMismatch as exc:
            charged = exc.channel.charged
            other = next((c for c in ceilings if c is not checked and _expected(c) == charged), None)
            if other is None:
                raise self._mismatch(checked, exc.channel) from None
        return await self._lock(other, holder, now)

    async def _holder_is_gone(self, holder: str) -> bool:
        instance, dot, _ = holder.partition(".")
        if not dot:
            return False
        if instance == self.instance:
            return holder not in self._in_flight
        return not await self._alive(instance)

    def ended(self, holder: str) -> None:
        """``holder``'s request is over (committed, released, or failed trying): a lock it left is stale."""
        self._in_flight.discard(holder)

    @staticmethod
    def _mismatch(checked: CheckedPayment, channel: Channel) -> Resynchronise:
        """The corrective 402: the client's voucher base is not ours; it resynchronises from what we send."""
        return Resynchronise(
            "the voucher's cumulative base does not match the server's channel state",
            reason=reasons.SESSION_CUMULATIVE_MISMATCH,
            scheme=SCHEME,
            network=checked.requirement.caip2,
            extra=corrective_extra(snapshot(channel), channel.signed_max, channel.signature),
        )


def _expected(checked: CheckedPayment) -> int:
    """The channel's ``charged`` the voucher was signed on: its cumulative amount less the ceiling (a refund
    claims nothing more)."""
    refund = checked.payment.kind == "refund"
    return checked.payment.voucher.max_claimable - (0 if refund else checked.requirement.amount)


def _ceilings(checked: CheckedPayment, route: PricedRoute, now: float) -> tuple[CheckedPayment, ...]:
    """``checked`` at the route's price, then at each earlier price still honoured (none for a refund)."""
    if checked.payment.kind == "refund":
        return (checked,)
    req = checked.requirement
    earlier = (
        replace(checked, requirement=replace(req, amount=p.amount))
        for p in route.earlier
        if now <= p.until and p.amount != req.amount
    )
    return (checked, *earlier)


class SessionRequest:
    """One session request holding its channel's lock, on its way to a committed charge (or none)."""

    scheme = SCHEME
    version = 2
    resumed = False

    def __init__(
        self, sessions: Sessions, checked: CheckedPayment, route: PricedRoute, channel: Channel, holder: str
    ) -> None:
        self._sessions = sessions
        self._checked = checked
        self.channel = channel  # as locked (the mirror refreshed by a deposit)
        self._holder = holder
        self._route = route
        self._meter = Meter(route.config.meter, checked.requirement.amount)
        self.charge = checked.requirement.amount  # the ceiling, until the answer says otherwise
        self.paid = False  # the charge is decided (the answer succeeded); committed by finish(served=True)
        self.delivered = False
        self.committed = False
        self.tx_hash: str | None = None  # the deposit's transaction, when this request carried one
        self.deposited: int | None = None
        self.answer: tuple[int, RawHeaders, bytes] | None = None  # a refund: answered without the app

    @property
    def requirement(self) -> Requirement:
        return self._checked.requirement

    @property
    def payer(self) -> str:
        return self._checked.payer

    @property
    def charges_after_serving(self) -> bool:
        return True  # a session's charge depends on the answer: never settled before the app runs

    @property
    def store(self) -> ChannelStore:
        return self._sessions.store

    @property
    def channel_id(self) -> str:
        return self._checked.channel_id

    # ------------------------------------------------------------------------------------------------- begin

    async def deposit(self, chain: ChannelChain, margin: float) -> None:
        """Execute the deposit this payment carries (the lock is held: no voucher on this channel meanwhile).

        Only for a request that the channel, with this deposit, would serve: checked on the chain's word before any
        transaction, so that a deposit whose request is refused anyway (a voucher it does not cover, a channel
        whose withdrawal ends within ``margin``) costs us no gas. Otherwise a payer could have us send deposits and
        then refund them cooperatively, over and over, without ever being charged (docs/threat-model.md T48)."""
        dep = self._checked.payment.deposit
        assert dep is not None
        before = await chain.state(self.channel_id)
        now = time.time()
        self.channel = await self.store.sync(self.channel_id, before, now=now) or self.channel
        if before.withdraw_requested_at:
            now = max(now, await chain.latest_time())  # when a withdrawal may end is the chain's clock's to say
        self._cover(margin, now, replace(self.channel, balance=before.balance + dep.amount))
        self.tx_hash = await chain.deposit(self._checked.payment.config, dep)
        self.deposited = dep.amount
        self._sessions.watch_deposit(self._checked, self.tx_hash, dep.amount)
        state = await chain.state(self.channel_id)
        synced = await self.store.sync(self.channel_id, state, now=time.time())
        if synced is not None:
            self.channel = synced

    async def check_cover(self, chain: ChannelChain, margin: float, now: float) -> None:
        """The voucher is within the channel's balance and the channel is not closing. A refusal is decided on the
        chain's word, not the mirror's: the mirror is read again first (a deposit someone else sent, a withdrawal
        that finished), which costs an RPC call on this refusal path only. So is every voucher on a channel being
        withdrawn: its balance may be gone any moment, and when it may go is the chain's clock's to say, not ours
        (a gateway clock behind the chain's would serve on money already withdrawn; docs/sessions.md)."""
        withdrawing = bool(self.channel.withdraw_requested_at)
        if withdrawing:
            await self._sync(chain, now)
            now = max(now, await chain.latest_time())
        try:
            self._cover(margin, now)
        except PaymentRequired:
            if withdrawing:
                raise  # decided on the chain's word already
            await self._sync(chain, now)
            self._cover(margin, now)

    async def _sync(self, chain: ChannelChain, now: float) -> None:
        synced = await self.store.sync(self.channel_id, await chain.state(self.channel_id), now=now)
        self.channel = synced or self.channel

    def _cover(self, margin: float, now: float, channel: Channel | None = None) -> None:
        ch = channel or self.channel
        voucher_max = self._checked.payment.voucher.max_claimable
        if voucher_max > ch.balance:
            raise PaymentRequired(
                "the voucher exceeds the channel's balance: deposit more",
                reason=reasons.SESSION_CUMULATIVE_EXCEEDS_BALANCE,
            )
        if ch.withdraw_requested_at and now >= ch.withdraw_requested_at + ch.withdraw_delay - margin:
            # What we serve now could not be claimed before the payer takes the balance back (docs/sessions.md).
            raise PaymentRequired("the channel is being withdrawn", reason=reasons.SESSION_WITHDRAWING)

    async def refund(self, chain: ChannelChain) -> None:
        """A cooperative refund: claim what we charged, then return the rest (or the amount asked) to the payer,
        in one transaction; the answer is built here and the app never runs."""
        payment = self._checked.payment
        state = await chain.state(self.channel_id)
        ch = self.channel
        remainder = state.balance - ch.charged
        amount = payment.refund_amount if payment.refund_amount is not None else remainder
        if remainder <= 0 or amount > remainder:
            raise PaymentRequired(
                f"nothing to refund beyond what was charged (refundable {max(remainder, 0)})",
                reason=reasons.SESSION_REFUND_NO_BALANCE,
            )
        floor = min(remainder, min_deposit(self._sessions.config, self._route.config))
        if amount < floor:
            # Every refund is a transaction we pay for: a partial one must be worth it (docs/sessions.md).
            raise PaymentRequired(
                f"a partial refund must be at least {floor} atomic units (or the whole remainder)",
                reason=reasons.SESSION_REFUND_AMOUNT_INVALID,
            )
        chain_id = self.requirement.chain_id
        calls: list[bytes] = []
        if ch.charged > state.total_claimed:
            claim = VoucherClaim(payment.config, payment.voucher.max_claimable, payment.voucher.signature, ch.charged)
            digest = claim_batch_digest([(self.channel_id, claim.max_claimable, claim.total_claimed)], chain_id)
            calls.append(claim_calldata([claim], self._sessions.sign(digest)))
        signature = self._sessions.sign(refund_digest(self.channel_id, state.refund_nonce, amount, chain_id))
        calls.append(refund_calldata(payment.config, amount, state.refund_nonce, signature))
        data = calls[0] if len(calls) == 1 else multicall_calldata(calls)
        gas = await chain.estimate(data)
        if gas is None:
            raise PaymentRequired("the refund would revert", reason=reasons.SESSION_REFUND_FAILED)
        # The mirror learns the lower balance before the refund leaves: if its outcome is never learnt (a crash, an
        # unknown broadcast), vouchers are checked against too little, never against money that is gone.
        await self.store.sync(self.channel_id, replace(state, balance=state.balance - amount), now=time.time())
        self.tx_hash, _receipt = await chain.send(data, gas + gas // 5)
        after = await chain.state(self.channel_id)
        now = time.time()
        await self.store.sync(self.channel_id, after, now=now)
        try:
            committed = await self.store.commit(self.channel_id, self._holder, 0, now=now)
        finally:
            self._sessions.ended(self._holder)
        self.committed = committed is not None
        self.channel = committed or ch
        self.paid = True
        self.charge = 0
        body = dumps({"message": "Refund acknowledged", "channelId": self.channel_id, "amount": str(amount)})
        receipt = self._receipt_body(success=True)
        receipt["amount"] = str(amount)
        receipt["extra"] = {"channelState": {"chargedCumulativeAmount": str(ch.charged)}}
        headers: RawHeaders = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"payment-response", encode_header(receipt).encode("ascii")),
        ]
        self.answer = (200, headers, body)

    # ----------------------------------------------------------------------------------------------- answer

    def metered(self, headers: RawHeaders) -> RawHeaders:
        """Read the charge from the answer's headers (a metered route), and strip the meter's header."""
        charge, kept = self._meter.from_headers(headers)
        if charge is not None:
            self.charge = charge
        return kept

    @property
    def reads_body(self) -> bool:
        """This route's charge is in the answer's JSON (:mod:`gateway.http.metering` holds the answer for it)."""
        return self._meter.reads_body

    def charge_from_body(self, body: bytes, *, complete: bool) -> None:
        self.charge = self._meter.from_json(body) if complete else self._meter.fallback()

    async def settle(self, *, simulate_again: bool = False) -> str:
        """The answer succeeded: its charge is decided (committed by ``finish``, before the answer leaves)."""
        self.paid = True
        return self.tx_hash or ""

    async def finish(self, *, served: bool) -> None:
        if self.committed:
            return
        if not served:
            await self.release_quietly()
            return
        try:
            committed = await self.store.commit(self.channel_id, self._holder, self.charge, now=time.time())
        finally:
            self._sessions.ended(self._holder)  # committed, or the store failed: either way this request is over
        if committed is None:
            # Our lock lapsed and another request took the channel: its voucher base is ours no more.
            raise PaymentInFlight("this session request lost its channel", reason=reasons.PAYMENT_IN_FLIGHT)
        self.committed = True
        self.channel = committed

    async def release_quietly(self) -> None:
        if self.committed:
            return
        try:
            await self.store.release(self.channel_id, self._holder)
        except (GatewayError, StoreUnavailable):
            log.warning("could not release a session channel; the next request on it takes it over")
        finally:
            self._sessions.ended(self._holder)

    async def hand_over(self) -> None:
        return None

    def _receipt_body(self, *, success: bool, reason: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "success": success,
            "transaction": self.tx_hash or "",
            "network": self.requirement.caip2,
            "payer": self.payer,
        }
        if reason:
            body["errorReason"] = reason
        return body

    def receipt(self, *, success: bool = True, reason: str | None = None) -> tuple[bytes, bytes]:
        """``PAYMENT-RESPONSE``: the charge and the channel with its new cumulative, which the client checks
        against its own (previous + charge) before it advances (docs/sessions.md)."""
        body = self._receipt_body(success=success, reason=reason)
        if success:
            before = (
                self.channel
                if not self.committed
                else replace(self.channel, charged=self.channel.charged - self.charge)
            )
            body["amount"] = "" if self.deposited is None else str(self.deposited)
            body["extra"] = {
                "chargedAmount": str(self.charge),
                "channelState": snapshot(before, before.charged + self.charge).wire(),
            }
        return b"payment-response", encode_header(body).encode("ascii")
