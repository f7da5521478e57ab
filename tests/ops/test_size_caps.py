"""Oversized input (docs/threat-model.md T16): header cap (431) before anything else; an oversized declared body (413)
before the payment is even looked at, so it consumes nothing and the same payment works on a normal request."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.dev.chain import DevChain
from tests.support.gateway import running_gateway, sqlite_url
from tests.support.servers import raw_http

SMALL_SERVER = {"max_header_bytes": 4096, "max_body_bytes": 1000}


def test_headers_over_the_cap_get_431_before_anything_else(base_chain: DevChain, tmp_path: Path) -> None:
    with (
        running_gateway(base_chain, store_url=sqlite_url(tmp_path), server=SMALL_SERVER) as gw,
        gw.client() as c,
    ):
        big = {"X-Filler": "a" * 5000}
        for path in ("/paid", "/free/thing", "/healthz"):
            r = c.post(path, headers=big)
            assert r.status_code == 431, path
            assert r.json()["error"] == "headers_too_large"
        assert gw.upstream.requests == []
        # Many small headers count too: the cap is on the total.
        many = {f"X-H{i}": "b" * 90 for i in range(50)}
        assert c.get("/free/thing", headers=many).status_code == 431
        assert c.get("/free/thing", headers={"X-Filler": "a" * 3000}).status_code == 200


def test_the_default_header_cap_is_16_kib(base_chain: DevChain, tmp_path: Path) -> None:
    with running_gateway(base_chain, store_url=sqlite_url(tmp_path)) as gw:
        request = (
            b"GET /free/thing HTTP/1.1\r\nHost: x\r\nX-Filler: " + b"a" * 17_000 + b"\r\nConnection: close\r\n\r\n"
        )
        status, _, _ = raw_http(gw.url, request)
        assert status == 431
        ok = b"GET /free/thing HTTP/1.1\r\nHost: x\r\nX-Filler: " + b"a" * 15_000 + b"\r\nConnection: close\r\n\r\n"
        assert raw_http(gw.url, ok)[0] == 200


@pytest.mark.parametrize("route", ["/paid", "/paid-before"])
def test_an_oversized_declared_body_gets_413_before_its_payment_is_claimed(
    base_chain: DevChain, tmp_path: Path, route: str
) -> None:
    payer = base_chain.new_payer(1_000_000)
    with (
        running_gateway(base_chain, store_url=sqlite_url(tmp_path), server=SMALL_SERVER) as gw,
        gw.client() as c,
    ):
        before = gw.balance(payer.address)
        name, header = gw.sign(payer, c.post(route))
        r = c.post(route, content=b"x" * 2000, headers={name: header})
        assert r.status_code == 413
        assert r.json()["error"] == "payload_too_large"
        assert gw.upstream.requests == []  # not a byte upstream
        assert gw.balance(payer.address) == before  # not settled, even on a settle-before route
        ok = c.post(route, content=b"x" * 500, headers={name: header})
        assert ok.status_code == 200, ok.text  # the same payment, unconsumed, pays for a normal request
        assert gw.upstream.requests[0].body == b"x" * 500
        assert gw.balance(payer.address) == before - 100_000


def test_an_oversized_chunked_body_is_not_charged(base_chain: DevChain, tmp_path: Path) -> None:
    """No declared size to check early: the proxy cuts the stream at the cap, and settle-after charges nothing."""
    payer = base_chain.new_payer(1_000_000)

    def chunks() -> Iterator[bytes]:
        for _ in range(10):
            yield b"y" * 300

    with (
        running_gateway(base_chain, store_url=sqlite_url(tmp_path), server=SMALL_SERVER) as gw,
        gw.client() as c,
    ):
        before = gw.balance(payer.address)
        name, header = gw.sign(payer, c.post("/paid"))
        r = c.post("/paid", content=chunks(), headers={name: header})
        assert r.status_code == 413
        assert gw.balance(payer.address) == before
        assert c.post("/paid", content=b"z", headers={name: header}).status_code == 200
        assert gw.balance(payer.address) == before - 100_000
