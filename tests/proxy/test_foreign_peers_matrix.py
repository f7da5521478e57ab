"""Acceptance matrix: ``x402-gateway serve`` (a real process) in front of upstreams written in other frameworks
(Node's ``http``, Express, aiohttp.web, Starlette under uvicorn, an HTTP/1.0 ``http.server`` whose answers end at
the close), paid by other people's clients (the official PyPI ``x402`` client, ``exact`` and ``batch-settlement``
sessions; curl with a pre-signed header; a raw socket; ``@x402/fetch``).

Every cell checks what goes through both ways and what it costs:

* the answer relayed is the upstream's: its status, its end-to-end header fields in order with the same bytes (the
  hop-by-hop ones of RFC 9110 7.6.1 handled, not copied; framing may change, a fixed length may not), the same body
  bytes (a gzip answer still coded), compared with the same request sent to the upstream directly;
* the request the upstream gets is the client's: the same method, request target and body bytes, and every
  end-to-end header field with the same bytes;
* money: exactly one upstream call per paid request, and charged iff served (a 2xx): for ``exact``, the payer's
  balance moved by the price once or not at all; for a session, the channel's charged total in the gateway's store
  moved by the metered charge once or not at all.

The contract the upstreams answer is in ``tests/proxy/foreign_peers.py``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import uuid
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account.signers.local import LocalAccount
from x402 import x402Client
from x402.http.clients import x402HttpxClient
from x402.mechanisms.evm.batch_settlement.client import BatchSettlementEvmScheme
from x402.mechanisms.evm.exact import register_exact_evm_client
from x402.mechanisms.evm.signers import EthAccountSigner

from gateway.client.exact import choose_requirement, parse_challenge, sign_exact_payment
from gateway.dev.chain import DevChain
from gateway.x402.codec import decode_header
from tests.proxy.foreign_peers import (
    BIG,
    ECHO_TOKENS,
    FRAMEWORKS,
    GZIP_BODY,
    NDJSON,
    SSE,
    USAGE_COST,
    Answer,
    exchange,
    request_head,
    serve_upstream,
    write_fixtures,
)
from tests.support.gateway import AUTHORIZER_KEY
from tests.support.processes import served_gateway

PRICE = 10_000  # /p/**, exact
SESSION_PRICE = 1_000  # /s/** and /sj/**, batch-settlement: the voucher's ceiling
UNIT = 2  # /sj/**: atomic units per token (unit_price 0.000002)
ROUTES: list[dict[str, Any]] = [
    {"route": "GET /p/**", "price": "0.01"},
    {"route": "POST /p/**", "price": "0.01"},
    {
        "route": "GET /s/**",
        "price": "0.001",
        "schemes": ["batch-settlement"],
        "meter.header": "x-usage-cost",
        "meter.unit": "atomic",
    },
    {
        "route": "GET /sj/**",
        "price": "0.001",
        "schemes": ["batch-settlement"],
        "meter.json": "usage.total_tokens",
        "meter.unit_price": "0.000002",
    },
]
SESSIONS = {"authorizer_key_env": "TEST_AUTHORIZER_KEY", "withdraw_delay": 900, "claim_interval": 3600}
ROOT = Path(__file__).resolve().parents[2]
FETCH_MODULES = ROOT / ".tools" / "x402-ts" / "node_modules"
FETCH_SCRIPT = Path(__file__).with_name("pay_raw_with_x402_fetch.mjs")

# RFC 9110 7.6.1: a proxy never copies these (nor the fields a Connection header names).
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}
# What the gateway adds to a paid answer.
RECEIPT_HEADERS = {"payment-response", "access-control-expose-headers"}


@dataclass
class Stack:
    name: str
    upstream: str
    gateway: str
    chain: DevChain
    store: Path

    def count(self, cell: str) -> int:
        found: int = httpx.get(f"{self.upstream}/_count?cell={cell}", timeout=10).json()["count"]
        return found

    def charged_on_channels(self) -> int:
        """The sum of every channel's charged total in the gateway's store (one session payer per stack)."""
        with sqlite3.connect(f"file:{self.store}?mode=ro", uri=True) as db:
            row = db.execute("SELECT COALESCE(SUM(charged), 0) FROM channels").fetchone()
        return int(row[0])


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fixtures(tmp_path_factory.mktemp("peer-fixtures"))


@pytest.fixture(scope="module", params=FRAMEWORKS)
def stack(
    request: pytest.FixtureRequest, base_chain: DevChain, fixtures: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    name: str = request.param
    tmp = tmp_path_factory.mktemp(f"gateway-{name}")
    previous = os.environ.get("TEST_AUTHORIZER_KEY")
    os.environ["TEST_AUTHORIZER_KEY"] = AUTHORIZER_KEY  # the served process inherits it
    try:
        with (
            serve_upstream(name, fixtures) as upstream,
            served_gateway(base_chain, tmp, upstream_url=upstream, routes=ROUTES, sessions=SESSIONS) as gw,
        ):
            yield Stack(name, upstream, gw.url, base_chain, tmp / "receipts.db")
    finally:
        if previous is None:
            os.environ.pop("TEST_AUTHORIZER_KEY", None)
        else:
            os.environ["TEST_AUTHORIZER_KEY"] = previous


def new_cell() -> str:
    return uuid.uuid4().hex


def presigned(stack: Stack, payer: LocalAccount, method: str, path: str) -> tuple[str, str]:
    """A payment header for ``method path``, signed ahead of the request (the 402 asked without a body)."""
    challenge = exchange(stack.gateway, request_head(method, path, []))
    assert challenge.status == 402, (challenge.status, challenge.body[:300])
    options = parse_challenge(httpx.Headers([(k, v.decode("latin-1")) for k, v in challenge.headers]), challenge.body)
    return sign_exact_payment(payer, choose_requirement(options))


def end_to_end(answer: Answer, *, drop: Collection[str] = ()) -> list[tuple[str, bytes]]:
    named = {t.strip().lower().decode("latin-1") for v in answer.values("connection") for t in v.split(b",")}
    return [(k, v) for k, v in answer.headers if k not in HOP_BY_HOP | named | set(drop)]


def assert_relayed(direct: Answer, via: Answer, *, drop: Collection[str] = ()) -> None:
    """``via`` (through the gateway) is ``direct`` (from the upstream): status, end-to-end fields in order with the
    same bytes (Date's value is the clock's), a fixed length kept, and the body bytes."""
    assert via.status == direct.status, (via.status, via.body[:300])
    want = [(k, b"<date>" if k == "date" else v) for k, v in end_to_end(direct, drop={*drop, "server"})]
    got = [(k, b"<date>" if k == "date" else v) for k, v in end_to_end(via, drop=RECEIPT_HEADERS | set(drop))]
    assert got == want
    assert len(via.values("date")) == 1  # RFC 9110 6.6.1: one, the upstream's
    assert not via.values("server")  # the software behind the gateway is not named
    if direct.framing == "length":
        assert via.framing == "length"
    assert via.body == direct.body


def charged(stack: Stack, payer: LocalAccount, start: int) -> int:
    return start - stack.chain.balance(payer.address)


# ---------------------------------------------------------------------------------------- answers relayed

ANSWERS = {
    "cookies": b"cookies\n",
    "nocontent": b"",
    "notmodified": b"",
    "gzip": GZIP_BODY,
    "sse": b"".join(SSE),
    "ndjson": b"".join(NDJSON),
    "big-cl": BIG,
    "big-stream": BIG,
}


# HEAD (priced as the GET) is asked of the answers that have a body to leave out.
ASKED = [*((answer, "GET") for answer in ANSWERS), *((a, "HEAD") for a in ("cookies", "gzip", "big-cl", "big-stream"))]


@pytest.mark.parametrize("route", ["paid", "free"])
@pytest.mark.parametrize(("answer", "method"), ASKED, ids=[f"{a}-{m}" for a, m in ASKED])
def test_every_answer_is_relayed_as_the_upstream_sent_it_and_charged_iff_served(
    stack: Stack, answer: str, method: str, route: str
) -> None:
    """Also: every answer ``serve`` writes has one Date (RFC 9110 6.6.1), the upstream's when it relays one. Failed
    before: ``serve`` stamps none of its own and the proxy dropped the upstream's, so no answer had any."""
    path = f"/{'p' if route == 'paid' else 'free'}/{answer}"
    cell = new_cell()
    ask = [("x-cell", cell), ("accept-encoding", "gzip")]
    head_request = method == "HEAD"
    direct = exchange(stack.upstream, request_head(method, path, ask), head_request=head_request)
    assert direct.status in (200, 204, 304)
    if not head_request:
        assert direct.body == ANSWERS[answer]
    payer = stack.chain.new_payer(1_000_000) if route == "paid" else None
    start = stack.chain.balance(payer.address) if payer else 0
    if payer is not None:
        unpaid = exchange(stack.gateway, request_head(method, path, ask), head_request=head_request)
        assert unpaid.status == 402 and len(unpaid.values("date")) == 1  # the gateway's own answer too
        ask = [*ask, presigned(stack, payer, method, path)]
    via = exchange(stack.gateway, request_head(method, path, ask), head_request=head_request)
    if head_request:
        assert via.body == b""  # whatever the upstream wrote after a HEAD answer's head (aiohttp: its stream)
        direct.body = b""
    assert_relayed(direct, via)
    assert stack.count(cell) == 1  # the unpaid ask never reached it, the paid one once
    if payer is not None:
        served = 200 <= via.status < 300
        assert charged(stack, payer, start) == (PRICE if served else 0)
        assert (via.header("payment-response") is not None) == served


