"""An attacker's raw sockets against the served gateway: uvicorn + httptools with the gateway's own guards
(gateway/http/server.py), the payment middleware, the proxy and its upstream pool, as ``x402-gateway serve`` runs
them. What must hold: nothing priced is served unpaid, one payment never pays for two upstream requests, the
upstream sees the request that was priced, and no client's bytes end up in another client's answer.

Each test is named for the property it protects.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httptools
import httpx
import pytest
from eth_account import Account

from gateway.client.exact import choose_requirement, parse_challenge, sign_exact_payment
from gateway.dev.chain import DevChain
from gateway.http.app import build_app
from gateway.http.server import HEAD_SLACK_BYTES, guarded_protocol
from tests.support.gateway import GatewayUnderTest, gateway_config, network_name, sqlite_url
from tests.support.servers import Behaviour, RecordingUpstream, serve_asgi

PRICE = 100_000  # POST /paid and POST /paid-before (tests/support/gateway.py DEFAULT_ROUTES)
Answer = tuple[int, dict[str, str], bytes]


# --- harness: the gateway as `serve` runs it, raw sockets, and answers read off a kept-alive connection ----------


@contextlib.contextmanager
def served(
    chain: DevChain,
    tmp_path: Path,
    *,
    upstream_app: Any = None,
    upstream_url: str | None = None,
    **sections: Any,
) -> Iterator[GatewayUnderTest]:
    """``build_app`` under uvicorn with the guarded httptools protocol and the options ``cmd_serve`` passes;
    the upstream is ``upstream_app`` (a RecordingUpstream by default) or the server at ``upstream_url``."""
    upstream = upstream_app or RecordingUpstream()
    with contextlib.ExitStack() as stack:
        if upstream_url is None:
            upstream_url = stack.enter_context(serve_asgi(upstream))
        config = gateway_config(
            [chain],
            upstream_url=upstream_url,
            store_url=sqlite_url(tmp_path),
            pay_to=Account.create().address,
            **sections,
        )
        app = build_app(config)
        server = config.server
        protocol = guarded_protocol(
            max_head_bytes=server.max_header_bytes + HEAD_SLACK_BYTES,
            head_timeout=server.header_read_timeout,
            drain_timeout=server.body_read_timeout,
        )
        url = stack.enter_context(
            serve_asgi(app, lifespan="on", http=protocol, server_header=False, date_header=False)  # type: ignore[arg-type]
        )
        yield GatewayUnderTest(
            url=url,
            config=config,
            upstream=upstream,
            chains={network_name(chain): chain},
            pay_to=config.payment.pay_to,
            app=app,
        )


@pytest.fixture(scope="module")
def gateway(base_chain: DevChain, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayUnderTest]:
    with served(base_chain, tmp_path_factory.mktemp("raw")) as gw:
        yield gw


@pytest.fixture
def gw(gateway: GatewayUnderTest) -> GatewayUnderTest:
    gateway.upstream.reset()
    return gateway


def connect(url: str, timeout: float = 10.0) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=timeout)


class _Answers:
    """httptools callbacks collecting every answer on one connection."""

    def __init__(self) -> None:
        self.done: list[Answer] = []
        self.headers: dict[str, str] = {}
        self.body = b""
        self.parser: Any = None

    def on_message_begin(self) -> None:
        self.headers, self.body = {}, b""

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.done.append((self.parser.get_status_code(), self.headers, self.body))


def read_answers(sock: socket.socket, count: int) -> list[Answer]:
    """Up to ``count`` answers (fewer if the server closes first). No HEAD answers: the parser expects bodies."""
    answers = _Answers()
    answers.parser = parser = httptools.HttpResponseParser(answers)
    with contextlib.suppress(TimeoutError, ConnectionResetError):
        while len(answers.done) < count:
            data = sock.recv(65536)
            if not data:
                break
            parser.feed_data(data)
    return answers.done


def sign_for(url: str, payer: Any, method: str, path: str) -> tuple[str, str]:
    challenge = httpx.request(method, url + path)
    assert challenge.status_code == 402
    return sign_exact_payment(payer, choose_requirement(parse_challenge(challenge.headers, challenge.content)))


# --- what the upstream sees is what was priced -----------------------------------------------------------------


@pytest.mark.parametrize(
    "request_line",
    [
        b"HEAD /cheap HTTP/1.1",  # HEAD of a priced GET is priced: upstreams run their GET handler for it
        b"GET http://other.example/cheap HTTP/1.1",  # absolute-form: priced on its path, its authority ignored
        b"GET http://other.example:8080/cheap?x=1 HTTP/1.1",
        b"GET /cheap#/../free HTTP/1.1",  # a fragment never reaches the upstream, so it cannot move the path
    ],
)
def test_head_and_absolute_form_targets_are_priced_like_their_path(gw: GatewayUnderTest, request_line: bytes) -> None:
    sock = connect(gw.url)
    sock.sendall(request_line + b"\r\nHost: gw.test\r\nConnection: close\r\n\r\n")
    data = b""
    with contextlib.suppress(TimeoutError, ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    sock.close()
    assert data.startswith(b"HTTP/1.1 402 "), data[:200]
    assert gw.upstream.requests == []


SMUGGLED = b"GET /free/smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
CHUNKED_POST = b"POST /free/front HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize(
    "framing",
    [
        b"POST /free/front HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST /free/front HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        b"POST /free/front HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n",
        CHUNKED_POST.replace(b"\r\n\r\n", b"\r\nTransfer-Encoding: chunked\r\n\r\n") + b"0\r\n\r\n",
        b"POST /free/front HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n",
        b"POST /free/front HTTP/1.1\r\nHost: x\r\nContent-Length: 0, 0\r\n\r\n",
        b"POST /free/front HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
        b"POST /free/front HTTP/1.1\r\nHost: x\r\nX-A: a\r\n Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",  # obs-fold
        b"POST /free/front HTTP/1.1\nHost: x\nContent-Length: 0\n\n",  # bare LF
        b"POST /free/front HTTP/1.1\r\nHost: x\r\nX-A: a\rContent-Length: 0\r\n\r\n",  # bare CR
        b"POST /free/front HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\nContent-Length: 0\r\n\r\n",  # NUL
        CHUNKED_POST + b"10000000000000001\r\nx\r\n0\r\n\r\n",  # chunk size overflowing 64 bits
        CHUNKED_POST + b'1;a="\r\n"\r\nx\r\n0\r\n\r\n',  # a line break inside a quoted chunk extension
        CHUNKED_POST + b"1\nx\n0\n\n",  # bare LF after the chunk size
        CHUNKED_POST + b"1\r\nxy0\r\n\r\n",  # chunk data longer than its size
    ],
    ids=[
        "cl-and-te",
        "te-chunked-identity",
        "te-identity",
        "te-twice",
        "cl-twice",
        "cl-list",
        "space-before-colon",
        "obs-fold",
        "bare-lf",
        "bare-cr",
        "nul",
        "chunk-size-overflow",
        "chunk-ext-line-break",
        "chunk-bare-lf",
        "chunk-overrun",
    ],
)
def test_ambiguous_framings_are_refused_and_nothing_behind_them_reaches_the_upstream(
    gw: GatewayUnderTest, framing: bytes
) -> None:
    """A framing a front proxy and the gateway could read differently is a 400 and the connection ends: no
    request hidden behind it (or inside it) is ever parsed, priced or forwarded."""
    sock = connect(gw.url)
    sock.sendall(framing + SMUGGLED)
    answers = read_answers(sock, 2)
    sock.close()
    assert [status for status, _, _ in answers] == [400]
    assert [r.path for r in gw.upstream.requests if r.complete] == []
    assert all(r.path != "/free/smuggled" for r in gw.upstream.requests)


def test_the_body_of_a_refused_request_is_never_read_as_a_request(gw: GatewayUnderTest) -> None:
    """A 402 sent before the body (Expect: 100-continue, no 100 sent) leaves the body to be discarded by its
    declared length: a request hidden in it is never served, and the one after it is."""
    sock = connect(gw.url)
    sock.sendall(
        b"POST /paid HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(SMUGGLED)
    )
    (first,) = read_answers(sock, 1)
    assert first[0] == 402
    sock.sendall(SMUGGLED + b"GET /free/after HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    rest = read_answers(sock, 2)
    sock.close()
    assert [status for status, _, _ in rest] == [200]
    assert [r.path for r in gw.upstream.requests] == ["/free/after"]


def test_a_transfer_coding_besides_chunked_is_refused_not_forwarded_as_other_bytes(gw: GatewayUnderTest) -> None:
    """``gzip, chunked``: the server takes the chunks off and what is left is still gzip. Forwarded without its
    coding, the upstream would read other bytes than the client sent: 501, nothing reaches the upstream."""
    sock = connect(gw.url)
    body = b"5\r\nhello\r\n0\r\n\r\n"
    sock.sendall(b"POST /free/front HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n" + body)
    answers = read_answers(sock, 1)
    sock.close()
    assert [status for status, _, _ in answers] == [501]
    assert b"unsupported_transfer_coding" in answers[0][2]
    assert gw.upstream.requests == []


@pytest.mark.parametrize(
    "host", [b"evil.example@gw", b"a/../cheap", b"gw\\x", b"gw:80/x", b"<b>", b"x'onmouseover=alert(1)", b"gw:99999"]
)
def test_a_malformed_host_never_reaches_the_upstream_as_a_forwarded_host(gw: GatewayUnderTest, host: bytes) -> None:
    """The upstream trusts X-Forwarded-Host (the gateway sets it, from the request's Host): only a host and a
    port may go there, never user-info, a path or markup."""
    sock = connect(gw.url)
    sock.sendall(b"GET /free/x HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n")
    answers = read_answers(sock, 1)
    sock.close()
    assert [status for status, _, _ in answers] == [400]
    assert b"invalid_host" in answers[0][2]
    assert gw.upstream.requests == []


@pytest.mark.parametrize(
    "host",
    [b"api.example.com", b"gw.example:8443", b"[::1]:8080", b"127.0.0.1", b"xn--bcher-kva.example.", b"my_svc:80"],
)
def test_a_well_formed_host_goes_upstream_as_the_forwarded_host(gw: GatewayUnderTest, host: bytes) -> None:
    sock = connect(gw.url)
    sock.sendall(b"GET /free/x HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n")
    answers = read_answers(sock, 1)
    sock.close()
    assert [status for status, _, _ in answers] == [200]
    (seen,) = gw.upstream.requests
    assert seen.header("x-forwarded-host") == host.decode()


# --- an upgrade the gateway does not take ---------------------------------------------------------------------

UPGRADE_POST = b"POST /free/front HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n"


@pytest.mark.parametrize(
    ("framing", "body"),
    [
        (b"Content-Length: %d" % len(SMUGGLED), SMUGGLED),
        (b"Transfer-Encoding: chunked", b"%x\r\n%b\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED)),
    ],
    ids=["content-length", "chunked"],
)
def test_an_upgrade_offer_never_hides_its_body_from_the_gateways_parser(
    gw: GatewayUnderTest, framing: bytes, body: bytes
) -> None:
    """Failed before (gateway/http/server.py): llhttp takes any request with ``Connection: Upgrade`` and an
    ``Upgrade`` header for a protocol switch and skips its body; uvicorn runs one that is not a WebSocket as a plain
    request. So the body a front proxy sends behind the head (it ignores the offer, as HTTP allows) was parsed as
    the requests that follow: ``/free/smuggled`` was answered as a second request on the connection (a front proxy
    hands that answer to its next client), while the upstream got the POST with a declared length and no bytes,
    waiting for the start of whatever request came next on its connection."""
    sock = connect(gw.url, timeout=5)
    sock.sendall(UPGRADE_POST + framing + b"\r\n\r\n")
    time.sleep(0.2)  # the body in a read of its own, as a front proxy streams it
    with contextlib.suppress(OSError):  # the gateway may have closed the connection already
        sock.sendall(body)
    answers = read_answers(sock, 2)
    sock.close()
    assert [status for status, _, _ in answers] == [400]
    assert answers[0][1]["content-type"] == "application/json"  # the gateway's error, with its reason
    assert b"unsupported_upgrade" in answers[0][2]
    assert gw.upstream.requests == []


def test_an_upgrade_the_gateway_does_not_take_is_answered_as_a_plain_request_and_ends_the_connection(
    gw: GatewayUnderTest,
) -> None:
    """Failed before: llhttp stops parsing the read an upgrade request came in, so a request pipelined behind an
    ``h2c`` offer was dropped without an answer while the connection stayed open (the client waits for ever). The
    offer is answered as a plain request, upstream without the hop-by-hop ``Upgrade``, with ``Connection: close``."""
    sock = connect(gw.url, timeout=5)
    sock.sendall(
        b"GET /free/h2c HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
        b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\nGET /free/after HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    answers = read_answers(sock, 2)
    closed = sock.recv(1) == b""
    sock.close()
    assert [(status, headers.get("connection")) for status, headers, _ in answers] == [(200, "close")]
    assert closed
    (rec,) = gw.upstream.requests
    assert (rec.path, rec.header("upgrade"), rec.header("http2-settings")) == ("/free/h2c", None, None)


# --- one keep-alive connection, several clients' worth of requests --------------------------------------------


def test_pipelined_requests_each_get_their_own_payment_credentials_and_answer(
    base_chain: DevChain, tmp_path: Path
) -> None:
    """Free, paid, unpaid and replayed requests pipelined on one connection: only the paid one is served as paid
    (receipt, upstream credentials); the payment never carries over to the requests after it, the answers come
    back in order, and a request inside a paid body reaches the upstream as that body, not as a request."""
    payer = base_chain.new_payer(1_000_000)
    with served(base_chain, tmp_path, upstream={"headers": {"X-Api-Key": "upstream-secret"}}) as gw:
        name, value = sign_for(gw.url, payer, "POST", "/paid")
        paid = f"POST /paid HTTP/1.1\r\nHost: x\r\n{name}: {value}\r\nContent-Length: {len(SMUGGLED)}\r\n\r\n"
        sock = connect(gw.url)
        sock.sendall(
            b"GET /free/1 HTTP/1.1\r\nHost: x\r\n\r\n"
            + paid.encode()
            + SMUGGLED
            + b"POST /paid HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nfree"
            + b"GET /free/2 HTTP/1.1\r\nHost: x\r\n\r\n"
            + paid.encode()
            + SMUGGLED
            + b"GET /free/3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        answers = read_answers(sock, 6)
        sock.close()
        assert [status for status, _, _ in answers] == [200, 200, 402, 200, 402, 200]
        assert ["payment-response" in headers for _, headers, _ in answers] == [False, True] + [False] * 4
        assert b'"error":"payment_already_used"' in answers[4][2]
        seen = [(r.method, r.path, r.body, r.header("x-api-key")) for r in gw.upstream.requests]
        assert seen == [
            ("GET", "/free/1", b"", None),
            ("POST", "/paid", SMUGGLED, "upstream-secret"),
            ("GET", "/free/2", b"", None),
            ("GET", "/free/3", b"", None),
        ]


def test_pipelined_requests_in_one_write_are_all_answered_whatever_their_total_size(gw: GatewayUnderTest) -> None:
    """Failed before (gateway/http/server.py, _GuardedHttpTools.data_received): the head cap is applied to the first
    ``max_head_bytes`` of a read, whatever requests end inside it. A body-carrying request followed by a pipelined
    one in a single write, where that next head straddles the cap's boundary, gets the connection closed without
    any answer (not even for the first request, which was complete and well inside every limit)."""
    cap = gw.config.server.max_header_bytes + HEAD_SLACK_BYTES
    head = b"POST /free/first HTTP/1.1\r\nHost: x\r\nContent-Length: %05d\r\n\r\n"
    body = b"b" * (cap - len(head % 0) - 10)  # the next head starts 10 bytes before the cap
    sock = connect(gw.url)
    sock.sendall(head % len(body) + body + b"GET /free/second HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    answers = read_answers(sock, 2)
    sock.close()
    assert [status for status, _, _ in answers] == [200, 200]


# --- trailers ----------------------------------------------------------------------------------------------------


def test_trailer_fields_never_become_request_headers(base_chain: DevChain, tmp_path: Path) -> None:
    """Failed before: llhttp hands a chunked body's trailer fields to ``on_header`` like header fields, and uvicorn's
    httptools protocol appends them to ``scope["headers"]`` (the very list the app reads). So a trailer is read as
    a request header by every layer, and forwarded upstream as one (RFC 9110 6.5.1: a recipient must not merge
    trailers into the header section). With ``trust_forwarded_headers`` the client address is the *last*
    ``X-Forwarded-For`` (gateway/http/app.py, _forwarded_client), so a client whose trusted proxy relays request
    trailers (HAProxy, Go-based proxies) picks its own address: every per-address limit (challenge rate, invalid
    payment limiter, uploads per client) is reset at will, and the upstream's ``X-Forwarded-For`` is forged."""
    with served(base_chain, tmp_path, server={"trust_forwarded_headers": True}) as gw:
        sock = connect(gw.url)
        sock.sendall(
            b"POST /free/t HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 203.0.113.7\r\n"  # appended by the trusted proxy
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            b"3\r\nabc\r\n0\r\nX-Forwarded-For: 6.6.6.6\r\nX-Trailer-Only: t\r\n\r\n"
        )
        (answer,) = read_answers(sock, 1)
        sock.close()
        assert answer[0] == 200
        (rec,) = gw.upstream.requests
        assert rec.body == b"abc"
        assert rec.header_values("x-forwarded-for") == ["203.0.113.7"]
        assert rec.header("x-trailer-only") is None


# --- hanging up after the upstream took a paid request --------------------------------------------------------


@pytest.mark.parametrize("route", ["/paid", "/paid-before"])
def test_hanging_up_after_the_upstream_took_a_paid_request_does_not_make_it_free_to_repeat(
    base_chain: DevChain, tmp_path: Path, route: str
) -> None:
    """Failed before: a payer sends a paid request, waits until the upstream has all of it (the work is under way), and
    hangs up. The disconnect watcher (gateway/http/proxy.py, _watch_disconnect) cancels the exchange; under
    ``after`` nothing settles and the claim is released, under ``before`` the settled payment is left unserved for
    a free retry. Either way the same payment is good again: N hang-ups and one final request make the upstream
    do the paid work N+1 times for one price (N+1 times for nothing under ``after``, if every attempt hangs up)."""
    upstream = RecordingUpstream(Behaviour(delay=1.0))  # a slow priced call: an LLM, a render, a search
    payer = base_chain.new_payer(1_000_000)
    with served(base_chain, tmp_path, upstream_app=upstream) as gw:
        before = gw.balance(payer.address)
        name, value = sign_for(gw.url, payer, "POST", route)
        sock = connect(gw.url)
        sock.sendall(f"POST {route} HTTP/1.1\r\nHost: x\r\n{name}: {value}\r\nContent-Length: 4\r\n\r\nwork".encode())
        assert upstream.wait_for_body_bytes(4)  # the upstream has the whole paid request
        time.sleep(0.2)
        sock.close()
        time.sleep(1.5)  # whatever the gateway does with the upstream's answer, it is done
        upstream.behaviour = Behaviour()
        retry = httpx.post(gw.url + route, headers={name: value}, content=b"work", timeout=30)
        carried_out = [r for r in upstream.requests if r.complete]
        assert (len(carried_out), gw.balance(payer.address)) == (1, before - PRICE), retry.text[:200]


# --- the upstream pool: one client's answer never reaches another ---------------------------------------------

FORGED = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 13\r\n\r\nforged answer"


class BodyAfterBodilessAnswer:
    """An upstream that writes a body where HTTP says there is none, in a write of its own: the body of a HEAD
    answer (gunicorn passes on whatever a WSGI app returns for HEAD, benoitc/gunicorn#2598; Django leaves the
    stripping to the server) or of a 204 (benoitc/gunicorn#3413). Here that body is a whole HTTP answer, as a page
    reflecting the attacker's input could be. Every other request gets ``the real answer to <path>``."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        with conn, contextlib.suppress(OSError):
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                method, target = head.split(b" ")[:2]
                if method == b"HEAD" or target == b"/free/no-content":
                    time.sleep(0.3)  # slow enough for the victim's request to queue for this connection
                    status = b"200 OK" if method == b"HEAD" else b"204 No Content"
                    conn.sendall(b"HTTP/1.1 %s\r\ncontent-length: %d\r\n\r\n" % (status, len(FORGED)))
                    time.sleep(0.05)
                    conn.sendall(FORGED)
                else:
                    body = b"the real answer to " + target
                    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))


@pytest.mark.parametrize("attack", [b"HEAD /free/page", b"GET /free/no-content"], ids=["head", "204"])
def test_a_body_sent_after_a_bodiless_answer_never_answers_another_clients_request(
    base_chain: DevChain, tmp_path: Path, attack: bytes
) -> None:
    """Failed before (gateway/http/upstream/connection.py): a HEAD (or 204) answer is complete at its headers, and its
    connection goes straight back to the pool, here to a paying victim queued for it. The stray body arriving
    next is parsed as the answer to the victim's request: the victim is charged and served the attacker's bytes,
    and its real answer is thrown away with the connection."""
    upstream = BodyAfterBodilessAnswer()
    payer = base_chain.new_payer(1_000_000)
    try:
        with served(
            base_chain, tmp_path, upstream_url=upstream.url, upstream={"max_connections": 1, "read_timeout": 10.0}
        ) as gw:
            name, value = sign_for(gw.url, payer, "GET", "/cheap")
            attacker = connect(gw.url)
            attacker.sendall(attack + b" HTTP/1.1\r\nHost: x\r\n\r\n")
            time.sleep(0.1)  # the attacker's request holds the one upstream connection
            victim = httpx.get(gw.url + "/cheap", headers={name: value}, timeout=10)
            attacker.close()
            assert victim.content == b"the real answer to /cheap"
    finally:
        upstream.close()


class _NotModifiedWithLength:
    """A raw upstream answering every request ``304`` with a ``Content-Length: 100`` (RFC 9110 allows a 304 to
    repeat the representation's length) and no body, on one kept-alive connection."""

    def __init__(self) -> None:
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _serve(conn: socket.socket) -> None:
        buf = b""
        with conn, contextlib.suppress(OSError):
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                _, _, buf = buf.partition(b"\r\n\r\n")
                conn.sendall(b'HTTP/1.1 304 Not Modified\r\ncontent-length: 100\r\netag: "x"\r\n\r\n')

    def close(self) -> None:
        self._listener.close()


def test_a_not_modified_answer_that_declares_a_length_reaches_the_client_whole(
    base_chain: DevChain, tmp_path: Path
) -> None:
    """A 304 relayed with the length it declared made the gateway's server wait for body bytes that never come:
    the client got the head, then a reset connection. Relayed without the length, both answers arrive on one
    client connection."""
    upstream = _NotModifiedWithLength()
    try:
        with served(base_chain, tmp_path, upstream_url=upstream.url) as gw, httpx.Client(timeout=10) as client:
            for path in ("/free/x", "/free/y"):
                answer = client.get(gw.url + path, headers={"if-none-match": '"x"'})
                assert answer.status_code == 304 and answer.headers["etag"] == '"x"'
                assert answer.content == b""
    finally:
        upstream.close()


# --- request heads are timed, each from its own first byte --------------------------------------------------------


def test_a_head_trickled_on_a_kept_alive_connection_is_cut_off_at_its_own_deadline(
    base_chain: DevChain, tmp_path: Path
) -> None:
    """A connection keeps one head timer across its requests: the timer armed for the first request is still pending
    when the second one's head starts. Firing at the first one's deadline, it must neither cut the second head short
    nor forget it: the second head gets its full ``header_read_timeout`` from its own first byte, then 408."""
    with served(base_chain, tmp_path, server={"header_read_timeout": 1.0}) as gw:
        sock = connect(gw.url)
        sock.sendall(b"GET /free/first HTTP/1.1\r\nHost: x\r\n\r\n")  # its head's deadline: ~1 s from the connect
        (first,) = read_answers(sock, 1)
        assert first[0] == 200
        time.sleep(0.5)
        sock.sendall(b"GET /free/second HTTP/1.1\r\n")  # and nothing more: past the first deadline, well within its own
        started = time.monotonic()
        data = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                data += chunk
        elapsed = time.monotonic() - started
        sock.close()
        assert data.startswith(b"HTTP/1.1 408 ")
        assert 0.9 <= elapsed < 3.0, elapsed
        assert [r.path for r in gw.upstream.requests] == ["/free/first"]
