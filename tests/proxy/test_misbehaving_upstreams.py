"""Upstreams that are not well-behaved, behind the gateway as ``x402-gateway serve`` runs it (uvicorn with the guarded
httptools protocol, the payment middleware, the proxy and its pool), for paid and free routes.

The upstream is a raw asyncio server of this file's own, so every byte it writes is under the test's control:
interim answers, answers cut short, garbled or oddly framed, heads that never end, trailers. What must hold, whatever
it writes: nothing is served unpaid, nobody is charged for an answer that was not delivered (a paid ``GET /cheap``
settles only on a 2xx, docs/threat-model.md T11), a fault upstream is a 5xx and never a 402, no request hangs past
``upstream.read_timeout``, and nothing an upstream wrote for one request reaches another.

Each test is named for the property it protects.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httptools
import httpx
import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount

from gateway.client.exact import choose_requirement, parse_challenge, sign_exact_payment
from gateway.dev.chain import DevChain
from gateway.http.app import build_app
from gateway.http.server import HEAD_SLACK_BYTES, guarded_protocol
from tests.support.gateway import gateway_config, sqlite_url
from tests.support.servers import serve_asgi

PRICE = 10_000  # GET /cheap (tests/support/gateway.py DEFAULT_ROUTES), settled after a 2xx
PAID_PRICE = 100_000  # POST /paid, settled after a 2xx
READ_TIMEOUT = 2.0
OK = b"HTTP/1.1 200 OK\r\ncontent-length: 12\r\n\r\nthe content."

# Writes the answer to one request (the request as read: head and body); returns whether to read another request
# on the connection.
Script = Callable[[bytes, asyncio.StreamWriter], Awaitable[bool]]


# --- a raw upstream on its own event loop ------------------------------------------------------------------------


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """One request as the gateway frames it (a Content-Length or a chunked body, or none), raw."""
    head = await reader.readuntil(b"\r\n\r\n")
    lower = head.lower()
    if b"content-length:" in lower:
        return head + await reader.readexactly(int(lower.split(b"content-length:")[1].split(b"\r\n")[0]))
    body = b""
    if b"transfer-encoding: chunked" in lower:
        while True:
            size_line = await reader.readuntil(b"\r\n")
            body += size_line + await reader.readexactly(int(size_line.strip(), 16) + 2)
            if size_line.strip() == b"0":
                break
    return head + body


class RawUpstream:
    """An asyncio server in a thread of its own; each request is answered by the current :attr:`script`."""

    def __init__(self) -> None:
        self.script: Script = answer(OK)
        self.requests: list[bytes] = []
        self.connections = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="raw-upstream")
        self._thread.start()
        self._server = self._run(asyncio.start_server(self._on_connect, "127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    def _run(self, coro: Awaitable[Any]) -> Any:
        async def run() -> Any:
            return await coro

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    def reset(self, script: Script) -> None:
        self.script = script
        self.requests = []

    def paths(self) -> list[bytes]:
        return [request.split(b" ", 2)[1] for request in self.requests]

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while True:
                request = await read_request(reader)
                self.requests.append(request)
                if not await self.script(request, writer):
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    def close(self) -> None:
        async def stop() -> None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()

        self._run(stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


def answer(raw: bytes, *, keep: bool = True) -> Script:
    """Write ``raw`` in one write; then read the next request (``keep``) or close the connection."""

    async def script(request: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(raw)
        await writer.drain()
        return keep

    return script


def by_path(scripts: dict[bytes, Script], default: Script) -> Script:
    async def script(request: bytes, writer: asyncio.StreamWriter) -> bool:
        return await scripts.get(request.split(b" ", 2)[1], default)(request, writer)

    return script


# --- the gateway, and a client reading raw answers ---------------------------------------------------------------


class Gateway:
    def __init__(self, url: str, chain: DevChain) -> None:
        self.url = url
        self.chain = chain

    def pay(self, payer: LocalAccount, method: str = "GET", path: str = "/cheap") -> dict[str, str]:
        challenge = httpx.request(method, self.url + path, timeout=10)
        assert challenge.status_code == 402
        name, value = sign_exact_payment(
            payer, choose_requirement(parse_challenge(challenge.headers, challenge.content))
        )
        return {name: value}

    def get(self, path: str, headers: dict[str, str] | None = None, *, method: str = "GET") -> Answer:
        return raw_request(self.url, method, path, headers)


@pytest.fixture(scope="module")
def upstream() -> Iterator[RawUpstream]:
    up = RawUpstream()
    try:
        yield up
    finally:
        up.close()


@pytest.fixture(scope="module")
def gateway(base_chain: DevChain, tmp_path_factory: pytest.TempPathFactory, upstream: RawUpstream) -> Iterator[Gateway]:
    """One upstream connection at most: a connection the pool wrongly kept would carry the very next request."""
    with served(base_chain, tmp_path_factory.mktemp("misbehaving"), upstream.url) as url:
        yield Gateway(url, base_chain)


@pytest.fixture
def gw(gateway: Gateway, upstream: RawUpstream) -> Gateway:
    upstream.reset(answer(OK))
    return gateway


@contextlib.contextmanager
def served(chain: DevChain, tmp_path: Path, upstream_url: str) -> Iterator[str]:
    """``build_app`` under uvicorn with the guarded httptools protocol and the options ``cmd_serve`` passes."""
    config = gateway_config(
        [chain],
        upstream_url=upstream_url,
        store_url=sqlite_url(tmp_path),
        pay_to=Account.create().address,
        upstream={"read_timeout": READ_TIMEOUT, "max_connections": 1},
    )
    server = config.server
    protocol = guarded_protocol(
        max_head_bytes=server.max_header_bytes + HEAD_SLACK_BYTES,
        head_timeout=server.header_read_timeout,
        drain_timeout=server.body_read_timeout,
    )
    with serve_asgi(
        build_app(config),
        lifespan="on",
        http=protocol,  # type: ignore[arg-type]
        server_header=False,
        date_header=False,
    ) as url:
        yield url


class Answer:
    """One answer as a client reads it off the wire: ``complete`` only if its framing ended where it said it would."""

    def __init__(self) -> None:
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.body = b""
        self.complete = False
        self.raw = b""

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k == name), None)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.complete = True


def raw_request(url: str, method: str, path: str, headers: dict[str, str] | None = None) -> Answer:
    """``method path`` (no body) on a connection of its own (``Connection: close``), read until the gateway closes
    it."""
    host, port = url.removeprefix("http://").split(":")
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    got = Answer()
    parser = httptools.HttpResponseParser(got)
    with socket.create_connection((host, int(port)), timeout=4 * READ_TIMEOUT) as sock:
        sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: gw.test\r\n{extra}Connection: close\r\n\r\n".encode())
        with contextlib.suppress(ConnectionResetError):
            while data := sock.recv(65536):
                got.raw += data
                if not got.complete:
                    parser.feed_data(data)
    if got.raw:
        got.status = parser.get_status_code()
    return got


def charged(gw: Gateway, payer: LocalAccount) -> int:
    return 1_000_000 - gw.chain.balance(payer.address)


# --- answers cut short -------------------------------------------------------------------------------------------


def test_a_paid_answer_the_upstream_cuts_short_is_a_502_that_charges_nothing(
    gw: Gateway, upstream: RawUpstream
) -> None:
    """Failed before: the payment settled on the 200 status line, then the upstream closed after 10 of the 100 bytes
    it declared. The payer was charged for a truncated answer, and the same payment could not be used again. A paid
    answer with a declared length (up to 1 MiB) is now read whole before its status line goes, so cut short it is a
    502 that never settles, and the same payment buys the answer once the upstream delivers it."""
    payer = gw.chain.new_payer(1_000_000)
    payment = gw.pay(payer)
    upstream.reset(answer(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n" + b"a" * 10, keep=False))
    cut = gw.get("/cheap", payment)
    assert (cut.status, cut.header("payment-response"), charged(gw, payer)) == (502, None, 0)
    assert b"a" * 10 not in cut.body
    upstream.reset(answer(OK))
    served = gw.get("/cheap", payment)
    assert (served.status, served.body, served.complete) == (200, b"the content.", True)
    assert served.header("payment-response") is not None
    assert charged(gw, payer) == PRICE


@pytest.mark.parametrize(
    "garbled",
    [
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n",  # not a chunk size
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1\r\nhello\r\n0\r\n\r\n",  # more data than its size
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\ncontent-length: 9\r\n\r\n",
    ],
    ids=["bad-chunk-size", "chunk-overrun", "content-length-trailer"],
)
def test_an_answer_garbled_in_the_read_its_head_came_in_is_a_502_not_a_truncated_200(
    gw: Gateway, upstream: RawUpstream, garbled: bytes
) -> None:
    """Failed before: the parser had already failed on the chunked body when the status line was relayed, so the paid
    request settled on a 200 and the client got the head and a cut connection. A failure known before the head
    goes out is a 502: nothing settled, and the connection is not reused."""
    payer = gw.chain.new_payer(1_000_000)
    upstream.reset(answer(garbled))
    got = gw.get("/cheap", gw.pay(payer))
    assert (got.status, got.header("payment-response"), charged(gw, payer)) == (502, None, 0)
    assert gw.get("/free/after").status == 502  # garbled again, for a free request too
    upstream.reset(answer(OK))
    assert gw.get("/free/after").body == b"the content."


@pytest.mark.parametrize("paid", [False, True], ids=["free", "paid"])
def test_a_streamed_answer_cut_short_never_reaches_a_client_as_a_complete_one(
    gw: Gateway, upstream: RawUpstream, paid: bool
) -> None:
    """The status line went out before the upstream closed mid-stream: the client must see a truncated answer (no
    terminating chunk, the connection closed), never a short body it would take for the whole one."""

    async def cut(request: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        await asyncio.sleep(0.2)  # after the head was relayed
        return False

    upstream.reset(cut)
    got = gw.get("/cheap", gw.pay(gw.chain.new_payer(1_000_000))) if paid else gw.get("/free/stream")
    assert (got.status, got.body, got.complete) == (200, b"hello", False)


# --- answers no client could be given as they are -------------------------------------------------------------


def test_trailer_fields_never_become_answer_headers(gw: Gateway, upstream: RawUpstream) -> None:
    """Failed before: llhttp reports a chunked answer's trailer fields like header fields, and they were appended to
    the answer's header list while it was still unsent: a ``Set-Cookie`` (or any field) written after the body was
    relayed as a header of the answer (RFC 9110 6.5.1 forbids merging trailers into the header section)."""
    payer = gw.chain.new_payer(1_000_000)
    upstream.reset(
        answer(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-late, set-cookie\r\n\r\n"
            b"c\r\nthe content.\r\n0\r\nx-late: 1\r\nset-cookie: session=forged\r\n\r\n"
        )
    )
    for got in (gw.get("/free/t"), gw.get("/cheap", gw.pay(payer))):
        assert (got.status, got.body, got.complete) == (200, b"the content.", True)
        assert got.header("x-late") is None and got.header("set-cookie") is None
    assert charged(gw, payer) == PRICE


@pytest.mark.parametrize("status", [b"999", b"000", b"099"])
def test_a_status_code_http_does_not_define_is_a_502(gw: Gateway, upstream: RawUpstream, status: bytes) -> None:
    """Failed before: llhttp takes any three digits, and uvicorn has no status line for them: it raised after
    marking the answer started, and closed the connection with nothing sent at all (no status, no error)."""
    payer = gw.chain.new_payer(1_000_000)
    upstream.reset(answer(b"HTTP/1.1 " + status + b" Odd\r\ncontent-length: 2\r\n\r\nok"))
    for got in (gw.get("/free/odd"), gw.get("/cheap", gw.pay(payer))):
        assert (got.status, got.complete) == (502, True)
    assert charged(gw, payer) == 0


@pytest.mark.parametrize(
    "framing",
    [
        b"transfer-encoding: gzip, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        b"transfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        b"transfer-encoding: gzip\r\n\r\nok",
    ],
    ids=["gzip-chunked", "chunked-twice", "gzip-until-close"],
)
def test_a_transfer_coding_the_gateway_does_not_decode_is_a_502_not_other_bytes(
    gw: Gateway, upstream: RawUpstream, framing: bytes
) -> None:
    """Failed before: only ``chunked`` is taken off, and ``Transfer-Encoding`` is hop-by-hop, so the body was
    relayed still coded (gzip bytes) under a header section that no longer says so, and the payment settled on it."""
    payer = gw.chain.new_payer(1_000_000)
    upstream.reset(answer(b"HTTP/1.1 200 OK\r\n" + framing, keep=False))
    for got in (gw.get("/free/coded"), gw.get("/cheap", gw.pay(payer))):
        assert got.status == 502
    assert charged(gw, payer) == 0


@pytest.mark.parametrize(
    "framing",
    [
        b"content-length: 2\r\ncontent-length: 2\r\n\r\nok",
        b"content-length: 2, 2\r\n\r\nok",
        b"content-length: 2\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        b"transfer-encoding: chunked\r\ncontent-length: 2\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    ],
    ids=["two-lengths", "length-list", "length-then-chunked", "chunked-then-length"],
)
def test_an_answer_framed_two_ways_is_a_502_that_charges_nothing(
    gw: Gateway, upstream: RawUpstream, framing: bytes
) -> None:
    """Two readings of where the answer ends (and a length that, relayed, would not match the body sent): refused
    at the head, before anything is relayed or settled."""
    payer = gw.chain.new_payer(1_000_000)
    upstream.reset(answer(b"HTTP/1.1 200 OK\r\n" + framing))
    got = gw.get("/cheap", gw.pay(payer))
    assert (got.status, charged(gw, payer)) == (502, 0)


# --- heads that take for ever ----------------------------------------------------------------------------------


def trickling(first: bytes, then: bytes) -> Script:
    """Writes ``first``, then ``then`` every 0.3 s until the gateway hangs up: bytes keep coming, no head ends."""

    async def script(request: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(first)
        while True:
            await writer.drain()
            await asyncio.sleep(0.3)
            writer.write(then)

    return script


@pytest.mark.parametrize(
    ("first", "then"),
    [
        (b"HTTP/1.1 102 Processing\r\n\r\n", b"HTTP/1.1 102 Processing\r\n\r\n"),
        (b"HTTP/1.1 103 Early Hints\r\n", b"link: </a.css>; rel=preload\r\n"),
        (b"HTTP/1.1 200 OK\r\nx-slow: ", b"a"),
    ],
    ids=["interim-answers", "endless-interim-head", "trickled-head"],
)
def test_an_upstream_that_keeps_writing_but_never_answers_is_a_504_that_charges_nothing(
    gw: Gateway, upstream: RawUpstream, first: bytes, then: bytes
) -> None:
    """Failed before (the client gave up waiting): the read timeout ran from the last byte received, so an upstream
    sending ``102 Processing`` every few seconds, or trickling its head, held the request for ever. The final head
    must come within ``read_timeout`` of the request, the longest the payment layer expects the upstream to take
    (an authorization must outlive it, docs/threat-model.md T32)."""
    payer = gw.chain.new_payer(1_000_000)
    payment = gw.pay(payer)
    upstream.reset(trickling(first, then))
    got = gw.get("/cheap", payment)
    assert (got.status, got.header("payment-response"), charged(gw, payer)) == (504, None, 0)
    assert b"upstream_timeout" in got.body
    upstream.reset(answer(OK))
    assert (gw.get("/cheap", payment).status, charged(gw, payer)) == (200, PRICE)  # the payment was still good


def test_an_answer_head_over_a_mebibyte_is_refused_not_buffered(gw: Gateway, upstream: RawUpstream) -> None:
    """Failed before: the head of an answer had no size bound (llhttp has none), so an upstream writing header
    fields without end made the gateway hold all of them. Past 1 MiB (what a connection buffers of a body before it
    pauses reading) it is a 502."""
    fields = b"".join(b"x-field-%d: %s\r\n" % (i, b"v" * 1000) for i in range(2000))
    upstream.reset(answer(b"HTTP/1.1 200 OK\r\n" + fields + b"content-length: 2\r\n\r\nok", keep=False))
    got = gw.get("/free/fat-head")
    assert (got.status, got.complete) == (502, True)


# --- well-formed but unusual: what already holds -----------------------------------------------------------------


def test_interim_answers_are_dropped_and_the_final_answer_is_paid_for_once(gw: Gateway, upstream: RawUpstream) -> None:
    payer = gw.chain.new_payer(1_000_000)
    upstream.reset(answer(b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\nHTTP/1.1 100 Continue\r\n\r\n" + OK))
    got = gw.get("/cheap", gw.pay(payer))
    assert got.raw.startswith(b"HTTP/1.1 200 ")  # no interim answer relayed (the server sends its own, if any)
    assert (got.body, got.header("link"), charged(gw, payer)) == (b"the content.", None, PRICE)


@pytest.mark.parametrize(
    "framing", [b"connection: keep-alive\r\n", b"transfer-encoding: identity\r\n"], ids=["keep-alive", "identity"]
)
def test_an_answer_delimited_by_close_is_relayed_whole_even_when_it_claims_keep_alive(
    gw: Gateway, upstream: RawUpstream, framing: bytes
) -> None:
    """No length, no chunks (``Connection: keep-alive`` all the same, or the no-op ``identity`` coding): the answer
    ends when the upstream closes, is relayed whole (re-framed for the client), and paid for once; the next request
    gets its own answer, on another connection."""
    payer = gw.chain.new_payer(1_000_000)
    until_close = answer(b"HTTP/1.1 200 OK\r\n" + framing + b"\r\n" + b"b" * 100_000, keep=False)
    upstream.reset(by_path({b"/cheap": until_close}, answer(OK)))
    got = gw.get("/cheap", gw.pay(payer))
    assert (got.status, got.body, got.complete, charged(gw, payer)) == (200, b"b" * 100_000, True, PRICE)
    assert gw.get("/free/next").body == b"the content."


@pytest.mark.parametrize(
    "extra",
    [
        b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 13\r\n\r\nforged answer",
        b"forged answer",
    ],
    ids=["second-answer", "garbage"],
)
def test_bytes_past_the_declared_end_of_an_answer_never_answer_the_next_request(
    gw: Gateway, upstream: RawUpstream, extra: bytes
) -> None:
    """An upstream writing more than the length it declared (in the same write): the extra bytes are never parsed as
    the answer to the next request on that connection, here a paying victim's."""
    payer = gw.chain.new_payer(1_000_000)
    upstream.reset(
        by_path({b"/free/attack": answer(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok" + extra)}, answer(OK))
    )
    assert gw.get("/free/attack").body == b"ok"
    victim = gw.get("/cheap", gw.pay(payer))
    assert (victim.status, victim.body, charged(gw, payer)) == (200, b"the content.", PRICE)


def test_connection_close_answers_never_break_the_requests_after_them(gw: Gateway, upstream: RawUpstream) -> None:
    """Every answer says ``Connection: close`` and the upstream closes: each request gets a fresh connection, none
    is sent on a closed one (a paid POST there would be a 502: a POST is never sent twice)."""
    payer = gw.chain.new_payer(1_000_000)
    upstream.reset(
        answer(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 12\r\n\r\nthe content.", keep=False)
    )
    for path in ("/free/1", "/free/2", "/free/3"):
        assert gw.get(path).body == b"the content."
    paid = gw.get("/paid", gw.pay(payer, "POST", "/paid"), method="POST")
    assert (paid.status, paid.body, charged(gw, payer)) == (200, b"the content.", PAID_PRICE)
    assert upstream.paths()[-4:] == [b"/free/1", b"/free/2", b"/free/3", b"/paid"]


# --- a client that leaves a paid stream -------------------------------------------------------------------------


def test_a_paid_stream_the_client_left_stops_holding_its_upstream_connection(
    gw: Gateway, upstream: RawUpstream
) -> None:
    """Failed before: a paid request the upstream has whole runs to its end when its client hangs up, so that its
    payment is settled on the status line and not made free to repeat (docs/threat-model.md T11). Once that status
    line has been relayed (and settled), nothing is left to wait for; but the exchange went on reading the answer for
    no one: an endless stream (server-sent events) held its upstream connection, one of those kept for paid
    requests, for ever after every client that left it."""
    payer = gw.chain.new_payer(1_000_000)
    ended = threading.Event()

    async def events(request: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        try:
            while True:
                writer.write(b"6\r\ndata:\n\r\n")
                await writer.drain()
                await asyncio.sleep(0.1)
        finally:
            ended.set()  # the gateway closed the connection: the write failed

    upstream.reset(events)
    host, port = gw.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        (name, value), *_ = gw.pay(payer).items()
        sock.sendall(f"GET /cheap HTTP/1.1\r\nHost: gw.test\r\n{name}: {value}\r\n\r\n".encode())
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
    assert ended.wait(10 * READ_TIMEOUT)
    assert charged(gw, payer) == PRICE  # the status line was relayed: settled, as for any hang-up after it
    upstream.reset(answer(OK))
    assert gw.get("/free/after").body == b"the content."  # the one upstream connection is free again


# --- upstreams that take no chunked request body -----------------------------------------------------------------


def length_only(request: bytes) -> bytes:
    """What an upstream that takes no chunked request body (uWSGI, PHP-FPM, an HTTP/1.0 server) answers: 411 to a
    chunked body, else 200 with the body it read."""
    head, _, body = request.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in head.lower():
        return b"HTTP/1.1 411 Length Required\r\ncontent-length: 0\r\n\r\n"
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)


def test_a_small_chunked_upload_reaches_an_upstream_that_takes_only_lengths_and_is_paid_for_once(
    gw: Gateway, upstream: RawUpstream
) -> None:
    """Failed before: a chunked request body (curl -T -, a fetch() with a stream, Node's http) went up chunked, and an
    upstream that takes none refused it (411) or read an empty body. A body that ends within the first 64 KiB the
    gateway reads before it takes a connection now goes up with its Content-Length, the same bytes."""

    async def script(request: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(length_only(request))
        await writer.drain()
        return True

    upstream.reset(script)
    payer = gw.chain.new_payer(1_000_000)
    challenge = httpx.post(gw.url + "/paid", timeout=10)
    assert challenge.status_code == 402
    name, value = sign_exact_payment(payer, choose_requirement(parse_challenge(challenge.headers, challenge.content)))
    body = b'{"prompt": "hello"}' * 100

    def chunked(path: str, extra: str = "") -> tuple[int, bytes]:
        host, port = gw.url.removeprefix("http://").split(":")
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:700], body[700:]))
        head = (
            f"POST {path} HTTP/1.1\r\nHost: gw.test\r\n{extra}Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        )
        with socket.create_connection((host, int(port)), timeout=4 * READ_TIMEOUT) as sock:
            sock.sendall(head.encode() + chunks + b"0\r\n\r\n")
            raw = b""
            with contextlib.suppress(ConnectionResetError):
                while data := sock.recv(65536):
                    raw += data
        status = int(raw.split(b" ", 2)[1])
        return status, raw.partition(b"\r\n\r\n")[2]

    assert chunked("/free/upload") == (200, body)
    status, answered = chunked("/paid", f"{name}: {value}\r\n")
    assert (status, answered) == (200, body)
    assert charged(gw, payer) == PAID_PRICE
    sent = upstream.requests[-1].lower()
    assert b"content-length: %d\r\n" % len(body) in sent and b"transfer-encoding" not in sent
