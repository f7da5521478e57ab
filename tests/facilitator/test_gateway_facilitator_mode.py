"""Facilitator mode end to end: the gateway delegates verify/settle to the x402 package's own facilitator."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.dev.chain import DevChain
from gateway.x402.codec import decode_header, encode_header
from tests.e2e.test_official_client import pay_with_official_client
from tests.support.facilitator import FacilitatorControl, refused_url, run_x402_facilitator
from tests.support.gateway import running_gateway, sqlite_url


def facilitator_networks(chain: DevChain, url: str) -> dict[str, Any]:
    return {
        "base": {
            "rpc_urls": [chain.url],
            "receipt_poll_interval": 0.02,
            "verifier": "facilitator",
            "facilitator": {"url": url, "timeout": 5.0},
        }
    }


@pytest.fixture
def control() -> FacilitatorControl:
    return FacilitatorControl()


@pytest.fixture
def facilitator_url(base_chain: DevChain, control: FacilitatorControl) -> Any:
    with run_x402_facilitator(base_chain, control=control) as url:
        yield url


def test_official_client_pays_through_the_facilitator_once(
    base_chain: DevChain, tmp_path: Path, facilitator_url: str
) -> None:
    payer = base_chain.new_payer(1_000_000)
    with running_gateway(
        base_chain, store_url=sqlite_url(tmp_path), networks=facilitator_networks(base_chain, facilitator_url)
    ) as gw:
        before = gw.balance(payer.address)
        response = asyncio.run(pay_with_official_client(gw.url + "/paid", payer))
        assert response.status_code == 200, response.text
        receipt = decode_header(response.headers["payment-response"])
        mined = base_chain.rpc("eth_getTransactionReceipt", [receipt["transaction"]])
        assert int(mined["status"], 16) == 1
        assert gw.balance(payer.address) == before - 100_000
        assert gw.balance(gw.pay_to) == 100_000
        assert len(gw.upstream.requests) == 1


def _signed_request(gw: Any, payer: Any, path: str = "/paid") -> tuple[httpx.Response, dict[str, str]]:
    with gw.client() as http:
        first = http.post(path, json={})
        name, value = gw.sign(payer, first)
        return first, {name: value}


@pytest.mark.parametrize(
    ("mode", "status", "reason"),
    [
        ("invalid", 402, "invalid_exact_evm_payload_signature"),
        ("error", 503, "facilitator_unavailable"),
        ("garbage", 502, "facilitator_bad_answer"),
    ],
)
def test_facilitator_failures_map_to_their_status_and_charge_nothing(
    base_chain: DevChain,
    tmp_path: Path,
    facilitator_url: str,
    control: FacilitatorControl,
    mode: str,
    status: int,
    reason: str,
) -> None:
    payer = base_chain.new_payer(1_000_000)
    with running_gateway(
        base_chain, store_url=sqlite_url(tmp_path), networks=facilitator_networks(base_chain, facilitator_url)
    ) as gw:
        _, headers = _signed_request(gw, payer)
        control.mode = mode  # type: ignore[assignment]
        control.reason = "invalid_exact_evm_payload_signature"
        with gw.client() as http:
            refused = http.post("/paid", json={}, headers=headers)
        assert refused.status_code == status, refused.text
        assert refused.json()["error"] == reason
        assert gw.upstream.requests == []
        assert gw.balance(payer.address) == 1_000_000
        # The facilitator recovers: the same payment was not consumed by the failure and works once.
        control.mode = "normal"
        with gw.client() as http:
            ok = http.post("/paid", json={}, headers=headers)
            again = http.post("/paid", json={}, headers=headers)
        assert ok.status_code == 200, ok.text
        assert again.status_code == 402
        assert again.json()["error"] == "payment_already_used"
        assert gw.balance(payer.address) == 900_000


PUBLIC_URL = "https://api.example.com"
ROUTES = [
    {
        "route": "POST /paid",
        "price": "0.10",
        "description": "A paid answer",
        "input_example": {"prompt": "hello"},
    },
    {"route": "POST /hidden", "price": "0.10", "description": "Kept out of discovery", "discoverable": False},
    {"route": "POST /weather/{city}", "price": "0.10", "description": "Weather", "example_path": "/weather/paris"},
]


def _payloads(control: FacilitatorControl) -> list[dict[str, Any]]:
    """The payment payload of every /verify and /settle call the facilitator received (both kinds must be there)."""
    calls = [c for c in control.calls if c.path.rstrip("/").endswith(("/verify", "/settle"))]
    assert {c.path.rstrip("/").rsplit("/", 1)[-1] for c in calls} == {"verify", "settle"}
    return [c.body["paymentPayload"] for c in calls]


def _pay(gw: Any, payer: Any, path: str, **client_says: Any) -> httpx.Response:
    """Pay ``path`` with a v2 payload to which the client added ``client_says`` (resource, extensions...)."""
    _, headers = _signed_request(gw, payer, path)
    ((name, value),) = headers.items()
    doc = {**decode_header(value), **client_says}
    with gw.client() as http:
        return http.post(path, json={}, headers={name: encode_header(doc)})


def test_the_facilitator_hears_the_routes_resource_and_bazaar_declaration_as_the_402_gave_them(
    base_chain: DevChain, tmp_path: Path, facilitator_url: str, control: FacilitatorControl
) -> None:
    """A bazaar facilitator catalogues a resource from the payload it verifies and settles: the gateway forwards
    the resource and the bazaar declaration of its own 402 (and not its tx-hash offer, which is ours)."""
    payer = base_chain.new_payer(1_000_000)
    networks = facilitator_networks(base_chain, facilitator_url)
    server = {"public_url": PUBLIC_URL}
    with running_gateway(
        base_chain, store_url=sqlite_url(tmp_path), routes=ROUTES, networks=networks, server=server
    ) as gw:
        with gw.client() as http:
            offered = decode_header(http.post("/paid", json={}).headers["payment-required"])
        response = asyncio.run(pay_with_official_client(gw.url + "/paid", payer))
        assert response.status_code == 200, response.text
    for payload in _payloads(control):
        assert payload["resource"] == offered["resource"]
        assert payload["resource"]["url"] == PUBLIC_URL + "/paid"
        assert payload["extensions"] == {"bazaar": offered["extensions"]["bazaar"]}
        assert payload["accepted"] == offered["accepts"][0]


def test_a_client_cannot_get_its_own_words_catalogued_next_to_the_operators(
    base_chain: DevChain, tmp_path: Path, facilitator_url: str, control: FacilitatorControl
) -> None:
    """The client's resource and extensions, its path values and its Host header never reach the facilitator:
    a parametrised route is listed through its configured example, a hidden route not at all."""
    payer = base_chain.new_payer(1_000_000)
    networks = facilitator_networks(base_chain, facilitator_url)
    server = {"public_url": PUBLIC_URL}
    made_up = {
        "resource": {"url": "https://elsewhere.example/free-stuff", "description": "spam"},
        "extensions": {"bazaar": {"info": {"input": {"type": "http", "method": "GET"}}, "schema": {}}},
    }
    with running_gateway(
        base_chain, store_url=sqlite_url(tmp_path), routes=ROUTES, networks=networks, server=server
    ) as gw:
        paid = _pay(gw, payer, "/weather/%3Cscript%3Ealert(1)%3C", **made_up)
        assert paid.status_code == 200, paid.text
        for payload in _payloads(control):
            assert payload["resource"]["url"] == PUBLIC_URL + "/weather/paris"
            assert payload["resource"]["description"] == "Weather"
            assert payload["extensions"]["bazaar"]["info"]["input"]["pathParams"] == {"city": "paris"}
        control.reset()
        paid = _pay(gw, payer, "/hidden", **made_up)
        assert paid.status_code == 200, paid.text
        for payload in _payloads(control):
            assert "resource" not in payload and "extensions" not in payload


def test_without_a_public_url_or_with_discovery_off_nothing_is_offered_for_cataloguing(
    base_chain: DevChain, tmp_path: Path, facilitator_url: str, control: FacilitatorControl
) -> None:
    """Without ``server.public_url`` the only address is the client's Host header; with discovery off the
    operator asked not to be listed: either way the payload carries neither resource nor extensions."""
    payer = base_chain.new_payer(1_000_000)
    networks = facilitator_networks(base_chain, facilitator_url)
    for i, sections in enumerate(({}, {"server": {"public_url": PUBLIC_URL}, "discovery": {"enabled": False}})):
        control.reset()
        (tmp_path / str(i)).mkdir()
        with running_gateway(
            base_chain,
            store_url=sqlite_url(tmp_path / str(i)),
            routes=ROUTES,
            networks=networks,
            **sections,
        ) as gw:
            paid = _pay(gw, payer, "/paid")
            assert paid.status_code == 200, paid.text
        for payload in _payloads(control):
            assert "resource" not in payload and "extensions" not in payload


def test_unreachable_facilitator_fails_start_with_a_clear_message(base_chain: DevChain, tmp_path: Path) -> None:
    with (
        pytest.raises(RuntimeError),
        running_gateway(
            base_chain, store_url=sqlite_url(tmp_path), networks=facilitator_networks(base_chain, refused_url())
        ),
    ):
        pass


def test_facilitator_without_support_for_the_network_fails_start(
    base_chain: DevChain, tmp_path: Path, facilitator_url: str, control: FacilitatorControl
) -> None:
    control.mode = "canned"  # type: ignore[assignment]
    control.canned = {"kinds": [{"x402Version": 2, "scheme": "exact", "network": "eip155:137"}]}
    control.status = 200
    with (
        pytest.raises(RuntimeError),
        running_gateway(
            base_chain, store_url=sqlite_url(tmp_path), networks=facilitator_networks(base_chain, facilitator_url)
        ),
    ):
        pass
