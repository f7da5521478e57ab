"""Refunds: a recorded payment's amount sent back to its payer from the refund wallet, at most once.

How "at most once" holds, layer by layer (docs/operating.md, "Refunds"):

1. On chain, the guarantee: the refund is an EIP-3009 ``transferWithAuthorization`` signed by the refund key, and its
   authorization nonce is derived from the payment's ledger key (:func:`refund_nonce`). The token executes one nonce
   once: however many transactions carry it (a retry, two instances, a re-send after a crash), at most one moves
   money and the others revert.
2. In the store, the intent: before anything is signed the refund claims ``refund:<payment key>`` in the receipt
   store (the atomic claim payments use). A concurrent request for the same refund finds it in flight (409
   ``refund_in_progress``) and sends nothing; the transaction's hash is recorded on the claim before it is broadcast.
3. In the ledger, the record: once the transfer is mined, the refund's entry (key ``refund:<payment key>``, the
   negative amount, ``refund_of``, the tx hash and block) is recorded, then the claim is marked done. The ledger
   refuses a second refund of one payment.

A payment whose settlement the finality tracker counted lost (a reorg dropped it and it could not be settled again) is
never refunded: the merchant never received that money. The ledger holds the mark (written by
:class:`gateway.engine.ledger.LostSettlements`, which every gateway process with a ledger feeds from its networks'
finality trackers: ``PaymentMiddleware``), so every instance refuses it, after a restart too: 409
``payment_settlement_lost``. A settlement not final yet is refunded (docs/operating.md, "Refunds", says why).

Crash windows (the process dies at each point; what the next request for the same refund does once it holds the
claim, which it does at once when the dead process's heartbeat lapsed, else after the claim's lease):

* after the claim, before a transaction was signed: the chain says the authorization is unused: it sends;
* after the hash was recorded, before or after the broadcast: it asks the chain (``authorizationState``). Used: it
  finds the transaction by the token's ``AuthorizationUsed`` log and records it. Unused: it sends again; if the first
  transaction was still waiting in a mempool, one of the two reverts (the nonce) and the one mined is recorded;
* after the transfer was mined, before the ledger entry: found used on chain, recorded;
* after the ledger entry, before the claim was marked done: the ledger entry answers (already refunded).

A refund that fails before anything was broadcast (the refund wallet lacks the money, the node refused the
transaction) gives its claim back: the next request starts afresh. One whose outcome is unknown keeps it, lapsed, so
the next request reconciles on chain at once.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

from coincurve import PrivateKey
from eth_account import Account
from eth_utils.crypto import keccak

from gateway.chain import abi
from gateway.chain.authorization import transfer_log
from gateway.chain.network import Network
from gateway.chain.relayer import Relayer
from gateway.chain.rpc import RpcError, hex_int
from gateway.engine.claim import Claims
from gateway.errors import GatewayError, PaymentInFlight, PaymentReplayed, ServiceUnavailable, SettlementFailed
from gateway.http.admin.calls import admin_error
from gateway.secrets import Secret
from gateway.storage.ledger.contract import REFUND_PREFIX, LedgerEntry, LedgerStore
from gateway.x402 import reasons
from gateway.x402.challenge import Requirement
from gateway.x402.eip712 import authorization_digest
from gateway.x402.payload import Authorization

__all__ = ["REFUND_PREFIX", "RefundOutcome", "Refunds", "refund_nonce"]

log = logging.getLogger("gateway.admin")

LOOKBACK_BLOCKS = 50_000  # how far back the token's AuthorizationUsed log of an earlier attempt is looked for
_GAS_MARGIN = 1.25  # over the node's estimate: the state a refund runs in may differ a little from the estimate's


def refund_nonce(payment_key: str) -> bytes:
    """The EIP-3009 nonce of the refund of ``payment_key``: one per payment, so the token executes one refund."""
    return keccak(b"x402-gateway refund\n" + payment_key.encode())


@dataclass(frozen=True, slots=True)
class RefundOutcome:
    entry: LedgerEntry | None  # the refund's ledger entry (None: refunded, but the ledger no longer holds it)
    done_now: bool  # this call completed the refund (recorded it); False: it had been refunded before
    sent: bool = False  # this call broadcast the transfer (False when an earlier attempt's transfer was found)


@dataclass(frozen=True, slots=True)
class _Transfer:
    tx_hash: str
    block: int | None


class Refunds:
    """Refunds of ledger entries from the refund key, sent through each network's relayer (or, where the gateway
    does not settle itself, by the refund key's own transactions)."""

    def __init__(
        self,
        key: Secret,
        *,
        ledger: LedgerStore,
        claims: Claims,
        networks: Mapping[str, Network],
        validity: int,
        settle_timeout: float,
    ) -> None:
        self._secret = key
        self._key = PrivateKey(bytes.fromhex(key.reveal().removeprefix("0x")))
        self.address: str = Account.from_key(key.reveal()).address.lower()
        self._ledger = ledger
        self._claims = claims
        self._networks = networks
        self._validity = validity
        self._timeout = settle_timeout
        self._own: dict[str, Relayer] = {}  # networks without a relayer: the refund key sends itself

    def __repr__(self) -> str:
        return f"Refunds(address={self.address})"

    async def refund(self, payment_key: str, *, by: str) -> RefundOutcome:
        """Refund the payment recorded under ``payment_key`` (``by``: who asked, kept in the entry's request id).

        Raises 404 ``payment_not_found``, 400 ``payment_not_refundable``, 409 ``payment_settlement_lost``, 409
        ``refund_in_progress``, 503/502 ``refund_failed`` (see the module docstring for what each leaves behind)."""
        key = REFUND_PREFIX + payment_key
        done = await self._ledger.get(key)
        if done is not None:
            return RefundOutcome(done, done_now=False)
        payment = await self._ledger.get(payment_key)
        if payment is None:
            raise admin_error(404, reasons.PAYMENT_NOT_FOUND, "no payment with this key in the ledger")
        network = self._refundable(payment)
        if await self._ledger.settlement_lost_at(payment_key) is not None:
            raise admin_error(
                409,
                reasons.PAYMENT_SETTLEMENT_LOST,
                "a chain reorganisation dropped this payment's settlement and it could not be settled again: the "
                "money never arrived, so nothing is refunded",
            )
        owner = self._claims.new_owner()
        try:
            await self._claims.claim(key, owner, now=time.time(), expires_at=None)
        except PaymentReplayed:
            # Done before (the ledger entry may have been purged by retention since): nothing to send.
            return RefundOutcome(await self._ledger.get(key), done_now=False)
        except PaymentInFlight:
            raise admin_error(
                409, reasons.REFUND_IN_PROGRESS, "this payment's refund is being sent right now"
            ) from None
        store = self._claims.store
        try:
            # Always asked, not only when the claim was taken over: the chain is what says whether money moved.
            transfer = await self._used(network, payment)
            sent = transfer is None
            if transfer is None:
                transfer = await self._send(network, payment, key, owner)
            entry = LedgerEntry(
                key=key,
                at=time.time(),
                route=payment.route,
                method=payment.method,
                resource=payment.resource,
                amount=-payment.amount,
                network=payment.network,
                asset=payment.asset,
                payer=payment.payer,
                pay_to=payment.pay_to,
                kind="refund",
                tx_hash=transfer.tx_hash,
                block=transfer.block,
                request_id=f"admin:{by}",
                job_id=payment.job_id,
                refund_of=payment_key,
            )
            if not await self._ledger.record(entry):
                entry = await self._ledger.get(key) or entry  # recorded by an earlier attempt that died after it
            await store.mark_paid(key, owner, transfer.tx_hash or None, now=time.time(), lease=self._claims.lease)
            await store.finish(key, owner, served=True, now=time.time(), expires_at=None)
            return RefundOutcome(entry, done_now=True, sent=sent)
        except _NothingSent as failed:
            with contextlib.suppress(GatewayError):
                await store.release(key, owner)
            raise failed.error from None
        except BaseException:
            # The transfer may be out (or recorded in the ledger but not marked done): keep the claim with its
            # recorded hash, lapsed, so the next request reconciles on chain at once.
            with contextlib.suppress(GatewayError):
                await store.lapse(key, owner, now=time.time())
            raise

    def _refundable(self, payment: LedgerEntry) -> Network:
        if payment.kind == "refund" or payment.amount <= 0:
            raise admin_error(400, reasons.PAYMENT_NOT_REFUNDABLE, "only a payment with a positive amount is refunded")
        network = self._networks.get(payment.network)
        if network is None:
            raise admin_error(400, reasons.PAYMENT_NOT_REFUNDABLE, f"network {payment.network!r} is not configured")
        if payment.asset.lower() != network.config.usdc.lower():
            raise admin_error(400, reasons.PAYMENT_NOT_REFUNDABLE, "the payment's asset is not the network's USDC")
        return network

    # -- the chain --------------------------------------------------------------------------------------------

    def _authorization(self, payment: LedgerEntry, now: float) -> tuple[Authorization, bytes]:
        auth = Authorization(
            from_=self.address,
            to=payment.payer.lower(),
            value=payment.amount,
            valid_after=0,
            valid_before=int(now) + self._validity,
            nonce=refund_nonce(payment.key),
        )
        net = self._networks[payment.network].config
        domain = Requirement(
            network=net.name,
            chain_id=net.chain_id,
            asset=net.usdc,
            amount=payment.amount,
            pay_to=payment.payer,
            max_timeout_seconds=self._validity,
            eip712_name=net.eip712_name,
            eip712_version=net.eip712_version,
        )
        signature = self._key.sign_recoverable(authorization_digest(domain, auth), hasher=None)
        r, s, v = signature[:32], signature[32:64], signature[64] + 27
        args = (auth.from_, auth.to, auth.value, auth.valid_after, auth.valid_before, auth.nonce)
        return auth, abi.TRANSFER_WITH_AUTHORIZATION_VRS.encode(*args, v, r, s)

    def _sender(self, network: Network) -> Relayer:
        if network.relayer is not None:
            return network.relayer  # one nonce sequence per key and process: the relayer's own
        name = network.config.name
        if name not in self._own:
            self._own[name] = Relayer(network.rpc, self._secret)
        return self._own[name]

    async def _send(self, network: Network, payment: LedgerEntry, key: str, owner: str) -> _Transfer:
        auth, calldata = self._authorization(payment, time.time())
        sender = self._sender(network)
        asset = network.config.usdc
        call = {"from": sender.address, "to": asset, "data": "0x" + calldata.hex()}
        balance_call = {"to": asset, "data": "0x" + abi.BALANCE_OF.encode(self.address).hex()}
        estimate, balance = await network.rpc.batch(
            [("eth_estimateGas", [call, "latest"]), ("eth_call", [balance_call, "latest"])]
        )
        if isinstance(estimate, RpcError):
            held = None if isinstance(balance, RpcError) else int(str(balance)[2:66] or "0", 16)
            if held is not None and held < payment.amount:
                why = f"the refund wallet {self.address} holds {held} atomic units, the refund needs {payment.amount}"
            else:
                why = "the refund transfer would revert"
            raise _NothingSent(admin_error(503, reasons.REFUND_FAILED, why))

        store = self._claims.store

        async def record(tx_hash: str) -> None:
            await store.record_tx(key, owner, tx_hash, now=time.time(), lease=self._claims.lease)

        try:
            tx_hash = await sender.submit(asset, calldata, int(hex_int(estimate) * _GAS_MARGIN), record)
        except SettlementFailed:  # broadcast without an answer
            raise admin_error(503, reasons.REFUND_FAILED, "the refund's broadcast got no answer; ask again") from None
        except ServiceUnavailable as exc:
            if exc.reason == reasons.RELAYER_REFUSED:
                raise _NothingSent(admin_error(503, reasons.REFUND_FAILED, exc.message)) from None
            raise
        try:
            receipt = await network.watcher.wait(tx_hash, timeout=self._timeout)
        except TimeoutError:
            raise admin_error(
                503, reasons.REFUND_FAILED, "the refund was sent and is not mined yet; ask again"
            ) from None
        moved = transfer_log(receipt, asset, auth.from_, auth.to, auth.value, auth.nonce)
        if moved is not None:
            return _Transfer(tx_hash.lower(), hex_int(receipt.get("blockNumber")))
        found = await self._used(network, payment)  # reverted: an earlier attempt's transaction got there first?
        if found is None:
            raise admin_error(502, reasons.REFUND_FAILED, f"the refund transaction {tx_hash} reverted")
        return found

    async def _used(self, network: Network, payment: LedgerEntry) -> _Transfer | None:
        """The refund's transfer if the token already executed its authorization, else None."""
        asset, nonce = network.config.usdc, refund_nonce(payment.key)
        state_call = {"to": asset, "data": "0x" + abi.AUTHORIZATION_STATE.encode(self.address, nonce).hex()}
        state = await network.rpc.request("eth_call", [state_call, "latest"])
        if not (isinstance(state, str) and len(state) >= 66 and int(state[2:66], 16) != 0):
            return None
        head = hex_int(await network.rpc.request("eth_blockNumber", []))
        logs = await network.rpc.request(
            "eth_getLogs",
            [
                {
                    "address": asset,
                    "fromBlock": hex(max(0, head - LOOKBACK_BLOCKS)),
                    "toBlock": "latest",
                    "topics": [
                        "0x" + abi.AUTHORIZATION_USED_TOPIC.hex(),
                        "0x" + (bytes(12) + bytes.fromhex(self.address[2:])).hex(),
                        "0x" + nonce.hex(),
                    ],
                }
            ],
        )
        for found in logs or ():
            tx_hash = found.get("transactionHash")
            if isinstance(tx_hash, str):
                receipt = await network.rpc.request("eth_getTransactionReceipt", [tx_hash])
                if transfer_log(receipt, asset, self.address, payment.payer, payment.amount, nonce) is not None:
                    return _Transfer(tx_hash.lower(), hex_int(receipt.get("blockNumber")))
        # Used, and not within the window looked at: refunded, the transaction unknown. Never sent again.
        log.warning("refund found executed on chain outside the log window", extra={"key": payment.key})
        return _Transfer("", None)

    async def aclose(self) -> None:
        for relayer in self._own.values():
            await relayer.aclose()


class _NothingSent(Exception):
    """A refund that failed before anything was broadcast: its claim is given back."""

    def __init__(self, error: GatewayError) -> None:
        super().__init__(error.message)
        self.error = error
