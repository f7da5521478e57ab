"""The upstream hop: a pure ASGI app that forwards a request to the one configured origin and streams back.

One keep-alive connection pool per proxy (:mod:`gateway.http.upstream`: asyncio protocols and the llhttp parser,
about 3x less CPU per request than aiohttp, itself 4-8x httpx's throughput in this role, see docs/development.md).
Little is buffered: a request body's first 64 KiB are read before a connection is taken (a chunked body that ends
within them goes up with a Content-Length, which many upstreams need), the rest streams up; a paid answer declaring
up to 1 MiB is read whole before its status line (docs/threat-model.md T11); any other answer streams down chunk by
chunk.

Guarantees (docs/threat-model.md T14-T16, T19): scheme, host and port come from the constructor only, the request adds a
path (never above the base path) and a query; hop-by-hop, payment and client-sent forwarding headers never go upstream,
the gateway *sets* ``X-Forwarded-*`` and ``inject_headers`` overwrite client headers; ambiguous framing is a 400
with nothing sent; 413 over ``max_body_bytes``, 408 on a stalled body, bounded upstream timeouts; error messages
are fixed sentences (no origin URL, credentials or injected value) and ``repr`` names injected headers only.

What the upstream routes is what the gateway priced (docs/threat-model.md T34, T36, T37): method and URL override
headers and ``_method`` query parameters are dropped (``strip_method_override``); ``inject_headers`` go only on
requests a verified payment let through, on the gateway's own job calls (:meth:`UpstreamProxy.credentialed`) and
where ``inject_on`` says; a ``Location`` or ``Content-Location`` naming the upstream's origin is rewritten to the
gateway's public URL (or to a path), and a redirect that named it loses its body.
The rules for what is forwarded (headers, target, answer URLs) live in :mod:`gateway.http.forwarding`.

Failure after ``http.response.start`` raises :class:`UpstreamAborted` so the server closes the connection and the
client sees a truncated body, never a second response. A failure already known when the head arrives (the answer
garbled or cut short in the same read) is a 502 instead; and a paid answer that declares a length up to
:data:`WHOLE_BEFORE_START` is read whole first, so the upstream cutting it short is a 502 that the payment layer
never settles (it settles on the status line, docs/threat-model.md T11).

A client that disconnects aborts the upstream request and ``__call__`` returns without (further) sending, unless
the request is paid and the upstream has all of it: that exchange runs until its status line is relayed (the server
drops it) and its payment is spent (docs/threat-model.md T11); the rest of its body is not read.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

from yarl import URL

from gateway.config import ServerConfig, UpstreamConfig
from gateway.config.upstream import InjectHeadersOn
from gateway.errors import (
    BadGateway,
    BadRequest,
    GatewayError,
    NotImplementedHere,
    PayloadTooLarge,
    RequestTimeout,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from gateway.http.asgi import ASGIApp, Message, Receive, Scope, Send, send_error
from gateway.http.forwarding import CREDENTIALS_KEY, SERVER_KEEPS_DATE, Forwarding, upstream_path
from gateway.http.upstream import (
    ClientBusy,
    ConnectFailed,
    Lease,
    ReadTimeout,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
)
from gateway.x402 import reasons

# Library defaults are the configuration's defaults, written once (gateway/config/).
_UPSTREAM = UpstreamConfig()
_SERVER = ServerConfig()

# Methods whose upstream answer can reflect the injected API key (TRACE) or open a tunnel (CONNECT).
REFUSED_METHODS = frozenset({"TRACE", "CONNECT"})
WATCH_AFTER = 0.05  # seconds into an exchange before a client's disconnect is watched for (see UpstreamProxy._http)
# A request body up to this size is read whole before an upstream connection is taken, so a client that sends it
# slowly holds nothing upstream; a larger one streams from here on, under the pool's per-client upload bound
# (docs/threat-model.md T39).
PREFETCH_BYTES = 64 * 1024
# A paid answer that declares a length up to this is read whole before its status line is relayed: the payment
# layer settles on the status line (docs/threat-model.md T11), so an answer the upstream cuts short must fail before
# it, as a 502, not after it as a truncated body that was charged. As much as a connection buffers anyway before it
# pauses reading (gateway/http/upstream/connection.py), so it costs no memory an answer could not take already.
WHOLE_BEFORE_START = 1 << 20


class UpstreamAborted(RuntimeError):
    """The upstream failed after the response started. Not a GatewayError on purpose: no answer can follow."""


class _Exchange:
    """What the body reader learned, read by the request task once the upstream client reports the failure it caused."""

    __slots__ = ("_body_event", "body_over", "cancelled", "disconnected", "error", "finished", "started")

    def __init__(self) -> None:
        self.error: GatewayError | None = None
        self.disconnected = False
        self.cancelled = False  # the watcher cancelled the request task (tells our cancel from anyone else's)
        self.started = False
        self.finished = False
        self.body_over = False  # the request body was read whole (or its reading ended), or there is none
        self._body_event: asyncio.Event | None = None  # made only for a watcher that has to wait for it

    def body_done(self) -> None:
        self.body_over = True
        if self._body_event is not None:
            self._body_event.set()

    async def body_read(self) -> None:
        """Until :meth:`body_done`."""
        if not self.body_over:
            if self._body_event is None:
                self._body_event = asyncio.Event()
            await self._body_event.wait()


class _BodyAborted(Exception):
    pass


def _framing(headers: list[tuple[bytes, bytes]]) -> tuple[int | None, bool]:
    """The declared body length (None when chunked/absent) and whether a ``Transfer-Encoding`` is present; refuses
    the framings smugglers rely on."""
    lengths: list[bytes] = []
    chunked = False
    for k, v in headers:
        name = k.lower()
        if name == b"content-length":
            lengths.append(v)
        elif name == b"transfer-encoding":
            chunked = True
            if v.strip().lower() != b"chunked":
                # ``gzip, chunked``: the server takes the chunks off, and the body that is left is still gzip; sent
                # on without its coding, the upstream would read other bytes than the client sent (RFC 9112 6.1).
                raise NotImplementedHere(
                    "only the chunked transfer coding is supported", reason=reasons.UNSUPPORTED_TRANSFER_CODING
                )
    if lengths and chunked:  # front and back end may pick different framings: request smuggling
        raise BadRequest("Content-Length together with Transfer-Encoding", reason=reasons.AMBIGUOUS_CONTENT_LENGTH)
    if not lengths:
        return None, chunked
    if len(lengths) > 1 or not lengths[0].strip().isdigit():
        raise BadRequest("malformed or repeated Content-Length", reason=reasons.INVALID_CONTENT_LENGTH)
    return int(lengths[0]), chunked


class UpstreamProxy:
    """ASGI app forwarding every HTTP request to ``origin`` (``scheme://host[:port][/base/path]``)."""

    def __init__(
        self,
        origin: str,
        *,
        inject_headers: Mapping[str, str] | None = None,
        strip_headers: Iterable[str] = (),
        connect_timeout: float = _UPSTREAM.connect_timeout,
        read_timeout: float = _UPSTREAM.read_timeout,
        max_connections: int = _UPSTREAM.max_connections,
        reserved_for_paid: float = _UPSTREAM.reserved_for_paid,
        max_uploads_per_client: int = _UPSTREAM.max_uploads_per_client,
        max_body_bytes: int | None = _SERVER.max_body_bytes,
        body_read_timeout: float = _SERVER.body_read_timeout,
        public_scheme: str | None = None,
        public_url: str | None = None,
        inject_on: InjectHeadersOn = _UPSTREAM.inject_headers_on,
        strip_method_override: bool = _UPSTREAM.strip_method_override,
    ) -> None:
        url = URL(origin)
        if url.scheme not in ("http", "https") or not url.host or url.raw_query_string or url.raw_fragment:
            raise ValueError("origin must be http(s)://host[:port][/path] without query or fragment")
        self._scheme = url.scheme
        self._host: str = url.raw_host or ""
        self._port: int = url.port or (443 if url.scheme == "https" else 80)
        self._authority: str = url.host_port_subcomponent or ""
        self._base = url.raw_path
        # Lowercase names, like everything else we forward: "overwrite" must not depend on the spelling.
        self._inject = {k.lower(): v for k, v in (inject_headers or {}).items()}
        if url.raw_user is not None and "authorization" not in self._inject:
            # credentials in the origin become a header: never part of a request line or an error message
            userinfo = f"{url.user or ''}:{url.password or ''}".encode()
            self._inject["authorization"] = "Basic " + base64.b64encode(userinfo).decode("ascii")
        self._forwarding = Forwarding(
            scheme=self._scheme,
            host=self._host,
            port=self._port,
            base=self._base,
            inject=self._inject,
            strip_headers=strip_headers,
            inject_on=inject_on,
            strip_method_override=strip_method_override,
            public_scheme=public_scheme,
            public_url=public_url,
        )
        # connect also bounds DNS and the wait for a pooled connection: a saturated pool answers 502, not a queue.
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._max_connections = max_connections
        self._reserved = int(max_connections * reserved_for_paid)
        self._uploads_per_client = max_uploads_per_client
        self._max_body = max_body_bytes
        self._body_timeout = body_read_timeout
        self._pool: UpstreamPool | None = None

    def credentialed(self) -> ASGIApp:
        """This proxy for calls the gateway itself decided to make (the jobs layer's status, cancel, list and
        health calls for a proven payer): the ``inject_headers`` go with them whatever ``inject_on`` says."""

        async def call(scope: Scope, receive: Receive, send: Send) -> None:
            await self({**scope, CREDENTIALS_KEY: True}, receive, send)

        return call

    def __repr__(self) -> str:
        names = sorted(self._inject)  # names only: the values are the upstream's API keys
        return f"UpstreamProxy(origin={self._scheme}://{self._authority}{self._base}, inject_headers={names})"

    async def start(self) -> None:
        if self._pool is None:
            self._pool = UpstreamPool(
                self._host,
                self._port,
                tls=self._scheme == "https",
                authority=self._authority,
                max_connections=self._max_connections,
                reserved=self._reserved,
                per_client=self._uploads_per_client,
                connect_timeout=self._connect_timeout,
                read_timeout=self._read_timeout,
            )

    async def aclose(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "websocket":
            await receive()  # websocket.connect; closing before accept makes the server answer 403
            await send({"type": "websocket.close", "code": 1008})
        elif kind == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await self.start()
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await self.aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            if scope["method"] in REFUSED_METHODS:
                raise BadRequest("method not forwarded", reason=reasons.METHOD_NOT_ALLOWED)
            length, chunked = _framing(scope["headers"])
            if length is not None and self._max_body is not None and length > self._max_body:
                raise PayloadTooLarge("request body exceeds the limit")
            headers = self._forwarding.request_headers(scope)
            target = self._forwarding.target(scope)
        except GatewayError as exc:  # refused before a byte went upstream
            await send_error(send, exc)
            return
        state = _Exchange()
        body = self._body(receive, state, length) if chunked or (length or 0) > 0 else None
        if body is None:
            state.body_done()
        task = asyncio.current_task()
        assert task is not None
        lease = _lease(scope)
        # The disconnect watcher starts only if the exchange is still going after WATCH_AFTER: most answers are
        # relayed sooner, and a task per request is a tenth of a small request's CPU. A client that left earlier
        # is noticed then (the server keeps its disconnect for the first receive that asks).
        watcher: list[asyncio.Task[None]] = []
        timer = asyncio.get_running_loop().call_later(
            WATCH_AFTER, _start_watching, watcher, receive, state, task, lease
        )
        try:
            await self._exchange(
                scope["method"],
                target,
                headers=headers,
                body=body,
                length=length,
                state=state,
                send=send,
                lease=lease,
                pending=_pending_charge(scope),
                keep_date=scope.get(SERVER_KEEPS_DATE) is True,
            )
        except asyncio.CancelledError:
            if state.cancelled and task.uncancel() == 0:
                return  # our own cancellation: the client left, the upstream request is aborted
            raise
        finally:
            state.finished = True
            timer.cancel()
            for watching in watcher:
                watching.cancel()

    async def _exchange(
        self,
        method: str,
        target: str,
        *,
        headers: list[tuple[bytes, bytes]],
        body: AsyncIterator[bytes] | None,
        length: int | None,
        state: _Exchange,
        send: Send,
        lease: Lease,
        pending: dict[str, Any] | None = None,
        keep_date: bool = False,
    ) -> None:
        """``pending``: while its ``charge_at_end`` is set, the payment's charge is still to be read from the answer
        (a metered session), so the answer is read on even when the client left (docs/threat-model.md T11).
        ``keep_date``: the server keeps the answer's own Date and Server (see ``Forwarding.response_headers``)."""
        await self.start()
        assert self._pool is not None
        try:
            if body is not None:  # a connection is taken only once there is something to send
                body, whole, size = await _prefetch(body)
                lease.uploading = not whole
                if whole and length is None:
                    # A chunked body that is all here goes up with its length: many upstreams (uWSGI, PHP-FPM,
                    # HTTP/1.0 servers) take no chunked request body, and would work on an empty one or refuse it.
                    length = size
            resp = await self._pool.request(method, target, headers, body, content_length=length, lease=lease)
            try:
                held = await _whole_body(resp) if lease.paid and method != "HEAD" else None
                if resp.error is not None:  # already known to be cut short or garbled: a 502, not a truncated answer
                    raise resp.error
                out, rewritten = self._forwarding.response_headers(resp.headers, keep_date=keep_date)
                # A redirect's body is a note repeating its Location (Express: "Redirecting to http://..."): when
                # that named the upstream's origin, the note goes too, so the origin is not shown there instead.
                silent = rewritten and 300 <= resp.status < 400
                if silent:
                    out = [(k, v) for k, v in out if k != b"content-length"] + [(b"content-length", b"0")]
                elif resp.status in (204, 304):
                    # No body by definition, whatever length it declares (a 304 may repeat the representation's):
                    # relayed, the length would make our server wait for bytes that never come and cut the reply.
                    out = [(k, v) for k, v in out if k not in (b"content-length", b"transfer-encoding")]
                state.started = True
                await send({"type": "http.response.start", "status": resp.status, "headers": out})
                streams = method != "HEAD" and held is None
                chunk = b""
                if held:  # read whole already: relayed as it came, without one more copy of it joined
                    *first, chunk = held
                    for part in first if not silent else ():
                        await send({"type": "http.response.body", "body": part, "more_body": True})
                if streams:
                    chunk = await resp.next_chunk()
                while streams and not resp.at_eof:
                    if not silent:
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    if state.disconnected and not (pending is not None and pending.get("charge_at_end")):
                        # A paid request the client left runs on only until its status line is relayed (and its
                        # payment settled on it, docs/threat-model.md T11): the rest of the answer is for no one,
                        # and an endless stream would hold its upstream connection for ever. Unless its charge is
                        # read from the answer's end: stopping here would leave the work done and nothing charged.
                        return
                    chunk = await resp.next_chunk()
                if silent:
                    chunk = b""
                # the last chunk (a small answer's only one) ends the body: no empty message after it
                state.finished = True  # from here a disconnect notice is the server's end-of-response, not a cancel
                await send({"type": "http.response.body", "body": chunk, "more_body": False})
            finally:
                resp.close()
        except (UpstreamError, _BodyAborted, OSError) as exc:
            if state.disconnected:
                return
            if state.started:
                raise UpstreamAborted("upstream failed after the response started") from None
            error = state.error or _map_error(exc)
            await send_error(send, error, [(b"retry-after", b"1")] if error.status == 429 else ())

    async def _body(self, receive: Receive, state: _Exchange, length: int | None) -> AsyncIterator[bytes]:
        """Stream the client's body upstream, enforcing the size cap, the per-chunk deadline and, for a declared
        ``length`` (sent upstream as the request's Content-Length), exactly that many bytes: fewer would make the
        upstream read the start of the next request on the connection as this body, more would be read as a request
        of its own (docs/threat-model.md T14). The server frames the body by that same length, so a mismatch is
        a server (or an ASGI layer) disagreeing with it: the request is refused before its last byte goes up."""
        seen = 0
        try:
            while True:
                try:
                    async with asyncio.timeout(self._body_timeout):  # slowloris: a stalled upload holds a socket
                        message: Message = await receive()
                except TimeoutError:
                    state.error = RequestTimeout("request body not received in time")
                    raise _BodyAborted from None
                if message["type"] == "http.disconnect":
                    state.disconnected = True
                    raise _BodyAborted
                chunk: bytes = message.get("body", b"")
                seen += len(chunk)
                if self._max_body is not None and seen > self._max_body:  # a chunked body has no declared size
                    state.error = PayloadTooLarge("request body exceeds the limit")
                    raise _BodyAborted
                last = not message.get("more_body", False)
                if length is not None and (seen > length or (last and seen != length)):
                    state.error = BadRequest(
                        "request body does not match its Content-Length", reason=reasons.INVALID_CONTENT_LENGTH
                    )
                    raise _BodyAborted
                if chunk:
                    yield chunk
                if last:
                    return
        finally:
            state.body_done()

    @staticmethod
    async def _watch_disconnect(receive: Receive, state: _Exchange, task: asyncio.Task[None], lease: Lease) -> None:
        """Cancel the request task when the client leaves: an abandoned upstream request must not run on. A paid
        one the upstream already has whole runs to its end instead, its answer dropped by the server: the payment
        layer then settles it as served. Cancelled, it would look unserved and its payment would come back, good
        for the same upstream work again after every hang-up (docs/threat-model.md T11)."""
        await state.body_read()  # one reader of receive at a time: the body stream goes first
        if state.disconnected:
            return
        while (await receive())["type"] != "http.disconnect":
            pass
        if state.finished:
            return
        state.disconnected = True  # an upstream failure from here on has no one to be told to
        if lease.paid and lease.sent:
            return
        state.cancelled = True
        task.cancel()


def _start_watching(
    watcher: list[asyncio.Task[None]], receive: Receive, state: _Exchange, task: asyncio.Task[None], lease: Lease
) -> None:
    watcher.append(asyncio.ensure_future(UpstreamProxy._watch_disconnect(receive, state, task, lease)))


def _payment(scope: Scope) -> dict[str, Any] | None:
    """The payment layer's record of this request, which PaymentMiddleware puts in the scope's state (None: free)."""
    state = scope.get("state")
    paid = state.get("x402") if isinstance(state, dict) else None
    return paid if isinstance(paid, dict) else None


def _pending_charge(scope: Scope) -> dict[str, Any] | None:
    """The payment's record when its ``charge_at_end`` says whether the charge is still to be read from the answer
    (a session on a route metered by the answer's JSON, until the meter has what it needs)."""
    paid = _payment(scope)
    return paid if paid is not None and "charge_at_end" in paid else None


def _lease(scope: Scope) -> Lease:
    """Who holds the upstream connection for this request: a verified payment's payer (PaymentMiddleware put it in
    the scope's state), or else the client's address; an IPv6 client counts by its /64, the block one host gets."""
    paid = _payment(scope)
    if paid is not None and paid.get("payer"):
        return Lease(paid=True, client=f"payer:{str(paid['payer']).lower()}")
    client = scope.get("client")
    if not client:
        return Lease()
    address = str(client[0])
    key = _CLIENT_KEYS.get(address)
    if key is None:
        key = client_key(address)
        if len(_CLIENT_KEYS) >= _CLIENT_KEYS_KEPT:
            _CLIENT_KEYS.clear()  # bounded, whatever addresses arrive; a busy gateway sees a few it keeps meeting
        _CLIENT_KEYS[address] = key
    return Lease(client=key)


def client_key(address: str) -> str:
    """The upload-bound key of a client address: ``ip:`` and the address in its canonical form (an IPv4-mapped
    IPv6 address as its IPv4 one), an IPv6 address's /64 network; an address that does not parse as it is."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return f"ip:{address}"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return f"ip:{ip.ipv4_mapped}"
        return f"ip:{ipaddress.ip_network(f'{ip}/64', strict=False)}"
    return f"ip:{ip}"


# client address -> client_key(address): parsing and formatting an address costs more than the rest of the lease
_CLIENT_KEYS: dict[str, str] = {}
_CLIENT_KEYS_KEPT = 4096


async def _whole_body(resp: UpstreamResponse) -> list[bytes] | None:
    """The whole body, as it came, of an answer that declares a length up to :data:`WHOLE_BEFORE_START` (raises
    the upstream client's error if it is cut short); None for any other answer, which streams."""
    declared = next((v for k, v in resp.headers if k.lower() == b"content-length"), None)
    if declared is None or int(declared) > WHOLE_BEFORE_START:  # llhttp took it: one field, digits only
        return None
    parts: list[bytes] = []
    while not resp.at_eof:
        parts.append(await resp.next_chunk())
    return parts


async def _prefetch(body: AsyncIterator[bytes]) -> tuple[AsyncIterator[bytes], bool, int]:
    """Read up to :data:`PREFETCH_BYTES` of ``body``; the same body to send, whether it is all there, and the
    bytes read."""
    parts: list[bytes] = []
    size = 0
    while size < PREFETCH_BYTES:
        try:
            chunk = await anext(body)
        except StopAsyncIteration:
            return _replay(parts, None), True, size
        parts.append(chunk)
        size += len(chunk)
    return _replay(parts, body), False, size


async def _replay(parts: list[bytes], rest: AsyncIterator[bytes] | None) -> AsyncIterator[bytes]:
    if parts:
        yield b"".join(parts)  # one write with the head for a small body
    if rest is not None:
        async for chunk in rest:
            yield chunk


def _map_error(exc: BaseException) -> GatewayError:
    """A fixed sentence per failure class (the client's own messages never name the origin either)."""
    if isinstance(exc, ClientBusy):
        busy = GatewayError("too many uploads in progress from this client", reason=reasons.TOO_MANY_UPLOADS)
        busy.status = 429  # type: ignore[misc]
        return busy
    if isinstance(exc, ConnectFailed):
        return UpstreamUnreachable("upstream could not be reached")
    if isinstance(exc, ReadTimeout):
        return UpstreamTimeout("upstream did not answer in time")
    return BadGateway("upstream answered in a way that could not be relayed")


__all__ = ["CREDENTIALS_KEY", "UpstreamAborted", "UpstreamProxy", "upstream_path"]
