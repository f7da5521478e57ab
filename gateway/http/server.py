"""The HTTP/1.1 server protocol ``x402-gateway serve`` runs: uvicorn's httptools protocol plus the two limits it
lacks before a request reaches any ASGI layer (docs/threat-model.md T40).

uvicorn bounds an unfinished request head only with h11 (``h11_max_incomplete_event_size``). With httptools, llhttp
hands the URL and every header over in pieces and they are joined in memory until the head ends, so a head that
never ends grows without bound (measured: 10 connections sending 20 MB of one header each, +260 MB). And nothing
times a head out: uvicorn's keep-alive timer runs only between requests, so a connection that trickles its head, or
never sends a byte, holds a socket for ever. The gateway's own 431 (``server.max_header_bytes``, gateway/http/app.py)
runs only once the head is complete, too late for both.

:func:`guarded_protocol` returns uvicorn's protocol class with:

* a cap on the bytes of one request head (request line, headers, blank line): a connection whose head grows past
  it gets ``431`` and is closed before the parser holds more. The trailer block of a chunked body is a header
  block too (llhttp hands trailers over like headers): it has the same cap;
* a deadline for the head: ``head_timeout`` seconds from the connection's start, or from the first byte of a
  later request on a kept-alive connection, to the end of the head. Past it: ``408`` and close (a connection that
  sent nothing at all is closed without an answer);
* a deadline for the rest of a body the app answered without reading (a 402, a 413): uvicorn then discards it
  but cancels its keep-alive timer on every byte, so a client trickling that body, or just stopping, held the
  socket for ever. It gets ``drain_timeout`` seconds to finish (enough for a client that uploads before it reads
  the answer), then the connection is closed.

They act at the transport, so they hold for any ASGI app behind it. A body the app is reading is timed by the
app (the proxy bounds each chunk with ``server.body_read_timeout``); uvicorn pauses reading above 64 KiB buffered.

Two fixes of framing (docs/threat-model.md T14). llhttp reports a chunked body's trailer fields like header fields,
and uvicorn appends them to the request's headers; here they are dropped, so a trailer never becomes a request
header. And llhttp takes any request with ``Connection: upgrade`` and an ``Upgrade`` header for a protocol switch:
it skips the request's body, stops parsing the read it came in, and would parse the next read as a new request.
uvicorn takes only a WebSocket upgrade; any other (``h2c``, made-up ones) runs as a plain request, so a body it
declared was read as the requests that follow: a front proxy that ignores the ``Upgrade`` (as HTTP allows) sends
that body as a body, and the gateway answered the requests hidden in it (request smuggling), while a declared length
went upstream with no bytes behind it. Such a request with a body is a 400 and the connection is closed, like every
other framing the gateway cannot read one way; one without a body is answered as a plain request, and the
connection closes after it (what followed it in the same read was never parsed).

Date (RFC 9110 6.6.1). ``serve`` runs uvicorn without a Date (or Server) field of its own, so that a relayed answer
does not carry two; an answer's own Date (the upstream's, relayed: the scope's ``SERVER_KEEPS_DATE`` tells the proxy
to keep it) goes out as it is, and an answer with none (the gateway's own 402s, 5xx, health answers; the head
refusals here) gets one.

One more change, for speed: uvicorn writes a response's status line and headers, then its body, in two writes
(two system calls, each waking the client). The head is held until the body's first write in the same turn of the
event loop and both leave in one write (:class:`_OneWrite`); a head whose body is not ready by the end of that turn
(a stream, a HEAD request) leaves alone, as before. Nothing is written once the connection is closing (a head
refused or timed out while an earlier request's answer was still being made): what was held is dropped too.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.http.asgi import Message
from gateway.http.forwarding import SERVER_KEEPS_DATE
from gateway.x402 import reasons

__all__ = ["HEAD_SLACK_BYTES", "guarded_protocol"]

log = logging.getLogger("gateway.server")

# A head the gateway's own 431 would accept (path, query and header lines <= server.max_header_bytes) is at most
# this much longer on the wire: method, " HTTP/1.1", line ends, optional whitespace, an absolute-form target.
HEAD_SLACK_BYTES = 1024


def _answer(status: bytes, reason: str, message: str) -> bytes:
    body = json.dumps({"error": reason, "message": message}).encode()
    return b"".join(
        (
            b"HTTP/1.1 " + status + b"\r\n",
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
            body,
        )
    )


_TOO_LARGE = _answer(
    b"431 Request Header Fields Too Large", reasons.HEADERS_TOO_LARGE, "request headers exceed the limit"
)
_TIMEOUT = _answer(b"408 Request Timeout", reasons.REQUEST_TIMEOUT, "request headers not received in time")
_UPGRADE_WITH_BODY = _answer(
    b"400 Bad Request",
    reasons.UNSUPPORTED_UPGRADE,
    "a protocol upgrade other than WebSocket cannot carry a body here: send it as plain HTTP/1.1"
    " (curl: --http1.1 instead of --http2 on http:// URLs)",
)


class _OneWrite:
    """The transport as one response's cycle sees it: its first write (the head) waits for the second (the
    body's first bytes) until the end of the current turn of the event loop, so the two leave in one write."""

    __slots__ = ("_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None  # None: nothing written yet; b"": the head has left

    def write(self, data: bytes) -> None:
        if self._transport.is_closing():
            self._held = b""  # the connection was ended (a refused head, a timeout): nothing more leaves on it
            return
        held = self._held
        if held is None and len(data) <= _MAX_HELD:
            self._held = data
            self._loop.call_soon(self._release)
            return
        if held:
            data = held + data
        self._held = b""
        self._transport.write(data)

    def _release(self) -> None:
        held = self._held
        self._held = b""
        if held and not self._transport.is_closing():
            self._transport.write(held)

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def close(self) -> None:
        self._release()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:  # anything else a cycle may ask of its transport
        return getattr(self._transport, name)


_MAX_HELD = 16 * 1024  # a head (or a first write) larger than this is written at once


_date: list[Any] = [0, b""]  # the second it was made for, and the Date value


def _http_date() -> bytes:
    """Now as an HTTP date (RFC 9110 5.6.7), made once a second."""
    now = int(time.time())
    if _date[0] != now:
        _date[0], _date[1] = now, formatdate(now, usegmt=True).encode("ascii")
    value: bytes = _date[1]
    return value


def _dated(send: Callable[[Message], Awaitable[None]]) -> Callable[[Message], Awaitable[None]]:
    """``send``, adding a Date to an answer that has none (RFC 9110 6.6.1): ``serve`` stamps no Date of its own, so
    that a relayed upstream's (an end-to-end field) is the only one."""

    async def dated(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = message.get("headers") or ()
            if not any(name.lower() == b"date" for name, _ in headers):
                message = {**message, "headers": [(b"date", _http_date()), *headers]}
        await send(message)

    return dated


class _UpgradeWithBody(Exception):
    """A request offering a protocol upgrade the server does not take, with a body llhttp would skip."""


def _declares_body(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether request headers (lowercase names) announce body bytes: a Transfer-Encoding, or a non-zero length."""
    for name, value in headers:
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip().strip(b"0") != b""):
            return True
    return False


class _GuardedHttpTools(HttpToolsProtocol):
    """uvicorn's httptools protocol with a bounded, timed request head (see the module docstring)."""

    max_head_bytes: ClassVar[int] = 16 * 1024 + HEAD_SLACK_BYTES
    head_timeout: ClassVar[float] = 10.0
    drain_timeout: ClassVar[float] = 30.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Before the parser is built (it registers the chunk callbacks this class defines).
        self._in_head = True  # the parser is between requests or inside a head
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_due: float | None = None  # when the head being read must be complete; None: no head is timed
        self._drain_timer: asyncio.TimerHandle | None = None
        self._after_chunk_header = False  # a chunk header was parsed and no body byte followed (yet)
        self._trailer_bytes = 0
        self._messages = 0  # requests the parser completed on this connection
        self._upgrade_refused = False  # the parser stopped at an upgrade offer with a body (send_400_response)
        super().__init__(*args, **kwargs)

    # -- transport events ---------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()  # a connection that never sends its head must not hold the socket

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self._cancel_drain_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        while data:
            if not self._in_head:
                in_trailers = self._after_chunk_header
                super().data_received(data)
                if in_trailers and self._after_chunk_header:
                    # A whole read after the last chunk's header with no body byte: trailer bytes, which the
                    # parser keeps until each trailer line ends (a non-final chunk would have had body bytes).
                    self._trailer_bytes += len(data)
                    if self._trailer_bytes > self.max_head_bytes and not self.transport.is_closing():
                        self._refuse(_TOO_LARGE)
                return
            if self._head_due is None:
                self._arm_head_timer()  # the first byte of a request on a kept-alive connection
            room = self.max_head_bytes - self._head_bytes
            if len(data) <= room:
                self._head_bytes += len(data)
                super().data_received(data)
                return
            # Feed only what the cap allows: if the head ends within it, the rest is body or the next request.
            piece, data = data[:room], data[room:]
            self._head_bytes += len(piece)
            messages = self._messages
            if piece:
                super().data_received(piece)
            if self.transport.is_closing() or self.transport.get_protocol() is not self:
                return  # the parser refused it (400), or the connection was upgraded
            if self._in_head and self._messages == messages:
                self._refuse(_TOO_LARGE)  # one head, still unfinished at the cap
                return
            # A request ended within the piece: the head in progress, if any, is the next one's, and its count
            # started afresh there (its bytes in this piece go uncounted: docs/threat-model.md T40, residual).

    # -- parser callbacks -----------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_head = True
        super().on_message_begin()

    def on_header(self, name: bytes, value: bytes) -> None:
        # llhttp reports a chunked body's trailer fields here too, and uvicorn would append them to the request's
        # headers, which every layer reads (the client address from X-Forwarded-For among them) and the proxy
        # forwards: a trailer is never merged into the header section, it is dropped (docs/threat-model.md T14).
        if self._in_head:
            super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._cancel_head_timer()
        # An upgrade uvicorn does not take is served as a plain request, but llhttp has switched protocols all the
        # same: it skips this request's body (see the module docstring).
        ignored_upgrade = self.parser.should_upgrade() and not self._should_upgrade()
        if ignored_upgrade and _declares_body(self.headers):
            self._upgrade_refused = True
            raise _UpgradeWithBody  # the parser fails: a 400 (send_400_response) and close, nothing after it parsed
        before = self.cycle
        self.scope[SERVER_KEEPS_DATE] = True  # type: ignore[literal-required]  # the proxy relays the upstream's
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and cycle is not before:  # a new request's cycle (not an upgrade)
            cycle.transport = _OneWrite(self.transport, self.loop)  # type: ignore[assignment]
            cycle.send = _dated(cycle.send)  # type: ignore[method-assign,assignment,arg-type]
            if ignored_upgrade:
                cycle.keep_alive = False  # what followed it in its read is gone: nothing more is read as a request

    def on_message_complete(self) -> None:
        self._in_head = True  # whatever follows is the next request's head: counted and timed afresh
        self._messages += 1
        self._head_bytes = 0
        self._after_chunk_header = False
        self._trailer_bytes = 0
        self._cancel_drain_timer()
        super().on_message_complete()

    def on_body(self, body: bytes) -> None:
        self._after_chunk_header = False
        self._trailer_bytes = 0
        super().on_body(body)

    def on_chunk_header(self) -> None:
        self._after_chunk_header = True

    def on_chunk_complete(self) -> None:
        self._after_chunk_header = False
        self._trailer_bytes = 0

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self._in_head and self.transport is not None and not self.transport.is_closing():
            # Answered before its body was read whole: the rest gets a deadline (see the module docstring).
            self._cancel_drain_timer()
            self._drain_timer = self.loop.call_later(self.drain_timeout, self._drain_timed_out)

    # -- limits -------------------------------------------------------------------------------------------

    def _arm_head_timer(self) -> None:
        """Time the head from now. One timer per connection, kept across its requests: one still pending (due at an
        earlier head's deadline) is left be, and when it fires it waits on to this head's deadline (a timer made
        and cancelled per request on a kept-alive connection cost more than the rest of this bookkeeping)."""
        self._head_due = self.loop.time() + self.head_timeout
        if self._head_timer is None:
            self._head_timer = self.loop.call_at(self._head_due, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        """No head is timed now; a pending timer finds nothing to do when it fires (see :meth:`_arm_head_timer`)."""
        self._head_due = None

    def _cancel_drain_timer(self) -> None:
        if self._drain_timer is not None:
            self._drain_timer.cancel()
            self._drain_timer = None

    def _drain_timed_out(self) -> None:
        self._drain_timer = None
        if not self._in_head and self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _head_timed_out(self) -> None:
        self._head_timer = None
        due = self._head_due
        if due is None:
            return  # the head it was armed for completed in time, and no other is being read
        if self.loop.time() < due:
            self._head_timer = self.loop.call_at(due, self._head_timed_out)  # a later head's deadline
            return
        self._head_due = None
        if not self._in_head or self.transport is None or self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined head behind a response still being sent: never cut that response short; the head gets
            # a fresh deadline (the response itself is bounded by the upstream's timeouts).
            self._arm_head_timer()
            return
        if self._head_bytes:
            self._refuse(_TIMEOUT)
        else:
            self.transport.close()  # nothing asked, nothing to answer

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request the parser refused: ours, with a reason, for an upgrade offer with a body
        (``curl --http2 -d ...`` on an http:// URL sends one)."""
        if self._upgrade_refused:
            self._upgrade_refused = False
            self._refuse(_UPGRADE_WITH_BODY)
            return
        super().send_400_response(msg)

    def _refuse(self, answer: bytes) -> None:
        self._cancel_head_timer()
        log.debug("request head refused", extra={"client": self.client[0] if self.client else None})
        if self.cycle is None or self.cycle.response_complete:
            status, _, rest = answer.partition(b"\r\n")
            # never in the middle of another response on this connection
            self.transport.write(b"%s\r\ndate: %s\r\n%s" % (status, _http_date(), rest))
        self.transport.close()


def guarded_protocol(*, max_head_bytes: int, head_timeout: float, drain_timeout: float) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol with these limits (pass it as ``uvicorn.run(..., http=...)``)."""
    return type(
        "GuardedHttpToolsProtocol",
        (_GuardedHttpTools,),
        {"max_head_bytes": max_head_bytes, "head_timeout": head_timeout, "drain_timeout": drain_timeout},
    )
