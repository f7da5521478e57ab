"""Operations settings: a typo fails at start naming the key, never as a crash on the first request."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from gateway.config import load_config, parse_config
from gateway.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
ENV = {"X402_RELAYER_KEY": "0x" + "ab" * 32}


def doc(**sections: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "upstream": {"url": "http://127.0.0.1:9000"},
        "payment": {"pay_to": "0x" + "11" * 20},
        "networks": {"base": {"rpc_urls": ["http://127.0.0.1:8545"]}},
        "routes": [{"route": "POST /a", "price": "0.10"}],
    }
    for name, value in sections.items():
        if name == "route":
            d["routes"][0].update(value)
        else:
            d.setdefault(name, {}).update(value)
    return d


def test_operations_settings_have_safe_defaults() -> None:
    c = parse_config(doc(), env=ENV)
    assert (c.server.health_path, c.server.ready_path, c.server.metrics_path) == ("/healthz", "/readyz", "/metrics")
    assert c.server.max_header_bytes == 16 * 1024
    assert c.upstream.health_path is None
    assert (c.rate_limits.enabled, c.rate_limits.challenge, c.rate_limits.paid) == (True, "60/minute", "600/minute")
    assert c.rate_limits.storage_url.reveal() == "memory://"
    assert (c.routes[0].rate_limit_challenge, c.routes[0].rate_limit_paid) == (None, None)


@pytest.mark.parametrize(
    ("sections", "key"),
    [
        ({"rate_limits": {"challenge": "60 a minute"}}, "rate_limits.challenge"),
        ({"rate_limits": {"paid": "0/minute"}}, "rate_limits.paid"),
        ({"rate_limits": {"storage_url": "memcached://x"}}, "rate_limits.storage_url"),
        ({"rate_limits": {"enabled": "yes"}}, "rate_limits.enabled"),
        ({"rate_limits": {"chalenge": "1/second"}}, "rate_limits.chalenge"),
        ({"route": {"rate_limit_paid": "lots"}}, "routes[0].rate_limit_paid"),
        ({"route": {"rate_limit_challenge": 60}}, "routes[0].rate_limit_challenge"),
        ({"server": {"health_path": "healthz"}}, "server.health_path"),
        ({"server": {"metrics_path": "/m?x=1"}}, "server.metrics_path"),
        ({"server": {"ready_path": "/healthz"}}, "server.health_path"),
        ({"server": {"max_header_bytes": 100}}, "server.max_header_bytes"),
        ({"server": {"ready_timeout": 0}}, "server.ready_timeout"),
        ({"upstream": {"health_path": "up"}}, "upstream.health_path"),
    ],
)
def test_a_bad_operations_setting_fails_naming_its_key(sections: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(doc(**sections), env=ENV)
    assert info.value.key == key or info.value.message.startswith(key + ":"), info.value.message


def test_rate_strings_accept_the_limits_syntax_with_several_windows() -> None:
    c = parse_config(
        doc(rate_limits={"challenge": "10/second;500/hour"}, route={"rate_limit_paid": "5 per minute"}), env=ENV
    )
    assert c.rate_limits.challenge == "10/second;500/hour"
    assert c.routes[0].rate_limit_paid == "5 per minute"


def test_a_redis_rate_limit_storage_password_is_a_secret() -> None:
    c = parse_config(doc(rate_limits={"storage_url": "redis://:hunter2hunter2@redis:6379/1"}), env=ENV)
    assert "hunter2" not in repr(c.rate_limits)
    assert c.rate_limits.storage_url.reveal() == "redis://:hunter2hunter2@redis:6379/1"


def test_the_example_config_documents_every_operations_key() -> None:
    text = (ROOT / "gateway.example.toml").read_text()
    for key in ("max_header_bytes", "health_path", "ready_path", "metrics_path", "ready_timeout", "storage_url"):
        assert re.search(rf"^#?\s*{key} = ", text, re.M), key
    assert "[rate_limits]" in text
    for key in ("rate_limit_challenge", "rate_limit_paid"):
        assert re.search(rf"^# {key} = ", text, re.M), key
    config = load_config(ROOT / "gateway.example.toml", env=ENV)
    assert config.rate_limits.challenge == "60/minute"
