"""A WebSocket on a priced path is opened only when paid (docs/threat-model.md T35).

``PaymentMiddleware`` inside a Starlette app, served by a real uvicorn: a handshake is a GET of its path and
priced like one. Unpaid: the handshake is answered with the 402 challenge (the ASGI ``websocket.http.response``
extension) or, on a server without that extension, refused (403); the app's handler never runs. Paid: the
payment is settled when the app accepts (``after``), the 101 carries the receipt, and the payment is then used.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from gateway.client.exact import Option, choose_requirement, parse_challenge, sign_exact_payment
from gateway.dev.chain import DevChain
from gateway.http.middleware import PaymentMiddleware
from gateway.x402 import reasons
from tests.support import raw_http, serve_asgi
from tests.support.gateway import gateway_config, sqlite_url

PRICE = 10_000
HANDSHAKE = (
    "GET {path} HTTP/1.1\r\nHost: gw.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
)


class WsApp:
    """A Starlette app with a priced and a free WebSocket; ``opened`` lists the handlers that ran."""

    def __init__(self) -> None:
        self.opened: list[str] = []

        async def paid(ws: WebSocket) -> None:
            self.opened.append("paid")
            await ws.accept()
            await ws.send_text(json.dumps({"stream": "priced", "payer": ws.scope["state"]["x402"]["payer"]}))
            await ws.close()

        async def refuses(ws: WebSocket) -> None:
            self.opened.append("refuses")
            await ws.close(code=1008)  # before accepting: nothing was served

        async def free(ws: WebSocket) -> None:
            self.opened.append("free")
            await ws.accept()
            await ws.send_text("free")
            await ws.close()

        self.app = Starlette(
            routes=[
                WebSocketRoute("/ws/paid", paid),
                WebSocketRoute("/ws/refuses", refuses),
                WebSocketRoute("/ws/free", free),
            ]
        )


def middleware_app(base_chain: DevChain, tmp_path: Path, inner: Any, **server: Any) -> tuple[PaymentMiddleware, str]:
    pay_to = Account.create().address
    routes = [
        {"route": "GET /ws/paid", "price": "0.01"},
        {"route": "GET /ws/refuses", "price": "0.01"},
    ]
    config = gateway_config(
        [base_chain],
        upstream_url="http://127.0.0.1:9",
        store_url=sqlite_url(tmp_path),
        pay_to=pay_to,
        routes=routes,
        **({"server": server} if server else {}),
    )
    return PaymentMiddleware(inner, config=config), pay_to


@pytest.fixture
def ws_app() -> WsApp:
    return WsApp()


@pytest.fixture
def served(base_chain: DevChain, tmp_path: Path, ws_app: WsApp) -> Iterator[tuple[str, str]]:
    app, pay_to = middleware_app(base_chain, tmp_path, ws_app.app)
    with serve_asgi(app, lifespan="on", ws="websockets-sansio") as url:
        yield url, pay_to


def refused(url: str, headers: dict[str, str] | None = None) -> Any:
    with pytest.raises(InvalidStatus) as caught, connect(url, additional_headers=headers or {}, open_timeout=10):
        pass
    return caught.value.response


def pay_header(base_chain: DevChain, payer: Any, response: Any) -> tuple[str, str]:
    options: list[Option] = parse_challenge(dict(response.headers.raw_items()), response.body)
    return sign_exact_payment(payer, choose_requirement(options))


def test_an_unpaid_handshake_on_a_priced_path_gets_the_402_challenge(served: tuple[str, str], ws_app: WsApp) -> None:
    url = served[0].replace("http://", "ws://")
    response = refused(url + "/ws/paid")
    assert response.status_code == 402
    assert response.headers["payment-required"]
    body = json.loads(response.body)
    assert body["error"] == reasons.PAYMENT_REQUIRED
    assert body["accepts"][0]["resource"].startswith("http://")  # the http(s) URL of the same path
    assert ws_app.opened == []


def test_a_raw_socket_handshake_gets_the_402_and_never_a_101(served: tuple[str, str], ws_app: WsApp) -> None:
    status, headers, _ = raw_http(served[0], HANDSHAKE.format(path="/ws/paid", extra="").encode(), timeout=5)
    assert status == 402
    assert "payment-required" in headers
    status, _, _ = raw_http(served[0], HANDSHAKE.format(path="/WS/PAID/", extra="").encode(), timeout=5)
    assert status == 402
    assert ws_app.opened == []


def test_a_server_without_denial_responses_refuses_the_handshake(
    base_chain: DevChain, tmp_path: Path, ws_app: WsApp
) -> None:
    app, _ = middleware_app(base_chain, tmp_path, ws_app.app)

    async def no_denial_extension(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "websocket":
            scope = {**scope, "extensions": {}}
        await app(scope, receive, send)

    with serve_asgi(no_denial_extension, lifespan="on", ws="websockets-sansio") as url:
        status, _, _ = raw_http(url, HANDSHAKE.format(path="/ws/paid", extra="").encode(), timeout=5)
    assert status == 403
    assert ws_app.opened == []


def test_a_free_websocket_is_untouched(served: tuple[str, str], ws_app: WsApp) -> None:
    with connect(served[0].replace("http://", "ws://") + "/ws/free", open_timeout=10) as ws:
        assert ws.recv(timeout=5) == "free"
    assert ws_app.opened == ["free"]


def test_a_paid_handshake_opens_the_socket_charges_once_and_cannot_be_replayed(
    served: tuple[str, str], ws_app: WsApp, base_chain: DevChain
) -> None:
    url, pay_to = served
    ws_url = url.replace("http://", "ws://") + "/ws/paid"
    payer = base_chain.new_payer(1_000_000)
    before = (base_chain.balance(payer.address), base_chain.balance(pay_to))
    name, value = pay_header(base_chain, payer, refused(ws_url))
    with connect(ws_url, additional_headers={name: value}, open_timeout=30) as ws:
        receipt = ws.response.headers.get("payment-response") or ws.response.headers.get("x-payment-response")
        assert receipt
        assert json.loads(ws.recv(timeout=5)) == {"stream": "priced", "payer": payer.address.lower()}
    assert (before[0] - base_chain.balance(payer.address), base_chain.balance(pay_to) - before[1]) == (PRICE, PRICE)
    again = refused(ws_url, {name: value})
    assert again.status_code == 402
    assert json.loads(again.body)["error"] == reasons.PAYMENT_ALREADY_USED
    assert ws_app.opened == ["paid"]


def test_a_handshake_the_app_refuses_is_not_charged(
    served: tuple[str, str], ws_app: WsApp, base_chain: DevChain
) -> None:
    ws_url = served[0].replace("http://", "ws://") + "/ws/refuses"
    payer = base_chain.new_payer(1_000_000)
    before = base_chain.balance(payer.address)
    name, value = pay_header(base_chain, payer, refused(ws_url))
    assert refused(ws_url, {name: value}).status_code == 403
    assert base_chain.balance(payer.address) == before
    assert ws_app.opened == ["refuses"]


def test_refuse_mode_refuses_unpriced_websockets_too(base_chain: DevChain, tmp_path: Path, ws_app: WsApp) -> None:
    app, _ = middleware_app(base_chain, tmp_path, ws_app.app, unpriced="refuse")
    with serve_asgi(app, lifespan="on", ws="websockets-sansio") as url:
        response = refused(url.replace("http://", "ws://") + "/ws/free")
    assert response.status_code == 404
    assert ws_app.opened == []


def test_the_standalone_gateway_prices_handshakes_and_never_tunnels_them(base_chain: DevChain, tmp_path: Path) -> None:
    from tests.support.gateway import running_gateway

    with running_gateway(base_chain, store_url=sqlite_url(tmp_path)) as gw:
        status, headers, _ = raw_http(gw.url, HANDSHAKE.format(path="/cheap", extra="").encode(), timeout=5)
        assert status == 402
        assert "payment-required" in headers
        status, _, _ = raw_http(gw.url, HANDSHAKE.format(path="/free", extra="").encode(), timeout=5)
        assert status == 403  # the proxy does not tunnel WebSockets
        assert gw.upstream.requests == []