# ----------------------------------------------------------------------------------------- requests relayed

QUERIES = {
    "repeated": "?a=1&a=2&a=3",
    "encoded": "?q=caf%C3%A9%20au%20lait&path=%2Fetc%2Fpasswd&plus=a+b&pct=100%25",
    "empty": "?a=&b&=c&&d=",
    "brackets": "?filter[name]=x&ids[]=1&ids[]=2",
    "json": '?where={"a":1}&sel=a|b',
}


UPLOAD = hashlib.sha256(b"upload").digest() * (5 * 1024 * 1024 // 32)  # 5 MiB


def echo_of(answer: Answer) -> dict[str, Any]:
    assert answer.status == 200, (answer.status, answer.body[:300])
    sha = answer.header("x-body-sha256")
    assert sha is not None and hashlib.sha256(answer.body).hexdigest() == sha.decode()  # the body as it was sent
    doc: dict[str, Any] = json.loads(answer.body)
    return doc


def seen_headers(doc: dict[str, Any]) -> list[tuple[str, bytes]]:
    return [(k, bytes.fromhex(v)) for k, v in doc["headers"]]


def assert_request_relayed(
    doc: dict[str, Any], method: str, target: str | bytes, sent: list[tuple[str, bytes | str]], body: bytes
) -> None:
    """The upstream got the client's method, request target, body bytes and end-to-end header fields."""
    raw_target = target if isinstance(target, bytes) else target.encode("latin-1")
    assert doc["method"] == method
    assert bytes.fromhex(doc["target"]) == raw_target
    assert (doc["body_len"], doc["body_sha256"]) == (len(body), hashlib.sha256(body).hexdigest())
    seen = seen_headers(doc)
    for name, value in sent:
        raw = value if isinstance(value, bytes) else value.encode("latin-1")
        if name.lower() in HOP_BY_HOP | {"expect", "payment-signature", "x-payment", "content-length"}:
            continue
        assert (name.lower(), raw) in seen, (name, raw, seen)
    names = {k for k, _ in seen}
    assert not names & {"payment-signature", "x-payment", "expect", "te", "keep-alive", "proxy-connection"}


@pytest.mark.parametrize("route", ["paid", "free"])
@pytest.mark.parametrize("query", list(QUERIES))
def test_a_query_string_reaches_the_upstream_byte_for_byte(stack: Stack, query: str, route: str) -> None:
    target = f"/{'p' if route == 'paid' else 'free'}/echo{QUERIES[query]}"
    cell = new_cell()
    sent: list[tuple[str, bytes | str]] = [("x-cell", cell)]
    payer = stack.chain.new_payer(1_000_000) if route == "paid" else None
    start = stack.chain.balance(payer.address) if payer else 0
    if payer is not None:
        sent.append(presigned(stack, payer, "GET", target))
    doc = echo_of(exchange(stack.gateway, request_head("GET", target, sent)))
    assert_request_relayed(doc, "GET", target, sent, b"")
    assert stack.count(cell) == 1
    if payer is not None:
        assert charged(stack, payer, start) == PRICE


HEADER_VALUES: dict[str, bytes] = {
    "utf8": "café ☕".encode(),
    "latin1": b"caf\xe9",
    "obs-text": b"\x80\xff tab\there",
}


@pytest.mark.parametrize("route", ["paid", "free"])
@pytest.mark.parametrize("value", list(HEADER_VALUES))
def test_a_non_ascii_header_value_reaches_the_upstream_byte_for_byte(stack: Stack, value: str, route: str) -> None:
    target = f"/{'p' if route == 'paid' else 'free'}/echo"
    cell = new_cell()
    sent: list[tuple[str, bytes | str]] = [("x-cell", cell), ("x-name", HEADER_VALUES[value])]
    payer = stack.chain.new_payer(1_000_000) if route == "paid" else None
    if payer is not None:
        sent.append(presigned(stack, payer, "GET", target))
    doc = echo_of(exchange(stack.gateway, request_head("GET", target, sent)))
    assert_request_relayed(doc, "GET", target, sent, b"")
    assert stack.count(cell) == 1


@pytest.mark.parametrize("route", ["paid", "free"])
def test_a_json_post_reaches_the_upstream_and_its_echo_comes_back(stack: Stack, route: str) -> None:
    target = f"/{'p' if route == 'paid' else 'free'}/echo?x=1"
    cell = new_cell()
    body = json.dumps({"prompt": "héllo", "n": [1, 2, 3]}, ensure_ascii=False).encode()
    sent: list[tuple[str, bytes | str]] = [
        ("x-cell", cell),
        ("content-type", "application/json; charset=utf-8"),
        ("content-length", str(len(body))),
    ]
    payer = stack.chain.new_payer(1_000_000) if route == "paid" else None
    start = stack.chain.balance(payer.address) if payer else 0
    if payer is not None:
        sent.append(presigned(stack, payer, "POST", target))
    doc = echo_of(exchange(stack.gateway, request_head("POST", target, sent), body))
    assert_request_relayed(doc, "POST", target, sent, body)
    assert (b"content-length", str(len(body)).encode()) in [(k.encode(), v) for k, v in seen_headers(doc)]
    assert stack.count(cell) == 1
    if payer is not None:
        assert charged(stack, payer, start) == PRICE


@pytest.mark.parametrize("route", ["paid", "free"])
def test_a_body_sent_after_100_continue_reaches_the_upstream_and_is_charged_once(stack: Stack, route: str) -> None:
    """The client waits for ``100 Continue`` before its body (a raw socket, no timeout to fall back on): the gateway
    asks for it once the payment is verified, and the upstream is never asked to continue (Expect is not relayed)."""
    target = f"/{'p' if route == 'paid' else 'free'}/echo"
    cell = new_cell()
    body = UPLOAD[: 256 * 1024]
    sent: list[tuple[str, bytes | str]] = [("x-cell", cell), ("content-length", str(len(body)))]
    payer = stack.chain.new_payer(1_000_000) if route == "paid" else None
    start = stack.chain.balance(payer.address) if payer else 0
    if payer is not None:
        sent.append(presigned(stack, payer, "POST", target))
    head = request_head("POST", target, [*sent, ("expect", "100-continue")])
    answer = exchange(stack.gateway, head, body, wait_for_continue=True)
    assert answer.interim == [100]
    assert_request_relayed(echo_of(answer), "POST", target, sent, body)
    assert stack.count(cell) == 1
    if payer is not None:
        assert charged(stack, payer, start) == PRICE


@pytest.mark.parametrize("kind", ["plain", "preflight"])
def test_options_reaches_the_upstream_unpriced(stack: Stack, kind: str) -> None:
    """OPTIONS on a path priced for GET and POST only is not priced: relayed (a preflight without its body)."""
    target = "/p/echo"
    cell = new_cell()
    sent: list[tuple[str, bytes | str]] = [("x-cell", cell)]
    if kind == "preflight":
        sent += [("origin", "https://app.example"), ("access-control-request-method", "POST")]
    answer = exchange(stack.gateway, request_head("OPTIONS", target, sent))
    assert answer.status == 200
    if kind == "plain":
        assert_request_relayed(echo_of(answer), "OPTIONS", target, sent, b"")
    else:
        assert answer.body == b""
    assert stack.count(cell) == 1


# ------------------------------------------------------------------------------------ large uploads (curl)


def curl(url: str, body: Path, headers: list[tuple[str, str]], out: Path) -> tuple[int, bytes]:
    args = ["curl", "-sS", "--http1.1", "-o", str(out), "-w", "%{http_code}", "--data-binary", f"@{body}"]
    for k, v in headers:
        args += ["-H", f"{k}: {v}" if v else f"{k}:"]  # "Name:" removes a header curl would send
    done = subprocess.run([*args, url], capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return int(done.stdout), out.read_bytes()


@pytest.mark.parametrize("route", ["paid", "free"])
@pytest.mark.parametrize("framing", ["length", "expect-100", "chunked"])
def test_a_large_upload_from_curl_reaches_the_upstream_whole_and_is_charged_once(
    stack: Stack, framing: str, route: str, tmp_path: Path
) -> None:
    if shutil.which("curl") is None:
        pytest.fail("curl is needed", pytrace=False)
    upload = tmp_path / "upload.bin"
    upload.write_bytes(UPLOAD)
    target = f"/{'p' if route == 'paid' else 'free'}/echo"
    cell = new_cell()
    headers = [("x-cell", cell), ("content-type", "application/octet-stream")]
    headers.append(("expect", "100-continue") if framing == "expect-100" else ("expect", ""))  # "": curl sends none
    if framing == "chunked":
        headers.append(("transfer-encoding", "chunked"))
    payer = stack.chain.new_payer(1_000_000) if route == "paid" else None
    start = stack.chain.balance(payer.address) if payer else 0
    if payer is not None:
        headers.append(presigned(stack, payer, "POST", target))
    status, body = curl(stack.gateway + target, upload, headers, tmp_path / "out.bin")
    assert status == 200, body[:300]
    doc = json.loads(body)
    assert (doc["body_len"], doc["body_sha256"]) == (len(UPLOAD), hashlib.sha256(UPLOAD).hexdigest())
    assert not {k for k, _ in seen_headers(doc)} & {"expect", "payment-signature", "x-payment"}
    assert stack.count(cell) == 1
    if payer is not None:
        assert charged(stack, payer, start) == PRICE


# ------------------------------------------------------------------------------- the official PyPI client


def official_client(payer: LocalAccount) -> x402Client:
    client = x402Client()
    register_exact_evm_client(client, EthAccountSigner(payer))
    return client


@pytest.mark.parametrize("shape", ["get-query", "post-json", "post-5mb"])
def test_the_official_python_client_pays_exact_once_and_gets_the_upstreams_bytes(stack: Stack, shape: str) -> None:
    payer = stack.chain.new_payer(1_000_000)
    start = stack.chain.balance(payer.address)
    cell = new_cell()

    async def run() -> httpx.Response:
        async with x402HttpxClient(official_client(payer), timeout=60) as http:
            headers = {"x-cell": cell}
            response: httpx.Response
            if shape == "get-query":
                response = await http.get(stack.gateway + "/p/echo?a=1&a=2&b=", headers=headers)
            else:
                body = json.dumps({"q": "x"}).encode() if shape == "post-json" else UPLOAD
                response = await http.post(stack.gateway + "/p/echo", content=body, headers=headers)
            return response

    response = asyncio.run(run())
    assert response.status_code == 200, response.text[:300]
    assert hashlib.sha256(response.content).hexdigest() == response.headers["x-body-sha256"]
    doc = response.json()
    sent = b"" if shape == "get-query" else (json.dumps({"q": "x"}).encode() if shape == "post-json" else UPLOAD)
    assert (doc["body_len"], doc["body_sha256"]) == (len(sent), hashlib.sha256(sent).hexdigest())
    assert decode_header(response.headers["payment-response"])["success"] is True
    assert stack.count(cell) == 1
    assert charged(stack, payer, start) == PRICE


# ------------------------------------------------------------------------------------------- @x402/fetch


def test_x402_fetch_pays_exact_once_and_gets_the_upstreams_bytes(stack: Stack) -> None:
    node = shutil.which("node")
    if node is None or not (FETCH_MODULES / "@x402" / "fetch").is_dir():
        pytest.fail("node and @x402/fetch are needed: run scripts/install-tools.sh", pytrace=False)
    payer = stack.chain.new_payer(1_000_000)
    start = stack.chain.balance(payer.address)
    cell = new_cell()
    body = json.dumps({"prompt": "hello"})
    key = "0x" + payer.key.hex().removeprefix("0x")
    done = subprocess.run(
        [node, str(FETCH_SCRIPT), str(FETCH_MODULES), stack.gateway + "/p/echo?a=1&a=2", key, cell, body],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    raw = base64.b64decode(got["body"])
    assert got["status"] == 200, raw[:300]
    assert hashlib.sha256(raw).hexdigest() == got["headers"]["x-body-sha256"]
    doc = json.loads(raw)
    assert bytes.fromhex(doc["target"]) == b"/p/echo?a=1&a=2"
    assert doc["body_sha256"] == hashlib.sha256(body.encode()).hexdigest()
    assert decode_header(got["headers"]["payment-response"])["success"] is True
    assert stack.count(cell) == 1
    assert charged(stack, payer, start) == PRICE


# --------------------------------------------------------------------------------------------- sessions

# What each answer costs on a header-metered route (/s/, x-usage-cost: 250) and on a JSON-metered one (/sj/):
# the last JSON event of a stream, the echo's usage, the ceiling for a body the meter cannot read or does not
# read (past 1 MiB), nothing for an answer that is not served.
SESSION_CELLS: dict[str, tuple[int, int]] = {
    "sse": (USAGE_COST, 9 * UNIT),
    "ndjson": (USAGE_COST, 5 * UNIT),
    "echo": (USAGE_COST, ECHO_TOKENS * UNIT),
    "big-cl": (USAGE_COST, SESSION_PRICE),
    "big-stream": (USAGE_COST, SESSION_PRICE),
    "nocontent": (USAGE_COST, SESSION_PRICE),
    "notmodified": (0, 0),
}


@pytest.fixture(scope="module")
def session_payer(stack: Stack) -> x402Client:
    payer = stack.chain.new_payer(5_000_000)
    client = x402Client()
    client.register("eip155:8453", BatchSettlementEvmScheme(EthAccountSigner(payer)))
    return client


@pytest.mark.parametrize("meter", ["header", "json"])
@pytest.mark.parametrize("answer", list(SESSION_CELLS))
def test_a_session_answer_is_relayed_as_sent_and_its_channel_charged_what_was_metered(
    stack: Stack, session_payer: x402Client, answer: str, meter: str
) -> None:
    path = f"/{'s' if meter == 'header' else 'sj'}/{answer}"
    cell = new_cell()
    # The JSON meter asks the upstream for the identity encoding: asked directly the same way.
    direct = exchange(stack.upstream, request_head("GET", path, [("x-cell", cell), ("accept-encoding", "identity")]))
    before = stack.charged_on_channels()

    async def run() -> tuple[httpx.Response, bytes]:
        async with (
            x402HttpxClient(session_payer, timeout=60) as http,
            http.stream("GET", stack.gateway + path, headers={"x-cell": cell}) as response,
        ):
            raw = b"".join([chunk async for chunk in response.aiter_raw()])
            return response, raw

    response, raw = asyncio.run(run())
    assert response.status_code == direct.status, raw[:300]
    if answer != "echo":
        assert raw == direct.body  # byte for byte (the echo names the headers each request carried)
    else:
        echo_of(Answer(200, [("x-body-sha256", response.headers["x-body-sha256"].encode())], raw, "length"))
    relayed = [(k.decode("latin-1").lower(), v) for k, v in response.headers.raw]
    names = {k for k, _ in relayed}
    if meter == "header":
        assert "x-usage-cost" not in names  # the meter's header is the gateway's
    want = [k for k, _ in end_to_end(direct, drop={"x-usage-cost", "server"})]
    got = [k for k in (k for k, _ in relayed) if k not in HOP_BY_HOP | RECEIPT_HEADERS | {"x-usage-cost"}]
    assert got == want  # (the upstream's Server is not relayed: it names the software behind the gateway)
    served = 200 <= direct.status < 300
    expected = SESSION_CELLS[answer][0 if meter == "header" else 1]
    assert stack.charged_on_channels() - before == expected
    if served:
        receipt = decode_header(response.headers["payment-response"])
        assert int(receipt["extra"]["chargedAmount"]) == expected
    assert stack.count(cell) == 1
