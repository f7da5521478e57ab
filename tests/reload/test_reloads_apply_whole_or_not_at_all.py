"""A reload applies the whole file or nothing (docs/operating.md, "Prices and routes at run time"): a file that does
not validate, or one that changes what only a restart can apply, leaves the routes in force untouched and says why;
a good one swaps routes, prices and descriptions at once; an old price is honoured only within its 402's validity."""

from __future__ import annotations

from pathlib import Path

import httpx

from gateway.client.exact import choose_requirement, sign_exact_payment
from gateway.dev.chain import DevChain
from gateway.x402 import reasons
from tests.reload.helpers import REPORT, ROUTES, offered, reloadable_gateway


async def test_a_file_that_does_not_validate_changes_nothing_and_says_why(base_chain: DevChain, tmp_path: Path) -> None:
    async with reloadable_gateway(base_chain, tmp_path) as gw, httpx.AsyncClient(base_url=gw.url) as client:
        table = gw.gateway.routes
        bad_files = {
            "routes[0].price: must be greater than zero": [{**ROUTES[0], "price": "0"}],
            "routes[1].bogus: unknown key": [ROUTES[0], {**ROUTES[1], "bogus": 1}],
            "routes[0].networks[0]: network 'nowhere' is not configured": [{**ROUTES[0], "networks": ["nowhere"]}],
        }
        for expected, routes in bad_files.items():
            gw.write(routes=routes)
            result = await gw.gateway.reloader.reload()
            assert not result.ok and result.error is not None and expected in result.error, result
            assert expected in result.message
            assert gw.gateway.routes is table  # the very table in force before
        gw.path.write_text("[[routes]\nroute = ")
        result = await gw.gateway.reloader.reload()
        assert not result.ok and result.error is not None and "is not valid TOML" in result.error
        assert gw.gateway.routes is table
        assert offered(await client.get("/report")) == 10_000
        assert (await client.get("/free-soon")).status_code == 402


async def test_a_change_only_a_restart_can_apply_is_refused_whole(base_chain: DevChain, tmp_path: Path) -> None:
    async with reloadable_gateway(base_chain, tmp_path) as gw, httpx.AsyncClient(base_url=gw.url) as client:
        table = gw.gateway.routes
        other_store = f"sqlite:///{tmp_path / 'other.db'}"
        gw.write(
            routes=[{**ROUTES[0], "price": "0.02", "rate_limit_paid": "5/minute"}, ROUTES[1]],
            payment={"pay_to": "0x" + "ab" * 20},
            store={"url": other_store},
        )
        result = await gw.gateway.reloader.reload()
        assert not result.ok
        restart = ("payment.pay_to", "store.url", "store.identity_file", "routes[0].rate_limit_paid")
        assert result.needs_restart == restart
        assert other_store not in result.message  # names keys, never values (a store URL may carry a password)
        # nothing half-applied: not even the price, which alone could change at run time
        assert gw.gateway.routes is table
        assert offered(await client.get("/report")) == 10_000


async def test_a_good_file_swaps_routes_prices_and_descriptions_at_once(base_chain: DevChain, tmp_path: Path) -> None:
    async with reloadable_gateway(base_chain, tmp_path) as gw, httpx.AsyncClient(base_url=gw.url) as client:
        gw.write(
            routes=[
                {**ROUTES[0], "price": "0.03", "description": "Tomorrow's forecast"},
                {"route": "POST /new", "price": "0.20"},
            ]
        )
        result = await gw.gateway.reloader.reload()
        assert result.ok, result.message
        assert result.changed == (
            f"{REPORT}: price $0.01 -> $0.03, description",
            "POST /new: added at $0.20",
            "GET /free-soon: removed",
        )
        report = await client.get("/report")
        assert offered(report) == 30_000
        assert report.json()["accepts"][0]["description"] == "Tomorrow's forecast"
        assert offered(await client.post("/new")) == 200_000
        free = await client.get("/free-soon")  # no longer priced: passed to the upstream for nothing
        assert free.status_code == 200 and [r.path for r in gw.upstream.requests] == ["/free-soon"]
        # The discovery document follows the file too.
        openapi = (await client.get("/openapi.json")).json()
        assert set(openapi["paths"]) == {"/report", "/new"}
        assert openapi["paths"]["/report"]["get"]["x-payment-info"]["price"]["amount"] == "0.03"
        # Reloading the same file again changes nothing.
        again = await gw.gateway.reloader.reload()
        assert again.ok and again.changed == ()


async def test_an_old_price_is_honoured_only_within_the_validity_of_its_402(
    base_chain: DevChain, tmp_path: Path
) -> None:
    payer = base_chain.new_payer(1_000_000)
    async with reloadable_gateway(base_chain, tmp_path) as gw, httpx.AsyncClient(base_url=gw.url) as client:
        old = await client.get("/report")
        gw.write(routes=[{**ROUTES[0], "price": "0.02"}, ROUTES[1]])
        assert (await gw.gateway.reloader.reload()).ok
        [earlier] = gw.gateway.reloader.state(REPORT).earlier
        assert earlier.amount == 10_000
        option = choose_requirement(gw.options(old))
        before = gw.balance(payer.address)

        # An authorization at the old price that may still be valid after the old 402's payments expired did not
        # answer a 402 from before the change: refused, nothing moves.
        late = int(earlier.until) - option.requirement["maxTimeoutSeconds"] + 5
        name, value = sign_exact_payment(payer, option, now=late)
        refused = await client.get("/report", headers={name: value})
        assert refused.status_code == 402 and refused.json()["error"] == reasons.VALUE_MISMATCH
        assert offered(refused) == 20_000  # and its 402 offers the new price
        assert gw.balance(payer.address) == before

        # The same old price, valid no longer than the old 402 allowed: served, charged the old price.
        name, value = sign_exact_payment(payer, option)
        served = await client.get("/report", headers={name: value})
        assert served.status_code == 200, served.text
        assert gw.balance(payer.address) == before - 10_000
