"""The keep-alive pool: at most ``max_connections`` to one origin, idle ones reused newest first.

Who may hold a connection (docs/threat-model.md T39): every request holds
one under a :class:`Lease` from the moment it is handed one until its exchange ends (the answer read whole, or
the connection closed). Two bounds apply to leases, besides the connection cap:

* ``reserved`` connections are kept for paid requests (a verified payment): requests without one may hold at most
  ``max_connections - reserved`` together, so free traffic, however slow, never takes a paying request's capacity;
* one client (a client address for a free request, a payer for a paid one) may have at most ``per_client``
  requests *uploading* at once: their body, too large to read before the connection was taken, still streaming
  up. Whatever else a client does holds a connection only while bytes flow to or from the upstream.

Fairness is first come, first served among the requests a freed connection may go to, paid ones first: a freed
connection (or a freed slot to connect with) is handed to the longest eligible waiter directly, so a request
arriving later can never take what an earlier one was woken for, and a waiter that may not take it (its client at
its upload bound, a free request while the free share is full) never blocks the ones behind it. The queue is
bounded in time, not length: after ``connect_timeout`` the request fails as unreachable (a saturated pool answers
502, not a queue), or as :class:`ClientBusy` when its own client's uploads were what it waited for. A request
whose reused connection turns out stale (``StaleConnection``) is sent once more on a fresh connection when
replaying it is safe.
"""

from __future__ import annotations

import asyncio
import ssl as ssl_module
from collections.abc import AsyncIterator
from dataclasses import dataclass

from gateway.http.upstream.connection import Connection, UpstreamResponse
from gateway.http.upstream.errors import ClientBusy, ConnectFailed, ProtocolFailure, StaleConnection
from gateway.http.upstream.framing import request_head

__all__ = ["Lease", "UpstreamPool"]

# Sent once more on a fresh connection when a reused one turned out stale, and only without a body: the rule Go's
# net/http uses (anything else may have had an effect upstream).
_REPLAYABLE = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(slots=True)
class Lease:
    """What holds a connection: a paid request or not, its client, whether its body is still streaming up, and
    whether the request has gone up whole (set by the connection once its last byte is written: from then on the
    upstream may be doing the work it asks for)."""

    paid: bool = False
    client: str | None = None
    uploading: bool = False
    sent: bool = False


