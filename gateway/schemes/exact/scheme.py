"""The x402 ``exact`` scheme on EVM: an EIP-3009 authorization that this gateway (or its facilitator) settles.

Sans-IO checks first (:mod:`.check`: garbage costs no I/O), then the claim on ``(chain, asset, payer, nonce)``,
then one batched RPC round trip (:mod:`.onchain`). Settlement goes through the network's relayer (batched where
the chain has Multicall3) or its facilitator; either way the money counts only when our own RPC shows the
authorization's ``AuthorizationUsed`` followed by its ``Transfer`` to us (docs/protocol.md §2).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.bazaar import facilitator_listing
from gateway.chain.facilitator import FacilitatorClient, FacilitatorUnavailable
from gateway.chain.network import Network
from gateway.config import GatewayConfig
from gateway.errors import (
    BadGateway,
    PaymentInFlight,
    PaymentReplayed,
    PaymentRequired,
    ServiceUnavailable,
    SettlementFailed,
)
from gateway.schemes.base import RECORD_MARGIN, Claim, Offer, Presented, PricedRoute, effect_key
from gateway.schemes.exact.check import SignatureKind, check_exact, check_window, payment_key, select_requirement
from gateway.schemes.exact.onchain import (
    Settlement,
    block_time,
    find_prior_settlement,
    preflight_exact,
    settlement_calldata,
    settlement_in_receipt,
)
from gateway.storage.receipts import ClaimRecord, ClaimState, Effect
from gateway.x402 import reasons
from gateway.x402.challenge import Requirement
from gateway.x402.payload import ExactPayment, parse_exact_payment

log = logging.getLogger("gateway.payments")


@dataclass(slots=True)
class ExactAttempt:
    """One presented authorization, checked against the route's requirement for the network it names."""

    authorization: ExactPayment
    requirement: Requirement
    kind: SignatureKind
    route: PricedRoute
    method: str
    gas: int = 0  # the simulated settlement gas (local settlement)
    own_tx: str | None = None  # the settlement transaction this claim recorded (or took over), if any
    resumed: bool = False  # this claim existed before (taken over): an earlier settlement of ours may be its own
    block_number: int | None = None  # where the settlement was seen mined, once it was (the ledger records it)
    _calldata: bytes | None = field(default=None, init=False, repr=False)

    @property
    def calldata(self) -> bytes:
        """The ``transferWithAuthorization`` call that settles it, ABI-encoded once: the simulation, the relayer
        and the finality tracker all send or keep these same bytes, and each encoding costs ~30 us."""
        if self._calldata is None:
            self._calldata = settlement_calldata(self.authorization)
        return self._calldata

    @property
    def payer(self) -> str:
        return self.authorization.payer

    @property
    def version(self) -> int:
        return self.authorization.version


ExactClaim = Claim[ExactAttempt]


