"""The keep-alive pool: at most ``max_connections`` to one origin, idle ones reused newest first.

Fairness is first come, first served: a request that finds every connection busy queues for a slot, and a freed
connection (or a freed slot to connect with) is handed to the longest waiter directly, so a request arriving later
can never take what an earlier one was woken for. The queue is bounded in time, not length: after
``connect_timeout`` the request fails as unreachable (a saturated pool answers 502, not a queue). A request whose
reused connection turns out stale (``StaleConnection``) is sent once more on a fresh connection when replaying it
is safe.
"""

from __future__ import annotations

import asyncio
import collections
import ssl as ssl_module
from collections.abc import AsyncIterator

from gateway.http.upstream.connection import Connection, UpstreamResponse
from gateway.http.upstream.errors import ConnectFailed, ProtocolFailure, StaleConnection
from gateway.http.upstream.framing import request_head

__all__ = ["UpstreamPool"]

# Sent once more on a fresh connection when a reused one turned out stale, and only without a body: the rule Go's
# net/http uses (anything else may have had an effect upstream).
_REPLAYABLE = frozenset({"GET", "HEAD", "OPTIONS"})


class UpstreamPool:
    """Keep-alive connections to one origin (see the package docstring)."""

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
        self._idle: list[Connection] = []
        self._open = 0  # connecting, busy and idle
        self._live: set[Connection] = set()
        self._slots: collections.deque[asyncio.Future[Connection | None]] = collections.deque()
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
        head, chunked = request_head(method, target, self.authority, headers, body is not None, content_length)
        conn = await self._acquire()
        try:
            return await conn.exchange(method, head, body, chunked)
        except StaleConnection:
            if method not in _REPLAYABLE or body is not None:
                raise ProtocolFailure("the upstream closed the connection without an answer") from None
        conn = await self._acquire(fresh=True)
        try:
            return await conn.exchange(method, head, None, False)
        except StaleConnection:
            raise ProtocolFailure("the upstream closed the connection without an answer") from None

    async def _acquire(self, *, fresh: bool = False) -> Connection:
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
            slot: asyncio.Future[Connection | None] = self.loop.create_future()
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

    def _take_idle(self) -> Connection | None:
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

    async def _connect(self, deadline: float) -> Connection:
        """Open a connection in a slot already counted in ``_open`` by the caller."""
        conn = Connection(self)
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

    def _give_back(self, conn: Connection) -> None:
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

    def _forget(self, conn: Connection) -> None:
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
