"""The discovery documents: what is listed and how, where URLs come from, and that they are never priced."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.config import parse_config
from gateway.dev.chain import DevChain
from gateway.errors import ConfigError
from gateway.x402.codec import decode_header
from tests.discovery.conftest import ANSWER_SCHEMA, PROMPT_SCHEMA, PUBLIC, ROUTES, UNITS_SCHEMA
from tests.support.gateway import GatewayUnderTest, running_gateway, sqlite_url

PAYMENT_INFO = {"protocols": [{"x402": {}}], "price": {"mode": "fixed", "currency": "USD", "amount": "0.10"}}


def test_openapi_has_one_paid_operation_per_priced_route_and_method(gw: GatewayUnderTest) -> None:
    doc = httpx.get(gw.url + "/openapi.json").json()
    assert doc["openapi"] == "3.1.0"
    assert doc["info"]["title"] == "Lisbon Weather Agent"
    assert doc["servers"] == [{"url": PUBLIC}]
    operations = {(path, method) for path, ops in doc["paths"].items() for method in ops}
    assert operations == {
        ("/agent/prompt", "post"),
        ("/weather/{city}", "get"),
        ("/any", "get"),  # "*": documented as GET and POST (every method still gets its 402)
        ("/any", "post"),
        ("/report", "get"),  # GET|HEAD: HEAD goes with GET
        ("/files/{path}", "get"),  # ** as one parameter that may contain '/'
    }  # and GET /internal (discoverable = false) is not there

    prompt = doc["paths"]["/agent/prompt"]["post"]
    assert prompt["x-payment-info"] == PAYMENT_INFO
    assert prompt["summary"] == "Ask the agent one question"
    assert prompt["requestBody"] == {
        "required": True,
        "content": {"application/json": {"schema": PROMPT_SCHEMA, "example": {"prompt": "Will it rain?"}}},
    }
    assert prompt["responses"]["200"]["content"]["application/json"]["schema"] == ANSWER_SCHEMA
    assert "PAYMENT-REQUIRED" in prompt["responses"]["402"]["headers"]
    ref = prompt["responses"]["402"]["content"]["application/json"]["schema"]["$ref"]
    assert ref == "#/components/schemas/PaymentRequiredV1"

    weather = doc["paths"]["/weather/{city}"]["get"]
    assert weather["x-payment-info"]["price"]["amount"] == "0.01"
    city, units = weather["parameters"]
    assert city == {"name": "city", "in": "path", "required": True, "schema": {"type": "string", "example": "lisbon"}}
    assert units == {
        "name": "units",
        "in": "query",
        "required": True,
        "schema": UNITS_SCHEMA["properties"]["units"],
        "example": "metric",
    }
    files = doc["paths"]["/files/{path}"]["get"]
    assert files["parameters"][0]["name"] == "path" and "may contain '/'" in files["parameters"][0]["description"]
    assert {doc["paths"]["/any"][m]["x-payment-info"]["price"]["amount"] for m in ("get", "post")} == {"0.05"}


def test_well_known_lists_concrete_urls_and_example_paths_only(gw: GatewayUnderTest) -> None:
    r = httpx.get(gw.url + "/.well-known/x402")
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
    assert r.json() == {
        "version": 1,
        "resources": [f"{PUBLIC}/agent/prompt", f"{PUBLIC}/weather/lisbon", f"{PUBLIC}/any", f"{PUBLIC}/report"],
    }


def test_discovery_paths_are_never_priced_or_proxied(base_chain: DevChain, tmp_path: Path) -> None:
    """A catch-all priced route must not put the documents themselves behind a paywall."""
    routes: list[dict[str, Any]] = [{"route": "* /**", "price": "0.01"}]
    with running_gateway(base_chain, store_url=sqlite_url(tmp_path), routes=routes) as gw, gw.client() as http:
        assert http.get("/openapi.json").status_code == 200
        assert http.get("/.well-known/x402").json() == {"version": 1, "resources": []}  # nothing concrete
        head = http.head("/openapi.json")
        assert head.status_code == 200 and head.content == b""
        assert http.options("/openapi.json").status_code == 204
        assert http.post("/openapi.json").status_code == 405
        assert http.get("/anything").status_code == 402  # the catch-all still prices everything else
        assert gw.upstream.requests == []


def test_urls_follow_the_request_without_public_url(base_chain: DevChain, tmp_path: Path) -> None:
    with running_gateway(
        base_chain, store_url=sqlite_url(tmp_path), routes=ROUTES, server={"trust_forwarded_headers": True}
    ) as gw:
        plain = httpx.get(gw.url + "/.well-known/x402").json()["resources"]
        forwarded = {"x-forwarded-proto": "https", "x-forwarded-host": "pay.example.org"}
        behind_proxy = httpx.get(gw.url + "/.well-known/x402", headers=forwarded).json()["resources"]
        servers = httpx.get(gw.url + "/openapi.json", headers=forwarded).json()["servers"]
    assert plain[0] == gw.url + "/agent/prompt"
    assert behind_proxy[0] == "https://pay.example.org/agent/prompt"
    assert servers == [{"url": "https://pay.example.org"}]


def test_discovery_can_be_turned_off(base_chain: DevChain, tmp_path: Path) -> None:
    with (
        running_gateway(base_chain, store_url=sqlite_url(tmp_path), routes=ROUTES, discovery={"enabled": False}) as gw,
        gw.client() as http,
    ):
        assert http.get("/openapi.json").status_code == 200  # unpriced: proxied to the upstream
        assert [r.path for r in gw.upstream.requests] == ["/openapi.json"]
        required = decode_header(http.get("/report").headers["payment-required"])
    assert set(required["extensions"]) == {"txhash"}
    assert "serviceName" not in required["resource"]


def test_bazaar_can_be_left_out_of_the_402(base_chain: DevChain, tmp_path: Path) -> None:
    with running_gateway(
        base_chain,
        store_url=sqlite_url(tmp_path),
        routes=ROUTES,
        discovery={"bazaar": False, "service_name": "Weather"},
    ) as gw:
        required = decode_header(httpx.get(gw.url + "/report").headers["payment-required"])
        hidden = decode_header(httpx.get(gw.url + "/internal").headers["payment-required"])
    assert "bazaar" not in required["extensions"] and required["resource"]["serviceName"] == "Weather"
    assert "bazaar" not in hidden["extensions"] and "serviceName" not in hidden["resource"]


# ---------------------------------------------------------------------------------------------- configuration

KEY = "0x" + "ab" * 32


def config(routes: list[dict[str, Any]], base_dir: Path | None = None, **sections: Any) -> Any:
    doc: dict[str, Any] = {
        "upstream": {"url": "http://127.0.0.1:9000"},
        "payment": {"pay_to": "0x" + "11" * 20},
        "networks": {"base": {"rpc_urls": ["http://127.0.0.1:8545"]}},
        "routes": routes,
        **sections,
    }
    return parse_config(doc, env={"X402_RELAYER_KEY": KEY}, base_dir=base_dir)


def test_schema_may_be_a_json_file_next_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "schemas").mkdir()
    (tmp_path / "schemas" / "prompt.json").write_text(json.dumps(PROMPT_SCHEMA))
    route = {"route": "POST /p", "price": "0.10", "input_schema": "schemas/prompt.json"}
    assert config([route], tmp_path).routes[0].docs.input_schema == PROMPT_SCHEMA


@pytest.mark.parametrize(
    ("routes", "sections", "key"),
    [
        ([{"route": "GET /w/{city}", "price": "1", "example_path": "/x/lisbon"}], {}, "routes[0].example_path"),
        ([{"route": "POST /p", "price": "1", "input_schema": "missing.json"}], {}, "routes[0].input_schema"),
        (
            [{"route": "POST /p", "price": "1", "input_schema": {"$ref": "https://evil.example/s.json"}}],
            {},
            "routes[0].input_schema",
        ),
        ([{"route": "POST /p", "price": "1", "body_type": "xml"}], {}, "routes[0].body_type"),
        ([], {"discovery": {"service_name": "x" * 33}}, "discovery.service_name"),
        ([], {"discovery": {"tags": ["a", "b", "c", "d", "e", "f"]}}, "discovery.tags"),
        ([], {"discovery": {"icon_url": "http://cdn.example.com/i.png"}}, "discovery.icon_url"),
        ([], {"discovery": {"openapi_path": "/healthz"}}, "discovery.openapi_path"),
        ([], {"discovery": {"well_known_path": "x402"}}, "discovery.well_known_path"),
        ([], {"discovery": {"bazar": True}}, "discovery.bazar"),
        ([], {"paywall": {"enable": True}}, "paywall.enable"),
    ],
)
def test_bad_discovery_settings_fail_at_start_naming_the_key(
    tmp_path: Path, routes: list[dict[str, Any]], sections: dict[str, Any], key: str
) -> None:
    with pytest.raises(ConfigError) as err:
        config(routes, tmp_path, **sections)
    assert err.value.key == key
