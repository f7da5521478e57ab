"""Every rule x402scan applies before it lists a resource (docs/protocol.md §6), checked against the gateway's own
402s and documents, and the official x402 package still parsing and paying the 402 with the extension present."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from x402.extensions.bazaar import extract_discovery_info, validate_discovery_extension_spec
from x402.extensions.bazaar.facilitator import validate_discovery_extension
from x402.extensions.bazaar.types import parse_discovery_extension
from x402.http.utils import decode_payment_required_header
from x402.schemas import PaymentRequired

from gateway.dev.chain import DevChain
from gateway.x402.codec import decode_header
from tests.discovery.conftest import DISCOVERY, PRICED_METHODS, PUBLIC, ROUTES
from tests.e2e.test_official_client import official_client
from tests.support.gateway import GatewayUnderTest, running_gateway, sqlite_url

X402_PAYMENT_INFO_KEYS = {"protocols", "price"}


def openapi_operation(openapi: dict[str, Any], path: str, method: str) -> dict[str, Any] | None:
    """The operation x402scan would match to a concrete ``path`` (templated paths included)."""
    for template, operations in openapi["paths"].items():
        parts, concrete = template.strip("/").split("/"), path.strip("/").split("/")
        if len(parts) == len(concrete) and all(
            p == c or p.startswith("{") for p, c in zip(parts, concrete, strict=True)
        ):
            op = operations.get(method.lower())
            if op is not None:
                return dict(op)
    return None


def test_every_discovered_resource_meets_every_x402scan_rule(gw: GatewayUnderTest) -> None:
    with gw.client() as http:
        well_known = http.get("/.well-known/x402").json()
        openapi = http.get("/openapi.json").json()
        assert well_known["version"] == 1
        resources = well_known["resources"]
        assert [urlsplit(u).path for u in resources] == list(PRICED_METHODS)
        for url in resources:
            # HTTPS: the public URL, not the http:// the gateway itself is served on.
            assert url.startswith(PUBLIC + "/")
            path = urlsplit(url).path
            for method in PRICED_METHODS[path]:
                # Unauthenticated and body-less, with any method the resource is priced for; even announcing a
                # JSON body that is not there: the 402 comes first, no input validation (the upstream's) runs.
                headers = {"content-type": "application/json"} if method in ("POST", "PUT", "PATCH") else {}
                r = http.request(method, path, headers=headers)
                assert r.status_code == 402, (method, path, r.status_code)

                # v2: the PAYMENT-REQUIRED header, parsed by the official pydantic models with the extension in.
                required = decode_payment_required_header(r.headers["payment-required"])
                assert isinstance(required, PaymentRequired)
                assert required.x402_version == 2
                assert required.resource is not None and required.resource.url.startswith(PUBLIC + path)
                # An accept on Base mainnet, and every accept complete.
                assert "eip155:8453" in [a.network for a in required.accepts]
                for accept in required.accepts:
                    assert accept.scheme and accept.network and accept.amount and accept.pay_to and accept.asset
                    assert accept.max_timeout_seconds > 0

                # An input schema: the bazaar extension, valid for the official facilitator-side validators ...
                assert required.extensions is not None
                bazaar = required.extensions["bazaar"]
                assert validate_discovery_extension_spec(bazaar).valid
                assert validate_discovery_extension(parse_discovery_extension(bazaar)).valid
                assert bazaar["info"]["input"]["method"] == method
                assert isinstance(bazaar["schema"]["properties"]["input"], dict)
                # ... and, for the methods it documents, an OpenAPI operation with x-payment-info and a 402.
                op = openapi_operation(openapi, path, method)
                if method != "HEAD" and not (path == "/any" and method not in ("GET", "POST")):
                    assert op is not None, (method, path)
                    info = op["x-payment-info"]
                    assert set(info) == X402_PAYMENT_INFO_KEYS
                    assert info["protocols"] == [{"x402": {}}]
                    assert info["price"]["mode"] == "fixed" and info["price"]["currency"] == "USD"
                    assert "402" in op["responses"]
    assert gw.upstream.requests == []  # nothing above reached the upstream


def test_input_schemas_reach_both_documents(gw: GatewayUnderTest) -> None:
    with gw.client() as http:
        openapi = http.get("/openapi.json").json()
        prompt = decode_header(http.post("/agent/prompt").headers["payment-required"])
        weather = decode_header(http.get("/weather/lisbon").headers["payment-required"])
    body_op = openapi["paths"]["/agent/prompt"]["post"]
    assert body_op["requestBody"]["content"]["application/json"]["schema"] == ROUTES[0]["input_schema"]
    bazaar = prompt["extensions"]["bazaar"]
    assert bazaar["info"]["input"] == {
        "type": "http",
        "method": "POST",
        "bodyType": "json",
        "body": {"prompt": "Will it rain?"},
    }
    assert bazaar["schema"]["properties"]["input"]["properties"]["body"] == ROUTES[0]["input_schema"]
    assert bazaar["info"]["output"] == {"type": "json", "example": {"answer": "No."}}

    query = openapi["paths"]["/weather/{city}"]["get"]["parameters"]
    assert {(p["name"], p["in"], p["required"]) for p in query} == {("city", "path", True), ("units", "query", True)}
    bazaar = weather["extensions"]["bazaar"]
    assert bazaar["info"]["input"]["queryParams"] == {"units": "metric"}
    assert bazaar["info"]["input"]["pathParams"] == {"city": "lisbon"}
    assert bazaar["routeTemplate"] == "/weather/:city"
    # The tx-hash option the 402 already carried survives next to the new extension.
    assert weather["extensions"]["txhash"]["options"][0]["network"] == "base"
    # Service metadata for catalogs, on the v2 resource object only.
    assert {k: weather["resource"][k] for k in ("serviceName", "tags", "iconUrl")} == {
        "serviceName": DISCOVERY["service_name"],
        "tags": DISCOVERY["tags"],
        "iconUrl": DISCOVERY["icon_url"],
    }


def capture_payments(app: Any, seen: list[str]) -> Any:
    """Record the PAYMENT-SIGNATURE header of every request (the payload a facilitator would catalog)."""

    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            seen.extend(v.decode() for k, v in scope["headers"] if k == b"payment-signature")
        await app(scope, receive, send)

    return wrapped


def test_official_client_pays_with_the_extension_and_a_facilitator_would_catalog_it(
    base_chain: DevChain, tmp_path: Path
) -> None:
    from x402.http.clients import x402HttpxClient

    payer = base_chain.new_payer(1_000_000)
    seen: list[str] = []
    with running_gateway(
        base_chain,
        store_url=sqlite_url(tmp_path),
        routes=ROUTES,
        server={"public_url": PUBLIC},
        discovery=DISCOVERY,
        wrap=lambda app: capture_payments(app, seen),
    ) as gw:
        before = gw.balance(payer.address)

        async def pay() -> Any:
            async with x402HttpxClient(official_client(payer), timeout=30) as http:
                return await http.post(gw.url + "/agent/prompt", json={"prompt": "Will it rain?"})

        response = asyncio.run(pay())
        assert response.status_code == 200, response.text
        assert len(gw.upstream.requests) == 1
        assert json.loads(gw.upstream.requests[0].body) == {"prompt": "Will it rain?"}
        assert gw.balance(payer.address) == before - 100_000

    # The client echoed the server's extensions into its payload, as x402 v2 does; the official facilitator-side
    # extraction finds a valid, complete listing in it.
    payload = decode_header(seen[-1])
    assert payload["extensions"]["bazaar"]["info"]["input"]["method"] == "POST"
    found = extract_discovery_info(payload, payload["accepted"])
    assert found is not None
    assert (found.resource_url, found.method) == (PUBLIC + "/agent/prompt", "POST")
    assert (found.service_name, found.tags, found.icon_url) == (
        DISCOVERY["service_name"],
        DISCOVERY["tags"],
        DISCOVERY["icon_url"],
    )
