"""Attacks and faults around reorganisations that tests/chain/test_reorged_settlements.py does not try
(docs/threat-model.md T26, T28, T12/T31, sessions T46-T48).

The money invariant: a served request is paid exactly once, forever. Each test reorganises a private anvil chain
(``anvil_reorg [depth, txs]``: the last ``depth`` blocks are replaced by new ones holding ``txs``; their own
transactions are gone, not back in the mempool) after something was served, then checks that what was served is
still paid for exactly once, or at least that its loss is counted. Every test here failed on the code it was written
against (the tx-hash transfer and session deposit ones as known limits of T28, until both were journalled).
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
from gateway.chain.transactions import signed_transaction
from gateway.chain.watched import Watched
from gateway.config import Secret
from gateway.dev.chain import BATCH_SETTLEMENT_ADDRESS, DevChain, send_transaction, set_eth_balance
from gateway.storage.settlements import SQLiteSettlementJournal
from gateway.x402 import reasons
from gateway.x402.codec import decode_header
from tests.chain.helpers import PRICE, fast_networks, head, lost_metric, pay, wait_until
from tests.chain.test_reorged_settlements import Rig, passes, settle_one
from tests.e2e import craft
from tests.e2e.helpers import decode_payment, receipt_of
from tests.sessions.crafted import CraftedChannel, session_offer
from tests.sessions.test_a_client_that_lost_its_state_resynchronises import fresh_client
from tests.sessions.test_a_client_that_lost_its_state_resynchronises import pay as pay_session
from tests.sessions.test_official_client_sessions import ROUTES as SESSION_ROUTES
from tests.support.facilitator import run_x402_facilitator
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


def test_a_served_tx_hash_proof_whose_transfer_a_reorg_dropped_is_at_least_counted(
    chain: DevChain, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A tx-hash proof is served once its transfer has ``confirmations`` blocks (T7); a reorg deeper than that drops
    the payer's transfer, and the payer signs another transaction at the same nonce (its money goes elsewhere).
    The request stays unpaid for good; like an exact settlement (T28) the loss must be counted and logged: the
    served transfer is in the settlement journal, and once its payer's nonce is taken it can never be mined."""
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
        chain.rpc("anvil_mine", ["0x2"])
        assert not wait_until(lambda: lost_metric(gw) != 1.0, timeout=1.0)  # once
        assert asyncio.run(_pending(sqlite_url(tmp_path))) == []  # and no longer watched
    lost = [r for r in caplog.records if r.levelname == "ERROR" and "lost" in r.getMessage()]
    assert len(lost) == 1
    assert getattr(lost[0], "tx_hash", None) == transfer
    assert str(getattr(lost[0], "claim_key", "")).startswith(f"tx:{chain.chain_id}:{transfer}:")


def test_a_replacement_of_a_served_transfer_a_reorg_dropped_pays_nothing_new(chain: DevChain, store_url: str) -> None:
    """The reorg drops a served transfer and the payer gets a *replacement* mined at once: the same nonce, a new
    hash, paying us again. The money arrives once (the first transfer never lands), so the replacement, a
    transaction never presented before, must not buy a second request: it fills the transaction slot the served
    proof took."""
    payer = new_tx_payer(chain)
    with running_gateway(chain, store_url=store_url, networks=fast_networks(chain)) as gw, gw.client() as http:
        transfer = erc20_transfer(chain, payer, gw.pay_to, PRICE)
        nonce = chain.rpc("eth_getTransactionByHash", [transfer])["nonce"]
        served = http.post("/paid", json={}, headers=proof(gw, payer, transfer))
        assert served.status_code == 200, served.text

        chain.rpc("anvil_reorg", [1, []])
        assert chain.rpc("eth_getTransactionReceipt", [transfer]) is None
        replacement = erc20_transfer(chain, payer, gw.pay_to, PRICE + 1)  # the next nonce is the dropped one's
        assert replacement != transfer
        assert chain.rpc("eth_getTransactionByHash", [replacement])["nonce"] == nonce
        assert gw.balance(gw.pay_to) == PRICE + 1

        second = http.post("/paid", json={}, headers=proof(gw, payer, replacement))
        assert second.status_code == 402, f"one payment served twice: {transfer} (reorged away) and its replacement"
        assert decode_header(second.headers["payment-required"])["error"] == reasons.PAYMENT_ALREADY_USED
        assert len(gw.upstream.requests) == 1


