"""Attacks on the watched transactions of the finality tracker: a payer's tx-hash transfer and a session deposit,
journalled until final (gateway/chain/finality.py, gateway/chain/watched.py, docs/threat-model.md T28).

Each test runs against a private anvil chain it may reorganise (``anvil_reorg``), a real relayer and a real journal.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpx
import pytest
from eth_abi.abi import encode as abi_encode
from eth_account import Account

from gateway.chain import finality
from gateway.chain.finality import FinalityTracker
from gateway.chain.relayer import Relayer
from gateway.chain.rpc import ChainRpc
from gateway.chain.transactions import signer
from gateway.chain.watched import MAX_RAW, Watched
from gateway.config import Secret
from gateway.dev.chain import send_transaction
from tests.chain.helpers import PRICE
from tests.chain.test_reorg_attacks import key_of, move_everything_away
from tests.chain.test_reorged_settlements import Rig, passes
from tests.clock.test_clock_jumps import HOUR, step_clock
from tests.support.servers import read_body, serve_asgi
from tests.txhash.helpers import TRANSFER_SELECTOR, new_tx_payer


async def test_a_watched_transfer_keeps_a_small_journal_entry_whatever_its_transaction_carries(rig: Rig) -> None:
    """A token's ``transfer`` ignores calldata past its two arguments, so a payer may pad its transfer with up to
    the node's transaction size limit (128 KB) of junk for a few cents of gas. Its signed bytes were kept whole in
    its journal entry, read and written again by every pass until final (minutes): a thousand such proofs made each
    pass move a quarter of a gigabyte through the store (a Redis script returning it blocks every instance). Such a
    transaction is not kept to be sent again; its sender and nonce are, so a reorg that drops it and a payer who
    takes the nonce are still counted."""
    payer = new_tx_payer(rig.chain)
    pay_to = Account.create().address.lower()
    nonce = int(rig.chain.rpc("eth_getTransactionCount", [payer.address, "latest"]), 16)
    data = TRANSFER_SELECTOR + abi_encode(["address", "uint256"], [pay_to, PRICE]) + os.urandom(60_000)
    receipt = send_transaction(rig.chain.anvil, key_of(payer), rig.chain.usdc, data)
    transfer = str(receipt["transactionHash"]).lower()
    relayer = Relayer(rig.rpc, Secret(rig.key))
    lost: list[str] = []
    tracker = rig.tracker(relayer, on_lost=[lambda network, key: lost.append(key)])
    key = f"tx:{rig.chain.chain_id}:{transfer}:0"
    try:
        tracker.watch("transfer", key, rig.chain.usdc, transfer, Watched(payer.address.lower(), pay_to, PRICE))
        await passes(tracker, 1)
        [entry] = await rig.journal.pending("base", limit=10)
        assert len(entry.calldata) < 2 * MAX_RAW + 1024, f"a {len(entry.calldata)}-byte journal entry"
        what = Watched.decode(entry.calldata)
        assert what is not None and what.raw == b""
        assert (what.sender, what.nonce) == (payer.address.lower(), nonce)  # checked against its signed bytes

        rig.chain.rpc("anvil_reorg", [1, []])
        move_everything_away(rig.chain, payer)  # takes the nonce
        await passes(tracker, tracker.missing_passes + 1)
        assert lost == [key], "a dropped transfer whose nonce was taken is counted lost"
    finally:
        await tracker.aclose()
        await relayer.aclose()


async def test_an_ordinary_transfer_is_still_kept_to_be_sent_again(rig: Rig) -> None:
    """The bound leaves the transfers payers send alone: a plain ``transfer`` is kept whole, and sent again as it
    was signed after a reorg drops it."""
    payer = new_tx_payer(rig.chain)
    pay_to = Account.create().address.lower()
    data = TRANSFER_SELECTOR + abi_encode(["address", "uint256"], [pay_to, PRICE])
    transfer = str(send_transaction(rig.chain.anvil, key_of(payer), rig.chain.usdc, data)["transactionHash"]).lower()
    relayer = Relayer(rig.rpc, Secret(rig.key))
    tracker = rig.tracker(relayer)
    try:
        tracker.watch("transfer", f"tx:{rig.chain.chain_id}:{transfer}:0", rig.chain.usdc, transfer,
                      Watched(payer.address.lower(), pay_to, PRICE))  # fmt: skip
        await passes(tracker, 1)
        [entry] = await rig.journal.pending("base", limit=10)
        what = Watched.decode(entry.calldata)
        assert what is not None and 0 < len(what.raw) <= MAX_RAW
        rig.chain.rpc("anvil_reorg", [1, []])
        await passes(tracker, tracker.missing_passes + 1)
        assert tracker.sent_again == 1
        deadline = time.monotonic() + 10
        while rig.chain.rpc("eth_getTransactionReceipt", [transfer]) is None and time.monotonic() < deadline:
            rig.chain.rpc("evm_mine", [])
        assert rig.chain.balance(pay_to) == PRICE
    finally:
        await tracker.aclose()
        await relayer.aclose()


class _WrongSender:
    """A JSON-RPC hop in front of anvil that answers ``eth_getTransactionByHash`` with another ``from``: a field no
    transaction hash covers (a lying or buggy node, T18)."""

    def __init__(self, upstream: str, sender: str = "", refusal: str = "") -> None:
        self.upstream = upstream
        self.sender = sender
        self.refusal = refusal  # set: every broadcast is refused with this message

    def _alter(self, item: Any, method: str) -> Any:
        if not isinstance(item, dict):
            return item
        if method == "eth_getTransactionByHash" and isinstance(item.get("result"), dict) and self.sender:
            item["result"]["from"] = self.sender
        if method == "eth_sendRawTransaction" and self.refusal:
            item.pop("result", None)
            item["error"] = {"code": -32000, "message": self.refusal}
        return item

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        request = json.loads(body)
        if self.refusal and isinstance(request, dict) and request.get("method") == "eth_sendRawTransaction":
            answer: Any = {"jsonrpc": "2.0", "id": request.get("id")}  # never reaches the node
        else:
            async with httpx.AsyncClient() as client:
                upstream = await client.post(self.upstream, content=body, headers={"content-type": "application/json"})
            answer = upstream.json()
        if isinstance(request, list):
            methods = {item.get("id"): item.get("method") for item in request}
            answer = [self._alter(item, methods.get(item.get("id"), "")) for item in answer]
        else:
            answer = self._alter(answer, str(request.get("method")))
        content = json.dumps(answer).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": content})


@contextlib.asynccontextmanager
async def _tracker_behind(rig: Rig, hop: _WrongSender, lost: list[str]) -> AsyncIterator[FinalityTracker]:
    """A tracker (with a relayer of its own) whose RPC goes through ``hop``; the keys it counts lost go to ``lost``."""
    relayer = Relayer(rig.rpc, Secret(rig.key))
    with serve_asgi(hop) as url:
        async with aiohttp.ClientSession() as session:
            rpc = ChainRpc("base", rig.chain.chain_id, [Secret(url)])
            await rpc.start(session)
            tracker = FinalityTracker(
                "base", rpc, relayer, lambda: relayer, rig.journal, finality="depth", depth=3, interval=0.1,
                on_lost=[lambda network, key: lost.append(key)],
            )  # fmt: skip
            try:
                yield tracker
            finally:
                await tracker.aclose()
                await relayer.aclose()


async def test_a_node_that_names_another_sender_cannot_get_a_dropped_transfer_written_off(rig: Rig) -> None:
    """Whose account nonce decides that a dropped transfer can never be mined was the node's ``from``: nothing binds
    it to the transaction's hash. A node naming an account whose nonce is already past the transfer's had the
    tracker count the served transfer lost (and its refund refused) instead of sending it again. The sender is the
    address its signature recovers to."""
    payer = new_tx_payer(rig.chain)
    pay_to = Account.create().address.lower()
    data = TRANSFER_SELECTOR + abi_encode(["address", "uint256"], [pay_to, PRICE])
    transfer = str(send_transaction(rig.chain.anvil, key_of(payer), rig.chain.usdc, data)["transactionHash"]).lower()
    busy = Account.create().address.lower()
    rig.chain.rpc("anvil_setNonce", [busy, "0x64"])  # well past the payer's
    lost: list[str] = []
    async with _tracker_behind(rig, _WrongSender(rig.chain.url, sender=busy), lost) as tracker:
        what = Watched(payer.address.lower(), pay_to, PRICE)
        tracker.watch("transfer", f"tx:{rig.chain.chain_id}:{transfer}:0", rig.chain.usdc, transfer, what)
        await passes(tracker, 1)
        [entry] = await rig.journal.pending("base", limit=10)
        watched = Watched.decode(entry.calldata)
        assert watched is not None and watched.sender == payer.address.lower(), "the node's word was kept"
        rig.chain.rpc("anvil_reorg", [1, []])
        await passes(tracker, tracker.missing_passes + 1)
        assert lost == [] and tracker.sent_again == 1


def test_a_transactions_sender_is_recovered_from_its_signature_for_every_type_it_rebuilds(rig: Rig) -> None:
    """Legacy (EIP-155), EIP-2930 and EIP-1559 transactions: the recovered signer is the payer, whatever ``from``
    says; an answer whose bytes do not hash to the hash has no signer."""
    payer = new_tx_payer(rig.chain)
    data = TRANSFER_SELECTOR + abi_encode(["address", "uint256"], [Account.create().address, 1])
    base: dict[str, Any] = {
        "chainId": rig.chain.chain_id,
        "gas": 100_000,
        "to": rig.chain.usdc,
        "value": 0,
        "data": data,
    }
    fee = int(rig.chain.rpc("eth_gasPrice"), 16) * 2
    access = [{"address": rig.chain.usdc, "storageKeys": ["0x" + "00" * 31 + "01"]}]
    shapes: list[dict[str, Any]] = [
        {"gasPrice": fee},
        {"gasPrice": fee, "accessList": access, "type": 1},
        {"maxFeePerGas": fee, "maxPriorityFeePerGas": 10**9, "accessList": access, "type": 2},
    ]
    for shape in shapes:
        nonce = int(rig.chain.rpc("eth_getTransactionCount", [payer.address, "pending"]), 16)
        signed = payer.sign_transaction({**base, **shape, "nonce": nonce})
        tx_hash = str(rig.chain.rpc("eth_sendRawTransaction", [signed.raw_transaction.to_0x_hex()])).lower()
        answer = rig.chain.rpc("eth_getTransactionByHash", [tx_hash])
        assert signer({**answer, "from": Account.create().address}, tx_hash) == payer.address.lower(), shape
        assert signer({**answer, "nonce": hex(nonce + 1)}, tx_hash) == "", shape


async def test_a_gateway_clock_behind_the_chains_does_not_write_off_a_watched_transfer_early(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A transfer with nothing to send again is counted lost once ``watch_bound`` has passed since it was served,
    on the chain's clock (the pass compares with the latest block's timestamp). Its start was the gateway's clock:
    one two hours behind (a step back) had a transfer dropped in the same instant written off at once."""
    step_clock(monkeypatch, -2 * HOUR, finality)
    payer = new_tx_payer(rig.chain)
    pay_to = Account.create().address.lower()
    data = TRANSFER_SELECTOR + abi_encode(["address", "uint256"], [pay_to, PRICE])
    transfer = str(send_transaction(rig.chain.anvil, key_of(payer), rig.chain.usdc, data)["transactionHash"]).lower()
    relayer = Relayer(rig.rpc, Secret(rig.key))
    lost: list[str] = []
    tracker = rig.tracker(relayer, on_lost=[lambda network, key: lost.append(key)])
    tracker.watch_bound = 600
    try:
        rig.chain.rpc("anvil_reorg", [1, []])  # before it could be read: nothing to send again
        what = Watched(payer=payer.address.lower(), pay_to=pay_to, value=PRICE)
        tracker.watch("transfer", f"tx:{rig.chain.chain_id}:{transfer}:0", rig.chain.usdc, transfer, what)
        await passes(tracker, tracker.missing_passes + 2)
        assert lost == [], "written off before watch_bound passed on the chain's clock"
        rig.chain.rpc("evm_increaseTime", [tracker.watch_bound + 60])
        rig.chain.rpc("evm_mine", [])
        await passes(tracker, 2)
        assert len(lost) == 1
    finally:
        await tracker.aclose()
        await relayer.aclose()


