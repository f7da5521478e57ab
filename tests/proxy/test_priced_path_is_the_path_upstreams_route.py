"""The path the gateway prices is the path the upstream routes, whichever framework it is
(docs/threat-model.md T33).

Starlette routes on the decoded path (``%2F`` separates segments); aiohttp and Express on the raw one (``%2F`` stays
inside its segment and binds to a ``{param}``). A request the gateway reads as free must not reach a priced
handler on any of them; a request one reading prices is priced; a path whose readings reach different priced
routes, or that no framework reads one way (control characters, bytes that are not UTF-8, IIS ``%u`` escapes), is
refused with 400 ``ambiguous_path`` before anything is forwarded.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.dev.chain import DevChain
from gateway.routes import AmbiguousPath, RoutePattern, RouteTable, path_readings
from gateway.x402 import reasons
from tests.e2e.helpers import Balances, gateway_with_upstream_url, receipt_of
from tests.proxy.frameworks import FRAMEWORKS, ROUTES, hits, priced_hits, reset_hits, serve_framework
from tests.support import raw_http
from tests.support.gateway import GatewayUnderTest, sqlite_url

PRICE = 10_000  # "0.01"


def get(url: str, target: str) -> tuple[int, dict[str, str], bytes]:
    """A GET with ``target`` exactly as written (httpx would normalise some of these paths)."""
    return raw_http(url, f"GET {target} HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n\r\n".encode())


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


@pytest.fixture
def upstream_url(framework: tuple[str, str]) -> str:
    reset_hits(framework[1])
    return framework[1]


# Each of these reaches a priced handler on at least one framework when forwarded as is, while the gateway's own
# (decoded) reading of it matches no priced route.
PRICED_ELSEWHERE = [
    "/item/a%2Fb",  # aiohttp, Express: GET /item/:id with id "a/b"
    "/item/a%2fb",
    "/files/a%2Fb",  # aiohttp, Express: the final * segment
    "/it%65m/a%2Fb",
    "/item//a%2Fb",
    "/item/a%2F",
    "/files/%2F",
]


@pytest.mark.parametrize("target", PRICED_ELSEWHERE)
def test_an_encoded_slash_in_a_priced_segment_is_priced_not_free(
    gateway: GatewayUnderTest, upstream_url: str, target: str
) -> None:
    status, headers, _ = get(gateway.url, target)
    assert status == 402, (target, status)
    assert "payment-required" in headers
    assert priced_hits(upstream_url) == []


# Spellings no framework reads one way, or readings that reach different routes: refused before the upstream.
NO_SINGLE_MEANING = [
    "/item/a%00b",  # NUL ends the path for C-based upstreams
    "/item/a%0Ab",
    "/item/%C0%AF",  # overlong UTF-8 for '/'
    "/item/%FF",
    "/item/a%u002Fb",  # IIS %u escape
    "/files/x%00",
]


@pytest.mark.parametrize("target", NO_SINGLE_MEANING)
def test_paths_without_one_meaning_are_refused_before_the_upstream(
    gateway: GatewayUnderTest, upstream_url: str, target: str
) -> None:
    status, _, body = get(gateway.url, target)
    assert status == 400, (target, status, body)
    assert b'"ambiguous_path"' in body
    assert hits(upstream_url) == []


# Readings an upstream other than these three makes (Tomcat's ;params, IIS's backslash, double decoding, NFKC):
# whichever it is, the request is priced if any reading is.
OTHER_READINGS = [
    "/report;jsessionid=1",  # Tomcat/Spring: /report
    "/item;x=1/7",  # Tomcat/Spring: /item/7
    "/item%5C7",  # IIS: /item/7
    "/item%252F7",  # decoded twice: /item/7
    "/%EF%BC%8Fitem%EF%BC%8F7",  # NFKC: fullwidth solidus -> /item/7
    "/report%3Bx",  # ;x once decoded
    "/report.",  # IIS: a segment's trailing dots are dropped
    "/item/7%2E%2E/",  # the same, once decoded
    "/report%20",  # IIS: trailing spaces too
]


@pytest.mark.parametrize("target", OTHER_READINGS)
def test_any_reading_that_is_priced_prices_the_request(
    gateway: GatewayUnderTest, upstream_url: str, target: str
) -> None:
    status, _, _ = get(gateway.url, target)
    assert status == 402, (target, status)
    assert priced_hits(upstream_url) == []


def test_free_paths_with_encoded_slashes_still_pass_unchanged(gateway: GatewayUnderTest, upstream_url: str) -> None:
    # No reading of it is priced: the request goes through, its raw path as sent.
    status, _, body = get(gateway.url, "/free/a%2Fb")
    assert status == 404  # the framework's own "no such route", not a refusal by the gateway
    assert b"ambiguous_path" not in body and b"route_not_found" not in body
    assert priced_hits(upstream_url) == []


@pytest.mark.parametrize("target", ["/item/a%2Fb", "/files/a%2Fb"])
def test_a_paid_request_with_an_encoded_slash_reaches_the_priced_handler_and_is_charged_once(
    gateway: GatewayUnderTest, framework: tuple[str, str], upstream_url: str, base_chain: DevChain, target: str
) -> None:
    if framework[0] == "starlette":
        pytest.skip("Starlette reads a%2Fb as two segments: no handler to pay for")
    payer = base_chain.new_payer(1_000_000)
    balances = Balances(gateway, payer.address)
    challenge = httpx.get(gateway.url + target)
    assert challenge.status_code == 402
    assert challenge.json()["accepts"][0]["resource"].endswith(target)
    name, value = gateway.sign(payer, challenge)
    served = httpx.get(gateway.url + target, headers={name: value}, timeout=30)
    assert served.status_code == 200, served.text
    assert served.json()["handler"] in ("item", "files")
    assert "a/b" in served.json().values()  # forwarded as priced: the upstream bound the segment it was paid for
    assert receipt_of(served)["success"] is True
    balances.assert_charged_once(PRICE)


# --- the readings themselves (no servers) -----------------------------------------------------------------------


def table(*entries: str) -> RouteTable[str]:
    return RouteTable([(RoutePattern.parse(e), e) for e in entries])


def test_a_plain_path_has_one_reading() -> None:
    assert path_readings("/a/./b/../c") == ["/a/c"]


def test_a_segment_with_trailing_dots_is_also_read_without_them() -> None:
    assert path_readings("/report.") == ["/report.", "/report"]
    assert path_readings("/a../b.c/d...") == ["/a../b.c/d...", "/a/b.c/d"]
    assert path_readings("/.well-known/x/../y") == ["/.well-known/y"]
    assert path_readings("/report%20") == ["/report ", "/report"]
    assert path_readings("/v1.2/report") == ["/v1.2/report"]


def test_an_encoded_slash_is_read_both_as_a_separator_and_inside_its_segment() -> None:
    readings = path_readings("/item/a%2Fb")
    assert readings[0] == "/item/a/b"  # the gateway's own reading comes first
    assert len(readings) == 2


def test_readings_that_reach_two_different_priced_routes_are_ambiguous() -> None:
    routes = table("GET /item/{id}", "GET /item/{a}/{b}")
    with pytest.raises(AmbiguousPath):
        routes.match_request("GET", "/item/x%2Fy")
    assert routes.match_request("GET", "/item/x") == ("GET /item/{id}", {"id": "x"})


def test_the_priced_reading_gives_the_path_values_with_their_slash() -> None:
    assert table("GET /item/{id}").match_request("GET", "/item/a%2Fb") == ("GET /item/{id}", {"id": "a/b"})


def test_one_route_reached_by_every_reading_is_not_ambiguous() -> None:
    assert table("GET /files/**").match_request("GET", "/files/a%2Fb") == ("GET /files/**", {})


@pytest.mark.parametrize("raw", ["/a%00", "/a%0d%0a", "/%C0%AF", "/%e9t%e9", "/a%u002f", "/a\tb"])
def test_paths_no_framework_reads_one_way_are_ambiguous(raw: str) -> None:
    with pytest.raises(AmbiguousPath):
        path_readings(raw)


def test_an_ambiguous_path_is_a_400_with_its_reason_and_nothing_forwarded(base_chain: DevChain, tmp_path: Path) -> None:
    routes: list[dict[str, Any]] = [
        {"route": "GET /item/{id}", "price": "0.01"},
        {"route": "GET /item/{a}/{b}", "price": "1.00"},
    ]
    with (
        serve_framework("starlette") as upstream,
        gateway_with_upstream_url(
            base_chain, store_url=sqlite_url(tmp_path), upstream_url=upstream, routes=routes
        ) as gw,
    ):
        status, _, body = get(gw.url, "/item/x%2Fy")
        assert status == 400
        assert reasons.AMBIGUOUS_PATH.encode() in body
        assert hits(upstream) == []