def test_a_tx_hash_proof_served_on_a_facilitator_network_is_watched_too(chain: DevChain, tmp_path: Path) -> None:
    """A network whose exact payments a remote facilitator settles has no relayer of ours, but its tx-hash proofs
    are checked and served by the gateway itself: a reorg that drops one is counted as anywhere else."""
    payer = new_tx_payer(chain)
    with run_x402_facilitator(chain) as facilitator:
        networks = fast_networks(chain, verifier="facilitator", facilitator={"url": facilitator, "timeout": 5.0})
        with (
            running_gateway(chain, store_url=sqlite_url(tmp_path), networks=networks) as gw,
            gw.client() as http,
        ):
            transfer = erc20_transfer(chain, payer, gw.pay_to, PRICE)
            served = http.post("/paid", json={}, headers=proof(gw, payer, transfer))
            assert served.status_code == 200, served.text
            chain.rpc("anvil_reorg", [1, []])
            move_everything_away(chain, payer)
            assert wait_until(lambda: lost_metric(gw) == 1.0, timeout=5.0), "not watched on a facilitator network"


def test_a_served_transfer_a_reorg_dropped_is_sent_again_as_its_payer_signed_it(
    chain: DevChain, store_url: str
) -> None:
    """The same reorg, but the payer does nothing: its nonce stays unused, and its signed transfer (rebuilt from
    the node's answer when it was served, checked against its hash) is sent again as it was. It is mined under the
    same hash and pays once; nothing is counted lost."""
    payer = new_tx_payer(chain)
    with running_gateway(chain, store_url=store_url, networks=fast_networks(chain)) as gw, gw.client() as http:
        transfer = erc20_transfer(chain, payer, gw.pay_to, PRICE)
        served = http.post("/paid", json={}, headers=proof(gw, payer, transfer))
        assert served.status_code == 200, served.text
        watched = wait_until(lambda: [e.kind for e in asyncio.run(_pending(store_url))] == ["transfer"], timeout=3.0)
        assert watched, "the served transfer is not in the settlement journal"
        chain.rpc("anvil_reorg", [1, []])
        assert chain.rpc("eth_getTransactionReceipt", [transfer]) is None
        assert gw.balance(gw.pay_to) == 0

        assert wait_until(lambda: gw.balance(gw.pay_to) == PRICE, timeout=10.0), "the transfer was not sent again"
        assert chain.rpc("eth_getTransactionReceipt", [transfer]) is not None  # under its own hash
        tracker = gw.app.payments.engine.networks["base"].finality
        assert tracker is not None and tracker.sent_again == 1
        chain.rpc("anvil_mine", ["0x3"])
        assert not wait_until(lambda: gw.balance(gw.pay_to) != PRICE, timeout=1.0)
        assert lost_metric(gw) == 0.0
        chain.rpc("anvil_mine", ["0x40"])
        assert wait_until(lambda: asyncio.run(_pending(store_url)) == [], timeout=5.0), "final, and still watched"
        # A second presentation of the same transfer is still the same claim: refused.
        again = http.post("/paid", json={}, headers=proof(gw, payer, transfer))
        assert again.status_code == 402, again.text


async def test_a_watched_transfer_that_is_never_mined_again_is_counted_lost_at_the_bound(
    rig: Rig, tmp_path: Path
) -> None:
    """A reorg drops the payer's transfer before its journal entry could read the transaction (no nonce, no signed
    bytes to send again), and nobody sends it again: it is counted lost once ``watch_bound`` has passed on the
    chain's clock, not before, and not again."""
    payer = new_tx_payer(rig.chain)
    pay_to = Account.create().address.lower()
    transfer = erc20_transfer(rig.chain, payer, pay_to, PRICE)
    relayer = Relayer(rig.rpc, Secret(rig.key))
    lost: list[tuple[str, str]] = []
    tracker = rig.tracker(relayer, on_lost=[lambda network, key: lost.append((network, key))])
    tracker.watch_bound = 600
    try:
        rig.chain.rpc("anvil_reorg", [1, []])
        what = Watched(payer=payer.address.lower(), pay_to=pay_to, value=PRICE)
        tracker.watch("transfer", f"tx:{rig.chain.chain_id}:{transfer}:0", rig.chain.usdc, transfer, what)
        await passes(tracker, tracker.missing_passes + 2)
        assert lost == [] and tracker.sent_again == 0  # nothing to send, its nonce unread: waited for
        rig.chain.rpc("evm_increaseTime", [tracker.watch_bound + 60])
        rig.chain.rpc("evm_mine", [])
        await passes(tracker, 2)
        assert lost == [("base", f"tx:{rig.chain.chain_id}:{transfer}:0")]
        assert await rig.journal.pending("base", limit=10) == []
    finally:
        await tracker.aclose()
        await relayer.aclose()