async def test_a_refused_broadcast_is_not_taken_for_one_already_pending(rig: Rig) -> None:
    """A node's "already known" means the transfer is pending again; any other refusal means it is not. The check
    was ``"known" in message``: a refusal saying "unknown ..." counted as sent again on every pass, so a transfer
    that can never be sent was never counted lost at ``watch_bound`` (and its payment stayed refundable)."""
    payer = new_tx_payer(rig.chain)
    pay_to = Account.create().address.lower()
    data = TRANSFER_SELECTOR + abi_encode(["address", "uint256"], [pay_to, PRICE])
    transfer = str(send_transaction(rig.chain.anvil, key_of(payer), rig.chain.usdc, data)["transactionHash"]).lower()
    lost: list[str] = []
    async with _tracker_behind(rig, _WrongSender(rig.chain.url, refusal="unknown transaction type"), lost) as tracker:
        tracker.watch_bound = 600
        what = Watched(payer.address.lower(), pay_to, PRICE)
        tracker.watch("transfer", f"tx:{rig.chain.chain_id}:{transfer}:0", rig.chain.usdc, transfer, what)
        await passes(tracker, 1)
        rig.chain.rpc("anvil_reorg", [1, []])
        await passes(tracker, tracker.missing_passes + 1)
        assert tracker.sent_again == 0, "a refused broadcast counted as sent again"
        rig.chain.rpc("evm_increaseTime", [tracker.watch_bound + 60])
        rig.chain.rpc("evm_mine", [])
        await passes(tracker, tracker.missing_passes + 1)
        assert len(lost) == 1, "never counted lost: every pass took the refusal for a pending transaction"
