"""The upstream hop, driven over real sockets: client -> uvicorn(UpstreamProxy) -> uvicorn(RecordingUpstream).

Each test is named for the property it protects (docs/threat-model.md T14-T16, T19).
"""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

from gateway.http.proxy import UpstreamAborted, UpstreamProxy, upstream_path
from tests.support import Behaviour, RecordingUpstream, raw_http, serve_asgi, serve_asgi_async

API_KEY = "sk-upstream-secret-0123456789"


@pytest.fixture(scope="module")
def upstream_server() -> Iterator[tuple[RecordingUpstream, str]]:
    upstream = RecordingUpstream()
    with serve_asgi(upstream) as url:
        yield upstream, url


@pytest.fixture
def upstream(upstream_server: tuple[RecordingUpstream, str]) -> RecordingUpstream:
    upstream_server[0].reset()
    return upstream_server[0]


@pytest.fixture
def upstream_url(upstream_server: tuple[RecordingUpstream, str], upstream: RecordingUpstream) -> str:
    return upstream_server[1]


@contextmanager
def proxy_for(origin: str, **kwargs: Any) -> Iterator[str]:
    with serve_asgi(UpstreamProxy(origin, **kwargs), lifespan="on") as url:
        yield url


@pytest.fixture
def proxy_url(upstream_url: str) -> Iterator[str]:
    # inject_on="all": these tests are about the hop itself; which requests get the headers is the subject of
    # tests/proxy/test_upstream_credentials_only_where_configured.py.
    with proxy_for(
        upstream_url + "/base", inject_headers={"X-Api-Key": API_KEY}, strip_headers=["X-Internal"], inject_on="all"
    ) as url:
        yield url


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def only_request(upstream: RecordingUpstream) -> Any:
    assert upstream.wait_for_requests(1)
    (rec,) = upstream.requests
    return rec


# --- headers (threat 14) ---------------------------------------------------------------------------------------


def test_upstream_never_sees_payment_or_hop_by_hop_headers(proxy_url: str, upstream: RecordingUpstream) -> None:
    sent = [
        ("X-Payment", "eyJwYXkiOjF9"),
        ("Payment-Signature", "sig"),
        ("X-Payment-Network", "base"),
        ("X-Payment-Auth", "a"),
        ("X-Payment-Binding", "b"),
        ("Connection", "keep-alive, X-Secret-Hop"),
        ("X-Secret-Hop", "must-not-pass"),
        ("Keep-Alive", "timeout=5"),
        ("TE", "trailers"),
        ("Trailer", "X-Foo"),
        ("Proxy-Authorization", "Basic Zm9vOmJhcg=="),
        ("Proxy-Connection", "keep-alive"),
        ("X-Internal", "strip me"),
        ("X-Kept", "kept"),
    ]
    r = httpx.get(proxy_url + "/h", headers=sent)
    assert r.status_code == 200
    seen = {k for k, _ in only_request(upstream).headers}
    forbidden = {
        "x-payment",
        "payment-signature",
        "x-payment-network",
        "x-payment-auth",
        "x-payment-binding",
        "x-secret-hop",
        "keep-alive",
        "te",
        "trailer",
        "proxy-authorization",
        "proxy-connection",
        "x-internal",
        "transfer-encoding",
        "upgrade",
    }
    assert not seen & forbidden
    rec = only_request(upstream)
    assert "x-secret-hop" not in " ".join(rec.header_values("connection")).lower()
    assert rec.header("x-kept") == "kept"


def test_forwarding_headers_are_set_by_gateway_not_copied_from_client(
    proxy_url: str, upstream: RecordingUpstream
) -> None:
    spoofed = [
        ("X-Forwarded-For", "6.6.6.6"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "evil.example"),
        ("X-Forwarded-Port", "1"),
        ("X-Real-IP", "6.6.6.6"),
        ("Forwarded", "for=6.6.6.6;host=evil.example"),
    ]
    httpx.get(proxy_url + "/f", headers=spoofed)
    rec = only_request(upstream)
    assert rec.header_values("x-forwarded-for") == ["127.0.0.1"]
    assert rec.header_values("x-forwarded-proto") == ["http"]
    assert rec.header_values("x-forwarded-host") == [proxy_url.removeprefix("http://")]
    assert rec.header_values("x-forwarded-port") == []
    assert rec.header_values("x-real-ip") == []
    assert rec.header_values("forwarded") == []


