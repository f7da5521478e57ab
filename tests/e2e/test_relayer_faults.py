"""A fault of ours is a 5xx: a relayer that cannot pay gas must not be blamed on the payer (no 402)."""

from __future__ import annotations

from pathlib import Path

from eth_account import Account

from gateway.dev.chain import DevChain, set_eth_balance
from tests.support.gateway import running_gateway, sqlite_url


def test_relayer_without_gas_money_is_503_and_the_payment_survives(base_chain: DevChain, tmp_path: Path) -> None:
    relayer = Account.create()
    payer = base_chain.new_payer(1_000_000)
    key = "0x" + bytes(relayer.key).hex()
    with running_gateway(base_chain, store_url=sqlite_url(tmp_path), relayer_key=key) as gw, gw.client() as http:
        first = http.post("/paid-before", json={})
        name, value = gw.sign(payer, first)
        refused = http.post("/paid-before", json={}, headers={name: value})
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"] == "relayer_refused"
        assert gw.upstream.requests == []
        assert gw.balance(payer.address) == 1_000_000
        # The operator tops the relayer up: the very same payment now works, once.
        set_eth_balance(base_chain.anvil, relayer.address, 10**18)
        ok = http.post("/paid-before", json={}, headers={name: value})
        assert ok.status_code == 200, ok.text
        assert gw.balance(payer.address) == 900_000
        assert len(gw.upstream.requests) == 1
