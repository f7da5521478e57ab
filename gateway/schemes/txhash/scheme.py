"""Tx-hash proofs as a scheme: the money is already on chain; prove it is ours, final, fresh and the caller's.

Offered per route (``tx_hash = true``) beside ``exact``, in the 402's v2 ``extensions.txhash`` and v1
``payment[]`` (docs/protocol.md §5). Everything is checked before the claim, because the claim key names the
qualifying log; the claim then consumes that log for ever.

A route with ``tx_hash_binding = "optional"`` also takes a proof without ``X-PAYMENT-BINDING``: every other check
still runs, and the same claim key makes its first presenter the only one served (docs/threat-model.md T43).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace

from gateway.chain.network import Network
from gateway.chain.watched import Watched
from gateway.config import GatewayConfig
from gateway.errors import ChainUnavailable, PaymentReplayed, PaymentRequired
from gateway.schemes.base import (
    RECORD_MARGIN,
    Claim,
    Offer,
    Presented,
    PricedRoute,
    authorization_key,
    slot_key,
)
from gateway.schemes.prices import EarlierPrice, honoured_floor, honoured_for
from gateway.schemes.txhash.check import FoundTransfer, binding_digest, binding_signer, find_transfer, tx_payment_key
from gateway.schemes.txhash.onchain import agreed_receipt, agreed_slot, check_final_and_fresh, contract_vouches
from gateway.storage.receipts import ClaimRecord, ClaimState, Effect
from gateway.x402 import reasons
from gateway.x402.challenge import Requirement
from gateway.x402.sessions import DEPOSIT_COLLECTOR, SETTLEMENT_CONTRACT
from gateway.x402.txhash import TxProof, looks_like_tx_hash, parse_tx_proof, tx_extension, tx_option

_SESSION_CONTRACTS = frozenset(a.lower() for a in (SETTLEMENT_CONTRACT, DEPOSIT_COLLECTOR))


@dataclass(slots=True)
class TxAttempt:
    proof: TxProof
    requirement: Requirement
    resource: str
    method: str
    earlier: tuple[EarlierPrice, ...] = ()  # the route's earlier prices still honoured (gateway/schemes/prices.py)
    found: FoundTransfer | None = None  # set by verify()
    slot: tuple[str, int] | None = None  # set by verify(): the transaction's (sender, nonce)
    version: int = 1  # receipts go back in the v1 header: the proof came in X-PAYMENT

    @property
    def payer(self) -> str:
        """The transfer's sender. For an unbound proof that is whose money it was, not who presented it."""
        assert self.found is not None, "verify() runs before the payer is known"
        return self.found.payer

    @property
    def unbound(self) -> bool:
        """Presented without a payer binding (a route with ``tx_hash_binding = "optional"``)."""
        return self.proof.binding is None


