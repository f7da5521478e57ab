"""The deny-list at work: a denied payer's new payment is refused 403 ``payer_denied`` before it settles, on every
instance of the store, and nothing is charged: the same payment, once the payer is allowed again, pays once."""

from __future__ import annotations

from pathlib import Path

import httpx
from eth_account.signers.local import LocalAccount

from gateway.dev.chain import DevChain
from tests.admin.conftest import running_admin
from tests.e2e.helpers import authorization_used, decode_payment
from tests.support.gateway import running_gateway
from tests.txhash.helpers import pay, proof

PRICE = 100_000  # POST /paid: $0.10


def test_a_denied_payer_is_refused_before_settlement_on_every_instance_and_charged_nothing(
    base_chain: DevChain, store_url: str, tmp_path: Path, admin_env: LocalAccount
) -> None:
    with running_admin(base_chain, store_url, tmp_path, admin_env) as admin:
        gw = admin.gateway
        payer = base_chain.new_payer(1_000_000)
        with gw.client() as client:
            name, value = gw.sign(payer, client.post("/paid"))
        authorization, _, _ = decode_payment(value)
        with admin.client() as api:
            r = api.post("/admin/deny", json={"payer": payer.address, "note": "chargeback"})
            assert r.status_code == 200 and r.json() == {"payer": payer.address.lower(), "denied": True, "added": True}
        # Another gateway instance on the same store refuses the payer too.
        with running_gateway(base_chain, store_url=store_url, pay_to=gw.pay_to) as other:
            for url in (gw.url, other.url):
                r = httpx.post(url + "/paid", headers={name: value}, timeout=30)
                assert r.status_code == 403, r.text
                assert r.json()["error"] == "payer_denied"
                assert "payment-response" not in r.headers
            assert other.upstream.requests == []
        assert gw.upstream.requests == []
        assert base_chain.balance(payer.address) == 1_000_000
        assert base_chain.balance(gw.pay_to) == 0
        assert not authorization_used(base_chain, payer.address, authorization["nonce"])
        # Allowed again: the very payment that was refused still pays, once.
        with admin.client() as api:
            assert api.delete(f"/admin/deny/{payer.address}").json()["removed"] is True
        r = httpx.post(gw.url + "/paid", headers={name: value}, timeout=30)
        assert r.status_code == 200, r.text
        assert base_chain.balance(payer.address) == 1_000_000 - PRICE
        assert base_chain.balance(gw.pay_to) == PRICE
        with admin.client() as api:
            payments = api.get("/admin/payments", params={"payer": payer.address}).json()["payments"]
        assert [(p["kind"], p["amount"]) for p in payments] == [("exact", PRICE)]
        denials = [c for c in admin.audit() if c.get("path") == "/admin/deny" and c.get("method") == "POST"]
        assert denials[0]["args"] == {"payer": payer.address.lower(), "note": "chargeback"}


def test_a_denied_payers_transfer_is_not_served_and_stays_usable_without_paying_again(
    base_chain: DevChain, store_url: str, tmp_path: Path, admin_env: LocalAccount
) -> None:
    with running_admin(base_chain, store_url, tmp_path, admin_env) as admin:
        gw = admin.gateway
        payer, tx_hash = pay(base_chain, gw, PRICE)  # the money moved before the gateway saw the proof
        with admin.client() as api:
            assert api.post("/admin/deny", json={"payer": payer.address}).status_code == 200
        headers = proof(gw, payer, tx_hash)
        r = httpx.post(gw.url + "/paid", headers=headers, timeout=30)
        assert r.status_code == 403 and r.json()["error"] == "payer_denied"
        assert gw.upstream.requests == []
        with admin.client() as api:
            api.delete(f"/admin/deny/{payer.address}")
        r = httpx.post(gw.url + "/paid", headers=headers, timeout=30)
        assert r.status_code == 200, r.text  # the same transfer, served once the payer is allowed
        assert len(gw.upstream.requests) == 1
        assert base_chain.balance(gw.pay_to) == PRICE