class _Waiter:
    __slots__ = ("fresh", "future", "lease")

    def __init__(self, lease: Lease, fresh: bool, loop: asyncio.AbstractEventLoop) -> None:
        self.lease = lease
        self.fresh = fresh
        self.future: asyncio.Future[Connection | None] = loop.create_future()


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
        reserved: int = 0,
        per_client: int = 0,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        idle_timeout: float = 4.0,
    ) -> None:
        self.host = host
        self.port = port
        self.ssl: ssl_module.SSLContext | None = ssl_module.create_default_context() if tls else None
        self.authority = authority.encode("ascii")
        self.max_connections = max(1, max_connections)
        # Free requests always keep at least one connection: a reserve of all of them would refuse every free one.
        self.free_limit = self.max_connections - max(0, min(reserved, self.max_connections - 1))
        self.per_client = max(0, per_client)  # 0: no bound
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.idle_timeout = idle_timeout
        self.loop = asyncio.get_running_loop()
        self._idle: list[Connection] = []
        self._open = 0  # connecting, busy and idle
        self._live: set[Connection] = set()
        self._waiters: list[_Waiter] = []
        self._held_free = 0  # leases of requests without a verified payment
        self._uploads: dict[str, int] = {}  # client -> its leases still streaming a body up
        self._closed = False

    @property
    def open_connections(self) -> int:
        return self._open

    @property
    def held_by_free_requests(self) -> int:
        return self._held_free

    async def request(
        self,
        method: str,
        target: str,
        headers: list[tuple[bytes, bytes]],
        body: AsyncIterator[bytes] | None = None,
        *,
        content_length: int | None = None,
        lease: Lease | None = None,
    ) -> UpstreamResponse:
        """Send ``method target`` with ``headers`` (no Host, no framing of the body but ``content_length`` when
        known: it is added here) and return the answer's head; the body follows through the response. ``lease``
        says who asks (default: a free request of no particular client, body sent whole)."""
        head, chunked = request_head(method, target, self.authority, headers, body is not None, content_length)
        lease = lease or Lease()
        if body is None:
            lease.uploading = False
        conn = await self._acquire(lease)
        try:
            return await conn.exchange(method, head, body, chunked)
        except StaleConnection:
            if method not in _REPLAYABLE or body is not None:
                raise ProtocolFailure("the upstream closed the connection without an answer") from None
        conn = await self._acquire(lease, fresh=True)
        try:
            return await conn.exchange(method, head, None, False)
        except StaleConnection:
            raise ProtocolFailure("the upstream closed the connection without an answer") from None

    # -- leases -------------------------------------------------------------------------------------------------

    def _may_hold(self, lease: Lease) -> bool:
        if not lease.paid and self._held_free >= self.free_limit:
            return False
        return not self._client_at_bound(lease)

    def _client_at_bound(self, lease: Lease) -> bool:
        if not (lease.uploading and lease.client is not None and self.per_client):
            return False
        return self._uploads.get(lease.client, 0) >= self.per_client

    def _take(self, lease: Lease) -> None:
        if not lease.paid:
            self._held_free += 1
        if lease.uploading and lease.client is not None:
            self._uploads[lease.client] = self._uploads.get(lease.client, 0) + 1

    def _untake(self, lease: Lease) -> None:
        if not lease.paid:
            self._held_free -= 1
        self._upload_over(lease)

    def _upload_over(self, lease: Lease) -> None:
        if lease.uploading and lease.client is not None:
            left = self._uploads.get(lease.client, 0) - 1
            if left > 0:
                self._uploads[lease.client] = left
            else:
                self._uploads.pop(lease.client, None)
        lease.uploading = False

    def upload_done(self, conn: Connection) -> None:
        """The request's body went up whole: it no longer counts against its client's upload bound."""
        lease = conn.lease
        if lease is not None and lease.uploading:
            self._upload_over(lease)
            self._dispatch()

    def release(self, conn: Connection, *, reusable: bool) -> None:
        """The exchange on ``conn`` ended: its lease ends, and the connection goes idle (or is closed)."""
        lease, conn.lease = conn.lease, None
        if lease is not None:
            self._untake(lease)
        if reusable and not self._closed and not conn.closed:
            conn.idle_since = self.loop.time()
            self._idle.append(conn)
        else:
            conn.close()
        self._dispatch()

    # -- acquiring ----------------------------------------------------------------------------------------------

    async def _acquire(self, lease: Lease, *, fresh: bool = False) -> Connection:
        """A connection for ``lease``: an idle one, a new one, or (none free to it) the next one freed that it may
        hold, handed over directly (see the module docstring)."""
        deadline = self.loop.time() + self.connect_timeout
        while True:
            if self._closed:
                raise ConnectFailed("the upstream client is closed")
            if self._may_hold(lease):
                if not fresh:
                    conn = self._take_idle()
                    if conn is not None:
                        self._take(lease)
                        conn.lease = lease
                        return conn
                if self._open < self.max_connections:
                    self._open += 1
                    self._take(lease)
                    return await self._connect(deadline, lease)
                if fresh and self._idle:  # full of idle connections: make room for a fresh one
                    self._idle.pop(0).close()
            waiter = _Waiter(lease, fresh, self.loop)
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout_at(deadline):
                    got = await waiter.future
            except BaseException as exc:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                elif waiter.future.done() and not waiter.future.cancelled():  # handed something as we gave up
                    handed = waiter.future.result()
                    if handed is None:
                        self._open -= 1
                        self._untake(lease)
                        self._dispatch()
                    else:
                        self.release(handed, reusable=True)
                if isinstance(exc, TimeoutError):
                    if self._client_at_bound(lease):
                        raise ClientBusy("this client's uploads hold all the connections it may use") from None
                    raise ConnectFailed("no upstream connection became free in time") from None
                raise
            if got is None:
                return await self._connect(deadline, lease)  # a slot was reserved for us (counted in _open)
            if not got.closed:
                got.reused = True
                return got
            # it closed on the way to us: its lease is ours to end; wait again (same deadline)
            self.release(got, reusable=False)

    def _dispatch(self) -> None:
        """Hand what is free to the waiters that may hold it: paid requests first, then free ones, each in arrival
        order; a waiter that may not hold a connection now is passed over, never blocking the ones behind it."""
        while self._waiters and not self._closed:
            waiter = self._next_waiter()
            if waiter is None:
                return
            if not waiter.fresh:
                conn = self._take_idle()
                if conn is not None:
                    self._waiters.remove(waiter)
                    self._take(waiter.lease)
                    conn.lease = waiter.lease
                    waiter.future.set_result(conn)
                    continue
            if self._open < self.max_connections:
                self._waiters.remove(waiter)
                self._open += 1
                self._take(waiter.lease)
                waiter.future.set_result(None)  # a slot to connect with
                continue
            if waiter.fresh and self._idle:
                self._idle.pop(0).close()  # its slot comes back through _forget
            return

    def _next_waiter(self) -> _Waiter | None:
        self._waiters = [w for w in self._waiters if not w.future.done()]
        for paid in (True, False):
            for waiter in self._waiters:
                if waiter.lease.paid == paid and self._may_hold(waiter.lease):
                    return waiter
        return None

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

    async def _connect(self, deadline: float, lease: Lease) -> Connection:
        """Open a connection in a slot already counted in ``_open``, and ``lease`` already taken, by the caller."""
        conn = Connection(self)
        conn.lease = lease
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
            self._connect_failed(conn)
            if isinstance(exc, TimeoutError):
                raise ConnectFailed("the upstream could not be reached in time") from None
            if isinstance(exc, OSError | ssl_module.SSLError):
                raise ConnectFailed("the upstream could not be reached") from None
            raise
        if conn.closed:  # lost before create_connection returned: never counted in _live, so count it out here
            self._connect_failed(conn)
            raise ConnectFailed("the upstream could not be reached")
        self._live.add(conn)
        return conn

    def _connect_failed(self, conn: Connection) -> None:
        conn.closed = True
        lease, conn.lease = conn.lease, None
        self._open -= 1
        if lease is not None:
            self._untake(lease)
        self._dispatch()

    def _forget(self, conn: Connection) -> None:
        """``conn`` is gone: whatever it held is free again."""
        lease, conn.lease = conn.lease, None
        if lease is not None:
            self._untake(lease)
        if conn in self._live:
            self._live.discard(conn)
            if conn in self._idle:
                self._idle.remove(conn)
            self._open -= 1
        self._dispatch()

    async def aclose(self) -> None:
        self._closed = True
        for conn in list(self._live):
            conn.close()
        self._idle.clear()
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.future.done():
                waiter.future.set_exception(ConnectFailed("the upstream client is closed"))
        await asyncio.sleep(0)  # let the transports' close callbacks run
