"""Configuration: bad files fail at start naming the key; prices are exact; secrets never show."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.config import load_config, parse_config
from gateway.errors import ConfigError

KEY = "0x" + "ab" * 32
ENV = {"X402_RELAYER_KEY": KEY, "UPSTREAM_KEY": "upstream-secret-123"}
PAY_TO = "0x" + "11" * 20


def minimal(**over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "upstream": {"url": "http://127.0.0.1:9000", "headers": {"X-API-Key": "${UPSTREAM_KEY}"}},
        "payment": {"pay_to": PAY_TO},
        "networks": {"base": {"rpc_urls": ["https://user:pw@rpc.example.com/v2/SECRETKEY"]}},
        "routes": [{"route": "POST /agent/prompt", "price": "0.10"}],
    }
    for section, value in over.items():
        doc[section] = value
    return doc


def test_example_config_is_valid_and_documents_defaults() -> None:
    config = load_config(Path(__file__).parents[2] / "gateway.example.toml", env=ENV)
    assert config.routes[0].price == 100_000
    assert config.networks["base"].chain_id == 8453
    assert config.server.unpriced == "pass"


def test_known_network_defaults_fill_in_usdc_and_domain() -> None:
    config = parse_config(minimal(), env=ENV)
    base = config.networks["base"]
    assert base.usdc == "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"
    assert (base.eip712_name, base.eip712_version, base.caip2) == ("USD Coin", "2", "eip155:8453")


@pytest.mark.parametrize(
    ("price", "atomic"),
    [("0.10", 100_000), ("0.0157", 15_700), ("$1", 1_000_000), ("0.000001", 1), (3, 3_000_000)],
)
def test_prices_are_parsed_exactly_with_decimal(price: Any, atomic: int) -> None:
    config = parse_config(minimal(routes=[{"route": "GET /x", "price": price}]), env=ENV)
    assert config.routes[0].price == atomic


@pytest.mark.parametrize(
    ("doc", "key"),
    [
        (minimal(routes=[{"route": "GET /x", "price": 0.1}]), "routes[0].price"),
        (minimal(routes=[{"route": "GET /x", "price": "0.0000001"}]), "routes[0].price"),
        (minimal(routes=[{"route": "GET /x", "price": "-1"}]), "routes[0].price"),
        (minimal(routes=[{"route": "GET /x", "price": "0"}]), "routes[0].price"),
        (minimal(routes=[{"route": "/x", "price": "1"}]), "routes[0].route"),
        (minimal(routes=[{"route": "GET /x", "price": "1", "networks": ["solana"]}]), "routes[0].networks[0]"),
        (minimal(routes=[{"route": "GET /x", "price": "1", "settlement": "never"}]), "routes[0].settlement"),
        (minimal(routes=[{"route": "GET /x", "price": "1", "colour": "red"}]), "routes[0].colour"),
        (minimal(payment={"pay_to": "0x1234"}), "payment.pay_to"),
        (minimal(upstream={"url": "ftp://x"}), "upstream.url"),
        (minimal(upstream={"url": "http://x", "read_timeout": "fast"}), "upstream.read_timeout"),
        (minimal(networks={"mychain": {"rpc_urls": ["http://x"]}}), "networks.mychain.chain_id"),
        (minimal(networks={"base": {"rpc_urls": []}}), "networks.base.rpc_urls"),
        (minimal(store={"url": "mysql://x"}), "store.url"),
        (minimal(server={"listen": "nowhere"}), "server.listen"),
        (minimal(server={"unpriced": "maybe"}), "server.unpriced"),
    ],
)
def test_bad_config_names_the_key(doc: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(doc, env=ENV)
    assert info.value.key == key


def test_missing_relayer_key_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(minimal(), env={"UPSTREAM_KEY": "x"})
    assert info.value.key == "payment.relayer_key_env"


def test_missing_environment_variable_is_named() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(minimal(), env={"X402_RELAYER_KEY": KEY})
    assert "UPSTREAM_KEY" in str(info.value)
    assert info.value.key == "upstream.headers.X-API-Key"


def test_secrets_never_appear_in_repr() -> None:
    config = parse_config(minimal(store={"url": "redis://:hunter2@127.0.0.1:6379/0"}), env=ENV)
    text = repr(config)
    for secret in (KEY[2:], "upstream-secret-123", "SECRETKEY", "hunter2", ":pw@"):
        assert secret not in text
    assert "rpc.example.com" in text  # the host stays visible for operators


def test_cli_check_exits_2_naming_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[upstream]\nurl = "http://x"\n[payment]\npay_to = "nope"\n[networks.base]\nrpc_urls = ["http://x"]\n'
    )
    proc = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "check", "-c", str(bad)],
        capture_output=True,
        text=True,
        env={"X402_RELAYER_KEY": KEY, "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert proc.returncode == 2
    assert "payment.pay_to" in proc.stderr


def test_a_claimer_slower_than_the_withdrawal_margin_is_warned_about(tmp_path: Path) -> None:
    # A withdrawing channel takes charges until withdraw_margin before the withdrawal can end; each must be claimed
    # by then, by a claimer pass that comes every claim_interval. Valid (tests use it to keep the claimer quiet),
    # but an operator who sets it so should hear what it risks, whether or not they run `check`.
    from gateway.cli import config_warnings

    env = {**ENV, "X402_AUTHORIZER_KEY": "0x" + "cd" * 32}
    session_route = [{"route": "POST /agent/prompt", "price": "0.10", "schemes": ["exact", "batch-settlement"]}]
    slow = parse_config(
        minimal(routes=session_route, sessions={"claim_interval": 900, "withdraw_margin": 600}), env=env
    )
    assert any("sessions.claim_interval (900 s) is not shorter than" in w for w in config_warnings(slow))
    assert not config_warnings(parse_config(minimal(routes=session_route), env=env))  # 30 s against 600 s
    assert not config_warnings(parse_config(minimal(sessions={"claim_interval": 900}), env=env))  # no session route

    path = tmp_path / "gateway.toml"
    path.write_text(
        '[upstream]\nurl = "http://127.0.0.1:9"\n[payment]\npay_to = "' + PAY_TO + '"\n'
        '[networks.base]\nrpc_urls = ["http://127.0.0.1:9"]\n[sessions]\nclaim_interval = 900\nwithdraw_margin = 600\n'
        '[[routes]]\nroute = "POST /agent/prompt"\nprice = "0.10"\nschemes = ["exact", "batch-settlement"]\n'
    )
    checked = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "check", "-c", str(path)],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert checked.returncode == 0, checked.stderr
    assert "warning: sessions.claim_interval (900 s)" in checked.stderr
