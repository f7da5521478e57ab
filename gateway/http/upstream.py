"""The upstream hop's HTTP/1.1 client: a keep-alive pool of asyncio protocols with the ``httptools`` parser.

Why our own: forwarding is the whole cost of a free request, and a general-purpose client spends most of its time
on what a proxy to one fixed origin never needs (URL objects, cookie jars, header multidicts, tracing hooks,
redirects). Measured on the benchmark's free route: aiohttp's request path was about a third of the gateway's
CPU. What remains here is the protocol itself, written against the same parser uvicorn uses (llhttp, via
``httptools``).

What it does, and the rules it keeps:

* One origin (host, port, optional TLS) per pool, at most ``max_connections`` open; a request that finds none free
  waits up to ``connect_timeout`` for one, then fails as unreachable (a saturated pool answers 502, not a queue).
* Idle connections are reused newest first and dropped after ``idle_timeout`` (below the common 5 s keep-alive
  of upstream servers, so we rarely reuse one the server is closing). A request on a reused connection that
  fails before any byte of an answer came back is sent once more on a fresh connection only if it is replayable
  (GET, HEAD or OPTIONS without a body: the rule Go's ``net/http`` uses).
* Request framing: the caller's ``content-length`` is kept and the body is streamed as is; a body of unknown
  length goes ``Transfer-Encoding: chunked``; a body-less POST/PUT/PATCH says ``content-length: 0``. The head and
  the first body chunk leave in one write.
* Response framing is llhttp's (Content-Length, chunked, or until close); a HEAD answer has no body whatever it
  declares; 1xx interim answers are skipped; an upgrade (101) is refused. A connection goes back to the pool only
  after a complete answer the server did not mark ``Connection: close``; anything else closes it.
* Read timeout: ``read_timeout`` without a byte from the upstream while we wait for one (time spent with reading
  paused because the client is slow to take the body does not count). Reading pauses above 1 MiB buffered.
* Errors are :class:`UpstreamError` subclasses whose messages never name the origin.
"""

from __future__ import annotations

import asyncio
import collections
import ssl as ssl_module
from collections.abc import AsyncIterator
from typing import Any

import httptools

__all__ = [
    "ConnectFailed",
    "ProtocolFailure",
    "ReadTimeout",
    "UpstreamError",
    "UpstreamPool",
    "UpstreamResponse",
]

_REPLAYABLE = frozenset({"GET", "HEAD", "OPTIONS"})
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_HIGH_WATER = 1 << 20  # buffered answer bytes above which reading pauses
_LOW_WATER = 1 << 18


class UpstreamError(Exception):
    """The upstream exchange failed; the message is a fixed sentence (no origin, no credentials)."""


class ConnectFailed(UpstreamError):
    """No connection: refused, unresolvable, TLS failure, connect timeout or a saturated pool."""


class ReadTimeout(UpstreamError, TimeoutError):
    """The upstream sent nothing for ``read_timeout`` while an answer was awaited."""


class ProtocolFailure(UpstreamError):
    """The connection broke, or the answer could not be parsed."""


class _Stale(Exception):
    """A reused connection closed before any byte of the answer: maybe the server's idle close."""


