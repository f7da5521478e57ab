"""A redirect is relayed, never charged, and never names the upstream's own origin
(docs/threat-model.md T37).

Only a 2xx is the priced content. A 3xx (and a 304) under ``settlement = "after"`` settles nothing and leaves the
payment usable, like a failure; under ``"before"`` the settled payment stays usable for one retry. A ``Location``
(or ``Content-Location``) on the upstream's origin is rewritten to ``server.public_url`` + the path below the
upstream's base path, or to that bare path when no public URL is set.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.dev.chain import DevChain
from gateway.http.proxy import UpstreamProxy
from tests.e2e.helpers import Balances, authorization_used, decode_payment, gateway_with_upstream_url, receipt_of
from tests.proxy.frameworks import FRAMEWORKS, ROUTES, serve_framework
from tests.support import Behaviour, RecordingUpstream, serve_asgi
from tests.support.gateway import running_gateway, sqlite_url

PUBLIC = "https://api.example.com"


@pytest.fixture(scope="module")
def recorder() -> Iterator[tuple[RecordingUpstream, str]]:
    upstream = RecordingUpstream()
    with serve_asgi(upstream) as url:
        yield upstream, url


def location_through(recorder: tuple[RecordingUpstream, str], location: str, **proxy: Any) -> str | None:
    upstream, url = recorder
    upstream.reset(Behaviour(status=302, body=b"", headers=[("Location", location), ("Content-Location", location)]))
    with serve_asgi(UpstreamProxy(url + "/base", **proxy), lifespan="on") as proxy_url:
        r = httpx.get(proxy_url + "/r")
    assert r.status_code == 302
    assert r.headers.get("content-location") == r.headers.get("location")
    return r.headers.get("location")


@pytest.mark.parametrize(
    ("template", "public", "expected"),
    [
        ("{up}/base/next?x=1#f", PUBLIC, PUBLIC + "/next?x=1#f"),
        ("{up}/base/next?x=1", None, "/next?x=1"),
        ("{up}/base", PUBLIC, PUBLIC + "/"),
        ("{up}/elsewhere", PUBLIC, PUBLIC + "/elsewhere"),  # the origin never shows, even outside the base path
        ("//{authority}/base/n", PUBLIC, PUBLIC + "/n"),
        ("HTTP://{authority}/base/n", None, "/n"),
        ("/base/n", PUBLIC, PUBLIC + "/n"),
        ("/other", PUBLIC, "/other"),  # outside the base path: not a path the gateway serves; left alone
        ("next", PUBLIC, "next"),  # relative references resolve against the public URL the client called
        ("https://elsewhere.example/x", PUBLIC, "https://elsewhere.example/x"),
        ("http://127.0.0.1:1/base/x", PUBLIC, "http://127.0.0.1:1/base/x"),  # another port: another origin
    ],
)
def test_a_location_on_the_upstreams_origin_becomes_the_public_one(
    recorder: tuple[RecordingUpstream, str], template: str, public: str | None, expected: str
) -> None:
    up = recorder[1]
    location = template.format(up=up, authority=up.removeprefix("http://"))
    assert location_through(recorder, location, public_url=public) == expected


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_a_redirect_on_a_priced_route_is_relayed_rewritten_and_not_charged(
    framework: str, base_chain: DevChain, tmp_path: Path
) -> None:
    payer = base_chain.new_payer(1_000_000)
    with (
        serve_framework(framework) as upstream,
        gateway_with_upstream_url(
            base_chain, store_url=sqlite_url(tmp_path), upstream_url=upstream, routes=ROUTES
        ) as gw,
    ):
        balances = Balances(gw, payer.address)
        challenge = httpx.get(gw.url + "/moved")
        name, value = gw.sign(payer, challenge)
        for _ in range(2):  # unused after the first: the same payment is still good
            r = httpx.get(gw.url + "/moved", headers={name: value}, timeout=30)
            assert r.status_code == 302
            assert r.headers["location"] == "/item/1?from=moved"
            assert upstream.removeprefix("http://") not in r.text + str(r.headers)
            assert "payment-response" not in r.headers
        balances.assert_unchanged()
        assert not authorization_used(base_chain, payer.address, decode_payment(value)[0]["nonce"])


@pytest.mark.parametrize("status", [301, 302, 303, 304, 307, 308])
def test_no_3xx_is_settled_under_after(status: int, base_chain: DevChain, tmp_path: Path) -> None:
    payer = base_chain.new_payer(1_000_000)
    with running_gateway(base_chain, store_url=sqlite_url(tmp_path), server={"public_url": PUBLIC}) as gw:
        balances = Balances(gw, payer.address)
        name, value = gw.sign(payer, httpx.post(gw.url + "/paid"))
        location = gw.config.upstream.url + "/done"
        gw.upstream.reset(Behaviour(status=status, body=b"", headers=[("Location", location)]))
        r = httpx.post(gw.url + "/paid", headers={name: value}, timeout=30)
        assert r.status_code == status
        assert r.headers["location"] == PUBLIC + "/done"
        balances.assert_unchanged()
        gw.upstream.reset()
        served = httpx.post(gw.url + "/paid", headers={name: value}, timeout=30)  # the payment was never used
        assert served.status_code == 200
        assert receipt_of(served)["success"] is True
        balances.assert_charged_once(100_000)


def test_a_redirect_under_before_leaves_the_settled_payment_usable_once(base_chain: DevChain, tmp_path: Path) -> None:
    payer = base_chain.new_payer(1_000_000)
    with running_gateway(base_chain, store_url=sqlite_url(tmp_path)) as gw:
        balances = Balances(gw, payer.address)
        name, value = gw.sign(payer, httpx.post(gw.url + "/paid-before"))
        gw.upstream.reset(Behaviour(status=302, body=b"", headers=[("Location", "/elsewhere")]))
        r = httpx.post(gw.url + "/paid-before", headers={name: value}, timeout=30)
        assert r.status_code == 302
        assert "payment-response" not in r.headers
        balances.assert_charged_once(100_000)  # "before": the money moved first
        gw.upstream.reset()
        served = httpx.post(gw.url + "/paid-before", headers={name: value}, timeout=30)
        assert served.status_code == 200
        balances.assert_charged_once(100_000)  # served by the retry, not paid twice
        again = httpx.post(gw.url + "/paid-before", headers={name: value}, timeout=30)
        assert again.status_code == 402  # now it was served: used
