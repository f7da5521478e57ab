"""Attacks and faults around reorganisations that tests/chain/test_reorged_settlements.py does not try
(docs/threat-model.md T26, T28, T12/T31, sessions T46-T48).

The money invariant: a served request is paid exactly once, forever. Each test reorganises a private anvil chain
(``anvil_reorg [depth, txs]``: the last ``depth`` blocks are replaced by new ones holding ``txs``; their own
transactions are gone, not back in the mempool) after something was served, then checks that what was served is
still paid for exactly once, or at least that its loss is counted. Every test here failed on the code it was written
against; the two marked as expected failures are the known limits docs/threat-model.md T28 states.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_abi.abi import encode as abi_encode
from eth_account import Account
from eth_utils.crypto import keccak

from gateway.chain.finality import FinalityTracker
from gateway.chain.relayer import Relayer
from gateway.config import Secret
from gateway.dev.chain import BATCH_SETTLEMENT_ADDRESS, DevChain, send_transaction, set_eth_balance
from gateway.storage.settlements import SQLiteSettlementJournal
from tests.chain.helpers import PRICE, fast_networks, head, lost_metric, pay, wait_until
from tests.chain.test_reorged_settlements import Rig, passes, settle_one
from tests.e2e import craft
from tests.e2e.helpers import decode_payment, receipt_of
from tests.sessions.crafted import CraftedChannel, session_offer
from tests.sessions.test_a_client_that_lost_its_state_resynchronises import fresh_client
from tests.sessions.test_a_client_that_lost_its_state_resynchronises import pay as pay_session
from tests.sessions.test_official_client_sessions import ROUTES as SESSION_ROUTES
from tests.support.gateway import SESSIONS, running_gateway, sqlite_url
from tests.txhash.helpers import erc20_transfer, new_tx_payer, proof
from tests.unit.test_settlement_batches import exact

SESSION_PRICE = 1_000  # GET /session: $0.001
QUIET_SESSIONS = {**SESSIONS, "min_deposit": "0.05", "claim_interval": 3600}  # charges stay unclaimed meanwhile


def key_of(account: Any) -> str:
    return "0x" + bytes(account.key).hex()


def move_everything_away(chain: DevChain, payer: Any) -> None:
    """The payer sends its whole USDC balance to a fresh address (its own transaction, gas paid by itself)."""
    set_eth_balance(chain.anvil, payer.address, 10**18)
    amount = chain.balance(payer.address)
    data = keccak(text="transfer(address,uint256)")[:4] + abi_encode(
        ["address", "uint256"], [Account.create().address, amount]
    )
    send_transaction(chain.anvil, key_of(payer), chain.usdc, data)


# ------------------------------------------------------------------------ exact: one execution, two serves


def test_a_payer_who_executes_its_own_reorged_authorization_cannot_present_that_transfer_again(
    chain: DevChain, tmp_path: Path
) -> None:
    """T26 after a reorg. The exact payment took the effect key of OUR settlement's Transfer. A reorg drops that
    transaction; the payer executes the (valid again) authorization itself, in its own transaction, before our
    tracker or nonce keeper re-sends ours. The money arrives once, through a transaction whose effect key nobody
    holds, and the payer presents it as a (bound) tx-hash proof: a second serve for one transfer."""
    payer = chain.new_payer(1_000_000)
    with (
        running_gateway(chain, store_url=sqlite_url(tmp_path), networks=fast_networks(chain)) as gw,
        gw.client() as http,
    ):
        served = pay(gw, http, payer)
        assert served.status_code == 200, served.text
        settled = receipt_of(served)["transaction"]
        auth, signature, _ = decode_payment(served.request.headers["payment-signature"])

        chain.rpc("anvil_reorg", [1, []])  # confirmations = 1: our settlement is gone
        assert chain.rpc("eth_getTransactionReceipt", [settled]) is None
        # At once (our nonce keeper needs two checks a second apart, the tracker two passes), the payer executes
        # its own authorization to us: the tracker will follow that execution as "someone else settled it".
        set_eth_balance(chain.anvil, payer.address, 10**18)
        theirs = craft.execute_authorization(chain, auth, signature, key=key_of(payer))
        assert gw.balance(gw.pay_to) == PRICE

        second = http.post("/paid", json={}, headers=proof(gw, payer, theirs))
        assert second.status_code == 402, (
            f"one transfer served twice: the exact payment (settlement {settled} reorged away) and a tx-hash proof "
            f"of the payer's own execution {theirs} of the same authorization"
        )
        assert len(gw.upstream.requests) == 1
        assert gw.balance(gw.pay_to) == PRICE


# ----------------------------------------------------------------- tx-hash: the payer's own transfer reorged


@pytest.mark.xfail(
    strict=True,
    reason="known limit (docs/threat-model.md T28): tx-hash transfers are not watched after they are served",
)
def test_a_served_tx_hash_proof_whose_transfer_a_reorg_dropped_is_at_least_counted(
    chain: DevChain, tmp_path: Path
) -> None:
    """A tx-hash proof is served once its transfer has ``confirmations`` blocks (T7), then nothing watches it:
    the settlement journal holds exact settlements only. A reorg deeper than that drops the payer's transfer; the
    payer signs another transaction at the same nonce (its money goes elsewhere). The request stays unpaid for
    good, and unlike an exact settlement (T28: ``settlements_lost_total``, an ERROR log) nobody is told."""
    payer = new_tx_payer(chain)
    with (
        running_gateway(chain, store_url=sqlite_url(tmp_path), networks=fast_networks(chain)) as gw,
        gw.client() as http,
    ):
        transfer = erc20_transfer(chain, payer, gw.pay_to, PRICE)
        served = http.post("/paid", json={}, headers=proof(gw, payer, transfer))
        assert served.status_code == 200, served.text
        chain.rpc("anvil_reorg", [1, []])
        assert chain.rpc("eth_getTransactionReceipt", [transfer]) is None
        move_everything_away(chain, payer)  # the same nonce, another recipient: the transfer can never land
        assert gw.balance(gw.pay_to) == 0
        counted = wait_until(lambda: lost_metric(gw) == 1.0, timeout=5.0)
        assert counted, "a served tx-hash proof whose transfer a reorg dropped is unpaid, and not counted lost"


# ------------------------------------------------------------ exact: served through reconciliation by hash


def test_a_settlement_reconciled_by_hash_is_served_only_with_the_configured_confirmations(
    chain: DevChain, tmp_path: Path
) -> None:
    """T12/T31 meet T28. With ``confirmations = 3`` the first request waits for three blocks, times out (503
    settlement_pending) and hands its claim over; the retry reconciles by the recorded hash
    (ExactScheme._reconcile) and serves as soon as a receipt exists, with one confirmation: the setting that
    protects against a two-block reorg is skipped on that path."""
    payer = chain.new_payer(1_000_000)
    networks = fast_networks(chain, confirmations=3)
    with (
        running_gateway(
            chain, store_url=sqlite_url(tmp_path), networks=networks, payment={"settle_timeout": 1.0}
        ) as gw,
        gw.client() as http,
    ):
        challenge = http.post("/paid-before", json={})
        name, value = gw.sign(payer, challenge)
        first = http.post("/paid-before", json={}, headers={name: value})
        assert first.status_code == 503, first.text  # mined, one block of three: pending
        retry = http.post("/paid-before", json={}, headers={name: value})
        if retry.status_code == 200:
            tx = receipt_of(retry)["transaction"]
            mined_at = int(chain.rpc("eth_getTransactionReceipt", [tx])["blockNumber"], 16)
            depth = head(chain) - mined_at + 1
            assert depth >= 3, f"served on a settlement with {depth} of 3 confirmations (reconciled by hash)"


def test_a_settlement_reconciled_by_hash_is_watched_until_final(chain: DevChain, tmp_path: Path) -> None:
    """T28 for the reconcile path. A settlement whose receipt came too late for its own request (503
    settlement_pending, the claim handed over) is served to the retry by ExactScheme._reconcile, which never hands
    it to the finality tracker. If a reorg then drops it after the relayer forgot it (a restart, or 15 minutes),
    nothing ever sends the authorization again, and the loss is not even counted."""
    payer = chain.new_payer(1_000_000)
    store = sqlite_url(tmp_path)
    chain.rpc("evm_setAutomine", [False])  # the settlement waits in the pool past settle_timeout
    with (
        running_gateway(chain, store_url=store, networks=fast_networks(chain), payment={"settle_timeout": 1.0}) as gw,
        gw.client() as http,
    ):
        challenge = http.post("/paid-before", json={})
        name, value = gw.sign(payer, challenge)
        first = http.post("/paid-before", json={}, headers={name: value})
        assert first.status_code == 503, first.text
        chain.rpc("evm_mine", [])
        chain.rpc("evm_setAutomine", [True])
        retry = http.post("/paid-before", json={}, headers={name: value})
        assert retry.status_code == 200, retry.text  # reconciled by hash, served
        settled = receipt_of(retry)["transaction"]
        assert gw.balance(gw.pay_to) == PRICE
        # The tracker passes every 0.2 s: a served settlement is in the journal until final.
        watched = wait_until(lambda: any(e.tx_hash == settled for e in asyncio.run(_pending(store))), timeout=3.0)
        assert watched, f"the request served on settlement {settled} (reconciled by hash) is not watched until final"


async def _pending(store_url: str) -> list[Any]:
    from gateway.storage.settlements import open_settlement_journal

    journal = open_settlement_journal(store_url)
    try:
        return list(await journal.pending("base", limit=100))
    finally:
        await journal.aclose()


# -------------------------------------------------------------------------- sessions: a deposit reorged out


def test_a_session_deposit_waits_for_the_configured_confirmations(chain: DevChain, tmp_path: Path) -> None:
    """A deposit is waited for until mined (ChannelChain.send: ``watcher.wait`` with its default of one
    confirmation), whatever the network's ``confirmations``: vouchers are served on a deposit a one-block reorg
    takes away, although the operator asked for three blocks."""
    payer = chain.new_payer(5_000_000)
    networks = fast_networks(chain, confirmations=3)
    with running_gateway(
        chain,
        store_url=sqlite_url(tmp_path),
        routes=SESSION_ROUTES,
        sessions=QUIET_SESSIONS,
        networks=networks,
        payment={"settle_timeout": 2.0},  # no block follows on this chain: a deposit waiting for three times out
    ) as gw:
        out = asyncio.run(pay_session(fresh_client(payer, chain.url), gw.url + "/session", 1, []))
        (first,) = out
        if first.status_code == 200:
            deposit = receipt_of(first)["transaction"]
            mined_at = int(chain.rpc("eth_getTransactionReceipt", [deposit])["blockNumber"], 16)
            depth = head(chain) - mined_at + 1
            assert depth >= 3, f"a session was served on a deposit with {depth} of 3 confirmations"


@pytest.mark.xfail(
    strict=True,
    reason="known limit (docs/threat-model.md T28): session deposits are not journaled after they are served on",
)
def test_vouchers_are_not_served_on_a_deposit_a_reorg_took_away(chain: DevChain, tmp_path: Path) -> None:
    """A deposit is served on, then a reorg drops it. Nothing journals deposits (the finality tracker watches
    exact settlements only), and vouchers on a known channel are checked against the store's mirror of its
    balance, without the chain. The payer moves its USDC away so that the deposit can never execute again, and
    keeps presenting vouchers: each is served on money that is not there."""
    payer = chain.new_payer(5_000_000)
    with running_gateway(
        chain,
        store_url=sqlite_url(tmp_path),
        routes=SESSION_ROUTES,
        sessions=QUIET_SESSIONS,
        networks=fast_networks(chain),
    ) as gw:
        client = fresh_client(payer, chain.url)
        url = gw.url + "/session"
        out = asyncio.run(pay_session(client, url, 2, []))
        assert [r.status_code for r in out] == [200, 200], [r.text for r in out]
        deposit = receipt_of(out[0])["transaction"]
        assert chain.rpc("eth_getTransactionReceipt", [deposit]) is not None

        chain.rpc("anvil_reorg", [1, []])
        assert chain.rpc("eth_getTransactionReceipt", [deposit]) is None
        assert chain.balance(payer.address) == 5_000_000  # the deposit never happened
        move_everything_away(chain, payer)  # ... and now it never can

        more = asyncio.run(pay_session(client, url, 5, []))
        served = [r for r in more if r.status_code == 200]
        unbacked = (2 + len(served)) * SESSION_PRICE
        assert not served, (
            f"{len(served)} more vouchers served after the deposit left the chain: {unbacked} atomic units served "
            "on a channel holding nothing"
        )


# ------------------------------------------------------------------------------ the journal across a restart


async def test_a_restarted_gateway_settles_again_what_its_predecessor_was_watching(rig: Rig, tmp_path: Path) -> None:
    """The journal is durable, but its entries are leased to the tracker that wrote them, named by a random
    ``uuid4`` per process, for ``max(60 s, 10 x interval)``; a clean shutdown does not give them back. After a
    restart (a deploy), a reorg that drops a served settlement is not acted on until that lease lapses: an
    authorization that expires within that minute is lost although a gateway was watching all along."""
    first = Relayer(rig.rpc, Secret(rig.key))
    payment, key, calldata, tx_hash = await settle_one(rig, first)
    path = str(tmp_path / "settlements.db")

    def tracker(relayer: Relayer) -> FinalityTracker:
        journal = SQLiteSettlementJournal(path)
        return FinalityTracker(
            "base", rig.rpc, relayer, lambda: relayer, journal, finality="depth", depth=3, interval=0.1
        )

    before = tracker(first)
    wire = exact(payment)
    before.track(key, rig.chain.usdc, calldata, wire.authorization.valid_before, tx_hash)
    await passes(before, 1)  # journalled and placed in its block
    await before.aclose()
    await first.aclose()  # the gateway stops cleanly (a deploy) ...
    relayer = Relayer(rig.rpc, Secret(rig.key))
    after = tracker(relayer)  # ... and starts again on the same journal
    try:
        rig.chain.rpc("anvil_reorg", [1, []])
        assert rig.chain.balance(payment.pay_to) == 0
        await passes(after, after.missing_passes + 1)
        assert after.resubmitted == 1, "the restarted gateway did not settle again the settlement a reorg dropped"
    finally:
        await after.aclose()
        await relayer.aclose()


# --------------------------------------------------------------- sessions: a withdrawal the reorg moved back


WATCHING = {**SESSIONS, "min_deposit": "0.10", "claim_interval": 0.2, "claim_after": 3600, "settle_interval": 0.2}


def test_a_withdrawal_that_a_reorg_places_in_a_block_already_read_is_still_claimed(
    chain: DevChain, tmp_path: Path
) -> None:
    """T46 under a reorg. The claimer reads ``WithdrawInitiated`` logs from where it stopped up to the head and
    never looks back (Claimer._watch_withdrawals). A reorg that replaces a block it already read with one holding
    the payer's ``initiateWithdraw`` (its transaction was pending, the new block producer included it) hides the
    withdrawal for good: the channel is neither claimed at once nor marked closing, and the payer takes back every
    unclaimed charge when the delay ends (with ``withdraw_delay = 900``, before ``claim_after`` would claim it)."""
    payer = chain.new_payer(1_000_000)
    with running_gateway(chain, store_url=sqlite_url(tmp_path), routes=SESSION_ROUTES, sessions=WATCHING) as gw:
        url = gw.url + "/session"
        ch = CraftedChannel.from_offer(payer, session_offer(httpx.get(url)))
        assert httpx.get(url, headers=ch.header(ch.deposit(100_000, voucher_max=SESSION_PRICE))).status_code == 200
        for n in range(2, 4):
            assert httpx.get(url, headers=ch.header(ch.paying(n * SESSION_PRICE))).status_code == 200
        charged = 3 * SESSION_PRICE
        claimer = gw.app.payments.engine.claimer
        withdraw = initiate_withdraw(chain, ch, 100_000)  # signed now (its gas money must predate the reorg)
        chain.rpc("evm_mine", [])  # an empty block ...
        read = head(chain)
        assert wait_until(lambda: claimer._from_block.get("base", 0) > read, timeout=5.0)  # ... that the claimer read
        assert ch.onchain(chain).total_claimed == 0  # nothing due yet: small, young charges

        # That block is replaced by one holding the payer's initiateWithdraw.
        chain.rpc("anvil_reorg", [1, [[withdraw, 0]]])
        assert head(chain) == read and ch.onchain(chain).withdraw_initiated_at > 0
        claimed = wait_until(lambda: ch.onchain(chain).total_claimed == charged, timeout=10.0)
        assert claimed, (
            f"the withdrawal in re-mined block {read} was never seen (withdrawals_seen = "
            f"{claimer.stats.withdrawals_seen}): {charged} charged and unclaimed, the payer can take it back"
        )


def initiate_withdraw(chain: DevChain, ch: CraftedChannel, amount: int) -> str:
    """The payer's signed ``initiateWithdraw(config, amount)``, raw, not sent."""
    config_type = "(address,address,address,address,address,uint40,bytes32)"
    data = keccak(text=f"initiateWithdraw({config_type},uint128)")[:4] + abi_encode(
        [config_type, "uint128"], [ch.abi_config(), amount]
    )
    account = ch.payer
    set_eth_balance(chain.anvil, account.address, 10**18)
    base_fee = int(chain.rpc("eth_getBlockByNumber", ["latest", False])["baseFeePerGas"], 16)
    signed = account.sign_transaction(
        {
            "chainId": chain.chain_id,
            "nonce": int(chain.rpc("eth_getTransactionCount", [account.address, "pending"]), 16),
            "gas": 200_000,
            "maxFeePerGas": 4 * base_fee + 10**9,
            "maxPriorityFeePerGas": 10**9,
            "to": BATCH_SETTLEMENT_ADDRESS,
            "value": 0,
            "data": data,
            "type": 2,
        }
    )
    return str(signed.raw_transaction.to_0x_hex())
