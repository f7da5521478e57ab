"""The payment engine: from a payment header to money that is verifiably ours, exactly once.

``begin`` parses and checks the payment (sans-IO first, so garbage costs no I/O), claims the money in the store
(one atomic write: the point where concurrent presentations are decided), then asks the chain. The returned
:class:`PaidRequest` is then ``settle``-d (before or after the upstream answers, per route) and ``finish``-ed
with whether the request was served. Adapters (middleware, CLI) never touch the store or chain directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from gateway.chain import abi
from gateway.chain.facilitator import CdpAuth, FacilitatorClient, FacilitatorUnavailable
from gateway.chain.relayer import GasBook, ReceiptWatcher, Relayer, SettlementBatcher
from gateway.chain.rpc import ChainRpc, RpcError, hex_int
from gateway.config import GatewayConfig, NetworkConfig, RouteConfig
from gateway.engine.deferred import DeferredOutcomes, Step
from gateway.errors import (
    BadGateway,
    ConfigError,
    GatewayError,
    PaymentInFlight,
    PaymentRequired,
    ServiceUnavailable,
    SettlementFailed,
    StoreUnavailable,
)
from gateway.http.bazaar import facilitator_listing
from gateway.routes import RouteTable
from gateway.schemes.exact.check import SignatureKind, check_exact, check_window, payment_key, select_requirement
from gateway.schemes.exact.onchain import (
    find_prior_settlement,
    preflight_exact,
    settlement_calldata,
    transfer_in_receipt,
)
from gateway.schemes.txhash import check as txhash
from gateway.schemes.txhash.check import TxProof, tx_option
from gateway.storage.receipts import ClaimRecord, ClaimState, ReceiptStore
from gateway.x402 import reasons
from gateway.x402.challenge import Challenge, Requirement, build_challenge
from gateway.x402.payload import ExactPayment, HeaderName, parse_exact_payment
from gateway.x402.receipt import receipt_header

log = logging.getLogger("gateway.payments")

# How long a consumed EIP-3009 record outlives its validBefore: after that the authorization cannot execute on
# chain any more, so nobody can present it again successfully; the margin absorbs clock skew between machines.
EXPIRY_MARGIN = 3600.0


@dataclass(frozen=True, slots=True)
class PricedRoute:
    config: RouteConfig
    requirements: tuple[Requirement, ...]


@dataclass(slots=True)
class Network:
    config: NetworkConfig
    rpc: ChainRpc
    watcher: ReceiptWatcher
    relayer: Relayer | None  # local verification and settlement
    facilitator: FacilitatorClient | None  # or a remote x402 facilitator does both
    gas: GasBook = field(default_factory=GasBook)  # learned settlement gas (local settlement only)
    batcher: SettlementBatcher | None = None  # several settlements per transaction, where the chain has Multicall3


def requirements_for(config: GatewayConfig, route: RouteConfig) -> tuple[Requirement, ...]:
    out = []
    for name in route.networks:
        n = config.networks[name]
        out.append(
            Requirement(
                network=n.name,
                chain_id=n.chain_id,
                asset=n.usdc,
                amount=route.price,
                pay_to=config.payment.pay_to,
                max_timeout_seconds=route.max_timeout_seconds,
                eip712_name=n.eip712_name,
                eip712_version=n.eip712_version,
            )
        )
    return tuple(out)


class PaymentEngine:
    def __init__(self, config: GatewayConfig, store: ReceiptStore) -> None:
        self.config = config
        self.store = store
        self._listings: dict[tuple[str, str], dict[str, Any]] = {}
        self.routes: RouteTable[PricedRoute] = RouteTable(
            [(r.pattern, PricedRoute(r, requirements_for(config, r))) for r in config.routes]
        )
        key = config.payment.relayer_key
        self.networks: dict[str, Network] = {}
        for n in config.networks.values():
            rpc = ChainRpc(n.name, n.chain_id, n.rpc_urls, timeout=n.rpc_timeout)
            relayer = facilitator = None
            if n.verifier == "facilitator":
                assert n.facilitator is not None
                f = n.facilitator
                auth = CdpAuth(f.cdp_key_id_env, f.cdp_key_secret_env) if f.auth == "cdp" else None
                facilitator = FacilitatorClient(f.url, timeout=f.timeout, auth=auth, name=f"{n.name} facilitator")
            else:
                if key is None:
                    raise ValueError("local settlement needs payment.relayer_key_env")
                relayer = Relayer(rpc, key)
            watcher = ReceiptWatcher(rpc, interval=n.receipt_poll_interval)
            self.networks[n.name] = Network(n, rpc, watcher, relayer, facilitator)
        pay = config.payment
        # A claim must outlive everything its owner may still do with it (settle, then wait for the upstream);
        # a shorter lease would let a second presentation resume a payment that is still being served.
        self.lease = max(config.store.lease_seconds, pay.settle_timeout + config.upstream.read_timeout + 30.0)
        self.deferred = DeferredOutcomes()  # claim outcomes a store outage interrupted (gateway/deferred.py)

    async def start(self, session: aiohttp.ClientSession) -> None:
        self.deferred = DeferredOutcomes()  # bound to this event loop; a restarted engine gets a fresh one
        for net in self.networks.values():
            await net.rpc.start(session)
            await net.rpc.verify_chain_id()
            if net.facilitator is not None:
                await net.facilitator.start(session)
                await self._check_facilitator(net)
            elif net.relayer is not None and net.config.settlement_batch > 1 and net.batcher is None:
                code = await net.rpc.request("eth_getCode", [abi.MULTICALL3_ADDRESS, "latest"])
                if isinstance(code, str) and len(code) > 2:
                    net.batcher = SettlementBatcher(
                        net.relayer, abi.MULTICALL3_ADDRESS, max_items=net.config.settlement_batch
                    )
                else:
                    log.info("no Multicall3 on %s: one settlement per transaction", net.config.name)
        await self.store.ping()

    async def _check_facilitator(self, net: Network) -> None:
        """Every route on a facilitator network must be one the facilitator says it supports (fail at start)."""
        assert net.facilitator is not None
        kinds = await net.facilitator.supported()
        if not FacilitatorClient.supports(kinds, version=2, scheme="exact", network=net.config.caip2):
            routes = [r.route for r in self.config.routes if net.config.name in r.networks]
            raise ConfigError(
                f"networks.{net.config.name}.facilitator",
                f"the facilitator does not support x402 v2 exact payments on {net.config.caip2} "
                f"(needed by {', '.join(routes) or 'no route'})",
            )

    async def aclose(self) -> None:
        for net in self.networks.values():
            if net.batcher is not None:
                await net.batcher.aclose()
            if net.relayer is not None:
                await net.relayer.aclose()
            await net.watcher.aclose()
        await self.deferred.aclose()
        await self.store.aclose()

    def facilitator_listing(self, route: PricedRoute, method: str) -> dict[str, Any]:
        """What a facilitator is told about the resource a payment is for (gateway/bazaar.py); per route and method."""
        key = (route.config.route, method)
        listing = self._listings.get(key)
        if listing is None:
            listing = self._listings[key] = facilitator_listing(self.config, route.config, method)
        return listing

    async def _claim(self, key: str, owner: str, *, now: float, expires_at: float | None) -> ClaimRecord:
        try:
            return await self.store.claim(key, owner, now=now, lease=self.lease, expires_at=expires_at)
        except PaymentInFlight:
            # Held by one of our own requests that a store outage cut short? Then settle its claim now and retry.
            if not await self.deferred.flush(key):
                raise
        return await self.store.claim(key, owner, now=time.time(), lease=self.lease, expires_at=expires_at)

    def challenge(
        self,
        route: PricedRoute,
        resource: str,
        reason: str = reasons.PAYMENT_REQUIRED,
        message: str = "",
        *,
        method: str = "GET",
    ) -> Challenge:
        tx_options = [tx_option(r, resource, method) for r in route.requirements] if route.config.tx_hash else None
        return build_challenge(
            route.requirements,
            resource=resource,
            description=route.config.description,
            mime_type=route.config.mime_type,
            reason=reason,
            message=message,
            tx_options=tx_options,
        )

    async def begin(
        self,
        route: PricedRoute,
        header: HeaderName,
        value: bytes,
        *,
        method: str = "GET",
    ) -> ExactRequest:
        """An x402 ``exact`` payment for a ``method`` request to ``route``: checks, claim, chain preflight."""
        payment = parse_exact_payment(value, header)
        req = select_requirement(payment, route.requirements)
        pay = self.config.payment
        now = time.time()
        kind = check_exact(payment, req)
        net = self.networks[req.network]
        key = payment_key(req, payment.authorization)
        owner = uuid.uuid4().hex
        expires_at = payment.authorization.valid_before + EXPIRY_MARGIN
        record = await self._claim(key, owner, now=now, expires_at=expires_at)
        paid = ExactRequest(self, net, route, req, key, owner, expires_at, payment, method)
        try:
            if record.state is ClaimState.PAID:
                # A paid payment whose earlier request failed (or whose gateway died): serve it, don't charge.
                if kind is SignatureKind.CONTRACT:
                    await paid.preflight(kind)
                paid.mark_resumed(record.tx_hash)
                return paid
            if record.resumed and record.tx_hash and await paid.reconcile(record.tx_hash):
                return paid
            try:
                check_window(
                    payment,
                    req,
                    now=int(now),
                    min_validity_seconds=pay.min_validity_seconds,
                    clock_skew_seconds=pay.clock_skew_seconds,
                )
            except PaymentRequired as exc:
                # An expired authorization may still have been executed to us by someone else (THREATS 9).
                if exc.reason == reasons.VALID_BEFORE_EXPIRED and await paid.paid_by_someone_else():
                    return paid
                raise
            await paid.preflight(kind)
        except BaseException:
            await paid.release_quietly()
            raise
        return paid

    async def begin_tx(self, route: PricedRoute, proof: TxProof, method: str, resource: str) -> TxHashRequest:
        """A tx-hash proof: the money is already on chain; prove it is ours, final, fresh and the caller's."""
        if not route.config.tx_hash:
            raise PaymentRequired("this route accepts x402 payments only", reason=reasons.UNSUPPORTED_PAYMENT_KIND)
        for req in route.requirements:
            if req.matches_network(proof.network):
                break
        else:
            raise PaymentRequired(
                f"network {proof.network!r} is not accepted on this route", reason=reasons.NETWORK_MISMATCH
            )
        net = self.networks[req.network]
        rpc = net.rpc
        receipt = await rpc.request_agreed("eth_getTransactionReceipt", [proof.tx_hash], project=_receipt_view)
        if not isinstance(receipt, dict):
            raise PaymentRequired("no such transaction on this network (yet)", reason=txhash.TX_NOT_FOUND)
        found = txhash.find_transfer(receipt, req)
        signer = txhash.binding_signer(proof, method, resource)
        digest = txhash.binding_digest(txhash.binding_message(proof.tx_hash, proof.network, method, resource))
        if signer != found.payer and not await _contract_vouches(rpc, found.payer, digest, proof.binding):
            raise PaymentRequired(
                "the payment binding is not signed by the transfer's sender", reason=txhash.BINDING_MISMATCH
            )
        await self._check_final_and_fresh(net, receipt, found)
        key = txhash.tx_payment_key(req.chain_id, proof.tx_hash, found.log_index)
        owner = uuid.uuid4().hex
        record = await self._claim(key, owner, now=time.time(), expires_at=None)
        paid = TxHashRequest(self, net, route, req, key, owner, None, payer=found.payer, version=1)
        if record.state is ClaimState.PAID:
            paid.mark_resumed(proof.tx_hash)
        else:
            # A Base transaction never expires: the record is kept for ever (expires_at None).
            await paid.mark_paid(proof.tx_hash)
        return paid

    async def _check_final_and_fresh(self, net: Network, receipt: dict[str, Any], found: txhash.FoundTransfer) -> None:
        """Confirmations, finality tag, reorg and age, each read so that one lying RPC cannot fake them: with
        several endpoints the block must be agreed on and the head/tag is the *lowest* any of them reports."""
        rpc = net.rpc
        block = await rpc.request_agreed(
            "eth_getBlockByNumber",
            [hex(found.block_number), False],
            project=lambda b: (b.get("hash"), b.get("timestamp")) if isinstance(b, dict) else b,
        )
        if not isinstance(block, dict):
            raise PaymentRequired("the transfer's block is not on this chain", reason=txhash.TX_NOT_FINAL)
        if str(block.get("hash", "")).lower() != str(receipt.get("blockHash", "")).lower():
            raise PaymentRequired("the transfer's block was reorganised away", reason=txhash.TX_NOT_FINAL)
        heads = await rpc.request_all("eth_blockNumber", [])
        depth = min(hex_int(h) for h in heads) - found.block_number + 1
        if depth < max(net.config.confirmations, 1):
            raise PaymentRequired(
                f"the transfer has {depth} of {net.config.confirmations} confirmations", reason=txhash.TX_NOT_FINAL
            )
        if net.config.finality != "latest":
            tagged = await rpc.request_all("eth_getBlockByNumber", [net.config.finality, False])
            lowest = min(hex_int(t.get("number")) if isinstance(t, dict) else -1 for t in tagged)
            if lowest < found.block_number:
                raise PaymentRequired(f"the transfer is not {net.config.finality} yet", reason=txhash.TX_NOT_FINAL)
        pay = self.config.payment
        age = time.time() - hex_int(block.get("timestamp"))
        if age < -pay.clock_skew_seconds:
            raise PaymentRequired("the transfer's block is dated in the future", reason=txhash.TX_IN_FUTURE)
        if age > pay.tx_max_age_seconds:
            raise PaymentRequired(f"the transfer is older than {pay.tx_max_age_seconds} s", reason=txhash.TX_TOO_OLD)


