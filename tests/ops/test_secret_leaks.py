"""Secrets that still reach an error message, a traceback, a log line, a repr, the CLI's output or an upstream
request that should not carry them (docs/threat-model.md T19, T36). An attacker's review: each test names the way
out it proves.

Where they come from:

* Redis passwords with a raw ``?`` or ``/`` (base64 passwords have ``/``; generated ones often ``?``): the topology
  parser quotes the "unknown query parameter" it reads out of the password's tail, and the port parsers of
  ``urllib`` quote the password's head in a chained ``ValueError``; ``limits`` (the rate-limit storage) quotes the
  whole URL; ``serve`` prints all of them in its traceback.
* A secret pasted where the *name* of its environment variable belongs (``relayer_key_env = "0x<key>"``,
  ``tokens = [{ env = "<token>" }]``): the config error quotes the "name", i.e. the secret.
* The client SDK's channel reader logs an ``httpx.HTTPStatusError`` whose text is the full RPC URL (its key);
  the tx-hash transfer puts web3's ``ClientResponseError`` (the full RPC URL) into ``PaymentRefused.message``.
* ``repr(GatewayConfig)`` shows the upstream URL's user info (which the proxy sends as Basic credentials).
* The log redactor (``config_secrets``) knows neither the sessions' authorizer key, the facilitator URL, the
  idempotency or ledger store URLs, nor a store password given in the query or holding a raw ``/``.
* The readiness probe of ``upstream.health_path`` sends the upstream URL's user info as Basic credentials on a free
  path, whatever ``inject_headers_on`` says.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account

from gateway.config import ConfigError, UpstreamConfig, parse_config
from gateway.ops.logs import SecretRedactor, config_secrets
from gateway.storage.backend import open_backend
from tests.support.servers import RecordingUpstream, read_body, serve_asgi

ROOT = Path(__file__).resolve().parents[2]
RELAYER_KEY = "0x" + "ab" * 32
ENV = {"X402_RELAYER_KEY": RELAYER_KEY}


def doc(**sections: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "upstream": {"url": "http://127.0.0.1:9000"},
        "payment": {"pay_to": "0x" + "11" * 20},
        "networks": {"base": {"rpc_urls": ["http://127.0.0.1:8545"]}},
        "routes": [{"route": "POST /a", "price": "0.10"}],
    }
    for name, value in sections.items():
        d.setdefault(name, {}).update(value)
    return d


def _everything_shown(exc: BaseException) -> str:
    """What ``serve`` prints when ``exc`` escapes it: the message and the whole chain of causes."""
    return "".join(traceback.format_exception(exc))


# --------------------------------------------------------------------------------- Redis URLs: errors, tracebacks


def test_a_sentinel_password_with_a_question_mark_is_not_quoted_as_an_unknown_query_parameter() -> None:
    """``parse_redis_url`` splits the query at the first ``?``, which is inside the password: the rest of the
    password (and the hosts) become a "query parameter", and the error names it (gateway/storage/redis_topology.py,
    ``unknown query parameter(s) ...``; only names containing "pass" are left out)."""
    tail = "T0pS3cretTail"
    url = f"redis+sentinel://app:k9?{tail}@10.0.0.1:26379,10.0.0.2:26379/mymaster/0"
    with pytest.raises(ConfigError) as refused:
        open_backend(url)
    assert tail not in str(refused.value), str(refused.value)


@pytest.mark.parametrize(
    "url",
    [
        "redis://:HeadSecret1/TailSecret2@127.0.0.1:6379/0",  # open_backend's urlsplit(...).port
        "redis://:HeadSecret1?TailSecret2@127.0.0.1:6379/0",
        "redis+sentinel://:HeadSecret1/mymaster@10.0.0.1:26379/0",  # redis_topology._nodes
    ],
)
def test_a_store_password_with_a_raw_slash_or_question_mark_is_not_in_the_chained_traceback(url: str) -> None:
    """The messages are careful (``redact_url``, fixed sentences), but they are raised ``from exc``: the cause is
    ``ValueError: Port could not be cast to integer value as 'HeadSecret1'``, the password's head, and ``serve``
    (which does not catch a ConfigError from ``build_app``) prints the chain."""
    with pytest.raises(ConfigError) as refused:
        open_backend(url)
    shown = _everything_shown(refused.value)
    assert "HeadSecret1" not in shown, shown


@pytest.mark.parametrize(
    "url",
    [
        "redis://:Hd/Tail5ecret@127.0.0.1:6379/0",
        "redis://:Hd#Tail5ecret@127.0.0.1:6379/0",
        "redis://:Hd?Tail5ecret@127.0.0.1:6379/0",
        "redis://:p@Tail5ecret@127.0.0.1/0",  # a raw "@" and no port
    ],
)
def test_a_rate_limit_storage_url_error_never_shows_its_password(url: str) -> None:
    """``open_storage`` (gateway/ops/ratelimit.py) hands the URL to ``limits`` unchecked: ``limits`` raises
    ``ConfigurationError(f"Unable to parse storage uri {uri}")`` (the whole URL, password and all) or ``Missing host
    or port in location <what follows the first @>``, from ``build_app``, which ``serve`` does not catch."""
    from gateway.ops.ratelimit import open_storage

    with pytest.raises(Exception) as refused:  # whatever it raises, it must not show the password
        open_storage(url)
    shown = _everything_shown(refused.value)
    assert "Tail5ecret" not in shown, shown


def _toml(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)


def _write_config(path: Path, d: dict[str, Any]) -> Path:
    lines: list[str] = []
    routes = d.pop("routes")
    for section, table in d.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml(v)}" for k, v in table.items()]
    for route in routes:
        lines.append("[[routes]]")
        lines += [f"{k} = {_toml(v)}" for k, v in route.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    ("sections", "secret"),
    [
        ({"store": {"url": "redis://:HeadSecret1/TailSecret2@127.0.0.1:1/0"}}, "HeadSecret1"),
        ({"store": {"url": "redis+sentinel://:k9?TailSecret2@127.0.0.1:1/mymaster/0"}}, "TailSecret2"),
        ({"rate_limits": {"storage_url": "redis://:HeadSecret1/TailSecret2@127.0.0.1:1/0"}}, "HeadSecret1"),
    ],
)
def test_serve_never_prints_a_store_password(tmp_path: Path, sections: dict[str, Any], secret: str) -> None:
    """End to end: ``x402-gateway check`` accepts these URLs ("ok"), ``x402-gateway serve`` dies in ``build_app``
    with a traceback on stderr, which is where a container runtime's log collector takes it."""
    d = doc(server={"listen": "127.0.0.1:0"}, **sections)
    d.setdefault("store", {}).setdefault("url", f"sqlite:///{tmp_path / 'g.db'}")
    config = _write_config(tmp_path / "gateway.toml", d)
    env = {**os.environ, **ENV, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "serve", "-c", str(config)],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode != 0
    assert secret not in done.stdout + done.stderr, done.stderr[-3000:]


