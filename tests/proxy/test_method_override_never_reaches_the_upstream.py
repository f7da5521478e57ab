"""An unpaid request is routed upstream by the method and path the gateway priced: method and URL override headers
and ``_method`` query parameters never reach the upstream (docs/threat-model.md T34).

Every framework here honours the overrides the way apps built on it do (Express: the ``method-override``
package), so ``POST /report`` (free) with ``X-HTTP-Method-Override: GET`` would run ``GET /report`` (priced).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account import Account
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.dev.chain import DevChain
from gateway.http.context import strip_method_override, without_method_override
from gateway.http.middleware import PaymentMiddleware
from tests.e2e.helpers import gateway_with_upstream_url
from tests.proxy.frameworks import FRAMEWORKS, ROUTES, _override, hits, priced_hits, reset_hits, serve_framework
from tests.support import RecordingUpstream, raw_http, serve_asgi
from tests.support.gateway import GatewayUnderTest, gateway_config, running_gateway, sqlite_url

OVERRIDES: list[tuple[str, list[tuple[str, str]]]] = [
    ("", [("X-HTTP-Method-Override", "GET")]),
    ("", [("X-Method-Override", "GET")]),
    ("", [("X-HTTP-Method", "GET")]),
    ("", [("x-http-method-override", "get")]),
    ("", [("X_HTTP_Method_Override", "GET")]),  # CGI-style servers read it as the dashed name
    ("?_method=GET", []),
    ("?_method=get", []),
    ("?%5Fmethod=GET", []),
    ("?%5fmethod=GET", []),
    ("?a=1&_method=GET&b=2", []),
    ("?a=1;_method=GET", []),
    ("?_method[]=GET", []),
    ("?_method=GET&_method=GET", []),
]


def post(url: str, target: str, headers: list[tuple[str, str]]) -> tuple[int, dict[str, str], bytes]:
    lines = "".join(f"{k}: {v}\r\n" for k, v in headers)
    request = f"POST {target} HTTP/1.1\r\nHost: gw.test\r\n{lines}Content-Length: 0\r\nConnection: close\r\n\r\n"
    return raw_http(url, request.encode())


@pytest.fixture(scope="module", params=FRAMEWORKS)
def framework(request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    with serve_framework(request.param) as url:
        yield request.param, url


@pytest.fixture(scope="module")
def gateway(
    framework: tuple[str, str], base_chain: DevChain, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayUnderTest]:
    tmp: Path = tmp_path_factory.mktemp("gw")
    with gateway_with_upstream_url(
        base_chain, store_url=sqlite_url(tmp), upstream_url=framework[1], routes=ROUTES
    ) as gw:
        yield gw


@pytest.mark.parametrize(("query", "headers"), OVERRIDES)
def test_an_unpaid_post_never_becomes_a_priced_get_upstream(
    gateway: GatewayUnderTest, framework: tuple[str, str], query: str, headers: list[tuple[str, str]]
) -> None:
    reset_hits(framework[1])
    status, _, body = post(gateway.url, "/report" + query, headers)
    assert status == 200, body
    assert [h["handler"] for h in hits(framework[1])] == ["report-post"]
    assert priced_hits(framework[1]) == []


def test_the_upstream_sees_the_rest_of_the_query_and_headers_untouched(base_chain: DevChain, tmp_path: Path) -> None:
    with running_gateway(base_chain, store_url=sqlite_url(tmp_path)) as gw:
        query = "a=%20b&_method=GET&payment_method=card&c=d%26e;%5Fmethod=PUT&x=1"
        post(gw.url, f"/free?{query}", [("X-HTTP-Method-Override", "GET"), ("X-Original-URL", "/paid"), ("X-K", "v")])
        (seen,) = gw.upstream.requests
        assert seen.query == b"a=%20b&payment_method=card&c=d%26e&x=1"
        names = {k for k, _ in seen.headers}
        assert not names & {"x-http-method-override", "x-original-url"}
        assert seen.header("x-k") == "v"


def test_overrides_pass_when_the_operator_turns_stripping_off(base_chain: DevChain, tmp_path: Path) -> None:
    with running_gateway(
        base_chain, store_url=sqlite_url(tmp_path), upstream_settings={"strip_method_override": False}
    ) as gw:
        post(gw.url, "/free?_method=GET", [("X-HTTP-Method-Override", "GET")])
        (seen,) = gw.upstream.requests
        assert seen.query == b"_method=GET"
        assert seen.header("x-http-method-override") == "GET"


def test_embedded_apps_never_see_an_override_either(base_chain: DevChain, tmp_path: Path) -> None:
    """PaymentMiddleware inside a Starlette app whose own middleware honours overrides."""
    ran: list[str] = []

    async def report(request: Request) -> Response:
        ran.append(request.method)
        return JSONResponse({"method": request.method})

    inner = Starlette(routes=[Route("/report", report, methods=["GET", "POST"])])

    async def honours_overrides(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
            scope = {**scope, "method": _override(scope["method"], headers, scope["query_string"].decode())}
        await inner(scope, receive, send)

    pay_to = Account.create().address
    config = gateway_config(
        [base_chain], upstream_url="http://127.0.0.1:9", store_url=sqlite_url(tmp_path), pay_to=pay_to, routes=ROUTES
    )
    with serve_asgi(PaymentMiddleware(honours_overrides, config=config), lifespan="on") as url:
        for query, headers in OVERRIDES:
            status, _, body = post(url, "/report" + query, headers)
            assert status == 200, body
        assert httpx.get(url + "/report").status_code == 402
    assert ran == ["POST"] * len(OVERRIDES)


def test_query_without_method_override_keeps_every_other_byte() -> None:
    assert without_method_override(b"a=1&b=2") == b"a=1&b=2"
    assert without_method_override(b"_method=GET") == b""
    assert without_method_override(b"x=1&+_method+=GET&y=2") == b"x=1&y=2"
    q = b"payment_method=card&methods=a"
    assert without_method_override(q) is q
    scope: dict[str, Any] = {"headers": [(b"x-kept", b"1")], "query_string": b"a=1"}
    assert strip_method_override(scope) is scope


def test_a_recording_upstream_confirms_nothing_else_is_dropped(tmp_path: Path) -> None:
    # The proxy alone (the jobs layer calls it directly): the same stripping.
    from gateway.http.proxy import UpstreamProxy

    upstream = RecordingUpstream()
    with serve_asgi(upstream) as up, serve_asgi(UpstreamProxy(up), lifespan="on") as url:
        post(url, "/x?_method=DELETE&keep=1", [("X-HTTP-Method", "DELETE"), ("X-Rewrite-URL", "/admin")])
    (seen,) = upstream.requests
    assert (seen.method, seen.query) == ("POST", b"keep=1")
    assert seen.header("x-http-method") is None and seen.header("x-rewrite-url") is None