class UpstreamResponse:
    """Status line and headers as received; the body through :meth:`next_chunk`. Always :meth:`close` it."""

    __slots__ = ("_conn", "headers", "status")

    def __init__(self, conn: _Connection, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self._conn = conn
        self.status = status
        self.headers = headers

    @property
    def at_eof(self) -> bool:
        """The whole body was received and handed out."""
        conn = self._conn
        return conn.complete and not conn.chunks

    async def next_chunk(self) -> bytes:
        """The next piece of the body; ``b""`` once it is all read. Raises ``ProtocolFailure``/``ReadTimeout``."""
        return await self._conn.next_chunk()

    def close(self) -> None:
        """Give the connection back (a complete, reusable answer) or close it."""
        self._conn.finish()


class _Connection(asyncio.Protocol):
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
        self._reset_exchange()

    def _reset_exchange(self) -> None:
        """Forget the exchange in progress: a connection carries one at a time, each with a parser of its own."""
        self.parser: Any = None
        self.head: asyncio.Future[UpstreamResponse] | None = None
        self.head_only = False
        self.received = False  # a byte of the answer arrived
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
        self._stop_timer()
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
        self.last_read = self.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(ProtocolFailure("the upstream switched protocols"))
            self.close()
        except httptools.HttpParserError:
            self._fail(ProtocolFailure("the upstream's answer is not valid HTTP/1.1"))
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
        # Read now: llhttp forgets the message's framing flags once it is complete.
        self.keep_alive = parser.should_keep_alive()
        self.head.set_result(UpstreamResponse(self, status, self.headers))
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

    def _fail(self, error: UpstreamError, *, closed: bool = False) -> None:
        """``closed``: the connection went away; on a reused one before any byte came back, that is the server's
        idle close racing our request (``_Stale``: replayable). A timeout or a parse error never is."""
        if self.error is None and not self.complete:
            self.error = error
        self._stop_timer()
        if self.head is not None and not self.head.done():
            stale = closed and self.reused and not self.received
            self.head.set_exception(_Stale() if stale else error)
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _arm_timer(self) -> None:
        self.last_read = self.loop.time()
        self.timer = self.loop.call_at(self.last_read + self.pool.read_timeout, self._on_timer)

    def _stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _on_timer(self) -> None:
        self.timer = None
        if self.complete or self.closed:
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
                    raise _Stale() if self.reused else ProtocolFailure("the upstream closed the connection")
            else:
                await self._send_body(head, body, chunked)
            if self.closed and not future.done():
                self._fail(ProtocolFailure("the upstream closed the connection without an answer"), closed=True)
            self._arm_timer()
            return await future
        except BaseException:
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
        if self.head is not None and self.head.done():
            # It answered before the request was whole: whether it read the rest is unknown, so no reuse.
            self.spoiled = True

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
            and (self.head_only or self.keep_alive)
        )
        self._reset_exchange()
        self.released = True
        self._stop_timer()
        if reusable:
            self.pool._give_back(self)
        else:
            self.close()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()  # connection_lost follows and forgets us in the pool
        elif self.transport is None:
            self.closed = True


