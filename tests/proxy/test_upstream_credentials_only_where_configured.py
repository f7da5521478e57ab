"""The upstream's own credentials (``[upstream.headers]``) go only on requests the operator said they go on
(docs/threat-model.md T36).

Default ``inject_headers_on = "priced"``: a paid request on a priced route and the gateway's own job calls; never a
free path, so ``unpriced = "pass"`` cannot turn the gateway into a free door to the upstream's paid API. ``"all"``
restores the old behaviour (and ``check`` warns with ``unpriced = "pass"``); a list names free routes that need them.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.config import parse_config
from gateway.dev.chain import DevChain
from tests.support import raw_http
from tests.support.gateway import running_gateway, sqlite_url

API_KEY = "sk-upstream-own-key-0123456789"
HEADERS = {"headers": {"X-Api-Key": API_KEY}}


def key_seen(gw: Any) -> list[str | None]:
    return [r.header("x-api-key") for r in gw.upstream.requests]


def test_free_paths_never_carry_the_upstreams_credentials(base_chain: DevChain, tmp_path: Path) -> None:
    with running_gateway(base_chain, store_url=sqlite_url(tmp_path), upstream_settings=HEADERS) as gw:
        httpx.get(gw.url + "/v1/anything")
        httpx.post(gw.url + "/free", headers={"X-Api-Key": "the-callers-guess"})
        httpx.request("OPTIONS", gw.url + "/paid")
        assert key_seen(gw) == [None, None, None]  # nor the caller's own value: the name is the gateway's


def test_a_paid_request_carries_them(base_chain: DevChain, tmp_path: Path) -> None:
    payer = base_chain.new_payer(1_000_000)
    with running_gateway(base_chain, store_url=sqlite_url(tmp_path), upstream_settings=HEADERS) as gw:
        challenge = httpx.post(gw.url + "/paid")
        name, value = gw.sign(payer, challenge)
        assert httpx.post(gw.url + "/paid", headers={name: value}, timeout=30).status_code == 200
        assert key_seen(gw) == [API_KEY]


def test_all_puts_them_on_every_request(base_chain: DevChain, tmp_path: Path) -> None:
    settings = {**HEADERS, "inject_headers_on": "all"}
    with running_gateway(base_chain, store_url=sqlite_url(tmp_path), upstream_settings=settings) as gw:
        httpx.get(gw.url + "/v1/anything")
        assert key_seen(gw) == [API_KEY]


def test_a_list_adds_exactly_those_free_routes_whichever_way_the_path_is_read(
    base_chain: DevChain, tmp_path: Path
) -> None:
    settings = {**HEADERS, "inject_headers_on": ["GET /v1/models"]}
    with running_gateway(base_chain, store_url=sqlite_url(tmp_path), upstream_settings=settings) as gw:
        for target in ["/v1/models", "/v1/models;x=1", "/v1/models%2Fx", "/v1/completions", "/v1/models/x"]:
            raw_http(gw.url, f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        # ";x=1" reads as /v1/models on Tomcat but as another route elsewhere: not every reading is the named one.
        assert key_seen(gw) == [API_KEY, None, None, None, None]


def _write(tmp_path: Path, upstream: str, unpriced: str) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(
        f"""
[server]
unpriced = "{unpriced}"
[upstream]
url = "http://127.0.0.1:9000"
{upstream}
[upstream.headers]
X-Api-Key = "sekrit-upstream-value"
[payment]
pay_to = "0x000000000000000000000000000000000000dEaD"
relayer_key_env = "X402_RELAYER_KEY"
[networks.base]
rpc_urls = ["http://127.0.0.1:8545"]
[[routes]]
route = "POST /paid"
price = "0.10"
"""
    )
    return path


def _check(path: Path) -> subprocess.CompletedProcess[str]:
    env = {"X402_RELAYER_KEY": "0x" + "11" * 32, "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "check", "-c", str(path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parents[2],
        check=False,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("upstream", "unpriced", "warns"),
    [
        ('inject_headers_on = "all"', "pass", True),
        ('inject_headers_on = "all"', "refuse", False),
        ("", "pass", False),
        ('inject_headers_on = ["GET /v1/models"]', "pass", False),
    ],
)
def test_check_warns_when_every_free_path_would_carry_the_credentials(
    tmp_path: Path, upstream: str, unpriced: str, warns: bool
) -> None:
    result = _check(_write(tmp_path, upstream, unpriced))
    assert result.returncode == 0, result.stderr
    assert ("inject_headers_on" in result.stderr) is warns
    assert "sekrit-upstream-value" not in result.stdout + result.stderr  # header names, never values
    if warns:
        assert "X-Api-Key" in result.stderr


@pytest.mark.parametrize("value", ["everywhere", ["GET"], [3]])
def test_inject_headers_on_is_validated(value: Any) -> None:
    from gateway.errors import ConfigError

    doc = {
        "upstream": {"url": "http://127.0.0.1:9000", "inject_headers_on": value},
        "payment": {"pay_to": "0x000000000000000000000000000000000000dEaD", "relayer_key_env": "K"},
        "networks": {"base": {"rpc_urls": ["http://127.0.0.1:8545"]}},
    }
    with pytest.raises(ConfigError, match="inject_headers_on"):
        parse_config(doc, env={"K": "0x" + "11" * 32})