def _receipt_view(receipt: Any) -> Any:
    """What several RPC endpoints must agree on about a receipt."""
    if not isinstance(receipt, dict):
        return receipt
    logs = [
        (str(e.get("address", "")).lower(), [str(t).lower() for t in e.get("topics") or ()], str(e.get("data", "")))
        for e in receipt.get("logs") or ()
    ]
    return (receipt.get("status"), str(receipt.get("blockHash", "")).lower(), logs)


async def _contract_vouches(rpc: ChainRpc, address: str, digest: bytes, signature: bytes) -> bool:
    """ERC-1271: a contract wallet at ``address`` says the signature is its own."""
    try:
        out = await rpc.eth_call(address, abi.IS_VALID_SIGNATURE.encode(digest, signature))
    except RpcError:
        return False
    return out[:4] == abi.ERC1271_MAGIC


class PaidRequest:
    """One claimed payment on its way to being settled and served."""

    def __init__(
        self,
        engine: PaymentEngine,
        net: Network,
        route: PricedRoute,
        req: Requirement,
        key: str,
        owner: str,
        expires_at: float | None,
        *,
        payer: str,
        version: int,
    ) -> None:
        self._engine = engine
        self._net = net
        self.route = route
        self.requirement = req
        self.key = key
        self._owner = owner
        self._expires_at = expires_at
        self.payer = payer
        self.version = version
        self._broadcast = False
        self._money_moved = False  # seen on chain, whether or not the store heard it: the claim is never released
        self.delivered = False  # the app acted on the payment (its on_paid hooks ran): a failed finish consumes it
        self.paid = False
        self.resumed = False
        self.tx_hash: str | None = None

    def mark_resumed(self, tx_hash: str | None) -> None:
        self.paid = True
        self.resumed = True
        self.tx_hash = tx_hash

    async def mark_paid(self, tx_hash: str) -> None:
        self._money_moved = True
        try:
            await self._mark_paid(tx_hash)
        except StoreUnavailable:
            # The money moved but the store did not hear it, and this request fails closed: once the store is
            # back, record the payment as paid-but-unserved, so the same payment is served without paying again.
            async def paid_unless_lost() -> None:
                with contextlib.suppress(PaymentInFlight):  # already PAID (the write landed) or no longer ours
                    await self._mark_paid(tx_hash)

            self._defer(paid_unless_lost, functools.partial(self._finish, served=False))
            raise
        self.paid = True
        self.tx_hash = tx_hash

    async def _mark_paid(self, tx_hash: str) -> None:
        await self._engine.store.mark_paid(self.key, self._owner, tx_hash, now=time.time(), lease=self._engine.lease)

    async def settle(self, *, simulate_again: bool = False) -> str:
        """Make the money move (no-op when already paid). Raises SettlementFailed / PaymentRequired."""
        raise NotImplementedError

    async def finish(self, *, served: bool) -> None:
        """Record the outcome: a served request consumes the payment (for ever, or until an authorization could not
        execute anyway); a failed one leaves it paid-but-unserved for a free retry (THREATS 11)."""
        try:
            await self._finish(served=served)
        except StoreUnavailable:
            # A finish that fails leaves the client refused (fail closed): the payment stays usable for a retry,
            # unless the app already acted on it (a job was created and bound to the payer, who can find it).
            self._defer(functools.partial(self._finish, served=served and self.delivered))
            raise

    async def _finish(self, *, served: bool) -> None:
        await self._engine.store.finish(
            self.key, self._owner, served=served, now=time.time(), expires_at=self._expires_at
        )

    def _defer(self, *steps: Step) -> None:
        self._engine.deferred.add(self.key, self._owner, steps, within=self._engine.lease)

    async def release_quietly(self) -> None:
        """Give the claim back when no money moved and nothing is in flight; keep it otherwise."""
        if self.paid or self._broadcast or self._money_moved:
            return
        try:
            await self._engine.store.release(self.key, self._owner)
        except GatewayError:
            log.warning("could not release a claim; will retry when the store is back", extra={"key": self.key})
            self._defer(lambda: self._engine.store.release(self.key, self._owner))

    def receipt(self, *, success: bool = True, reason: str | None = None) -> tuple[bytes, bytes]:
        return receipt_header(
            self.version,
            self.requirement,
            success=success,
            transaction=self.tx_hash or "",
            payer=self.payer,
            reason=reason,
        )


