"""Anyone may call the settlement contract's ``settle(pay_to, token)``: it sweeps what was claimed for ``pay_to``
as a fresh ``Transfer(settlement contract -> pay_to)``, sent by whoever called it, not by our relayer. On a route
whose tx-hash proofs need no binding (``tx_hash_binding = "optional"``) that transfer must not buy anything: it is
session revenue already counted, not a payment (docs/threat-model.md T48).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
from eth_abi.abi import encode as abi_encode
from eth_account import Account
from eth_utils.crypto import keccak

from gateway.dev.chain import BATCH_SETTLEMENT_ADDRESS, DevChain, set_eth_balance
from gateway.dev.transactions import send_transaction
from gateway.x402 import reasons
from tests.sessions.crafted import CraftedChannel, session_offer
from tests.sessions.test_official_client_sessions import wait_for
from tests.support.gateway import SESSIONS, running_gateway, sqlite_url

PRICE = 1_000
ROUTES: list[dict[str, Any]] = [
    {"route": "GET /session", "price": "0.001", "schemes": ["batch-settlement"]},
    {"route": "GET /open", "price": "0.001", "tx_hash_binding": "optional"},
]
# Claims a second after the charge; sweeps only once an hour, so the stranger's settle is the one that moves it.
CLAIMING = {**SESSIONS, "min_deposit": "0.01", "claim_interval": 0.2, "claim_after": 1.0, "settle_interval": 3600}


def test_a_strangers_sweep_of_our_session_charges_is_refused_as_a_tx_hash_proof(
    base_chain: DevChain, tmp_path: Path
) -> None:
    with running_gateway(base_chain, store_url=sqlite_url(tmp_path), routes=ROUTES, sessions=CLAIMING) as gw:
        url = gw.url + "/session"
        ch = CraftedChannel.from_offer(base_chain.new_payer(1_000_000), session_offer(httpx.get(url)))
        assert httpx.get(url, headers=ch.header(ch.deposit(10 * PRICE, voucher_max=PRICE))).status_code == 200
        for n in (2, 3):
            assert httpx.get(url, headers=ch.header(ch.paying(n * PRICE))).status_code == 200
        wait_for(lambda: ch.onchain(base_chain).total_claimed == 3 * PRICE, timeout=20)

        stranger = Account.create()
        set_eth_balance(base_chain.anvil, stranger.address, 10**18)
        settle = keccak(text="settle(address,address)")[:4] + abi_encode(
            ["address", "address"], [gw.pay_to, base_chain.usdc]
        )
        tx = send_transaction(base_chain.anvil, "0x" + bytes(stranger.key).hex(), BATCH_SETTLEMENT_ADDRESS, settle)[
            "transactionHash"
        ]
        assert base_chain.balance(gw.pay_to) == 3 * PRICE  # a real transfer to pay_to, worth three prices
        base_chain.rpc("anvil_mine", [hex(20), "0x0"])  # final by any confirmation rule

        served = len(gw.upstream.requests)
        r = httpx.get(gw.url + "/open", headers={"X-PAYMENT": tx, "X-PAYMENT-NETWORK": "base"}, timeout=30)
        assert r.status_code == 402, r.text
        assert r.json()["error"] == reasons.PAYMENT_ALREADY_USED
        assert len(gw.upstream.requests) == served