def test_public_scheme_is_asserted_as_forwarded_proto(upstream_url: str, upstream: RecordingUpstream) -> None:
    with proxy_for(upstream_url, public_scheme="https") as url:
        httpx.get(url + "/", headers={"X-Forwarded-Proto": "gopher"})
    assert only_request(upstream).header_values("x-forwarded-proto") == ["https"]


def test_injected_api_key_overwrites_client_value(proxy_url: str, upstream: RecordingUpstream) -> None:
    httpx.get(proxy_url + "/k", headers=[("x-api-key", "client-chosen"), ("X-API-KEY", "another")])
    assert only_request(upstream).header_values("x-api-key") == [API_KEY]


def test_multi_valued_headers_are_kept(proxy_url: str, upstream: RecordingUpstream) -> None:
    httpx.get(proxy_url + "/m", headers=[("X-Multi", "one"), ("X-Multi", "two")])
    assert only_request(upstream).header_values("x-multi") == ["one", "two"]


def test_upstream_host_is_the_configured_one(proxy_url: str, upstream_url: str, upstream: RecordingUpstream) -> None:
    httpx.get(proxy_url + "/x", headers={"Host": "evil.example"})
    assert only_request(upstream).host == upstream_url.removeprefix("http://")


def test_secrets_never_appear_in_errors_or_repr() -> None:
    origin = f"http://user:hunter2@127.0.0.1:{closed_port()}/base"
    proxy = UpstreamProxy(origin, inject_headers={"X-Api-Key": API_KEY})
    assert "hunter2" not in repr(proxy)
    assert API_KEY not in repr(proxy)
    with serve_asgi(proxy, lifespan="on") as url:
        r = httpx.get(url + "/x")
    assert r.status_code == 502
    assert "hunter2" not in r.text
    assert API_KEY not in r.text
    assert "127.0.0.1" not in r.text


def test_origin_credentials_become_basic_auth_upstream(upstream_url: str, upstream: RecordingUpstream) -> None:
    with proxy_for(upstream_url.replace("http://", "http://user:pw@"), inject_on="all") as url:
        httpx.get(url + "/", headers={"Authorization": "Bearer client"})
    assert only_request(upstream).header_values("authorization") == ["Basic dXNlcjpwdw=="]


# --- paths (threat 15) -----------------------------------------------------------------------------------------

NASTY_PATHS = {
    "//evil/x": b"/base/evil/x",
    "/http://evil/": b"/base/http:/evil/",
    "/%2F%2Fevil": b"/base/%2F%2Fevil",
    "/../x": b"/base/x",
    "/%2e%2e/x": b"/base/x",
    "/.%2E/%2e./x": b"/base/x",
    "/a/../../../etc/passwd": b"/base/etc/passwd",
    "/..": b"/base/",
    "/@evil/x": b"/base/@evil/x",
    "http://evil:1/x": b"/base/x",  # absolute-form target: its authority is ignored
}