class TxHashRequest(PaidRequest):
    """A tx-hash proof: paid before it arrived; nothing to settle."""

    async def settle(self, *, simulate_again: bool = False) -> str:
        return self.tx_hash or ""


class ExactRequest(PaidRequest):
    """An EIP-3009 authorization this gateway settles itself."""

    def __init__(
        self,
        engine: PaymentEngine,
        net: Network,
        route: PricedRoute,
        req: Requirement,
        key: str,
        owner: str,
        expires_at: float,
        payment: ExactPayment,
        method: str = "GET",
    ) -> None:
        super().__init__(engine, net, route, req, key, owner, expires_at, payer=payment.payer, version=payment.version)
        self.payment = payment
        self.method = method
        self._gas = 0

    async def reconcile(self, tx_hash: str) -> bool:
        """A lapsed claim left a settlement hash behind: find out what happened to it (never re-broadcast)."""
        rpc = self._net.rpc
        receipt = await rpc.request("eth_getTransactionReceipt", [tx_hash])
        if isinstance(receipt, dict):
            if transfer_in_receipt(receipt, self.requirement, self.payment.authorization):
                await self.mark_paid(tx_hash)
                return True
            return False  # it reverted: verify afresh below (maybe someone else settled first)
        known = await rpc.request("eth_getTransactionByHash", [tx_hash])
        if known is not None:
            self._broadcast = True  # still in the mempool: keep the claim, tell the client to come back
            raise PaymentInFlight("this payment's settlement is still pending", reason=reasons.SETTLEMENT_PENDING)
        return False  # never reached the network: safe to settle afresh

    def _facilitator_payload(self) -> dict[str, Any]:
        """The payment as x402 v2, whatever version the client spoke: the authorization and signature are the
        same; ``accepted`` is the server's own requirement, and ``resource`` / ``extensions`` (what a bazaar
        facilitator catalogues) are the gateway's own listing of the route, never the client's echo: a client must
        not get a route its operator keeps out of discovery catalogued, or describe ours in its own words."""
        return {
            "x402Version": 2,
            **self._engine.facilitator_listing(self.route, self.method),
            "accepted": self.requirement.v2(),
            "payload": self.payment.raw["payload"],
        }

    async def paid_by_someone_else(self) -> bool:
        net, req, auth = self._net, self.requirement, self.payment.authorization
        prior = await find_prior_settlement(net.rpc, req, auth)
        if prior is None:
            return False
        log.info("payment settled by a third party", extra={"tx_hash": prior, "payer": auth.from_})
        await self.mark_paid(prior)
        return True

    async def preflight(self, kind: SignatureKind, *, simulate: bool = True) -> None:
        net, req = self._net, self.requirement
        if net.facilitator is not None:
            verdict = await net.facilitator.verify(2, self._facilitator_payload(), req.v2())
            if verdict.is_valid:
                return
            if verdict.invalid_reason == reasons.NONCE_ALREADY_USED and await self.paid_by_someone_else():
                return
            raise PaymentRequired(
                "the facilitator refused this payment", reason=verdict.invalid_reason or "facilitator_rejected"
            )
        assert net.relayer is not None
        # A smart wallet's signature check costs what its code costs: those are always estimated.
        hint = net.gas.hint() if simulate and kind is SignatureKind.EOA else None
        result = await preflight_exact(
            net.rpc, req, self.payment, kind, net.relayer.address, simulate=simulate, gas_hint=hint
        )
        if result.nonce_used:
            if await self.paid_by_someone_else():
                return
            raise PaymentRequired("this authorization was already used on chain", reason=reasons.NONCE_ALREADY_USED)
        if simulate:
            self._gas = result.gas
            if hint is None and kind is SignatureKind.EOA:
                net.gas.learn(result.gas)

    async def _settle_remotely(self, facilitator: FacilitatorClient) -> str:
        net, req, auth = self._net, self.requirement, self.payment.authorization
        engine = self._engine
        try:
            result = await facilitator.settle(2, self._facilitator_payload(), req.v2())
        except FacilitatorUnavailable as exc:
            if exc.request_sent:
                self._broadcast = True  # it may have broadcast: keep the claim, reconcile on chain later
                raise SettlementFailed(
                    "the facilitator did not confirm the settlement", reason=reasons.SETTLEMENT_PENDING, unknown=True
                ) from None
            raise
        except BadGateway:
            self._broadcast = True
            raise
        if result.success or result.pending:
            tx_hash = result.transaction
            self._broadcast = True  # the facilitator has broadcast it: the claim stays, even if recording fails
            await engine.store.record_tx(self.key, self._owner, tx_hash, now=time.time(), lease=engine.lease)
            try:
                # Trust, but verify: the money must show up as a Transfer to us on our own RPC.
                receipt = await net.watcher.wait(
                    tx_hash, timeout=engine.config.payment.settle_timeout, confirmations=net.config.confirmations
                )
            except TimeoutError:
                raise SettlementFailed(
                    "settlement is broadcast but not confirmed yet", reason=reasons.SETTLEMENT_PENDING, unknown=True
                ) from None
            if transfer_in_receipt(receipt, req, auth):
                await self.mark_paid(tx_hash)
                return tx_hash
        if await self.paid_by_someone_else():
            return self.tx_hash or ""
        self._broadcast = False
        raise SettlementFailed("the facilitator could not settle this payment", reason=result.error_reason)

    async def settle(self, *, simulate_again: bool = False) -> str:
        """Make the money move (no-op when already paid). Raises SettlementFailed / PaymentRequired."""
        if self.paid:
            assert self.tx_hash is not None or self.resumed
            return self.tx_hash or ""
        net, req, auth = self._net, self.requirement, self.payment.authorization
        engine = self._engine
        if simulate_again:
            # THREATS 10: the payer may have drained the balance while the upstream worked. Balance and nonce
            # state only: the simulation of begin() stands (see preflight_exact).
            await self.preflight(SignatureKind.EOA, simulate=False)  # the signature kind was settled at begin()
            if self.paid:
                return self.tx_hash or ""

        if net.facilitator is not None:
            return await self._settle_remotely(net.facilitator)

        async def record(tx_hash: str) -> None:
            await engine.store.record_tx(self.key, self._owner, tx_hash, now=time.time(), lease=engine.lease)
            self._broadcast = True

        assert net.relayer is not None
        gas = self._gas * 5 // 4 + 10_000
        submitter = net.batcher or net.relayer
        try:
            tx_hash = await submitter.submit(req.asset, settlement_calldata(self.payment), gas, record)
        except ServiceUnavailable:
            self._broadcast = False  # refused before it left: the money did not move, the claim may go
            raise
        except asyncio.CancelledError:
            # A batch records and broadcasts in its own task, which this cancellation does not stop: the hash may
            # be recorded (or about to be) and the transaction may leave. Keep the claim; it is reconciled by hash.
            if submitter is net.batcher:
                self._broadcast = True
            raise
        try:
            receipt = await net.watcher.wait(
                tx_hash, timeout=engine.config.payment.settle_timeout, confirmations=net.config.confirmations
            )
        except TimeoutError:
            raise SettlementFailed(
                "settlement is broadcast but not confirmed yet", reason=reasons.SETTLEMENT_PENDING, unknown=True
            ) from None
        if transfer_in_receipt(receipt, req, auth):
            await self.mark_paid(tx_hash)
            return tx_hash
        # Reverted: if someone else executed the same authorization to us first, the money still arrived.
        prior = await find_prior_settlement(net.rpc, req, auth)
        if prior is not None:
            await self.mark_paid(prior)
            return prior
        self._broadcast = False  # our transaction failed and moved nothing: the claim may be released
        net.gas.forget()  # if the limit we learned was too low, the next preflight estimates afresh
        raise SettlementFailed("the settlement transaction reverted", reason=reasons.TRANSACTION_FAILED)


__all__ = [
    "ExactRequest",
    "Network",
    "PaidRequest",
    "PaymentEngine",
    "PricedRoute",
    "TxHashRequest",
    "requirements_for",
]
