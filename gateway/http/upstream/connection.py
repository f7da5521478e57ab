"""One upstream connection as an asyncio protocol, with the ``httptools`` (llhttp) parser, and the answer it hands out.

One exchange at a time, each with a parser of its own. The rules kept here: a HEAD answer has no body whatever it
declares; 1xx interim answers are skipped; an upgrade (101), a status outside 200-599 and a transfer coding besides
chunked are refused; trailer fields are dropped; an answer without length ends at a clean close, while a reset or a
close before the declared end is a truncation. The final head must arrive within the read timeout of the request's
last byte and within ``_HIGH_WATER`` bytes. The connection is reusable only after a complete answer the server did
not mark ``Connection: close``, to a request that was sent whole; an upstream talking out of turn (bytes nobody
asked for, a second answer) is never trusted with the next request, nor is one that may still send a body it declared
where HTTP has none (a HEAD answer; a 204 or 304 with a length). Reading pauses above ``_HIGH_WATER`` buffered bytes,
and the read timeout does not run while it is paused (the client is slow, not the upstream).

A complete answer no longer needs its connection: its buffered body moves to the :class:`UpstreamResponse` and the
connection goes back to the pool at once, so a client slow to read an answer of up to ``_HIGH_WATER`` bytes holds
no upstream connection while it reads (docs/threat-model.md T39).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import httptools

from gateway.http.upstream.errors import ProtocolFailure, ReadTimeout, StaleConnection, UpstreamError

if TYPE_CHECKING:
    from gateway.http.upstream.pool import Lease, UpstreamPool

__all__ = ["Connection", "UpstreamResponse"]

_HIGH_WATER = 1 << 20  # buffered answer bytes above which reading pauses
_LOW_WATER = 1 << 18


def _transfer_codings(headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    """The transfer codings the answer's ``Transfer-Encoding`` fields list, in order, lowercase."""
    codings: list[bytes] = []
    for name, value in headers:
        if name.lower() == b"transfer-encoding":
            codings += [token.strip().lower() for token in value.split(b",") if token.strip()]
    return codings


