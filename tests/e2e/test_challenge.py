"""The 402 challenge: both protocol versions in every 402, valid for the official schemas and the legacy clients'
strict rules, absolute resource URLs, exact amounts, every configured network (docs/protocol.md §1, §4)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from eth_account.signers.local import LocalAccount
from x402 import x402Client
from x402.http.clients import x402HttpxClient
from x402.mechanisms.evm.exact import register_exact_evm_client
from x402.mechanisms.evm.signers import EthAccountSigner
from x402.schemas import PaymentRequired
from x402.schemas.v1 import PaymentRequiredV1

from gateway.dev.chain import BASE_USDC, POLYGON_USDC, DevChain
from tests.e2e.helpers import EXPOSED, assert_error, b64json, receipt_of
from tests.support.gateway import GatewayUnderTest, running_gateway, sqlite_url

PAY_TO = re.compile(r"^0x[0-9a-fA-F]{40}$")


@pytest.fixture(scope="module")
def gw(base_chain: DevChain, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayUnderTest]:
    with running_gateway(base_chain, store_url=sqlite_url(tmp_path_factory.mktemp("challenge"))) as gw:
        yield gw


def challenge_parts(response: httpx.Response) -> tuple[dict[str, Any], dict[str, Any]]:
    """(v2 PaymentRequired from the header, v1 body)."""
    assert response.status_code == 402, response.text
    return b64json(response.headers["payment-required"]), response.json()


@pytest.mark.parametrize(("method", "path", "amount"), [("POST", "/paid", "100000"), ("GET", "/cheap", "10000")])
def test_unpaid_request_gets_a_402_valid_for_v1_and_v2_clients(
    gw: GatewayUnderTest, method: str, path: str, amount: str
) -> None:
    gw.upstream.reset()
    response = httpx.request(method, gw.url + path, params={"q": "1"})
    v2, v1 = challenge_parts(response)
    assert gw.upstream.requests == []

    # Headers: not cacheable, readable by browsers.
    assert response.headers["cache-control"] == "no-store"
    exposed = {h.strip().lower() for h in response.headers["access-control-expose-headers"].split(",")}
    assert exposed >= EXPOSED
    assert response.headers["content-type"].startswith("application/json")

    # The official package's own models accept both halves.
    required = PaymentRequired.model_validate(v2)
    legacy = PaymentRequiredV1.model_validate(v1)
    assert required.x402_version == 2
    assert legacy.x402_version == 1
    assert v1["error"] == v2["error"] == "payment_required"

    # v2: top-level resource, CAIP-2 network, ``amount``.
    (accept,) = v2["accepts"]
    assert accept["network"] == "eip155:8453"
    assert accept["amount"] == amount
    assert accept["asset"] == BASE_USDC
    assert accept["scheme"] == "exact"
    assert PAY_TO.match(accept["payTo"])
    assert accept["payTo"] == gw.pay_to
    assert isinstance(accept["maxTimeoutSeconds"], int)
    assert accept["maxTimeoutSeconds"] > 0
    assert accept["extra"] == {"name": "USD Coin", "version": "2"}
    resource = v2["resource"]["url"]
    assert urlsplit(resource).scheme in ("http", "https")
    assert urlsplit(resource).netloc
    assert resource == f"{gw.url}{path}?q=1"

    # v1: the legacy strict schema, per requirement.
    (req,) = v1["accepts"]
    assert req["network"] == "base"
    assert req["maxAmountRequired"] == amount
    assert isinstance(req["maxAmountRequired"], str)
    assert req["resource"] == resource
    assert isinstance(req["description"], str)
    assert isinstance(req["mimeType"], str)
    assert "outputSchema" not in req or isinstance(req["outputSchema"], dict)
    assert PAY_TO.match(req["payTo"])
    assert isinstance(req["maxTimeoutSeconds"], int)
    assert req["asset"] == BASE_USDC
    assert req["extra"] == {"name": "USD Coin", "version": "2"}
    assert "null" not in response.text.replace('"error":null', "")


def test_resource_uses_the_configured_public_url(base_chain: DevChain, tmp_path: Path) -> None:
    server = {"public_url": "https://api.example.com/"}
    with running_gateway(base_chain, store_url=sqlite_url(tmp_path), server=server) as gw:
        v2, v1 = challenge_parts(httpx.post(gw.url + "/paid?x=1", headers={"X-Forwarded-Proto": "http"}))
        assert v2["resource"]["url"] == "https://api.example.com/paid?x=1"
        assert v1["accepts"][0]["resource"] == "https://api.example.com/paid?x=1"


@pytest.mark.parametrize(("trust", "expected_scheme"), [(False, "http"), (True, "https")])
def test_forwarded_proto_is_honoured_only_when_trusted(
    base_chain: DevChain, tmp_path: Path, trust: bool, expected_scheme: str
) -> None:
    server = {"trust_forwarded_headers": trust}
    with running_gateway(base_chain, store_url=sqlite_url(tmp_path), server=server) as gw:
        response = httpx.post(gw.url + "/paid", headers={"X-Forwarded-Proto": "https"})
        v2, v1 = challenge_parts(response)
        host = urlsplit(gw.url).netloc
        assert v2["resource"]["url"] == f"{expected_scheme}://{host}/paid"
        assert v1["accepts"][0]["resource"] == v2["resource"]["url"]


def test_amounts_are_exact_integer_strings_from_decimal(base_chain: DevChain, tmp_path: Path) -> None:
    # int(0.0157 * 10**6) is 15699: a float anywhere on the way would show here.
    routes = [
        {"route": "GET /odd", "price": "0.0157"},
        {"route": "GET /tiny", "price": "$0.000001"},
        {"route": "GET /big", "price": "1234.567891"},
    ]
    expected = {"/odd": "15700", "/tiny": "1", "/big": "1234567891"}
    with running_gateway(base_chain, store_url=sqlite_url(tmp_path), routes=routes) as gw:
        for path, amount in expected.items():
            v2, v1 = challenge_parts(httpx.get(gw.url + path))
            assert v2["accepts"][0]["amount"] == amount
            assert v1["accepts"][0]["maxAmountRequired"] == amount


def test_route_on_base_and_polygon_lists_both(base_chain: DevChain, polygon_chain: DevChain, tmp_path: Path) -> None:
    routes = [{"route": "POST /multi", "price": "0.25", "networks": ["base", "polygon"]}]
    with running_gateway([base_chain, polygon_chain], store_url=sqlite_url(tmp_path), routes=routes) as gw:
        v2, v1 = challenge_parts(httpx.post(gw.url + "/multi"))
        PaymentRequired.model_validate(v2)
        PaymentRequiredV1.model_validate(v1)
        assert [(a["network"], a["asset"], a["amount"]) for a in v2["accepts"]] == [
            ("eip155:8453", BASE_USDC, "250000"),
            ("eip155:137", POLYGON_USDC, "250000"),
        ]
        assert [(a["network"], a["asset"], a["maxAmountRequired"]) for a in v1["accepts"]] == [
            ("base", BASE_USDC, "250000"),
            ("polygon", POLYGON_USDC, "250000"),
        ]
        assert {a["payTo"] for a in v2["accepts"]} == {gw.pay_to}


def test_unpriced_route_passes_free_by_default(gw: GatewayUnderTest) -> None:
    gw.upstream.reset()
    response = httpx.get(gw.url + "/free/thing")
    assert response.status_code == 200, response.text
    assert "payment-required" not in response.headers
    assert len(gw.upstream.requests) == 1


def test_unpriced_route_is_404_when_configured_to_refuse(base_chain: DevChain, tmp_path: Path) -> None:
    with running_gateway(base_chain, store_url=sqlite_url(tmp_path), server={"unpriced": "refuse"}) as gw:
        response = httpx.get(gw.url + "/free/thing")
        assert_error(response, 404, "route_not_found")
        assert gw.upstream.requests == []
        # Priced routes still challenge.
        assert httpx.post(gw.url + "/paid").status_code == 402


async def _official_pay(url: str, payer: LocalAccount) -> httpx.Response:
    client = x402Client()
    register_exact_evm_client(client, EthAccountSigner(payer))
    async with x402HttpxClient(client, timeout=30) as http:
        response: httpx.Response = await http.post(url, json={"prompt": "hello"})
        return response


def test_official_client_pays_a_polygon_only_route_on_chain_137(polygon_chain: DevChain, tmp_path: Path) -> None:
    payer = polygon_chain.new_payer(1_000_000)
    routes = [{"route": "POST /poly", "price": "0.05", "networks": ["polygon"]}]
    with running_gateway(polygon_chain, store_url=sqlite_url(tmp_path), routes=routes) as gw:
        v2, _ = challenge_parts(httpx.post(gw.url + "/poly"))
        assert [a["network"] for a in v2["accepts"]] == ["eip155:137"]
        before = (gw.balance(payer.address), gw.balance(gw.pay_to))
        response = asyncio.run(_official_pay(gw.url + "/poly", payer))
        assert response.status_code == 200, response.text
        assert len(gw.upstream.requests) == 1
        receipt = receipt_of(response)
        assert receipt["network"] == "eip155:137"
        assert receipt["success"] is True
        mined = polygon_chain.rpc("eth_getTransactionReceipt", [receipt["transaction"]])
        assert int(mined["status"], 16) == 1
        assert (gw.balance(payer.address), gw.balance(gw.pay_to)) == (before[0] - 50_000, before[1] + 50_000)
