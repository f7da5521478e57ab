"""A CORS preflight on a priced route is passed on unpriced, never consumes or requires a payment, and never
carries content (docs/threat-model.md T38).

A preflight is ``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method`` and no body; browsers send it
without credentials or custom headers, so it can never carry a payment, and a 402 to it stops every cross-origin
call before it could pay. The upstream (or the embedding app) owns its CORS policy and answers it; its answer
reaches the browser with status and headers only. Any other OPTIONS is an ordinary request, priced as one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
from eth_account import Account
from starlette.applications import Starlette
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.dev.chain import DevChain
from gateway.http.middleware import PaymentMiddleware
from tests.e2e.helpers import Balances, receipt_of
from tests.support import Behaviour, serve_asgi
from tests.support.gateway import gateway_config, running_gateway, sqlite_url

ROUTES: list[dict[str, Any]] = [
    {"route": "POST /paid", "price": "0.10"},
    {"route": "* /api/**", "price": "0.10"},
]
PREFLIGHT = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
UPSTREAM_CORS = [
    ("Access-Control-Allow-Origin", "https://app.example"),
    ("Access-Control-Allow-Methods", "POST"),
    ("Access-Control-Allow-Headers", "payment-signature, x-payment"),
]


def test_a_preflight_on_a_priced_route_reaches_the_upstream_and_never_a_402(
    base_chain: DevChain, tmp_path: Path
) -> None:
    with running_gateway(
        base_chain, store_url=sqlite_url(tmp_path), routes=ROUTES, upstream_settings={"headers": {"X-Api-Key": "k"}}
    ) as gw:
        # A catch-all upstream handler answering OPTIONS with content: the preflight must not carry it out.
        gw.upstream.reset(Behaviour(status=200, body=b"PRICED CONTENT", headers=UPSTREAM_CORS))
        for path in ["/paid", "/api/report", "/API/x/y"]:
            r = httpx.request("OPTIONS", gw.url + path, headers=PREFLIGHT)
            assert r.status_code == 200, (path, r.text)
            assert r.headers["access-control-allow-origin"] == "https://app.example"
            assert r.content == b""
            assert "payment-required" not in r.headers
        seen = gw.upstream.requests
        assert [s.method for s in seen] == ["OPTIONS"] * 3
        assert all(s.header("x-api-key") is None for s in seen)  # unpaid: no upstream credentials


def test_a_204_preflight_answer_is_relayed_as_a_204(base_chain: DevChain, tmp_path: Path) -> None:
    # Express's cors() answers preflights with 204, which has no body and declares no length.
    with running_gateway(base_chain, store_url=sqlite_url(tmp_path), routes=ROUTES) as gw:
        gw.upstream.reset(Behaviour(status=204, body=b"", headers=UPSTREAM_CORS))
        r = httpx.request("OPTIONS", gw.url + "/api/x", headers=PREFLIGHT)
        assert r.status_code == 204
        assert r.headers["access-control-allow-methods"] == "POST"
        assert "content-length" not in r.headers


def test_other_options_requests_are_priced_as_usual(base_chain: DevChain, tmp_path: Path) -> None:
    with running_gateway(base_chain, store_url=sqlite_url(tmp_path), routes=ROUTES) as gw:
        assert httpx.request("OPTIONS", gw.url + "/api/x").status_code == 402  # no preflight headers
        origin_only = {"Origin": "https://app.example"}
        assert httpx.request("OPTIONS", gw.url + "/api/x", headers=origin_only).status_code == 402
        with_body = httpx.request("OPTIONS", gw.url + "/api/x", headers=PREFLIGHT, content=b"prompt=secret")
        assert with_body.status_code == 402  # a preflight has no body: this is an ordinary request
        assert gw.upstream.requests == []


def test_a_preflight_never_consumes_a_payment_it_carries(base_chain: DevChain, tmp_path: Path) -> None:
    payer = base_chain.new_payer(1_000_000)
    with running_gateway(base_chain, store_url=sqlite_url(tmp_path), routes=ROUTES) as gw:
        balances = Balances(gw, payer.address)
        name, value = gw.sign(payer, httpx.post(gw.url + "/paid"))
        r = httpx.request("OPTIONS", gw.url + "/paid", headers={**PREFLIGHT, name: value})
        assert r.status_code == 200
        assert "payment-response" not in r.headers
        assert all(s.header(name) is None for s in gw.upstream.requests)
        balances.assert_unchanged()
        paid = httpx.post(gw.url + "/paid", headers={name: value}, timeout=30)
        assert paid.status_code == 200
        assert receipt_of(paid)["success"] is True
        balances.assert_charged_once(100_000)


def test_refuse_mode_passes_preflights_for_priced_methods_only(base_chain: DevChain, tmp_path: Path) -> None:
    with running_gateway(
        base_chain, store_url=sqlite_url(tmp_path), routes=ROUTES, server={"unpriced": "refuse"}
    ) as gw:
        assert httpx.request("OPTIONS", gw.url + "/paid", headers=PREFLIGHT).status_code == 200
        get_preflight = {**PREFLIGHT, "Access-Control-Request-Method": "GET"}
        assert httpx.request("OPTIONS", gw.url + "/paid", headers=get_preflight).status_code == 404
        assert httpx.request("OPTIONS", gw.url + "/nothing", headers=PREFLIGHT).status_code == 404
        assert len(gw.upstream.requests) == 1


def test_embedded_the_apps_cors_policy_answers_and_the_402_is_readable_cross_origin(
    base_chain: DevChain, tmp_path: Path
) -> None:
    async def paid(request: Request) -> Response:
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/api/paid", paid, methods=["POST"])])
    cors = CORSMiddleware(
        app,
        allow_origins=["https://app.example"],
        allow_methods=["POST"],
        allow_headers=["payment-signature", "x-payment"],
        expose_headers=["payment-required", "payment-response"],
    )
    config = gateway_config(
        [base_chain],
        upstream_url="http://127.0.0.1:9",
        store_url=sqlite_url(tmp_path),
        pay_to=Account.create().address,
        routes=ROUTES,
    )
    # The payment middleware outside the app's CORS middleware: before, every preflight got the 402.
    with serve_asgi(PaymentMiddleware(cors, config=config), lifespan="on") as url:
        asks = {**PREFLIGHT, "Access-Control-Request-Headers": "payment-signature"}
        pre = httpx.request("OPTIONS", url + "/api/paid", headers=asks)  # "* /api/**" prices OPTIONS too
        assert pre.status_code == 200
        assert pre.headers["access-control-allow-origin"] == "https://app.example"
        assert "payment-signature" in pre.headers["access-control-allow-headers"]
        challenge = httpx.post(url + "/api/paid", headers={"Origin": "https://app.example"})
        assert challenge.status_code == 402
        assert challenge.headers["access-control-allow-origin"] == "*"
        assert "PAYMENT-REQUIRED" in challenge.headers["access-control-expose-headers"]


def test_the_gateways_own_402_is_readable_by_a_cross_origin_caller(base_chain: DevChain, tmp_path: Path) -> None:
    with running_gateway(base_chain, store_url=sqlite_url(tmp_path), routes=ROUTES) as gw:
        r = httpx.post(gw.url + "/paid", headers={"Origin": "https://app.example"})
        assert r.status_code == 402
        assert r.headers["access-control-allow-origin"] == "*"
        assert "PAYMENT-REQUIRED" in r.headers["access-control-expose-headers"]
        assert "access-control-allow-credentials" not in r.headers
        assert "access-control-allow-origin" not in httpx.post(gw.url + "/paid").headers  # same-origin: nothing added