def _declares_body(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether the answer's headers announce body bytes: a ``Transfer-Encoding``, or a non-zero length."""
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"transfer-encoding" or (lowered == b"content-length" and value.strip().strip(b"0") != b""):
            return True
    return False


class UpstreamResponse:
    """Status line and headers as received; the body through :meth:`next_chunk`. Always :meth:`close` it."""

    __slots__ = ("_conn", "_rest", "headers", "status")

    def __init__(self, conn: Connection, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self._conn = conn
        self._rest: collections.deque[bytes] | None = None  # the body left to hand out once the connection is gone
        self.status = status
        self.headers = headers

    @property
    def at_eof(self) -> bool:
        """The whole body was received and handed out."""
        if self._rest is not None:
            return not self._rest
        conn = self._conn
        return conn.complete and not conn.chunks

    @property
    def error(self) -> UpstreamError | None:
        """Why the answer already failed (cut short, not valid HTTP), with body chunks still to hand out maybe."""
        return self._conn.error if self._rest is None else None

    async def next_chunk(self) -> bytes:
        """The next piece of the body; ``b""`` once it is all read. Raises ``ProtocolFailure``/``ReadTimeout``."""
        if self._rest is not None:
            return self._rest.popleft() if self._rest else b""
        return await self._conn.next_chunk()

    def close(self) -> None:
        """Give the connection back (a complete, reusable answer) or close it."""
        if self._rest is None:  # else it went back to the pool when the answer completed (maybe in use again)
            self._conn.finish()


class Connection(asyncio.Protocol):
    """One upstream connection; one exchange at a time; its own parser per exchange."""

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.reused = False
        self.chunks: collections.deque[bytes] = collections.deque()
        self.waiter: asyncio.Future[None] | None = None
        self.paused_reading = False
        self.drain: asyncio.Future[None] | None = None
        self.last_read = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.timing = False  # an exchange is waiting on the upstream: the read timeout runs (see _arm_timer)
        self.lease: Lease | None = None  # who holds the connection (set and ended by the pool)
        self._reset_exchange()

    def _reset_exchange(self) -> None:
        """Forget the exchange in progress: a connection carries one at a time, each with a parser of its own."""
        self.parser: Any = None
        self.head: asyncio.Future[UpstreamResponse] | None = None
        self.response: UpstreamResponse | None = None
        self.sending = False  # the request (head or body) is still being written
        self.head_only = False
        self.received = False  # a byte of the answer arrived
        self.head_bytes = 0  # bytes received before the final answer's head was complete (interim answers too)
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks.clear()
        self.buffered = 0
        self.complete = False
        self.error: UpstreamError | None = None
        self.released = False
        self.spoiled = False  # the request was not sent whole, or the upstream sent more than one answer
        self.keep_alive = False  # the answer lets the connection carry another request

    # -- asyncio.Protocol -------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's TCPTransport is not an asyncio.Transport

    def connection_lost(self, exc: Exception | None) -> None:
        was_open = not self.closed
        self.closed = True
        self._cancel_timer()
        if self.parser is not None and not self.complete:
            if self.head is not None and not self.head.done():
                self._fail(ProtocolFailure("the upstream closed the connection without an answer"), closed=True)
            elif exc is None and self._delimited_by_close():
                self._message_complete()  # a clean close ends an answer that has no length
            else:  # a reset, or a close before the declared end: truncated
                self._fail(ProtocolFailure("the upstream closed the connection mid-answer"))
        if self.drain is not None and not self.drain.done():
            self.drain.set_result(None)
        if was_open:
            self.pool._forget(self)

    def data_received(self, data: bytes) -> None:
        if self.parser is None or self.complete:
            self.close()  # nothing was asked: an upstream talking out of turn cannot be trusted with the next one
            return
        self.received = True
        if self.response is None:
            # Before the final head, the read timeout runs from the request's last byte, not from each byte that
            # comes back: an upstream trickling its head, or sending interim answers (102 Processing, 103 Early
            # Hints) one after another, must still answer within read_timeout, the longest the payment layer
            # expects the upstream to take (docs/threat-model.md T32). And what it may send before that is bounded.
            self.head_bytes += len(data)
        else:
            self.last_read = self.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(ProtocolFailure("the upstream switched protocols"))
            self.close()
        except httptools.HttpParserError:
            self._fail(ProtocolFailure("the upstream's answer is not valid HTTP/1.1"))
            self.close()
            return
        if self.response is None and self.head_bytes > _HIGH_WATER and self.error is None:
            self._fail(ProtocolFailure("the upstream's answer head is too large"))
            self.close()

    def eof_received(self) -> bool | None:
        return None  # close the transport: connection_lost decides whether the answer was complete

    def pause_writing(self) -> None:
        if self.drain is None or self.drain.done():
            self.drain = self.loop.create_future()

    def resume_writing(self) -> None:
        if self.drain is not None and not self.drain.done():
            self.drain.set_result(None)

    # -- httptools callbacks ----------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.head is not None and self.head.done():
            self.spoiled = True  # a second answer to one request: the connection's framing is not to be trusted
            self.headers = []  # (the answer already handed out keeps its own list)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.response is not None:
            # A chunked body's trailer fields (llhttp reports them here too) never become header fields of the
            # answer that was handed out (RFC 9110 6.5.1): they are dropped, as the request side drops them.
            return
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self.parser
        status = parser.get_status_code()
        if status == 101:
            self._fail(ProtocolFailure("the upstream switched protocols"))
            return
        if 100 <= status < 200:
            return  # interim (103 Early Hints...): its headers are dropped when its message completes
        if self.head is None or self.head.done():
            self.spoiled = True  # a second answer to one request: the connection's framing is not to be trusted
            return
        if not 200 <= status <= 599:
            # Outside HTTP's status codes (RFC 9110 15): no server can relay it, and no client could read it.
            self._fail(ProtocolFailure("the upstream answered with a status code HTTP does not define"))
            self.close()
            return
        if (
            not self.head_only
            and status not in (204, 304)
            and _transfer_codings(self.headers) not in ([], [b"chunked"], [b"identity"])
        ):
            # Only chunked is taken off (identity, still sent by some old servers, is no coding at all). Anything
            # else (gzip, gzip under chunked, chunked twice) would be relayed still coded, without the
            # Transfer-Encoding that says so (a hop-by-hop field): other bytes than the upstream meant.
            self._fail(ProtocolFailure("the upstream's answer uses a transfer coding the gateway does not decode"))
            self.close()
            return
        # Read now: llhttp forgets the message's framing flags once it is complete. An answer without a body by
        # definition (to a HEAD; a 204 or 304) is complete at its headers, but an upstream may write the body it
        # declared all the same: read on this connection, it would be the next request's answer, another client's
        # perhaps. So no reuse after a HEAD answer, or after a 204 or 304 that declares a body.
        self.keep_alive = (
            parser.should_keep_alive()
            and not self.head_only
            and not (status in (204, 304) and _declares_body(self.headers))
        )
        self.response = UpstreamResponse(self, status, self.headers)
        self.last_read = self.loop.time()  # from here, the read timeout runs from each byte received
        self.head.set_result(self.response)
        if self.head_only:
            self._message_complete()

    def on_body(self, body: bytes) -> None:
        if self.complete:
            return
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and not self.paused_reading and self.transport is not None:
            self.paused_reading = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.head is None or not self.head.done():
            self.headers = []  # the end of an interim answer: the real one follows
            return
        self._message_complete()

    # -- exchange ----------------------------------------------------------------------------------------------

    def _delimited_by_close(self) -> bool:
        """An answer without Content-Length or chunked framing ends when the connection does."""
        if self.head is None or not self.head.done() or self.head.cancelled() or self.head_only:
            return False
        for name, value in self.headers:
            lowered = name.lower()
            if lowered == b"content-length" or (lowered == b"transfer-encoding" and b"chunked" in value.lower()):
                return False
        return True

    def _message_complete(self) -> None:
        if self.complete:
            return
        self.complete = True
        self._stop_timer()
        self._wake()
        if self.response is not None:
            # Not from inside the parser's callback: the connection must not start another exchange mid-feed.
            self.loop.call_soon(self._hand_over, self.response)

    def _hand_over(self, response: UpstreamResponse) -> None:
        """The answer is complete: the body not yet read moves to ``response``, the connection to the pool."""
        if (
            self.response is not response
            or self.released
            or self.sending  # it answered before the request was whole: finish() decides once sending stops
            or self.error is not None
            or self.transport is None
            or self.transport.is_closing()
        ):
            return
        response._rest = collections.deque(self.chunks)
        self.chunks.clear()
        self.buffered = 0
        if self.paused_reading:
            self.paused_reading = False
            self.transport.resume_reading()
        self.finish()

    def _fail(self, error: UpstreamError, *, closed: bool = False) -> None:
        """``closed``: the connection went away; on a reused one before any byte came back, that is the server's
        idle close racing our request (``StaleConnection``: replayable). A timeout or a parse error never is."""
        if self.error is None and not self.complete:
            self.error = error
        self._stop_timer()
        if self.head is not None and not self.head.done():
            stale = closed and self.reused and not self.received
            self.head.set_exception(StaleConnection() if stale else error)
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _arm_timer(self) -> None:
        """Start the read timeout. One timer per connection, kept across its exchanges: an exchange that finds it
        still pending (due at an earlier exchange's deadline) leaves it be, and when it fires it waits on to this
        exchange's deadline (a timer made and cancelled per request cost more than the rest of the bookkeeping)."""
        self.last_read = self.loop.time()
        self.timing = True
        if self.timer is None:
            self.timer = self.loop.call_at(self.last_read + self.pool.read_timeout, self._on_timer)

    def _stop_timer(self) -> None:
        """Stop the read timeout; a pending timer finds nothing to time when it fires (see :meth:`_arm_timer`)."""
        self.timing = False

    def _cancel_timer(self) -> None:
        self.timing = False
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _on_timer(self) -> None:
        self.timer = None
        if not self.timing or self.complete or self.closed:
            return
        now = self.loop.time()
        due = self.last_read + self.pool.read_timeout
        if self.paused_reading:  # the client is slow, not the upstream: the clock restarts when reading resumes
            self.last_read, due = now, now + self.pool.read_timeout
        if now < due:
            self.timer = self.loop.call_at(due, self._on_timer)
            return
        self._fail(ReadTimeout("the upstream did not answer in time"))
        self.close()

    def _write(self, data: bytes) -> bool:
        """Send ``data``; False when the connection is gone (the answer, or its absence, tells the rest)."""
        transport = self.transport
        if transport is None or self.closed or transport.is_closing():
            return False
        transport.write(data)
        return True

    async def _drained(self) -> None:
        if self.drain is not None and not self.drain.done():
            try:
                async with asyncio.timeout(self.pool.read_timeout):  # an upstream that stops reading our body
                    await self.drain
            except TimeoutError:
                raise ReadTimeout("the upstream did not take the request body in time") from None

    async def exchange(
        self, method: str, head: bytes, body: AsyncIterator[bytes] | None, chunked: bool
    ) -> UpstreamResponse:
        self._reset_exchange()
        self.parser = httptools.HttpResponseParser(self)
        self.head_only = method == "HEAD"
        future: asyncio.Future[UpstreamResponse] = self.loop.create_future()
        self.head = future
        try:
            if body is None:
                if not self._write(head):
                    raise StaleConnection() if self.reused else ProtocolFailure("the upstream closed the connection")
                self._sent_whole()
            else:
                self.sending = True
                await self._send_body(head, body, chunked)
                self.sending = False
                self.pool.upload_done(self)
            if self.closed and not future.done():
                self._fail(ProtocolFailure("the upstream closed the connection without an answer"), closed=True)
            self._arm_timer()
            return await future
        except BaseException:
            if not future.done():
                future.cancel()  # nobody will read it: its failure must not be reported as never retrieved
            self.close()
            raise

    async def _send_body(self, head: bytes, body: AsyncIterator[bytes], chunked: bool) -> None:
        """Stream the body after the head (the head leaves with the first chunk: one write for a small request).
        If the connection goes, sending stops: an early answer (413...) is still read, and the connection,
        its request unfinished, is never reused."""
        pending = head
        async for chunk in body:
            if not chunk:
                continue
            data = pending + (b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
            pending = b""
            if not self._write(data):
                self.spoiled = True
                return
            await self._drained()
        if chunked:
            pending += b"0\r\n\r\n"
        if pending and not self._write(pending):
            self.spoiled = True
            return
        self._sent_whole()
        if self.head is not None and self.head.done():
            # It answered before the request was whole: whether it read the rest is unknown, so no reuse.
            self.spoiled = True

    def _sent_whole(self) -> None:
        """The request's last byte is written: its lease learns that the upstream has (or will have) all of it."""
        if self.lease is not None:
            self.lease.sent = True

    async def next_chunk(self) -> bytes:
        while True:
            if self.chunks:
                chunk = self.chunks.popleft()
                self.buffered -= len(chunk)
                if self.paused_reading and self.buffered < _LOW_WATER and self.transport is not None:
                    self.paused_reading = False
                    self.last_read = self.loop.time()
                    self.transport.resume_reading()
                return chunk
            if self.complete:
                return b""
            if self.error is not None:
                raise self.error
            self.waiter = self.loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None

    def finish(self) -> None:
        if self.released:
            return
        self.released = True
        reusable = (
            self.complete
            and self.error is None
            and not self.spoiled
            and not self.closed
            and not self.paused_reading
            and self.parser is not None
            and self.keep_alive
        )
        self._reset_exchange()
        self.released = True
        self._stop_timer()
        self.pool.release(self, reusable=reusable)

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()  # connection_lost follows and forgets us in the pool
        elif self.transport is None:
            self.closed = True
