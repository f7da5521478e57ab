"""A served request stays paid when the chain changes its mind (docs/threat-model.md T28).

Real anvil chains, reorganised with ``anvil_reorg [depth, []]`` (the last ``depth`` blocks are dropped and empty ones
mined instead) after a paid request was served: the settlement journal and the finality tracker
(gateway/chain/finality.py) must get the merchant paid exactly once while the authorization is valid, and count
and log what cannot be recovered, never sending it again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from eth_account import Account

from gateway.chain.finality import FinalityTracker
from gateway.chain.relayer import Relayer
from gateway.chain.rpc import ChainRpc
from gateway.chain.watcher import ReceiptWatcher
from gateway.config import Secret
from gateway.dev.chain import DEV_KEYS, DevChain, send_transaction, set_eth_balance, start_dev_chain
from gateway.schemes.exact.check import payment_key
from gateway.schemes.exact.onchain import settlement_calldata
from gateway.storage.settlements import SQLiteSettlementJournal
from tests.chain.helpers import PRICE, fast_networks, head, lost_metric, pay, transactions_to, wait_until
from tests.e2e.helpers import authorization_used, decode_payment, receipt_of
from tests.support.facilitator import Payment, make_payment, requirement
from tests.support.gateway import running_gateway, sqlite_url
from tests.unit.test_settlement_batches import exact


def test_a_settlement_a_reorg_dropped_is_settled_again_and_pays_once(chain: DevChain, store_url: str) -> None:
    payer = chain.new_payer(1_000_000)
    with running_gateway(chain, store_url=store_url, networks=fast_networks(chain)) as gw, gw.client() as http:
        served = pay(gw, http, payer)
        assert served.status_code == 200, served.text
        assert gw.balance(gw.pay_to) == PRICE
        tracker = gw.app.payments.engine.networks["base"].finality
        assert tracker is not None
        settled = receipt_of(served)["transaction"]
        mined_at = int(chain.rpc("eth_getTransactionReceipt", [settled])["blockNumber"], 16)
        assert head(chain) == mined_at  # confirmations = 1: a reorg of depth 1 drops it

        chain.rpc("anvil_reorg", [1, []])
        assert chain.rpc("eth_getTransactionReceipt", [settled]) is None
        assert gw.balance(gw.pay_to) == 0  # the request was served, and the chain no longer pays for it

        assert wait_until(lambda: gw.balance(gw.pay_to) == PRICE), "the merchant was never paid"
        # ... exactly once, however long the tracker keeps watching (the authorization executes only once).
        chain.rpc("anvil_mine", ["0x3"])
        passes = tracker.final + tracker.resubmitted
        assert not wait_until(lambda: gw.balance(gw.pay_to) != PRICE, timeout=1.5)
        assert gw.balance(gw.pay_to) == PRICE
        assert tracker.final + tracker.resubmitted >= passes
        assert gw.balance(payer.address) == 1_000_000 - PRICE
        assert lost_metric(gw) == 0.0


def test_a_two_block_reorg_under_two_confirmations_is_settled_again(tmp_path: Path) -> None:
    chain = start_dev_chain(8453, block_time=1)  # blocks keep coming: two confirmations arrive by themselves
    try:
        payer = chain.new_payer(1_000_000)
        networks = fast_networks(chain, confirmations=2)
        with running_gateway(chain, store_url=sqlite_url(tmp_path), networks=networks) as gw, gw.client() as http:
            served = pay(gw, http, payer)
            assert served.status_code == 200, served.text
            settled = receipt_of(served)["transaction"]
            chain.rpc("evm_setIntervalMining", [0])  # hold the chain still while it is reorganised
            mined_at = int(chain.rpc("eth_getTransactionReceipt", [settled])["blockNumber"], 16)
            depth = head(chain) - mined_at + 1
            assert depth >= 2
            chain.rpc("anvil_reorg", [depth, []])
            assert gw.balance(gw.pay_to) == 0
            chain.rpc("evm_setIntervalMining", [1])
            assert wait_until(lambda: gw.balance(gw.pay_to) == PRICE), "the merchant was never paid"
            assert gw.balance(payer.address) == 1_000_000 - PRICE
            assert lost_metric(gw) == 0.0
    finally:
        chain.stop()


def test_an_authorization_expired_before_the_reorg_is_counted_lost_and_never_sent_again(
    chain: DevChain, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    payer = chain.new_payer(1_000_000)
    with (
        running_gateway(chain, store_url=sqlite_url(tmp_path), networks=fast_networks(chain)) as gw,
        gw.client() as http,
    ):
        served = pay(gw, http, payer)
        assert served.status_code == 200, served.text
        settled = receipt_of(served)["transaction"]
        authorization, _, _ = decode_payment(served.request.headers["payment-signature"])
        reorg_at = head(chain)
        chain.rpc("anvil_reorg", [1, []])
        assert chain.rpc("eth_getTransactionReceipt", [settled]) is None
        # The chain's clock passes validBefore before the reorg is noticed: the authorization can never execute.
        # (anvil_reorg dates the blocks it mines by the wall clock again: move the clock after it.)
        chain.rpc("evm_increaseTime", [int(authorization["validBefore"]) - int(time.time()) + 60])
        chain.rpc("evm_mine", [])

        assert wait_until(lambda: lost_metric(gw) == 1.0), "the lost settlement was not counted"
        assert not authorization_used(chain, payer.address, authorization["nonce"])
        assert gw.balance(payer.address) == 1_000_000
        assert gw.balance(gw.pay_to) == 0
        # Nothing that would revert was sent for it: no transaction to the token after the reorg.
        chain.rpc("anvil_mine", ["0x1"])
        assert transactions_to(chain, chain.usdc, reorg_at) == []
        assert lost_metric(gw) == 1.0  # counted once
    lost = [r for r in caplog.records if r.getMessage().startswith("settlement lost")]
    assert len(lost) == 1
    assert lost[0].levelname == "ERROR"
    assert getattr(lost[0], "tx_hash", None) == settled
    assert str(getattr(lost[0], "claim_key", "")).startswith("exact:8453:")


# ------------------------------------------------------------------------------------ the tracker on its own


class Rig:
    """A relayer that settled a payment, a tracker on a journal, and the chain they share."""

    def __init__(self, chain: DevChain, rpc: ChainRpc, key: str, journal: SQLiteSettlementJournal) -> None:
        self.chain = chain
        self.rpc = rpc
        self.key = key
        self.journal = journal

    def tracker(self, relayer: Relayer, on_lost: list[Callable[[str, str], None]] | None = None) -> FinalityTracker:
        return FinalityTracker(
            "base",
            self.rpc,
            relayer,
            lambda: relayer,
            self.journal,
            finality="depth",
            depth=3,
            interval=0.1,
            on_lost=on_lost,
        )


async def settle_one(rig: Rig, relayer: Relayer) -> tuple[Payment, str, bytes, str]:
    """Settle a fresh payment through ``relayer``: (payment, claim key, calldata, tx hash)."""
    payment = make_payment(rig.chain)
    wire = exact(payment)
    calldata = settlement_calldata(wire)

    async def record(tx_hash: str) -> None:
        return None

    tx_hash = await relayer.submit(rig.chain.usdc, calldata, 120_000, record)
    watcher = ReceiptWatcher(rig.rpc, interval=0.02)
    try:
        await watcher.wait(tx_hash, timeout=20)
    finally:
        await watcher.aclose()
    req = requirement(rig.chain, amount=payment.amount, pay_to=payment.pay_to)
    return payment, payment_key(req, wire.authorization), calldata, tx_hash


async def passes(tracker: FinalityTracker, n: int) -> None:
    for _ in range(n):
        await tracker.check()
        await asyncio.gather(*list(tracker._busy.values()))  # a re-submission started by this pass


async def test_the_tracker_settles_again_when_the_relayer_that_sent_it_is_gone(rig: Rig) -> None:
    first = Relayer(rig.rpc, Secret(rig.key))
    payment, key, calldata, tx_hash = await settle_one(rig, first)
    await first.aclose()  # a restart: the new relayer knows nothing of the dropped transaction
    relayer = Relayer(rig.rpc, Secret(rig.key))
    tracker = rig.tracker(relayer)
    try:
        wire = exact(payment)
        tracker.track(key, rig.chain.usdc, calldata, wire.authorization.valid_before, tx_hash)
        await passes(tracker, 1)
        (entry,) = await rig.journal.take("base", tracker.owner, now=0, lease=0, limit=5)
        assert entry.block_number is not None  # placed where it was mined
        rig.chain.rpc("anvil_reorg", [1, []])
        assert rig.chain.balance(payment.pay_to) == 0
        await passes(tracker, tracker.missing_passes)
        assert tracker.resubmitted == 1
        watcher = ReceiptWatcher(rig.rpc, interval=0.02)
        (entry,) = await rig.journal.take("base", tracker.owner, now=0, lease=0, limit=5)
        assert entry.tx_hash != tx_hash  # a new transaction, recorded before it left
        await watcher.wait(entry.tx_hash, timeout=20)
        await watcher.aclose()
        assert rig.chain.balance(payment.pay_to) == payment.amount
        # Watched until final, then forgotten.
        await passes(tracker, 1)
        rig.chain.rpc("anvil_mine", ["0x3"])
        await passes(tracker, 1)
        assert await rig.journal.take("base", tracker.owner, now=0, lease=0, limit=5) == []
        assert tracker.final == 1 and tracker.lost == 0
        assert rig.chain.balance(payment.pay_to) == payment.amount
    finally:
        await tracker.aclose()
        await relayer.aclose()


async def test_an_authorization_someone_else_executed_to_us_after_the_reorg_is_not_settled_again(rig: Rig) -> None:
    first = Relayer(rig.rpc, Secret(rig.key))
    payment, key, calldata, tx_hash = await settle_one(rig, first)
    await first.aclose()
    relayer = Relayer(rig.rpc, Secret(rig.key))
    tracker = rig.tracker(relayer)
    try:
        wire = exact(payment)
        tracker.track(key, rig.chain.usdc, calldata, wire.authorization.valid_before, tx_hash)
        await passes(tracker, 1)
        rig.chain.rpc("anvil_reorg", [1, []])
        # A watcher (or the payer's own facilitator) executes the freed authorization first: the money is ours.
        theirs = send_transaction(rig.chain.anvil, DEV_KEYS[3], rig.chain.usdc, calldata)["transactionHash"]
        await passes(tracker, tracker.missing_passes)
        assert tracker.resubmitted == 0 and tracker.lost == 0
        (entry,) = await rig.journal.take("base", tracker.owner, now=0, lease=0, limit=5)
        assert entry.tx_hash == theirs and entry.block_number is not None  # that execution is watched instead
        assert rig.chain.balance(payment.pay_to) == payment.amount
    finally:
        await tracker.aclose()
        await relayer.aclose()


async def test_a_payer_who_spent_the_money_after_the_reorg_is_counted_lost(rig: Rig) -> None:
    first = Relayer(rig.rpc, Secret(rig.key))
    payment, key, calldata, tx_hash = await settle_one(rig, first)
    await first.aclose()
    relayer = Relayer(rig.rpc, Secret(rig.key))
    lost: list[tuple[str, str]] = []
    tracker = rig.tracker(relayer, on_lost=[lambda network, key: lost.append((network, key))])
    try:
        wire = exact(payment)
        tracker.track(key, rig.chain.usdc, calldata, wire.authorization.valid_before, tx_hash)
        await passes(tracker, 1)
        rig.chain.rpc("anvil_reorg", [1, []])
        # The payer moves everything away before the authorization is executed again.
        payer = payment.payer
        set_eth_balance(rig.chain.anvil, payer.address, 10**18)
        balance = rig.chain.balance(payer.address)
        elsewhere = Account.create().address
        transfer = bytes.fromhex("a9059cbb") + bytes(12) + bytes.fromhex(elsewhere[2:]) + balance.to_bytes(32, "big")
        send_transaction(rig.chain.anvil, "0x" + bytes(payer.key).hex(), rig.chain.usdc, transfer)
        await passes(tracker, tracker.missing_passes)
        assert lost == [("base", key)] and tracker.lost == 1 and tracker.resubmitted == 0
        assert await rig.journal.take("base", tracker.owner, now=0, lease=0, limit=5) == []
        assert not authorization_used(rig.chain, payer.address, "0x" + wire.authorization.nonce.hex())
    finally:
        await tracker.aclose()
        await relayer.aclose()