class UpstreamPool:
    """Keep-alive connections to one origin (see the module docstring)."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        tls: bool,
        authority: str,
        max_connections: int = 256,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        idle_timeout: float = 4.0,
    ) -> None:
        self.host = host
        self.port = port
        self.ssl: ssl_module.SSLContext | None = ssl_module.create_default_context() if tls else None
        self.authority = authority.encode("ascii")
        self.max_connections = max(1, max_connections)
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.idle_timeout = idle_timeout
        self.loop = asyncio.get_running_loop()
        self._idle: list[_Connection] = []
        self._open = 0  # connecting, busy and idle
        self._live: set[_Connection] = set()
        self._slots: collections.deque[asyncio.Future[_Connection | None]] = collections.deque()
        self._closed = False

    @property
    def open_connections(self) -> int:
        return self._open

    async def request(
        self,
        method: str,
        target: str,
        headers: list[tuple[bytes, bytes]],
        body: AsyncIterator[bytes] | None = None,
        *,
        content_length: int | None = None,
    ) -> UpstreamResponse:
        """Send ``method target`` with ``headers`` (no Host, no framing of the body but ``content_length`` when
        known: it is added here) and return the answer's head; the body follows through the response."""
        lines = [f"{method} {target} HTTP/1.1\r\nhost: ".encode("latin-1"), self.authority, b"\r\n"]
        for name, value in headers:
            lines += (name, b": ", value, b"\r\n")
        chunked = body is not None and content_length is None
        if chunked:
            lines.append(b"transfer-encoding: chunked\r\n")
        elif content_length is not None:
            lines.append(b"content-length: %d\r\n" % content_length)
        elif method in _BODY_METHODS:
            lines.append(b"content-length: 0\r\n")
        lines.append(b"\r\n")
        head = b"".join(lines)
        # Exactly the line breaks written above (request line, host, each header, framing, blank line), and no
        # NUL: a CR or LF inside a header (or the target) would let it write a header or a request of its own.
        breaks = len(headers) + (4 if (chunked or content_length is not None or method in _BODY_METHODS) else 3)
        if head.count(b"\n") != breaks or head.count(b"\r") != breaks or b"\0" in head:
            raise ProtocolFailure("a header would break the request's framing")  # never written upstream
        conn = await self._acquire()
        try:
            return await conn.exchange(method, head, body, chunked)
        except _Stale:
            if method not in _REPLAYABLE or body is not None:
                raise ProtocolFailure("the upstream closed the connection without an answer") from None
        conn = await self._acquire(fresh=True)
        try:
            return await conn.exchange(method, head, None, False)
        except _Stale:
            raise ProtocolFailure("the upstream closed the connection without an answer") from None

    async def _acquire(self, *, fresh: bool = False) -> _Connection:
        """A connection: an idle one, a new one, or (all ``max_connections`` busy) the next one freed, first come
        first served. A waiter is handed a released connection directly, or a reserved slot to connect with, so
        a request arriving later can never take what an earlier one was woken for."""
        deadline = self.loop.time() + self.connect_timeout
        while True:
            if self._closed:
                raise ConnectFailed("the upstream client is closed")
            if not self._slots:  # nobody is queued ahead of this request
                if not fresh:
                    conn = self._take_idle()
                    if conn is not None:
                        return conn
                if self._open < self.max_connections:
                    self._open += 1
                    return await self._connect(deadline)
                if fresh and self._idle:  # full of idle connections: make room for a fresh one
                    self._idle.pop(0).close()
            slot: asyncio.Future[_Connection | None] = self.loop.create_future()
            self._slots.append(slot)
            try:
                async with asyncio.timeout_at(deadline):
                    got = await slot
            except BaseException as exc:
                if slot in self._slots:
                    self._slots.remove(slot)
                elif slot.done() and not slot.cancelled():  # handed something just as we gave up: pass it on
                    handed = slot.result()
                    if handed is None:
                        self._open -= 1
                        self._free_slot()
                    else:
                        self._give_back(handed)
                if isinstance(exc, TimeoutError):
                    raise ConnectFailed("no upstream connection became free in time") from None
                raise
            if got is None:
                return await self._connect(deadline)  # a slot was reserved for us (counted in _open)
            if fresh:  # a replay wants a new connection: pass this one on and wait for a slot
                self._give_back(got)
                continue
            if not got.closed:
                got.reused = True
                return got
            # it closed on the way to us: its slot comes back through _forget; wait again (same deadline)

    def _take_idle(self) -> _Connection | None:
        now = self.loop.time()
        while self._idle:
            conn = self._idle.pop()
            if conn.closed:
                continue
            if now - conn.idle_since > self.idle_timeout:
                conn.close()
                continue
            conn.reused = True
            return conn
        return None

    async def _connect(self, deadline: float) -> _Connection:
        """Open a connection in a slot already counted in ``_open`` by the caller."""
        conn = _Connection(self)
        try:
            async with asyncio.timeout_at(deadline):
                await self.loop.create_connection(
                    lambda: conn,
                    self.host,
                    self.port,
                    ssl=self.ssl,
                    server_hostname=self.host if self.ssl else None,
                )
        except BaseException as exc:
            self._open -= 1
            self._free_slot()
            conn.closed = True
            if isinstance(exc, TimeoutError):
                raise ConnectFailed("the upstream could not be reached in time") from None
            if isinstance(exc, OSError | ssl_module.SSLError):
                raise ConnectFailed("the upstream could not be reached") from None
            raise
        if conn.closed:  # lost before create_connection returned: never counted in _live, so count it out here
            self._open -= 1
            self._free_slot()
            raise ConnectFailed("the upstream could not be reached")
        self._live.add(conn)
        return conn

    def _give_back(self, conn: _Connection) -> None:
        if self._closed:
            conn.close()
            return
        while self._slots:  # the longest waiter takes it as it is
            slot = self._slots.popleft()
            if not slot.done():
                slot.set_result(conn)
                return
        conn.idle_since = self.loop.time()
        self._idle.append(conn)

    def _forget(self, conn: _Connection) -> None:
        if conn in self._live:
            self._live.discard(conn)
            if conn in self._idle:
                self._idle.remove(conn)
            self._open -= 1
            self._free_slot()

    def _free_slot(self) -> None:
        """A slot opened: reserve it for the longest waiter, who connects with it."""
        while self._slots:
            slot = self._slots.popleft()
            if not slot.done():
                self._open += 1
                slot.set_result(None)
                return

    async def aclose(self) -> None:
        self._closed = True
        for conn in list(self._live):
            conn.close()
        self._idle.clear()
        while self._slots:
            slot = self._slots.popleft()
            if not slot.done():
                slot.set_exception(ConnectFailed("the upstream client is closed"))
        await asyncio.sleep(0)  # let the transports' close callbacks run
