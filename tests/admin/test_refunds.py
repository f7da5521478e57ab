"""Refunds: a real payment's amount goes back to its payer from the refund wallet exactly once on chain, however
many times and however concurrently it is asked for, and is recorded in the ledger linked to the payment; a payment
whose settlement a reorg lost is never refunded (the money never arrived), by any instance, after a restart too."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from eth_account import Account
from eth_account.signers.local import LocalAccount

from gateway.chain import abi
from gateway.dev.chain import DevChain, send_transaction, set_eth_balance
from gateway.dev.keys import DEV_KEYS
from gateway.http.admin.refunds import refund_nonce
from gateway.storage.ledger import LedgerEntry, LedgerQuery, open_ledger_store
from gateway.storage.ledger.export import entry_from_record
from tests.admin.conftest import READ_TOKEN, WRITE_TOKEN, Admin, running_admin
from tests.chain.helpers import fast_networks, head, wait_until
from tests.support.gateway import running_gateway, sqlite_url

PRICE = 100_000  # POST /paid: $0.10
FLOAT = 1_000_000  # the refund wallet's USDC


def _paid(admin: Admin, chain: DevChain) -> tuple[LocalAccount, dict[str, Any]]:
    """A real paid request; the payer and its ledger entry (as the admin API lists it)."""
    gw = admin.gateway
    payer = chain.new_payer(PRICE)
    with gw.client() as client:
        name, value = gw.sign(payer, client.post("/paid"))
        assert client.post("/paid", headers={name: value}).status_code == 200
    with admin.client(READ_TOKEN) as api:
        (entry,) = api.get("/admin/payments", params={"payer": payer.address}).json()["payments"]
    return payer, entry


def _refund_executions(chain: DevChain, refund_wallet: str, key: str) -> list[str]:
    """Transactions in which the token executed this payment's refund authorization (AuthorizationUsed logs)."""
    logs = chain.rpc(
        "eth_getLogs",
        [
            {
                "address": chain.usdc,
                "fromBlock": "0x0",
                "toBlock": "latest",
                "topics": [
                    "0x" + abi.AUTHORIZATION_USED_TOPIC.hex(),
                    "0x" + (bytes(12) + bytes.fromhex(refund_wallet[2:])).hex(),
                    "0x" + refund_nonce(key).hex(),
                ],
            }
        ],
    )
    return [str(log["transactionHash"]).lower() for log in logs]


def _together(url: str, body: dict[str, Any], n: int) -> list[httpx.Response]:
    """``n`` POST /admin/refund calls released at once by a barrier, each on a warmed-up connection."""
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n

    def worker(i: int) -> None:
        with httpx.Client(base_url=url, headers={"authorization": f"Bearer {WRITE_TOKEN}"}, timeout=90) as client:
            client.get("/admin/deny")
            barrier.wait(timeout=30)
            try:
                results[i] = client.post("/admin/refund", json=body)
            except httpx.HTTPError as exc:
                results[i] = exc

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(isinstance(r, httpx.Response) for r in results), results
    return results


def test_a_refund_moves_the_amount_exactly_once_even_when_asked_for_concurrently(
    base_chain: DevChain, store_url: str, tmp_path: Path, admin_env: LocalAccount
) -> None:
    refund_wallet = admin_env.address.lower()
    base_chain.mint(refund_wallet, FLOAT)
    with running_admin(base_chain, store_url, tmp_path, admin_env) as admin:
        payer, payment = _paid(admin, base_chain)
        key = payment["key"]
        assert base_chain.balance(payer.address) == 0
        with admin.client(READ_TOKEN) as api:  # a read-only token moves nothing
            r = api.post("/admin/refund", json={"key": key})
            assert r.status_code == 403 and r.json()["error"] == "admin_token_read_only"
        assert base_chain.balance(payer.address) == 0 and base_chain.balance(refund_wallet) == FLOAT

        answers = _together(admin.url, {"key": key}, 4)
        statuses = sorted(r.status_code for r in answers)
        assert statuses == [200, 409, 409, 409], [r.text for r in answers]
        (done,) = [r.json() for r in answers if r.status_code == 200]
        assert done["sent"] is True
        assert {r.json()["error"] for r in answers if r.status_code == 409} <= {
            "refund_in_progress",
            "payment_already_refunded",
        }
        with admin.client() as api:  # and once more, afterwards
            again = api.post("/admin/refund", json={"key": key})
            assert again.status_code == 409 and again.json()["error"] == "payment_already_refunded"
            assert again.json()["refund"] == done["refund"]
            listed = api.get("/admin/payments", params={"payer": payer.address}).json()["payments"]
            revenue = api.get("/admin/revenue", params={"by": "route"}).json()

        assert base_chain.balance(payer.address) == PRICE
        assert base_chain.balance(refund_wallet) == FLOAT - PRICE
        assert base_chain.balance(admin.gateway.pay_to) == PRICE  # the revenue stays where it was paid
        executions = _refund_executions(base_chain, refund_wallet, key)
        assert len(executions) == 1
        refund = done["refund"]
        assert refund["key"] == "refund:" + key and refund["refund_of"] == key and refund["kind"] == "refund"
        assert (refund["amount"], refund["payer"], refund["tx_hash"]) == (-PRICE, payer.address.lower(), executions[0])
        assert refund["block"] is not None and refund["request_id"] == "admin:TEST_ADMIN_WRITE"
        assert [p["kind"] for p in listed] == ["refund", "exact"]
        (paid_route,) = [g for g in revenue["groups"] if g["group"] == "POST /paid"]
        assert paid_route["amount"] == 0 and revenue["total"]["amount"] == 0  # net of the refund
        refunds = [c for c in admin.audit() if c.get("path") == "/admin/refund"]
        assert len(refunds) == 6 and all(c["args"]["key"] == key for c in refunds)
        assert [c["args"].get("tx_hash") for c in refunds if c["status"] == 200] == [executions[0]]


