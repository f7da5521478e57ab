"""A paused route answers 503 ``route_paused`` before any payment is read: a payment sent to it is neither verified,
claimed nor charged, and stays good for when the route is resumed (docs/operating.md, "Prices and routes at run
time"). Paused by an admin action (the shared store) or by the file."""

from __future__ import annotations

from pathlib import Path

import httpx

from gateway.dev.chain import DevChain
from gateway.x402 import reasons
from tests.reload.helpers import REPORT, ROUTES, offered, reloadable_gateway


async def test_a_paused_route_refuses_before_taking_payment_and_the_payment_works_once_resumed(
    base_chain: DevChain, tmp_path: Path
) -> None:
    payer = base_chain.new_payer(1_000_000)
    async with reloadable_gateway(base_chain, tmp_path) as gw, httpx.AsyncClient(base_url=gw.url) as client:
        challenge = await client.get("/report")
        name, value = gw.sign(payer, challenge)
        before = gw.balance(payer.address)

        state = await gw.gateway.reloader.pause(REPORT, True)
        assert state.paused and not state.file_paused
        for headers in ({}, {name: value}):
            answer = await client.get("/report", headers=headers)
            assert answer.status_code == 503
            assert answer.json()["error"] == reasons.ROUTE_PAUSED
            assert "payment-required" not in answer.headers
        assert (await client.get("/free-soon")).status_code == 402  # only that route
        assert gw.upstream.requests == []
        assert gw.balance(payer.address) == before  # nothing verified, claimed or charged

        state = await gw.gateway.reloader.pause(REPORT, False)
        assert not state.paused
        served = await client.get("/report", headers={name: value})  # the very same payment
        assert served.status_code == 200, served.text
        assert gw.balance(payer.address) == before - 10_000


async def test_the_file_pauses_a_route_and_an_admin_override_outranks_it(base_chain: DevChain, tmp_path: Path) -> None:
    async with reloadable_gateway(base_chain, tmp_path) as gw, httpx.AsyncClient(base_url=gw.url) as client:
        gw.write(routes=[{**ROUTES[0], "paused": True}, ROUTES[1]])
        result = await gw.gateway.reloader.reload()
        assert result.ok and result.changed == (f"{REPORT}: paused",)
        assert (await client.get("/report")).status_code == 503

        await gw.gateway.reloader.pause(REPORT, False)  # the operator resumes it: every instance, whatever its file
        assert offered(await client.get("/report")) == 10_000
        again = await gw.gateway.reloader.reload()
        assert again.ok and again.overridden == (REPORT,)
        assert offered(await client.get("/report")) == 10_000

        await gw.gateway.reloader.pause(REPORT, None)  # the override cleared: the file's word again
        assert (await client.get("/report")).status_code == 503