class TxHashScheme:
    name = "txhash"

    def __init__(self, config: GatewayConfig, networks: Mapping[str, Network]) -> None:
        self.config = config
        self.networks = networks

    def accepts(self, presented: Presented) -> bool:
        return presented.header == "x-payment" and looks_like_tx_hash(presented.value.strip())

    def offer(self, route: PricedRoute, resource: str, method: str) -> Offer | None:
        if not route.config.tx_hash:
            return None
        required = route.config.tx_hash_binding == "required"
        options = [tx_option(r, resource, method, binding_required=required) for r in route.requirements]
        extension = tx_extension(options, binding_required=required)
        return Offer(extensions={"txhash": extension}, v1_extra={"payment": options})

    def parse(self, route: PricedRoute, presented: Presented) -> TxAttempt:
        required = route.config.tx_hash_binding == "required"
        proof = parse_tx_proof(presented.value, presented.network, presented.binding, binding_required=required)
        if not route.config.tx_hash:
            raise PaymentRequired("this route accepts x402 payments only", reason=reasons.UNSUPPORTED_PAYMENT_KIND)
        for req in route.requirements:
            if req.matches_network(proof.network):
                return TxAttempt(proof, req, presented.resource, presented.method, route.earlier)
        raise PaymentRequired(
            f"network {proof.network!r} is not accepted on this route", reason=reasons.NETWORK_MISMATCH
        )

    async def verify(self, payment: TxAttempt) -> None:
        net = self.networks[payment.requirement.network]
        proof = payment.proof
        receipt = await agreed_receipt(net.rpc, proof.tx_hash)
        req, now = payment.requirement, time.time()
        if payment.earlier:
            # A transfer answering a 402 from before a price change pays at the price that 402 showed.
            floor = honoured_floor(req, payment.earlier, now=now)
            found = find_transfer(receipt, replace(req, amount=floor))
            payment.requirement = honoured_for(req, found.value, payment.earlier, now=now)
        else:
            found = find_transfer(receipt, req)
        # No binding: parse() let it through only on a route that takes unbound proofs (docs/threat-model.md T43).
        # A binding that is sent must be the sender's, on every route (T3).
        if proof.binding is not None:
            await self._check_binding(net, payment, proof.binding, found)
        if await net.settled_by_us(str(receipt.get("from", ""))):
            # A transfer a relayer of this deployment sent is an ``exact`` settlement a gateway of it already
            # collected (a payer's proof is a transfer the payer sent): it never pays again, even if its records
            # were lost (docs/threat-model.md T26, T30; gateway/engine/relayers.py).
            raise PaymentReplayed("this transfer settled a payment this gateway already collected")
        if found.payer in _SESSION_CONTRACTS:
            # A sweep of session charges to pay_to (anyone may call ``settle``): money collected as sessions, never
            # a payment for something else (docs/threat-model.md T48).
            raise PaymentReplayed("this transfer swept session charges this gateway already collected")
        # The transaction's slot (its sender's nonce) is read beside the block checks: a proof that fails before
        # here costs no read of it.
        slot, _ = await asyncio.gather(
            agreed_slot(net.rpc, proof.tx_hash), check_final_and_fresh(net, receipt, found, self.config.payment)
        )
        if str(receipt.get("from", "")).lower() != slot[0]:
            raise ChainUnavailable("the RPC's receipt and transaction name different senders")
        payment.found = found
        payment.slot = slot

    async def _check_binding(self, net: Network, payment: TxAttempt, binding: bytes, found: FoundTransfer) -> None:
        proof = payment.proof
        signer = binding_signer(proof, payment.method, payment.resource)
        if signer != found.payer and not await contract_vouches(
            net.rpc, found.payer, binding_digest(proof, payment.method, payment.resource), binding
        ):
            raise PaymentRequired(
                "the payment binding is not signed by the transfer's sender", reason=reasons.BINDING_MISMATCH
            )

    def claim_key(self, payment: TxAttempt, *, now: float) -> tuple[str, float | None]:
        assert payment.found is not None
        key = tx_payment_key(payment.requirement.chain_id, payment.proof.tx_hash, payment.found.log_index)
        # A transfer older than tx_max_age_seconds never pays again, whichever way it is presented, so its record
        # is kept that long plus a margin for clocks that disagree (docs/threat-model.md T27).
        return key, now + self.config.payment.tx_max_age_seconds + RECORD_MARGIN

    async def confirm(self, claim: Claim[TxAttempt], record: ClaimRecord, *, now: float) -> None:
        if record.state is ClaimState.PAID:
            claim.mark_resumed(claim.payment.proof.tx_hash)
            return
        payment = claim.payment
        found = payment.found
        assert found is not None
        req = payment.requirement
        expires = now + self.config.payment.tx_max_age_seconds + RECORD_MARGIN
        assert payment.slot is not None
        # The sender's transaction slot: after a reorg dropped this transfer, a replacement at the same nonce (a
        # wallet sending it again with more gas: a new hash, paying us again) is the same payment, not a new one.
        # It also makes one transaction pay for one request (docs/protocol.md §5, docs/threat-model.md T28).
        effects = [Effect(slot_key(req.chain_id, *payment.slot), expires)]
        if found.authorization_nonce is not None:
            # This transfer executed an EIP-3009 authorization: the same money may have been presented (or be
            # presented later) as that authorization, served through a settlement of ours that a reorg then dropped
            # while the payer executed it itself. Its authorization key is taken with this claim: whichever way
            # comes second is refused (docs/threat-model.md T26).
            key = authorization_key(req.chain_id, req.asset, found.payer, found.authorization_nonce)
            effects.append(Effect(key, expires))
        await claim.mark_paid(payment.proof.tx_hash, effects=tuple(effects))
        _watch(self.networks[payment.requirement.network], payment, found)

    async def settle(self, claim: Claim[TxAttempt], *, simulate_again: bool) -> str:
        return claim.tx_hash or ""  # paid before it arrived: confirm() marked it


def _watch(net: Network, payment: TxAttempt, found: FoundTransfer) -> None:
    """Served from here on: the payer's transfer is watched until final, and counted if a reorg loses it
    (docs/threat-model.md T28; never waits). Watched only: we hold no authorization to pay it again with."""
    req = payment.requirement
    key = tx_payment_key(req.chain_id, payment.proof.tx_hash, found.log_index)
    what = Watched(payer=found.payer, pay_to=req.pay_to.lower(), value=found.value)
    net.watch_transaction("transfer", key, req.asset, payment.proof.tx_hash, what)


__all__ = ["TxAttempt", "TxHashScheme"]