def test_a_refund_already_executed_on_chain_is_recorded_and_never_sent_again(
    base_chain: DevChain, store_url: str, tmp_path: Path, admin_env: LocalAccount
) -> None:
    """The crash window after the transfer was mined and before the ledger heard of it: the next request finds the
    authorization used on chain and records that transfer instead of sending another."""
    refund_wallet = admin_env.address.lower()
    base_chain.mint(refund_wallet, FLOAT)
    with running_admin(base_chain, store_url, tmp_path, admin_env) as admin:
        payer, payment = _paid(admin, base_chain)
        refunds = admin.app.refunds
        assert refunds is not None
        entry = _ledger_entry(admin, payment["key"])
        _, calldata = refunds._authorization(entry, time.time())
        earlier = send_transaction(base_chain.anvil, DEV_KEYS[4], base_chain.usdc, calldata)  # "the dead attempt"
        assert base_chain.balance(payer.address) == PRICE
        with admin.client() as api:
            r = api.post("/admin/refund", json={"key": payment["key"]})
        assert r.status_code == 200, r.text
        assert r.json()["sent"] is False
        assert r.json()["refund"]["tx_hash"] == str(earlier["transactionHash"]).lower()
        assert base_chain.balance(payer.address) == PRICE  # moved once, by the earlier attempt
        assert base_chain.balance(refund_wallet) == FLOAT - PRICE
        assert len(_refund_executions(base_chain, refund_wallet, payment["key"])) == 1


def test_a_refund_the_wallet_cannot_pay_sends_nothing_and_can_be_asked_again(
    base_chain: DevChain, store_url: str, tmp_path: Path, admin_env: LocalAccount
) -> None:
    with running_admin(base_chain, store_url, tmp_path, admin_env) as admin:
        payer, payment = _paid(admin, base_chain)
        with admin.client() as api:
            r = api.post("/admin/refund", json={"key": payment["key"]})
            assert r.status_code == 503 and r.json()["error"] == "refund_failed"
            assert admin_env.address.lower() in r.json()["message"]  # says which wallet is short
            base_chain.mint(admin_env.address, PRICE)
            r = api.post("/admin/refund", json={"key": payment["key"]})  # the claim was given back
            assert r.status_code == 200 and r.json()["sent"] is True
            missing = api.post("/admin/refund", json={"key": "exact:8453:no-such-payment"})
            assert missing.status_code == 404 and missing.json()["error"] == "payment_not_found"
            again = api.post("/admin/refund", json={"key": r.json()["refund"]["key"]})  # a refund of a refund
            assert again.status_code == 400 and again.json()["error"] == "payment_not_refundable"
        assert base_chain.balance(payer.address) == PRICE


def _ledger_entry(admin: Admin, key: str) -> LedgerEntry:
    with admin.client(READ_TOKEN) as api:
        (doc,) = [p for p in api.get("/admin/payments").json()["payments"] if p["key"] == key]
    return entry_from_record(doc)