class ExactScheme:
    name = "exact"

    def __init__(self, config: GatewayConfig, networks: Mapping[str, Network]) -> None:
        self.config = config
        self.networks = networks
        self._listings: dict[tuple[str, str], dict[str, Any]] = {}
        # How long the effect key of a settled transfer is kept: a transfer older than tx_max_age_seconds never
        # pays (as a tx-hash proof or as a prior settlement), so the key outlives the last moment it could be used.
        self._effect_retention = config.payment.tx_max_age_seconds + RECORD_MARGIN

    def accepts(self, presented: Presented) -> bool:
        return True  # every x402 payload header that is not another scheme's

    def offer(self, route: PricedRoute, resource: str, method: str) -> Offer | None:
        return Offer(accepts=route.requirements) if "exact" in route.config.schemes else None

    def parse(self, route: PricedRoute, presented: Presented) -> ExactAttempt:
        payment = parse_exact_payment(presented.value, presented.header)
        if "exact" not in route.config.schemes:
            raise PaymentRequired("this route is not paid with the exact scheme", reason=reasons.UNSUPPORTED_SCHEME)
        req = select_requirement(payment, route.requirements, route.earlier)
        kind = check_exact(payment, req)
        return ExactAttempt(payment, req, kind, route, presented.method)

    async def verify(self, payment: ExactAttempt) -> None:
        return None  # the chain is asked after the claim: concurrent presentations cost one round trip, not N

    def claim_key(self, payment: ExactAttempt, *, now: float) -> tuple[str, float | None]:
        auth = payment.authorization.authorization
        # After validBefore the authorization cannot execute on chain any more; what it paid stays recorded under
        # its transfer's effect key (see _collect), which outlives this record.
        # Bounded by what the window check accepts, so that no authorization can make a record live for ever.
        # Kept as long as a transfer that executed it can still be presented as a tx-hash proof (at most
        # tx_max_age_seconds after validBefore): that proof finds this record and is refused (T26).
        pay = self.config.payment
        latest = now + payment.requirement.max_timeout_seconds + pay.clock_skew_seconds
        kept = pay.tx_max_age_seconds + RECORD_MARGIN
        return payment_key(payment.requirement, auth), min(auth.valid_before, latest) + kept

    async def confirm(self, claim: ExactClaim, record: ClaimRecord, *, now: float) -> None:
        attempt = claim.payment
        attempt.own_tx = record.tx_hash
        attempt.resumed = record.resumed
        if record.state is ClaimState.PAID:
            # A paid payment whose earlier request failed (or whose gateway died): serve it, don't charge. The chain
            # is not asked again: the money moved under this very claim, and its nonce is used on chain by now.
            claim.mark_resumed(record.tx_hash)
            return
        if record.tx_hash:
            # A settlement of this claim was recorded (and may be on its way): whatever goes wrong from here, the
            # claim is kept, never released with that hash in it (a release would let it be settled a second time).
            claim.in_flight(True)
        if record.resumed and record.tx_hash and await self._reconcile(claim, record.tx_hash):
            return
        pay = self.config.payment
        try:
            check_window(
                attempt.authorization,
                attempt.requirement,
                now=int(now),
                min_validity_seconds=self._min_validity(attempt.route),
                clock_skew_seconds=pay.clock_skew_seconds,
            )
        except PaymentRequired as exc:
            # An expired authorization may still have been executed to us by someone else (docs/threat-model.md T9).
            if exc.reason == reasons.VALID_BEFORE_EXPIRED and await self._paid_by_someone_else(claim):
                return
            raise
        await self._preflight(claim, attempt.kind)

    def _min_validity(self, route: PricedRoute) -> int:
        """How long an authorization must still be valid when it is accepted: enough to settle it, and under
        ``settlement = "after"`` also to wait for the upstream first (its read timeout), so the upstream never
        works for an authorization that expires before it can be settled (docs/threat-model.md T32)."""
        pay = self.config.payment
        if route.config.settlement == "after":
            return pay.min_validity_seconds + math.ceil(self.config.upstream.read_timeout)
        return pay.min_validity_seconds

    async def settle(self, claim: ExactClaim, *, simulate_again: bool) -> str:
        attempt = claim.payment
        net = self.networks[attempt.requirement.network]
        if simulate_again:
            # T10: the payer may have drained the balance while the upstream worked. Balance and nonce state only:
            # the simulation of confirm() stands (see preflight_exact).
            await self._preflight(claim, SignatureKind.EOA, simulate=False)  # the signature kind is settled
            if claim.paid:
                return claim.tx_hash or ""
        if attempt.authorization.authorization.valid_before < time.time() + self.config.payment.min_validity_seconds:
            # Never broadcast what cannot succeed: the contract refuses an expired authorization, and the relayer
            # would pay gas for a reverting transaction (a clock jump or a stalled queue can get us here).
            claim.in_flight(False)
            raise SettlementFailed(
                "the authorization expires before it could be settled", reason=reasons.VALID_BEFORE_EXPIRED
            )
        if net.facilitator is not None:
            return await self._settle_remotely(claim, net, net.facilitator)
        return await self._settle_locally(claim, net)

    # ------------------------------------------------------------------------------------------------- chain

    async def _reconcile(self, claim: ExactClaim, tx_hash: str) -> bool:
        """A lapsed claim left a settlement hash behind: find out what happened to it (never re-broadcast)."""
        attempt = claim.payment
        net = self.networks[attempt.requirement.network]
        rpc = net.rpc
        receipt = await rpc.request("eth_getTransactionReceipt", [tx_hash])
        if isinstance(receipt, dict):
            if settlement_in_receipt(receipt, attempt.requirement, attempt.authorization.authorization) is None:
                claim.in_flight(False)  # it reverted and moved nothing: the claim may go if what follows fails
                return False  # verify afresh (maybe someone else settled first)
            # Served only as deep as a first settlement would be (the network's confirmations), and watched until
            # final like one: a reorg may still drop it (docs/threat-model.md T28).
            claim.in_flight(True)
            if not await self._confirmed(claim, net, tx_hash):
                claim.in_flight(False)  # reorganised into a block where it reverted
                return False
            sender = str(receipt.get("from", "")).lower()
            if net.relayer is not None and sender == net.relayer.address.lower():
                _track(net, attempt, tx_hash)
            return True
        known = await rpc.request("eth_getTransactionByHash", [tx_hash])
        if known is not None:
            claim.in_flight(True)  # still in the mempool: keep the claim, tell the client to come back
            raise PaymentInFlight("this payment's settlement is still pending", reason=reasons.SETTLEMENT_PENDING)
        return False  # never reached the network: safe to settle afresh

    async def _collect(self, claim: ExactClaim, found: Settlement, tx_hash: str) -> None:
        """The money is on chain in ``tx_hash``: the claim is PAID and, in the same store step, takes the transfer's
        effect key, the key a tx-hash proof of the same transfer would claim (docs/threat-model.md T26)."""
        req = claim.payment.requirement
        effect = Effect(effect_key(req.chain_id, tx_hash, found.log_index), time.time() + self._effect_retention)
        await claim.mark_paid(tx_hash, effects=(effect,))
        claim.payment.block_number = found.block_number

    async def _paid_by_someone_else(self, claim: ExactClaim) -> bool:
        """Was this authorization already executed to us? Then the money arrived and the payment counts, once.

        Not when a relayer of this deployment (this gateway's, or a peer's sharing the store) executed it in a
        transaction this claim does not know, and the claim is new (not taken over from an earlier owner of the same
        record): then an earlier claim collected it, and only a lost or expired record could make it look new
        (docs/threat-model.md T27, T30; gateway/engine/relayers.py). Not when the execution is older than a transfer
        may be to pay: its effect key may no longer be kept."""
        attempt = claim.payment
        req, auth = attempt.requirement, attempt.authorization.authorization
        net = self.networks[req.network]
        prior = await find_prior_settlement(net.rpc, req, auth)
        if prior is None:
            return False
        mine = prior.tx_hash == (attempt.own_tx or "").lower() or attempt.resumed
        if not mine and await net.settled_by_us(prior.sender):  # (a peer instance's relayer too)
            log.warning(
                "an authorization this gateway settled before was presented again", extra={"tx_hash": prior.tx_hash}
            )
            raise PaymentReplayed("this authorization was already settled by this gateway")
        mined_at = await block_time(net.rpc, prior.block_number)
        if mined_at is None or time.time() - mined_at > self.config.payment.tx_max_age_seconds:
            return False
        log.info("payment settled by a third party", extra={"tx_hash": prior.tx_hash, "payer": auth.from_})
        await self._collect(claim, prior, prior.tx_hash)
        return True

    def _facilitator_payload(self, attempt: ExactAttempt) -> dict[str, Any]:
        """The payment as x402 v2, whatever version the client spoke: the authorization and signature are the
        same; ``accepted`` is the server's own requirement, and ``resource`` / ``extensions`` (what a bazaar
        facilitator catalogues) are the gateway's own listing of the route, never the client's echo: a client must
        not get a route its operator keeps out of discovery catalogued, or describe ours in its own words."""
        key = (attempt.route.config.route, attempt.method)
        listing = self._listings.get(key)
        if listing is None:
            listing = self._listings[key] = facilitator_listing(self.config, attempt.route.config, attempt.method)
        return {
            "x402Version": 2,
            **listing,
            "accepted": attempt.requirement.v2(),
            "payload": attempt.authorization.raw["payload"],
        }

    async def _preflight(self, claim: ExactClaim, kind: SignatureKind, *, simulate: bool = True) -> None:
        attempt = claim.payment
        req = attempt.requirement
        net = self.networks[req.network]
        if net.facilitator is not None:
            verdict = await net.facilitator.verify(2, self._facilitator_payload(attempt), req.v2())
            if verdict.is_valid:
                return
            if verdict.invalid_reason == reasons.NONCE_ALREADY_USED and await self._paid_by_someone_else(claim):
                return
            raise PaymentRequired(
                "the facilitator refused this payment", reason=verdict.invalid_reason or reasons.FACILITATOR_REJECTED
            )
        assert net.relayer is not None
        # A smart wallet's signature check costs what its code costs: those are always estimated.
        hint = net.gas.hint() if simulate and kind is SignatureKind.EOA else None
        result = await preflight_exact(
            net.rpc,
            req,
            attempt.authorization,
            kind,
            net.relayer.address,
            simulate=simulate,
            gas_hint=hint,
            calldata=attempt.calldata if simulate else None,
        )
        if result.nonce_used:
            if await self._paid_by_someone_else(claim):
                return
            raise PaymentRequired("this authorization was already used on chain", reason=reasons.NONCE_ALREADY_USED)
        if simulate:
            attempt.gas = result.gas
            if hint is None and kind is SignatureKind.EOA:
                net.gas.learn(result.gas)

    async def _confirmed(self, claim: ExactClaim, net: Network, tx_hash: str) -> bool:
        """Wait for ``tx_hash`` and tell whether it executed this authorization to us (then the claim is PAID)."""
        attempt = claim.payment
        try:
            receipt = await net.watcher.wait(
                tx_hash, timeout=self.config.payment.settle_timeout, confirmations=net.config.confirmations
            )
        except TimeoutError:
            raise SettlementFailed(
                "settlement is broadcast but not confirmed yet", reason=reasons.SETTLEMENT_PENDING, unknown=True
            ) from None
        found = settlement_in_receipt(receipt, attempt.requirement, attempt.authorization.authorization)
        if found is not None:
            await self._collect(claim, found, tx_hash)
            return True
        return False

    async def _settle_remotely(self, claim: ExactClaim, net: Network, facilitator: FacilitatorClient) -> str:
        attempt = claim.payment
        try:
            result = await facilitator.settle(2, self._facilitator_payload(attempt), attempt.requirement.v2())
        except FacilitatorUnavailable as exc:
            if exc.request_sent:
                claim.in_flight(True)  # it may have broadcast: keep the claim, reconcile on chain later
                raise SettlementFailed(
                    "the facilitator did not confirm the settlement", reason=reasons.SETTLEMENT_PENDING, unknown=True
                ) from None
            raise
        except BadGateway:
            claim.in_flight(True)
            raise
        if result.success or result.pending:
            tx_hash = result.transaction
            claim.in_flight(True)  # the facilitator has broadcast it: the claim stays, even if recording fails
            await claim.record_tx(tx_hash)
            attempt.own_tx = tx_hash
            # Trust, but verify: the money must show up as a Transfer to us on our own RPC.
            if await self._confirmed(claim, net, tx_hash):
                return tx_hash
        if await self._paid_by_someone_else(claim):
            return claim.tx_hash or ""
        claim.in_flight(False)
        raise SettlementFailed("the facilitator could not settle this payment", reason=result.error_reason)

    async def _settle_locally(self, claim: ExactClaim, net: Network) -> str:
        attempt = claim.payment

        async def record(tx_hash: str) -> None:
            await claim.record_tx(tx_hash)
            attempt.own_tx = tx_hash
            claim.in_flight(True)

        assert net.relayer is not None
        gas = attempt.gas * 5 // 4 + 10_000
        submitter = net.batcher or net.relayer
        try:
            tx_hash = await submitter.submit(attempt.requirement.asset, attempt.calldata, gas, record)
        except ServiceUnavailable:
            claim.in_flight(False)  # refused before it left: the money did not move, the claim may go
            raise
        except asyncio.CancelledError:
            # A batch records and broadcasts in its own task, which this cancellation does not stop: the hash may
            # be recorded (or about to be) and the transaction may leave. Keep the claim; it is reconciled by hash.
            if submitter is net.batcher:
                claim.in_flight(True)
            raise
        if await self._confirmed(claim, net, tx_hash):
            # Served from here on: watched until final, settled again if a reorg drops it (T28; never waits).
            _track(net, attempt, tx_hash)
            return tx_hash
        # Reverted: if someone else executed the same authorization to us first, the money still arrived.
        if await self._paid_by_someone_else(claim):
            return claim.tx_hash or ""
        claim.in_flight(False)  # our transaction failed and moved nothing: the claim may be released
        net.gas.forget()  # if the limit we learned was too low, the next preflight estimates afresh
        raise SettlementFailed("the settlement transaction reverted", reason=reasons.TRANSACTION_FAILED)


def _track(net: Network, attempt: ExactAttempt, tx_hash: str) -> None:
    """Hand a served settlement our relayer sent to the network's finality tracker (T28; never waits)."""
    auth = attempt.authorization.authorization
    net.track_settlement(
        payment_key(attempt.requirement, auth), attempt.requirement.asset, attempt.calldata, auth.valid_before, tx_hash
    )


__all__ = ["ExactAttempt", "ExactScheme"]