@pytest.mark.parametrize("target", list(NASTY_PATHS))
def test_ssrf_paths_stay_on_configured_origin(
    proxy_url: str, upstream_url: str, upstream: RecordingUpstream, target: str
) -> None:
    # raw bytes: httpx would normalise these paths before sending them.
    status, _, _ = raw_http(proxy_url, f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    assert status == 200
    rec = only_request(upstream)
    assert rec.host == upstream_url.removeprefix("http://")
    assert rec.raw_path == NASTY_PATHS[target]


@pytest.mark.parametrize("target", ["/..%2F..%2Fadmin", "/..%5C..%5Cadmin", "/a/..%2f"])
def test_traversal_hidden_behind_encoded_separators_is_refused(
    proxy_url: str, upstream: RecordingUpstream, target: str
) -> None:
    status, _, body = raw_http(proxy_url, f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    assert status == 400
    assert json.loads(body)["error"] == "invalid_path"
    assert upstream.requests == []


def test_upstream_path_never_climbs_above_base() -> None:
    for raw in ["/../../..", "/%2e%2e/%2E%2E/x", "/a/b/../../../c", "/./././.."]:
        assert upstream_path("/base/v1", raw).startswith("/base/v1/")


def test_base_path_is_kept(upstream_url: str, upstream: RecordingUpstream) -> None:
    with proxy_for(upstream_url + "/api/v1/") as url:
        httpx.get(url + "/items/7")
    assert only_request(upstream).raw_path == b"/api/v1/items/7"


def test_query_string_passes_unchanged(proxy_url: str, upstream: RecordingUpstream) -> None:
    query = "a=%20b&c=d%26e&x=1&x=2&empty=&plus=a+b&slash=/&q=%3F"
    raw_http(proxy_url, f"GET /q?{query} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    assert only_request(upstream).query == query.encode()


def test_non_http_scopes_are_refused(proxy_url: str, upstream: RecordingUpstream) -> None:
    handshake = (
        "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    status, _, _ = raw_http(proxy_url, handshake.encode(), timeout=2)
    assert status == 403
    assert upstream.requests == []


def test_trace_is_not_forwarded_so_the_api_key_cannot_be_reflected(proxy_url: str, upstream: RecordingUpstream) -> None:
    r = httpx.request("TRACE", proxy_url + "/")
    assert r.status_code == 400
    assert API_KEY not in r.text
    assert upstream.requests == []


# --- bodies and framing (threats 14, 16) -----------------------------------------------------------------------


def test_request_body_streams_upstream(proxy_url: str, upstream: RecordingUpstream) -> None:
    seen_before_end: list[bool] = []

    # Past the first 64 KiB (read before an upstream connection is taken, docs/threat-model.md T39) it streams.
    first = 70_000

    def body() -> Iterator[bytes]:
        yield b"a" * first
        # The second chunk is only produced once the upstream holds the first: a buffering proxy deadlocks here.
        seen_before_end.append(upstream.wait_for_body_bytes(first, timeout=5))
        yield b"b" * 1000

    r = httpx.post(proxy_url + "/upload", content=body())
    assert r.status_code == 200
    assert seen_before_end == [True]
    rec = only_request(upstream)
    assert rec.body == b"a" * first + b"b" * 1000
    assert rec.complete


def test_fixed_length_body_keeps_its_content_length(proxy_url: str, upstream: RecordingUpstream) -> None:
    httpx.post(proxy_url + "/p", content=b"hello world")
    rec = only_request(upstream)
    assert rec.body == b"hello world"
    assert rec.header("content-length") == "11"
    assert rec.header("transfer-encoding") is None


def test_oversized_body_is_413_with_zero_bytes_upstream(upstream_url: str, upstream: RecordingUpstream) -> None:
    with proxy_for(upstream_url, max_body_bytes=1000) as url:
        r = httpx.post(url + "/big", content=b"x" * 5000)
    assert r.status_code == 413
    assert r.json()["error"] == "payload_too_large"
    assert upstream.requests == []


def test_chunked_body_growing_past_the_cap_is_413_and_never_completes_upstream(
    upstream_url: str, upstream: RecordingUpstream
) -> None:
    with proxy_for(upstream_url, max_body_bytes=1000) as url:
        r = httpx.post(url + "/big", content=iter([b"x" * 600] * 5))
    assert r.status_code == 413
    assert all(not rec.complete for rec in upstream.requests)


def test_stalled_body_is_408(upstream_url: str, upstream: RecordingUpstream) -> None:
    with proxy_for(upstream_url, body_read_timeout=0.3) as url:
        request = b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\nConnection: close\r\n\r\n0123456789"
        status, _, body = raw_http(url, request, timeout=5, pause_after=1.0)
    assert status == 408
    assert json.loads(body)["error"] == "request_timeout"
    assert all(not rec.complete for rec in upstream.requests)


def test_content_length_with_transfer_encoding_is_rejected(proxy_url: str, upstream: RecordingUpstream) -> None:
    smuggle = (
        b"POST /s HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    status, _, _ = raw_http(proxy_url, smuggle)
    assert status == 400  # httptools refuses it before the app; the proxy's own check is tested below
    assert upstream.requests == []


async def call_proxy(proxy: UpstreamProxy, headers: list[tuple[bytes, bytes]]) -> tuple[int, dict[str, Any]]:
    """Drive the ASGI app directly with a scope no HTTP parser would let through."""
    sent: list[dict[str, Any]] = []

    messages = [{"type": "http.request", "body": b"hello", "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await asyncio.sleep(3600)  # the client stays connected
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/", "raw_path": b"/", "query_string": b"", "headers": headers}
    await proxy(scope, receive, send)
    await proxy.aclose()
    return sent[0]["status"], json.loads(sent[1]["body"])


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ([(b"content-length", b"5"), (b"transfer-encoding", b"chunked")], "ambiguous_content_length"),
        ([(b"content-length", b"5"), (b"content-length", b"5")], "invalid_content_length"),
        ([(b"content-length", b"5, 5")], "invalid_content_length"),
        ([(b"content-length", b"-1")], "invalid_content_length"),
        ([(b"content-length", b"0x5")], "invalid_content_length"),
        ([(b"host", b"a"), (b"host", b"b")], "invalid_host"),
    ],
)
async def test_ambiguous_framing_is_refused_by_the_proxy_itself(
    upstream_url: str, upstream: RecordingUpstream, headers: list[tuple[bytes, bytes]], reason: str
) -> None:
    status, body = await call_proxy(UpstreamProxy(upstream_url), headers)
    assert (status, body["error"]) == (400, reason)
    assert upstream.requests == []


@pytest.mark.parametrize("declared", [b"4", b"6"], ids=["body-longer", "body-shorter"])
async def test_a_body_that_disagrees_with_its_content_length_never_goes_upstream(
    upstream_url: str, upstream: RecordingUpstream, declared: bytes
) -> None:
    """Failed before: the proxy sent the declared Content-Length upstream and then whatever body the server handed
    over. A server (or an ASGI layer) that delivers five bytes for a declared four makes the upstream read the fifth
    as the start of the next request on its pooled connection; for a declared six, the upstream reads the first byte
    of the next request (another client's, with its credentials) as this one's body. uvicorn's httptools protocol
    did exactly that for an upgrade offer with a body (tests/proxy/test_raw_socket_attacks.py)."""
    status, body = await call_proxy(UpstreamProxy(upstream_url), [(b"content-length", declared)])
    assert (status, body["error"]) == (400, "invalid_content_length")
    assert upstream.requests == []


# --- responses -------------------------------------------------------------------------------------------------


def test_response_streams_before_upstream_finishes(proxy_url: str, upstream: RecordingUpstream) -> None:
    gate = threading.Event()
    upstream.reset(Behaviour(chunks=[b"first|", b"second"], gate=gate))
    try:
        with httpx.stream("GET", proxy_url + "/stream", timeout=5) as r:
            chunks = r.iter_raw()
            first = next(chunks)  # a buffering proxy would time out here: the upstream is still waiting on the gate
            assert first == b"first|"
            assert not gate.is_set()
            gate.set()
            assert first + b"".join(chunks) == b"first|second"
    finally:
        gate.set()


def test_big_response_is_relayed_intact(proxy_url: str, upstream: RecordingUpstream) -> None:
    upstream.reset(Behaviour(big_body=3 * 1024 * 1024 + 7))
    r = httpx.get(proxy_url + "/big")
    assert len(r.content) == 3 * 1024 * 1024 + 7


def test_gzip_body_passes_through_untouched(proxy_url: str, upstream: RecordingUpstream) -> None:
    payload = gzip.compress(b'{"hello": "world"}' * 100)
    upstream.reset(
        Behaviour(body=payload, headers=[("Content-Encoding", "gzip"), ("Content-Type", "application/json")])
    )
    with httpx.stream("GET", proxy_url + "/gz", headers={"Accept-Encoding": "gzip"}) as r:
        raw = b"".join(r.iter_raw())
        assert r.headers["content-encoding"] == "gzip"
        assert r.headers["content-length"] == str(len(payload))
    assert raw == payload
    assert only_request(upstream).header("accept-encoding") == "gzip"


def test_upstream_status_and_headers_are_relayed(proxy_url: str, upstream: RecordingUpstream) -> None:
    upstream.reset(
        Behaviour(status=418, body=b"teapot", headers=[("X-Up", "1"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")])
    )
    r = httpx.get(proxy_url + "/t")
    assert (r.status_code, r.content, r.headers["x-up"]) == (418, b"teapot", "1")
    assert r.headers.get_list("set-cookie") == ["a=1", "b=2"]


def test_the_answer_has_one_date_and_one_server_header_ours_not_a_second_from_the_upstream(
    proxy_url: str, upstream: RecordingUpstream
) -> None:
    # Both servers are uvicorn and each stamps Date and Server: relayed as is, the answer would carry two of each
    # (Date is a singleton field; strict clients refuse the answer). The upstream's own go, as nginx does it.
    upstream.reset(Behaviour(body=b"ok", headers=[("Server", "upstream/1.0"), ("X-Up", "1")]))
    r = httpx.get(proxy_url + "/t")
    assert r.status_code == 200 and r.headers["x-up"] == "1"
    assert len(r.headers.get_list("date")) == 1
    assert r.headers.get_list("server") == ["uvicorn"]


def test_redirects_are_relayed_not_followed(proxy_url: str, upstream: RecordingUpstream) -> None:
    upstream.reset(Behaviour(status=302, body=b"", headers=[("Location", "http://169.254.169.254/latest")]))
    r = httpx.get(proxy_url + "/r")
    assert (r.status_code, r.headers["location"]) == (302, "http://169.254.169.254/latest")
    assert len(upstream.requests) == 1


def test_upstream_cookies_are_not_shared_between_clients(upstream_url: str, upstream: RecordingUpstream) -> None:
    # "localhost", not an IP: aiohttp's default jar would ignore cookies for a bare IP and hide the leak.
    upstream.reset(Behaviour(body=b"", headers=[("Set-Cookie", "session=victim; Path=/")]))
    with proxy_for(upstream_url.replace("127.0.0.1", "localhost")) as url:
        httpx.get(url + "/login")
        upstream.reset()
        httpx.get(url + "/other")
    assert only_request(upstream).header("cookie") is None


def test_head_has_no_body(proxy_url: str, upstream: RecordingUpstream) -> None:
    upstream.reset(Behaviour(body=b"hello world"))
    status, headers, body = raw_http(proxy_url, b"HEAD /h HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert (status, headers["content-length"], body) == (200, "11", b"")
    assert only_request(upstream).method == "HEAD"


# --- upstream failures (threat 16) -----------------------------------------------------------------------------


def test_unreachable_upstream_is_502() -> None:
    with proxy_for(f"http://127.0.0.1:{closed_port()}") as url:
        r = httpx.get(url + "/x")
    assert r.status_code == 502
    assert r.json()["error"] == "upstream_unreachable"


def test_slow_upstream_is_504(upstream_url: str, upstream: RecordingUpstream) -> None:
    upstream.reset(Behaviour(delay=3))
    with proxy_for(upstream_url, read_timeout=0.3) as url:
        started = time.monotonic()
        r = httpx.get(url + "/slow")
    assert r.status_code == 504
    assert r.json()["error"] == "upstream_timeout"
    assert time.monotonic() - started < 2


def test_upstream_failure_after_start_truncates_instead_of_answering_twice(
    upstream_url: str, upstream: RecordingUpstream
) -> None:
    gate = threading.Event()
    upstream.reset(Behaviour(chunks=[b"partial", b"rest"], gate=gate, gate_timeout=3))
    with proxy_for(upstream_url, read_timeout=0.3) as url, httpx.stream("GET", url + "/t") as r:
        assert r.status_code == 200
        with pytest.raises(httpx.RemoteProtocolError):  # the chunked stream ends without its terminator
            b"".join(r.iter_raw())
    gate.set()


async def test_failure_after_start_raises_and_never_sends_a_second_start(
    upstream_url: str, upstream: RecordingUpstream
) -> None:
    gate = threading.Event()
    upstream.reset(Behaviour(chunks=[b"partial", b"rest"], gate=gate, gate_timeout=3))
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    proxy = UpstreamProxy(upstream_url, read_timeout=0.3)
    scope = {"type": "http", "method": "GET", "path": "/", "raw_path": b"/", "query_string": b"", "headers": []}
    try:
        with pytest.raises(UpstreamAborted):
            await proxy(scope, receive, send)
    finally:
        gate.set()
        await proxy.aclose()
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[1]["more_body"] is True


def test_client_disconnect_aborts_upstream_request(upstream_url: str, upstream: RecordingUpstream) -> None:
    upstream.reset(Behaviour(delay=3))
    with proxy_for(upstream_url) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.get(url + "/slow", timeout=0.3)
        deadline = time.monotonic() + 2
        while not (upstream.requests and upstream.requests[0].aborted) and time.monotonic() < deadline:
            time.sleep(0.02)
    assert upstream.requests[0].aborted


async def test_proxy_runs_on_the_callers_loop(upstream_url: str, upstream: RecordingUpstream) -> None:
    proxy = UpstreamProxy(upstream_url)
    async with serve_asgi_async(proxy, lifespan="on") as url, httpx.AsyncClient() as client:
        r = await client.post(url + "/async?x=1", content=b"abc")
    assert r.json()["body_length"] == 3
    assert only_request(upstream).query == b"x=1"