def test_a_payment_whose_settlement_a_reorg_lost_is_never_refunded_by_any_instance(
    private_chain: DevChain, store_url: str, tmp_path: Path, admin_env: LocalAccount
) -> None:
    """The merchant would pay back money it never received: the tracker's loss is marked in the ledger and every
    refund of that payment is refused (409 payment_settlement_lost), with nothing signed or sent."""
    chain = private_chain  # reorganised: never the session chain
    refund_wallet = admin_env.address.lower()
    chain.mint(refund_wallet, FLOAT)
    with running_admin(chain, store_url, tmp_path, admin_env, networks=fast_networks(chain)) as admin:
        payer, payment = _paid(admin, chain)
        key = payment["key"]
        mined_at = int(chain.rpc("eth_getTransactionReceipt", [payment["tx_hash"]])["blockNumber"], 16)
        assert head(chain) == mined_at  # one confirmation: a reorg of depth 1 drops the settlement
        chain.rpc("anvil_reorg", [1, []])
        # The payer moves the money away before the authorization can be settled again: the tracker counts it lost.
        set_eth_balance(chain.anvil, payer.address, 10**18)
        elsewhere = bytes.fromhex(Account.create().address[2:])  # anywhere but the merchant
        transfer = bytes.fromhex("a9059cbb") + bytes(12) + elsewhere + PRICE.to_bytes(32, "big")
        send_transaction(chain.anvil, "0x" + bytes(payer.key).hex(), chain.usdc, transfer)
        assert wait_until(lambda: _marked_lost(store_url, key)), "the lost settlement was not marked in the ledger"
        assert chain.balance(admin.gateway.pay_to) == 0  # served, and never paid

        with admin.client() as api:
            r = api.post("/admin/refund", json={"key": key})
        assert r.status_code == 409, r.text
        assert r.json()["error"] == "payment_settlement_lost"
        assert chain.balance(refund_wallet) == FLOAT and chain.balance(payer.address) == 0  # nothing sent
        assert _refund_executions(chain, refund_wallet, key) == []
        assert [c["status"] for c in admin.audit() if c.get("path") == "/admin/refund"] == [409]

    # Another instance, started afresh on the same store, refuses it too: the mark is in the store, not in memory.
    with running_admin(chain, store_url, tmp_path, admin_env, networks=fast_networks(chain)) as again:
        with again.client() as api:
            r = api.post("/admin/refund", json={"key": key})
        assert r.status_code == 409 and r.json()["error"] == "payment_settlement_lost", r.text
    assert _refund_executions(chain, refund_wallet, key) == []
    assert chain.balance(refund_wallet) == FLOAT


def _marked_lost(store_url: str, key: str) -> bool:
    """Whether the ledger (the store every instance shares) holds the mark of ``key``'s lost settlement."""

    async def read() -> bool:
        store = open_ledger_store(store_url)
        try:
            return await store.settlement_lost_at(key) is not None
        finally:
            await store.aclose()

    return asyncio.run(read())


def _lose_the_settlement(chain: DevChain, payer: LocalAccount) -> None:
    """A reorg of depth 1 drops the settlement; the payer moves the money away before it can be settled again."""
    chain.rpc("anvil_reorg", [1, []])
    set_eth_balance(chain.anvil, payer.address, 10**18)
    elsewhere = bytes.fromhex(Account.create().address[2:])  # anywhere but the merchant
    transfer = bytes.fromhex("a9059cbb") + bytes(12) + elsewhere + PRICE.to_bytes(32, "big")
    send_transaction(chain.anvil, "0x" + bytes(payer.key).hex(), chain.usdc, transfer)


def test_a_gateway_without_the_admin_api_marks_the_losses_its_tracker_counts(
    private_chain: DevChain, store_url: str
) -> None:
    """Whichever instance's tracker counts a loss (the one holding the journal entry's lease) marks it, admin API
    or not: the instance that later serves the refund reads the mark from the shared store."""
    chain = private_chain
    with running_gateway(chain, store_url=store_url, networks=fast_networks(chain)) as gw:
        payer = chain.new_payer(PRICE)
        with gw.client() as client:
            name, value = gw.sign(payer, client.post("/paid"))
            assert client.post("/paid", headers={name: value}).status_code == 200
        assert wait_until(lambda: len(asyncio.run(_entries(store_url))) == 1)  # written as the answer leaves
        (key,) = [e.key for e in asyncio.run(_entries(store_url))]
        _lose_the_settlement(chain, payer)
        assert wait_until(lambda: _marked_lost(store_url, key)), "a loss counted without the admin API is not marked"


async def _entries(store_url: str) -> list[LedgerEntry]:
    store = open_ledger_store(store_url)
    try:
        return await store.find(LedgerQuery())
    finally:
        await store.aclose()


def test_a_payment_whose_settlement_is_not_final_yet_is_refunded(
    base_chain: DevChain, tmp_path: Path, admin_env: LocalAccount
) -> None:
    """docs/operating.md ("Refunds"): a refund does not wait for finality; only a settlement counted lost is refused."""
    base_chain.mint(admin_env.address, PRICE)
    with running_admin(base_chain, sqlite_url(tmp_path), tmp_path, admin_env) as admin:
        payer, payment = _paid(admin, base_chain)
        with admin.client() as api:
            pending = api.get("/admin/pending").json()["settlements"]
            assert payment["key"] in [s["key"] for s in pending]  # watched by the tracker: not final yet
            r = api.post("/admin/refund", json={"key": payment["key"]})
        assert r.status_code == 200 and r.json()["sent"] is True, r.text
        assert base_chain.balance(payer.address) == PRICE
