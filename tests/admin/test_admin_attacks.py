"""An attacker's review of the operator side: the admin API, its audit log, run-time overrides and the admin CLI.

Each test states a promise of docs/operating.md (or a plain safety property of an operator's API) and attacks it:

* a page of another origin that makes the operator's browser send an admin action (the dashboard's documented way in
  is a browser extension that adds the bearer header, which makes the token an ambient credential);
* a token that reaches the audit log in an encoded spelling the redactor does not know (percent-encoded in the
  query, JSON-escaped in an argument);
* an unauthenticated peer writing unbounded audit lines, and a WebSocket handshake that is neither refused nor
  audited;
* (passing, kept) a read token or a path variant reaching an action through another spelling of the call;
* an override that outlives its route and can no longer be cleared;
* the admin CLI handing the bearer token to an HTTP proxy from the environment;
* a price the stores cannot hold answered as an internal error.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus

import httpx
import pytest
from eth_account.signers.local import LocalAccount

from gateway.cli import main
from gateway.dev.chain import DevChain
from gateway.errors import BadRequest
from tests.admin.conftest import READ_TOKEN, WRITE_TOKEN, running_admin
from tests.reload.helpers import REPORT, ROUTES, reloadable_gateway
from tests.support.gateway import sqlite_url

PAYER = "0x" + "ab" * 20
EVIL = "https://evil.example"


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


# ------------------------------------------------------------------------------------- cross-site requests (CSRF)


def test_a_cross_site_request_that_carries_the_token_cannot_act(
    base_chain: DevChain, tmp_path: Path, admin_env: LocalAccount
) -> None:
    """The dashboard's documented way in is a browser extension that adds ``Authorization: Bearer`` for the admin
    origin, so the operator's browser attaches the token to every request to it, whichever page made it. A page on
    another origin can send a "simple" request without a preflight: a form POST (no body, the arguments in the
    action URL's query) or ``fetch(..., {mode: "no-cors"})`` with a ``text/plain`` JSON body. The browser labels
    both (``Origin``, ``Sec-Fetch-Site: cross-site``); the admin API must refuse them instead of acting."""
    cross_site = {
        "authorization": f"Bearer {WRITE_TOKEN}",  # added by the operator's header extension
        "origin": EVIL,
        "sec-fetch-site": "cross-site",
        "sec-fetch-mode": "no-cors",
        "content-type": "text/plain;charset=UTF-8",
    }
    with running_admin(base_chain, sqlite_url(tmp_path), tmp_path, admin_env) as admin:
        with httpx.Client(base_url=admin.url, headers=cross_site) as evil:
            attempts = [
                # <form method="POST" action="http://127.0.0.1:9402/admin/deny?payer=...&note=..."> with no fields
                evil.post("/admin/deny", params={"payer": PAYER, "note": "csrf"}),
                evil.post("/admin/routes/pause", params={"route": "GET /cheap"}),
                # fetch(admin + "/admin/routes/price", {method: "POST", mode: "no-cors", body: JSON.stringify(...)})
                evil.post("/admin/routes/price", content=json.dumps({"route": "GET /cheap", "price": "0.000001"})),
            ]
        with admin.client(READ_TOKEN) as api:
            denied = api.get("/admin/deny").json()["denied"]
            routes = {r["route"]: r for r in api.get("/admin/routes").json()["routes"]}
    acted = [(r.request.url.path, r.status_code) for r in attempts if r.status_code < 400]
    assert acted == [], f"cross-site requests acted: {acted}"
    assert denied == []
    assert routes["GET /cheap"]["price"] == "10000" and routes["GET /cheap"]["paused"] is False


def _raw(url: str, method: str, path: str, token: str, body: str) -> int:
    """One request sent as raw bytes (httpx would upper-case the method and resolve dot segments); its status."""
    host, port = url.removeprefix("http://").split(":")
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall((head + body).encode())
        return int(sock.recv(4096).split(b" ", 2)[1])


def test_a_read_token_cannot_act_through_another_spelling_of_the_call(
    base_chain: DevChain, tmp_path: Path, admin_env: LocalAccount
) -> None:
    """A read token may only read (``may`` lets ``GET`` and ``HEAD`` through): no method spelling, override header
    or path variant brings it to an action's handler, and no variant of an action's path reaches a handler at all,
    whatever the token."""
    body = json.dumps({"payer": PAYER, "note": "variant"})
    deny_one = f"/admin/deny/{PAYER}"
    with running_admin(base_chain, sqlite_url(tmp_path), tmp_path, admin_env) as admin:
        statuses: dict[str, int] = {}
        for method in ("POST", "post", "Post", "HEAD", "OPTIONS", "PATCH", "PUT"):
            statuses[f"read {method}"] = _raw(admin.url, method, "/admin/deny", READ_TOKEN, body)
        for method in ("DELETE", "delete"):
            statuses[f"read {method} one"] = _raw(admin.url, method, deny_one, READ_TOKEN, "")
        statuses["read POST encoded"] = _raw(admin.url, "POST", "/admin/%64eny", READ_TOKEN, body)
        with admin.client(READ_TOKEN) as api:
            for override in ("X-HTTP-Method-Override", "X-Method-Override", "X-HTTP-Method"):
                api.request("GET", "/admin/deny", content=body, headers={override: "POST"})
        for path in (
            "/admin//deny",
            "/ADMIN/deny",
            "/admin/deny/",
            "/admin/./deny",
            "/admin/x/../deny",
            "/admin/deny.",
        ):
            statuses[f"write {path}"] = _raw(admin.url, "POST", path, WRITE_TOKEN, body)
        with admin.client(READ_TOKEN) as api:
            denied = api.get("/admin/deny").json()["denied"]
    assert denied == []
    assert all(status >= 400 for status in statuses.values()), statuses
    assert statuses["read POST"] == 403 and statuses["read DELETE one"] == 403


# --------------------------------------------------------------------------------------------------- audit log


def test_no_token_reaches_the_audit_log_in_an_encoded_spelling(
    base_chain: DevChain, tmp_path: Path, admin_env: LocalAccount, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/operating.md: "any of them is masked as *** wherever it appears, a token pasted into a note included".
    The redactor runs on the JSON line, so it only finds a token spelled exactly as configured: a base64 token
    (``+ / =``) pasted into a query is percent-encoded in the raw ``query`` field, and a token holding a quote or a
    backslash is JSON-escaped in ``args``. Whoever reads the audit log decodes both back into the token."""
    read = "b64+read/token+" + "r" * 16 + "=="  # as `openssl rand -base64` prints one
    write = 'write"tok\\en-' + "w" * 20
    monkeypatch.setenv("TEST_ADMIN_READ", read)
    monkeypatch.setenv("TEST_ADMIN_WRITE", write)
    with running_admin(base_chain, sqlite_url(tmp_path), tmp_path, admin_env) as admin:
        with httpx.Client(base_url=admin.url, headers={"authorization": f"Bearer {write}"}) as api:
            in_query = api.post("/admin/deny", params={"payer": PAYER, "note": f"pasted {read} by mistake"})
            in_body = api.post("/admin/deny", json={"payer": "0x" + "cd" * 20, "note": f"pasted {write} here"})
        assert (in_query.status_code, in_body.status_code) == (200, 200), (in_query.text, in_body.text)
        lines = admin.audit()
    leaked = []
    for line in lines:
        texts = list(_strings(line))
        if line.get("query"):
            texts.append(unquote_plus(line["query"]))
        for token in (read, write):
            if any(token in text for text in texts):
                leaked.append((line.get("path"), line.get("query"), line.get("args")))
    assert leaked == [], f"a token is readable in the audit log: {leaked}"


def test_an_unauthenticated_request_writes_a_bounded_audit_line(
    base_chain: DevChain, tmp_path: Path, admin_env: LocalAccount
) -> None:
    """Every call is fsynced into the audit log, refused ones too, so anyone who reaches the port writes to the
    operator's disk without a token. The query is cut at 2 048 characters; the path is not: each unauthenticated
    request writes up to ``server.max_header_bytes`` (16 KiB) of the caller's choosing."""
    with running_admin(base_chain, sqlite_url(tmp_path), tmp_path, admin_env) as admin:
        with httpx.Client(base_url=admin.url) as anonymous:
            r = anonymous.get("/admin/" + "a" * 12_000)
        assert r.status_code == 401
        line = admin.audit_log.read_text().splitlines()[-1]
    assert json.loads(line)["token"] is None
    assert len(line) <= 4096, f"one unauthenticated request wrote a {len(line)}-byte audit line"


def test_a_websocket_handshake_is_refused_and_audited(
    base_chain: DevChain, tmp_path: Path, admin_env: LocalAccount
) -> None:
    """ "Every admin call, refused ones too, is one JSON line" and app.py says "closing the handshake unanswered
    refuses it". A WebSocket handshake to the admin listener (any path, with or without a token) returns from the
    app without a word: uvicorn answers 500 and logs an ASGI error, and the audit log has no line for it."""
    with running_admin(base_chain, sqlite_url(tmp_path), tmp_path, admin_env) as admin:
        before = len(admin.audit())
        host, port = admin.url.removeprefix("http://").split(":")
        handshake = (
            f"GET /admin/deny HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(handshake.encode())
            status = int(sock.recv(4096).split(b" ", 2)[1])
        after = admin.audit()
    assert status in (401, 403), f"a WebSocket handshake was answered {status}"
    assert len(after) == before + 1 and after[-1]["path"] == "/admin/deny"


# ------------------------------------------------------------------------------------------ run-time overrides


async def test_an_override_of_a_route_the_file_no_longer_has_can_be_cleared(
    base_chain: DevChain, tmp_path: Path
) -> None:
    """An override is stored by the route's text and outlives the route: once a reload removed the route, the
    override can no longer be cleared (``route_not_found``), and when the route comes back (the same pattern at
    a new price) the stale override (here: a one-off $0.000001) is its price again on every instance."""
    async with reloadable_gateway(base_chain, tmp_path) as gw:
        reloader = gw.gateway.reloader
        await reloader.set_price(REPORT, 1)  # a promotion: one atomic unit
        gw.write(routes=[r for r in ROUTES if r["route"] != REPORT])  # the route is retired
        assert (await reloader.reload()).ok
        try:
            await reloader.set_price(REPORT, None)  # the operator cleans up the promotion's override
        except BadRequest as exc:
            pytest.fail(f"the override of a retired route cannot be cleared: {exc.reason}: {exc.message}")
        gw.write(routes=[{**r, "price": "1.00"} if r["route"] == REPORT else r for r in ROUTES])
        assert (await reloader.reload()).ok
        assert reloader.state(REPORT).price == 1_000_000


# ---------------------------------------------------------------------------------------------------- prices


def test_a_price_the_stores_cannot_hold_is_a_bad_request(
    base_chain: DevChain, tmp_path: Path, admin_env: LocalAccount
) -> None:
    """docs/operating.md: a malformed value is 400 ``bad_request``. A price of $10 000 000 000 000 (10**19 atomic
    units) passes every check of the price action and overflows SQLite's 64-bit integer: 500 ``internal_error``
    (on Redis it is stored and served; no ledger entry can hold an amount over 2**53 - 1)."""
    with running_admin(base_chain, sqlite_url(tmp_path), tmp_path, admin_env) as admin, admin.client() as api:
        r = api.post("/admin/routes/price", json={"route": "GET /cheap", "price": "10000000000000"})
    assert r.status_code == 400, r.text


# ------------------------------------------------------------------------------------------------------- CLI


class _Recorder(BaseHTTPRequestHandler):
    """Answers every request with ``{"routes": []}`` and keeps its request line and headers."""

    seen: list[tuple[str, dict[str, str]]]

    def do_GET(self) -> None:
        self.seen.append((self.requestline, {k.lower(): v for k, v in self.headers.items()}))
        body = b'{"routes": []}'
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def _recording_server() -> tuple[ThreadingHTTPServer, list[tuple[str, dict[str, str]]]]:
    seen: list[tuple[str, dict[str, str]]] = []
    handler = type("Handler", (_Recorder,), {"seen": seen})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, seen


def test_the_admin_cli_never_hands_its_token_to_a_proxy_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An operator's shell often has ``http_proxy`` set (a corporate proxy). The CLI's httpx client honours it for
    the admin URL too (no loopback exception), so the bearer token travels in clear text to the proxy, which can
    then act as the operator. The admin CLI talks to one known listener: it should ignore proxy variables."""
    admin, at_admin = _recording_server()
    proxy, at_proxy = _recording_server()
    try:
        proxy_url = f"http://127.0.0.1:{proxy.server_address[1]}"
        for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
            monkeypatch.setenv(name, proxy_url)
        for name in ("no_proxy", "NO_PROXY"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("TEST_ADMIN_TOKEN", WRITE_TOKEN)
        url = f"http://127.0.0.1:{admin.server_address[1]}"
        code = main(["admin", "routes", "--url", url, "--token-env", "TEST_ADMIN_TOKEN", "--timeout", "10"])
        capsys.readouterr()
    finally:
        admin.shutdown()
        proxy.shutdown()
    leaked = [line for line, headers in at_proxy if WRITE_TOKEN in headers.get("authorization", "")]
    assert leaked == [], f"the proxy received the admin token with: {leaked}"
    assert code == 0 and len(at_admin) == 1