def test_a_transaction_is_rebuilt_only_when_its_bytes_hash_to_its_hash(chain: DevChain) -> None:
    """The tracker may send a payer's transaction again only as the payer signed it: the bytes rebuilt from a node's
    answer (legacy, EIP-2930 and EIP-1559 transactions) must hash to the transaction's hash, so a node that alters
    any field cannot make us broadcast something else."""
    payer = new_tx_payer(chain)
    to = Account.create().address
    data = keccak(text="transfer(address,uint256)")[:4] + abi_encode(["address", "uint256"], [to, 1])
    base = {"chainId": chain.chain_id, "gas": 100_000, "to": chain.usdc, "value": 0, "data": data}
    fee = int(chain.rpc("eth_gasPrice"), 16) * 2
    access = [{"address": chain.usdc, "storageKeys": ["0x" + "00" * 31 + "01"]}]
    shapes: list[dict[str, Any]] = [
        {"gasPrice": fee},
        {"gasPrice": fee, "accessList": access, "type": 1},
        {"maxFeePerGas": fee, "maxPriorityFeePerGas": 10**9, "accessList": access, "type": 2},
    ]
    for shape in shapes:
        nonce = int(chain.rpc("eth_getTransactionCount", [payer.address, "pending"]), 16)
        signed = payer.sign_transaction({**base, **shape, "nonce": nonce})
        tx_hash = str(chain.rpc("eth_sendRawTransaction", [signed.raw_transaction.to_0x_hex()])).lower()
        answer = chain.rpc("eth_getTransactionByHash", [tx_hash])
        assert signed_transaction(answer, tx_hash) == bytes(signed.raw_transaction), shape
        assert signed_transaction({**answer, "value": "0x1"}, tx_hash) == b"", shape  # altered: refused
        assert signed_transaction(answer, "0x" + "00" * 32) == b""


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


def test_vouchers_are_not_served_on_a_deposit_a_reorg_took_away(
    chain: DevChain, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A deposit is served on, then a reorg drops it. Vouchers on a known channel are checked against the store's
    mirror of its balance, without the chain; the payer moves its USDC away so that the deposit can never execute
    again, and keeps presenting vouchers. The deposit is in the settlement journal: the tracker sets the channel's
    mirror to the chain's balance as soon as it finds the deposit gone, and counts it lost once our relayer's
    nonce has been taken by another transaction (the nonce keeper's no-op: the deposit would revert now). From
    then on every voucher is refused."""
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
        counted = wait_until(lambda: lost_metric(gw) == 1.0, timeout=10.0)
        assert counted, "a served-on deposit that a reorg took away for good is not counted lost"

        answers: list[httpx.Response] = []
        more = asyncio.run(pay_session(client, url, 5, answers))
        served = [r for r in more if r.status_code == 200]
        unbacked = (2 + len(served)) * SESSION_PRICE
        assert not served, (
            f"{len(served)} more vouchers served after the deposit left the chain: {unbacked} atomic units served "
            "on a channel holding nothing"
        )
        # Refused with the scheme's answer for a voucher beyond the balance: the client sees it must deposit more.
        reasons_seen = {decode_header(r.headers["payment-required"]).get("error") for r in answers}
        assert reasons_seen == {reasons.SESSION_CUMULATIVE_EXCEEDS_BALANCE}, reasons_seen
        assert lost_metric(gw) == 1.0  # counted once
    lost = [r for r in caplog.records if r.levelname == "ERROR" and "lost" in r.getMessage()]
    assert [getattr(r, "tx_hash", None) for r in lost] == [deposit]


def test_a_deposit_a_reorg_dropped_is_mined_again_and_the_session_goes_on(chain: DevChain, store_url: str) -> None:
    """The same reorg, but the payer keeps its money: our relayer sends the very same deposit transaction again
    (same hash), it is mined, and vouchers on the channel are served again on the chain's word; nothing is lost and
    the payer paid the deposit once."""
    payer = chain.new_payer(5_000_000)
    with running_gateway(
        chain, store_url=store_url, routes=SESSION_ROUTES, sessions=QUIET_SESSIONS, networks=fast_networks(chain)
    ) as gw:
        client = fresh_client(payer, chain.url)
        url = gw.url + "/session"
        out = asyncio.run(pay_session(client, url, 2, []))
        assert [r.status_code for r in out] == [200, 200], [r.text for r in out]
        deposit = receipt_of(out[0])["transaction"]
        deposited = 5_000_000 - chain.balance(payer.address)
        assert deposited > 0

        chain.rpc("anvil_reorg", [1, []])
        assert chain.rpc("eth_getTransactionReceipt", [deposit]) is None
        mined = wait_until(lambda: chain.rpc("eth_getTransactionReceipt", [deposit]) is not None, timeout=10.0)
        assert mined, "the dropped deposit was not sent again"
        assert chain.balance(payer.address) == 5_000_000 - deposited  # once

        more = asyncio.run(pay_session(client, url, 3, []))
        assert [r.status_code for r in more] == [200] * 3, [r.text for r in more]
        assert chain.balance(payer.address) == 5_000_000 - deposited  # no second deposit was needed
        assert lost_metric(gw) == 0.0


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
