"""Every way of paying honours the price a 402 showed just before a change, and only a price the route really had
(gateway/schemes/prices.py): a tx-hash transfer sent for the old price, a session voucher signed for the old
ceiling. Plus the sans-IO rules themselves, and the reload's wording that never shows a secret."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import httpx

from gateway.client.txhash import tx_proof_headers
from gateway.config import load_config
from gateway.dev.chain import DevChain
from gateway.engine.reload import needs_restart
from gateway.schemes.prices import EarlierPrice, at_earlier_price, honoured_floor, honoured_for
from gateway.x402 import reasons
from gateway.x402.challenge import Requirement
from tests.reload.helpers import REPORT, offered, reloadable_gateway
from tests.sessions.crafted import CraftedChannel, corrective, session_offer
from tests.support.gateway import SESSIONS
from tests.support.processes import config_text
from tests.txhash.helpers import erc20_transfer, new_tx_payer


async def test_a_transfer_sent_for_the_old_price_pays_after_a_rise_and_a_short_one_does_not(
    base_chain: DevChain, tmp_path: Path
) -> None:
    async with reloadable_gateway(base_chain, tmp_path) as gw, httpx.AsyncClient(base_url=gw.url) as client:
        assert offered(await client.get("/report")) == 10_000
        payer = new_tx_payer(base_chain)
        on_time = erc20_transfer(base_chain, payer, gw.pay_to, 10_000)
        short = erc20_transfer(base_chain, payer, gw.pay_to, 9_999)
        await gw.gateway.reloader.set_price(REPORT, 30_000)

        refused = await client.get("/report", headers=tx_proof_headers(payer, short, "base", "GET", gw.url + "/report"))
        assert refused.status_code == 402 and refused.json()["error"] == reasons.AMOUNT_TOO_LOW
        assert offered(refused) == 30_000
        served = await client.get(
            "/report", headers=tx_proof_headers(payer, on_time, "base", "GET", gw.url + "/report")
        )
        assert served.status_code == 200, served.text
        assert [r.path for r in gw.upstream.requests] == ["/report"]


SESSION_ROUTES = [{"route": "GET /session", "price": "0.001", "schemes": ["exact", "batch-settlement"]}]


async def test_a_voucher_signed_for_the_old_ceiling_is_charged_that_ceiling(
    base_chain: DevChain, tmp_path: Path
) -> None:
    payer = base_chain.new_payer(1_000_000)
    quiet = {**SESSIONS, "min_deposit": "0.01", "claim_interval": 3600}
    async with (
        reloadable_gateway(base_chain, tmp_path, routes=SESSION_ROUTES, sessions=quiet) as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=30) as client,
    ):
        offer = session_offer(await client.get("/session"))
        assert offer["amount"] == "1000"
        ch = CraftedChannel.from_offer(payer, offer)
        opened = await client.get("/session", headers=ch.header(ch.deposit(50_000, voucher_max=1_000)))
        assert opened.status_code == 200, opened.text

        await gw.gateway.reloader.set_price("GET /session", 2_500)
        assert session_offer(await client.get("/session"))["amount"] == "2500"
        steps = [
            (2_000, 2_000),  # charged 1000 + the old ceiling (the 402 it answered): honoured, charged 1000
            (4_500, 4_500),  # + the new ceiling
        ]
        channel = gw.gateway.payments.engine.sessions
        assert channel is not None
        for voucher_max, charged in steps:
            answer = await client.get("/session", headers=ch.header(ch.paying(voucher_max)))
            assert answer.status_code == 200, answer.text
            record = await channel.store.get(ch.id)
            assert record is not None and record.charged == charged
        # A ceiling the route never had: the client's view is off, it gets the channel state to resynchronise.
        odd = await client.get("/session", headers=ch.header(ch.paying(4_500 + 1_700)))
        assert odd.status_code == 402
        assert corrective(odd)["error"] == reasons.SESSION_CUMULATIVE_MISMATCH
        assert len(gw.upstream.requests) == 3


REQ = Requirement(
    network="base",
    chain_id=8453,
    asset="0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913",
    amount=20_000,
    pay_to="0x" + "11" * 20,
    max_timeout_seconds=300,
    eip712_name="USD Coin",
    eip712_version="2",
)


def test_an_earlier_price_is_honoured_exactly_and_only_until_its_deadline() -> None:
    earlier = (EarlierPrice(10_000, until=1_000.0), EarlierPrice(15_000, until=2_000.0))
    assert at_earlier_price(REQ, 10_000, earlier, expires_by=1_000.0) == replace(REQ, amount=10_000)
    assert at_earlier_price(REQ, 10_000, earlier, expires_by=1_000.5) is None  # may outlive its 402
    assert at_earlier_price(REQ, 10_001, earlier, expires_by=10.0) is None  # never the route's price
    # A transfer pays the highest price it covers among those still honoured at that moment.
    assert honoured_for(REQ, 16_000, earlier, now=900.0).amount == 15_000
    assert honoured_for(REQ, 25_000, earlier, now=900.0).amount == 20_000
    assert honoured_for(REQ, 12_000, earlier, now=1_500.0) == REQ  # 10_000 lapsed: not covered, refused later
    assert honoured_floor(REQ, earlier, now=900.0) == 10_000
    assert honoured_floor(REQ, earlier, now=2_500.0) == 20_000


def test_a_refused_reload_names_the_keys_that_changed_never_their_values(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    sections = {
        "upstream": {"url": "http://127.0.0.1:9"},
        "payment": {"pay_to": "0x" + "1" * 40},
        "networks.base": {"rpc_urls": ["https://rpc.example/v2/KEY-one"]},
    }
    routes = [{"route": "GET /report", "price": "0.01"}]
    path.write_text(config_text(sections, routes))
    old = load_config(path, env={**os.environ, "X402_RELAYER_KEY": "11" * 32})
    sections["networks.base"] = {"rpc_urls": ["https://rpc.example/v2/KEY-two"]}
    path.write_text(config_text(sections, routes))
    new = load_config(path, env={**os.environ, "X402_RELAYER_KEY": "22" * 32})
    changed = needs_restart(old, new, sessions=False)
    assert changed == ["payment.relayer_key", "networks.base.rpc_urls"]
    assert not any("22" * 32 in c or "KEY-two" in c for c in changed)
