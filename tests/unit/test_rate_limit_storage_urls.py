"""``rate_limits.storage_url`` is read by the stores' parser (gateway.storage.redis_topology), never handed whole to
``limits``: a URL without a port means Redis's default port, as it does for the stores; a password with a raw
``/``, ``?``, ``#`` or ``@`` is refused with a fixed message; and ``x402-gateway check`` refuses what ``serve``
would refuse."""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

import pytest

from gateway import cli
from gateway.errors import ConfigError
from gateway.ops.ratelimit import open_storage
from gateway.storage.backend import open_backend


def _pool(url: str) -> dict[str, Any]:
    storage = open_storage(url)
    assert type(storage).__name__ == "RedisStorage"
    kwargs: dict[str, Any] = storage.bridge.storage.connection_pool.connection_kwargs  # type: ignore[attr-defined]
    return kwargs


def test_a_redis_url_without_a_port_means_the_default_port() -> None:
    # limits itself refuses "redis://host/0" ("Missing host or port"), which `check` and the stores accept
    assert open_backend("redis://cache.internal/0")
    kwargs = _pool("redis://cache.internal/2")
    assert (kwargs["host"], kwargs["port"], kwargs["db"]) == ("cache.internal", 6379, 2)
    assert _pool("redis://cache.internal:6380")["port"] == 6380
    v6 = _pool("rediss://[::1]/1?ssl_cert_reqs=none")
    assert (v6["host"], v6["port"], v6["ssl_cert_reqs"]) == ("::1", 6379, "none")


def test_a_percent_encoded_password_reaches_redis_py_decoded() -> None:
    kwargs = _pool("redis://app:p%40ss%2Fw%3Fo%23rd@cache.internal/0")
    assert (kwargs["username"], kwargs["password"]) == ("app", "p@ss/w?o#rd")
    assert _pool("unix://:pw@/run/redis.sock?db=2")["password"] == "pw"
    assert _pool("redis://cache.internal/0?password=inquery")["password"] == "inquery"


@pytest.mark.parametrize(
    "url",
    [
        "redis://:Hd/Tail5ecret@cache.internal/0",
        "redis://:Hd?Tail5ecret@cache.internal/0",
        "redis://:Hd#Tail5ecret@cache.internal/0",
        "redis://:Hd@Tail5ecret@cache.internal/0",
        "redis+sentinel://:Hd/Tail5ecret@s1:26379/mymaster/0",
        "redis+cluster://:Hd?Tail5ecret@n1:7000/",
        "redis://user:12345/Tail5ecret@cache.internal:6379/0",  # "user:12345" reads as a host and a port
        "redis://user:12345?Tail5ecret@cache.internal:6379/0",
    ],
)
def test_a_raw_delimiter_in_the_password_is_refused_with_a_fixed_message(url: str) -> None:
    for opening in (open_storage, open_backend):
        with pytest.raises(ConfigError, match="percent-encode the password") as refused:
            opening(url)
        shown = "".join(traceback.format_exception(refused.value))
        assert "Tail5ecret" not in shown and "Hd" not in shown and "12345" not in shown, shown


def test_an_at_sign_in_a_path_or_a_query_is_not_a_user_info() -> None:
    assert open_backend("unix:///run/redis@6379.sock?db=1")
    assert open_backend("rediss://cache.internal:6379/0?ssl_ca_certs=/etc/ca@2.pem")
    assert _pool("rediss://:pw@cache.internal/0?ssl_ca_certs=/etc/ca@2.pem")["ssl_ca_certs"] == "/etc/ca@2.pem"


def _config(tmp_path: Path, extra: str) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(
        '[upstream]\nurl = "http://127.0.0.1:9000"\n'
        f'[payment]\npay_to = "0x{"11" * 20}"\n'
        '[networks.base]\nrpc_urls = ["http://127.0.0.1:8545"]\n'
        '[[routes]]\nroute = "POST /a"\nprice = "0.10"\n' + extra
    )
    return path


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ('[store]\nurl = "redis://:Head5ecret/Tail@127.0.0.1:1/0"\n', "store.url"),
        ('[idempotency]\nstore_url = "redis://:Head5ecret?Tail@127.0.0.1:1/0"\n', "idempotency.store_url"),
        ('[ledger]\nstore_url = "redis+sentinel://:Head5ecret/x@127.0.0.1:1/m/0"\n', "ledger.store_url"),
        ('[rate_limits]\nstorage_url = "redis://:Head5ecret#Tail@127.0.0.1:1/0"\n', "rate_limits.storage_url"),
        ('[rate_limits]\nstorage_url = "redis+cluster://h1:7000/?db=3"\n', "rate_limits.storage_url"),
    ],
)
def test_check_refuses_a_store_url_that_serve_refuses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, extra: str, key: str
) -> None:
    monkeypatch.setenv("X402_RELAYER_KEY", "0x" + "ab" * 32)
    with pytest.raises(SystemExit) as exited:
        cli.main(["check", "-c", str(_config(tmp_path, extra))])
    assert exited.value.code == 2
    out = capsys.readouterr()
    assert key in out.err and "Head5ecret" not in out.out + out.err, out.err
    assert "Traceback" not in out.err


def test_check_accepts_a_redis_rate_limit_url_without_a_port(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("X402_RELAYER_KEY", "0x" + "ab" * 32)
    config = _config(tmp_path, '[rate_limits]\nstorage_url = "redis://cache.internal/0"\n')
    assert cli.main(["check", "-c", str(config)]) == 0
    assert capsys.readouterr().out.startswith("ok:")