# ------------------------------------------------------------------------- a secret where its variable's name goes


def test_a_relayer_key_pasted_into_relayer_key_env_is_not_echoed_by_the_config_error() -> None:
    """``relayer_key_env = "0x<key>"`` (the value where the name belongs): gateway/config/loader.py says
    ``environment variable 0x<key> must hold the relayer's private key``."""
    key = "0x" + "5e" * 32
    with pytest.raises(ConfigError) as refused:
        parse_config(doc(payment={"relayer_key_env": key}), env={})
    assert key[2:] not in str(refused.value), str(refused.value)


@pytest.mark.parametrize("token", ["adm1n-T0ken-pasted-here-123456", "Adm1nT0kenPastedHere123456"])
def test_an_admin_token_pasted_into_env_is_not_echoed_by_the_config_error(tmp_path: Path, token: str) -> None:
    """``tokens = [{ env = "<the token>" }]``: gateway/config/admin.py says ``'<token>' is not an environment
    variable name`` or ``environment variable <token> is not set``."""
    admin = {"tokens": [{"env": token, "access": "write"}]}
    with pytest.raises(ConfigError) as refused:
        parse_config(doc(admin=admin), env=ENV, base_dir=tmp_path)
    assert token not in str(refused.value), str(refused.value)


def test_x402_gateway_check_does_not_print_a_key_pasted_into_relayer_key_env(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway import cli

    key = "0x" + "5e" * 32
    monkeypatch.delenv("X402_RELAYER_KEY", raising=False)
    config = _write_config(tmp_path / "gateway.toml", doc(payment={"relayer_key_env": key}))
    with pytest.raises(SystemExit):
        cli.main(["check", "-c", str(config)])
    out = capsys.readouterr()
    assert key[2:] not in out.out + out.err, out.err


# ------------------------------------------------------------------------------------------------------- reprs


def test_the_upstream_urls_credentials_are_not_in_the_configs_repr() -> None:
    """The proxy sends the upstream URL's user info as ``Authorization: Basic`` (gateway/http/proxy.py), and
    ``config_secrets`` treats it as a secret; ``UpstreamConfig.url`` is a plain ``str`` in a dataclass repr."""
    config = parse_config(doc(upstream={"url": "http://svc:upstream-pass-123@127.0.0.1:9000"}), env=ENV)
    assert "upstream-pass-123" not in repr(config.upstream)
    assert "upstream-pass-123" not in repr(config)


# ---------------------------------------------------------------------------------------- the log redactor's gaps

AUTHORIZER_KEY = "0x" + "7c" * 32


@pytest.mark.parametrize(
    ("sections", "env", "shown", "secret"),
    [
        ({"sessions": {}}, {"X402_AUTHORIZER_KEY": AUTHORIZER_KEY}, f"authorizer {AUTHORIZER_KEY}", AUTHORIZER_KEY[2:]),
        (
            {
                "networks": {
                    "base": {
                        "rpc_urls": ["http://127.0.0.1:8545"],
                        "verifier": "facilitator",
                        "facilitator": {"url": "https://facilitator.example.com/v1/FACILKEY123456"},
                    }
                }
            },
            {},
            "POST https://facilitator.example.com/v1/FACILKEY123456/settle failed",
            "FACILKEY123456",
        ),
        (
            {"idempotency": {"store_url": "redis://:IdemPassw0rd99@10.0.0.5:6379/1"}},
            {},
            "connecting to redis://:IdemPassw0rd99@10.0.0.5:6379/1",
            "IdemPassw0rd99",
        ),
        (
            {"ledger": {"store_url": "redis://:LedgerPassw0rd11@10.0.0.6:6379/2"}},
            {},
            "connecting to redis://:LedgerPassw0rd11@10.0.0.6:6379/2",
            "LedgerPassw0rd11",
        ),
        (
            {"store": {"url": "redis://10.0.0.7:6379/0?password=QueryPassw0rd77"}},
            {},
            "connecting to redis://10.0.0.7:6379/0?password=QueryPassw0rd77",
            "QueryPassw0rd77",
        ),
        (
            {"store": {"url": "redis+sentinel://10.0.0.8:26379/mymaster/0?sentinel_password=SentinelPassw0rd88"}},
            {},
            "sentinel redis+sentinel://10.0.0.8:26379/mymaster/0?sentinel_password=SentinelPassw0rd88",
            "SentinelPassw0rd88",
        ),
        (
            {"store": {"url": "redis://:HeadSecret1/TailSecret2@10.0.0.9:6379/0"}},
            {},
            "connecting to redis://:HeadSecret1/TailSecret2@10.0.0.9:6379/0",
            "HeadSecret1",
        ),
    ],
    ids=[
        "authorizer-key",
        "facilitator-url",
        "idempotency-url",
        "ledger-url",
        "query-password",
        "sentinel-password",
        "password-with-slash",
    ],
)
def test_the_log_redactor_knows_every_secret_of_the_configuration(
    tmp_path: Path, sections: dict[str, Any], env: dict[str, str], shown: str, secret: str
) -> None:
    """``install_redaction`` registers ``config_secrets(config)`` (gateway/ops/logs.py): the relayer key, upstream
    headers and user info, RPC URLs, ``[store].url``'s and ``rate_limits.storage_url``'s *user info*. The rest of
    what the configuration holds is not masked when a library or a future change logs it."""
    config = parse_config(doc(**sections), env={**ENV, **env}, base_dir=tmp_path)
    redactor = SecretRedactor()
    redactor.add(config_secrets(config))
    assert secret not in redactor.redact(shown), redactor.redact(shown)


async def test_the_admin_audit_log_masks_a_token_pasted_into_a_query_in_its_percent_encoded_form(
    tmp_path: Path,
) -> None:
    """gateway/http/admin/audit.py scrubs each line with the log redactor "even [of a token] a caller pasted into an
    argument"; gateway/http/admin/app.py records the query string as received, percent-encoded. A base64 token
    (``openssl rand -base64 24``: ``+``, ``/``, ``=``) then appears as ``%2B``/``%2F``/``%3D`` and is not matched."""
    from urllib.parse import urlencode

    from gateway.http.admin.audit import AuditLog
    from gateway.ops.logs import REDACTOR

    token = "Adm1n+T0ken/With=Base64Chars"
    handle = REDACTOR.add([token])
    audit = AuditLog(tmp_path / "audit.jsonl")
    try:
        await audit.record({"method": "GET", "path": "/admin/payments", "query": urlencode({"route": token})})
    finally:
        await audit.aclose()
        REDACTOR.remove(handle)
    line = (tmp_path / "audit.jsonl").read_text()
    assert "Adm1n%2BT0ken%2FWith%3DBase64Chars" not in line, line


# ---------------------------------------------------------------------------------- the client SDK and its CLI

RPC_KEY = "ClientRpcKey0123456789abcdef"


def _rpc(chain_id: int | None) -> Any:
    """A JSON-RPC endpoint that answers ``eth_chainId`` with ``chain_id`` (None: never) and HTTP 429 otherwise, as a
    hosted RPC over its rate limit does."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        call = json.loads(body or b"{}")
        if chain_id is not None and isinstance(call, dict) and call.get("method") == "eth_chainId":
            status, payload = 200, json.dumps({"jsonrpc": "2.0", "id": call.get("id"), "result": hex(chain_id)})
        else:
            status, payload = 429, '{"error":"rate limited"}'
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload.encode()})

    return app


async def test_the_session_clients_channel_reader_never_logs_its_rpc_key(caplog: pytest.LogCaptureFixture) -> None:
    """gateway/client/_onchain.py ``ChannelReader.channel``: ``log.warning("... (%s): %s", redact_url(url), exc)``
    with ``exc`` an ``httpx.HTTPStatusError``, whose text is ``... for url 'https://.../v2/<key>'``. The CLI's
    ``session`` commands log at WARNING to stderr with no redactor."""
    from gateway.client._onchain import ChannelReader

    with serve_asgi(_rpc(None), lifespan="off") as rpc_url:
        reader = ChannelReader({"base": f"{rpc_url}/v2/{RPC_KEY}"})
        try:
            assert await reader.channel("base", 8453, "0x" + "aa" * 32) is None
        finally:
            await reader.aclose()
    assert "could not read channel" in caplog.text
    assert RPC_KEY not in caplog.text, caplog.text


@pytest.mark.parametrize("answers_chain_id", [True, False], ids=["estimate-gas-refused", "chain-id-refused"])
async def test_a_tx_hash_transfer_refused_by_the_rpc_does_not_quote_its_url(answers_chain_id: bool) -> None:
    """gateway/client/_transfer.py ``TransferSender``: web3's session raises ``aiohttp.ClientResponseError``
    (``429, message=..., url='http://.../v2/<key>'``). From ``estimate_gas`` it becomes ``PaymentRefused(f"the transfer
    would fail: {exc}")``, whose message the CLI prints (``--json``: on stdout); from ``w3.eth.chain_id`` in
    ``_web3`` it is not caught at all, and the CLI (``_run`` catches only the SDK's errors) prints its traceback."""
    from gateway.client._config import TxHashPayments
    from gateway.client._transfer import TransferSender, TxOption

    with serve_asgi(_rpc(8453 if answers_chain_id else None), lifespan="off") as rpc_url:
        sender = TransferSender(Account.create(), TxHashPayments(rpc_urls={"base": f"{rpc_url}/v2/{RPC_KEY}"}))
        option = TxOption(
            network="base",
            chain_id=8453,
            recipient="0x" + "22" * 20,
            asset="0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913",
            amount=1,
            resource=None,
            raw={},
        )
        try:
            with pytest.raises(Exception) as refused:  # PaymentRefused, or whatever web3 raised
                await sender.send(option)
        finally:
            await sender.aclose()
    shown = _everything_shown(refused.value)
    assert RPC_KEY not in shown, shown


# ------------------------------------------------------------------------- upstream requests without a payment


async def test_the_readiness_probe_sends_no_upstream_credentials_to_a_free_path() -> None:
    """gateway/ops/health.py ``_upstream_check``: ``aiohttp`` turns the upstream URL's user info into
    ``Authorization: Basic`` on every probe of ``health_path`` (a free path), whatever ``inject_headers_on`` says; the
    proxy sends it only where ``inject_on`` allows (gateway/http/proxy.py, gateway/http/forwarding.py)."""
    from gateway.ops.health import Readiness

    upstream = RecordingUpstream()
    with serve_asgi(upstream, lifespan="off") as url:
        config = UpstreamConfig(url=url.replace("http://", "http://svc:upstream-pass-123@"), health_path="/healthz")
        readiness = Readiness(None, config, timeout=5.0)  # type: ignore[arg-type] - the upstream check needs no engine
        try:
            assert await readiness._upstream_check() == "ok"
        finally:
            await readiness.aclose()
    (probe,) = upstream.requests
    assert probe.path == "/healthz"
    assert probe.header("authorization") is None, probe.header("authorization")
