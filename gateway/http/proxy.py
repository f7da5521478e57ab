"""The upstream hop: a pure ASGI app that forwards a request to the one configured origin and streams back.

One keep-alive connection pool per proxy (:mod:`gateway.http.upstream`: asyncio protocols and the llhttp parser,
about 3x less CPU per request than aiohttp, itself 4-8x httpx's throughput in this role, see docs/development.md).
Nothing is buffered: the request body streams up, the response body streams down chunk by chunk.

Guarantees (docs/threat-model.md T14-T16, T19): scheme, host and port come from the constructor only, the request adds a
path (never above the base path) and a query; hop-by-hop, payment and client-sent forwarding headers never go upstream,
the gateway *sets* ``X-Forwarded-*`` and ``inject_headers`` overwrite client headers; ambiguous framing is a 400
with nothing sent; 413 over ``max_body_bytes``, 408 on a stalled body, bounded upstream timeouts; error messages
are fixed sentences (no origin URL, credentials or injected value) and ``repr`` names injected headers only.

Failure after ``http.response.start`` raises :class:`UpstreamAborted` so the server closes the connection and the
client sees a truncated body, never a second response. A client that disconnects aborts the upstream request
and ``__call__`` returns without (further) sending.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from urllib.parse import quote, unquote

from yarl import URL

from gateway.config import ServerConfig, UpstreamConfig
from gateway.errors import (
    BadGateway,
    BadRequest,
    GatewayError,
    PayloadTooLarge,
    RequestTimeout,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from gateway.http.asgi import Message, Receive, Scope, Send, send_error
from gateway.http.upstream import ConnectFailed, ReadTimeout, UpstreamError, UpstreamPool
from gateway.x402 import reasons

# Library defaults are the configuration's defaults, written once (gateway/config/).
_UPSTREAM = UpstreamConfig()
_SERVER = ServerConfig()

# RFC 9110 7.6.1; Proxy-Connection is the pre-standard spelling. Expect is answered by our own server (uvicorn
# sends 100 Continue), so forwarding it would make the upstream wait for a continue that we never await.
HOP_BY_HOP = frozenset(
    b"connection keep-alive proxy-authenticate proxy-authorization te trailer transfer-encoding upgrade "
    b"proxy-connection expect".split()
)
# Answered by our own server: the upstream's copy would be a second Date / Server field in the answer (Date is a
# singleton, RFC 9110 6.6.1), which strict clients refuse. nginx drops the same two by default.
UPSTREAM_OWN = frozenset({b"date", b"server"})
PAYMENT_HEADERS = frozenset(b"x-payment payment-signature x-payment-network x-payment-auth x-payment-binding".split())
# A client must not be able to claim an address, scheme or host: upstreams use these for auth and links.
FORWARDING_HEADERS = frozenset(
    b"forwarded x-forwarded-for x-forwarded-proto x-forwarded-host x-forwarded-port x-real-ip".split()
)
_RESPONSE_DROP = HOP_BY_HOP | UPSTREAM_OWN
# Methods whose upstream answer can reflect the injected API key (TRACE) or open a tunnel (CONNECT).
REFUSED_METHODS = frozenset({"TRACE", "CONNECT"})
# Everything that may appear unescaped in a path or query; anything else (raw non-ASCII, '#', '\\', space) is
# percent-encoded so no upstream parser can re-read or truncate it. '%' is safe: existing escapes pass untouched.
_PATH_SAFE = "/%:@!$&'()*+,;=-._~"
_QUERY_SAFE = _PATH_SAFE + "?"
_DOT_SEGMENTS = frozenset({".", ".."})
WATCH_AFTER = 0.05  # seconds into an exchange before a client's disconnect is watched for (see UpstreamProxy._http)


class UpstreamAborted(RuntimeError):
    """The upstream failed after the response started. Not a GatewayError on purpose: no answer can follow."""


@dataclass(slots=True)
class _Exchange:
    """What the body reader learned, read by the request task once the upstream client reports the failure it caused."""

    error: GatewayError | None = None
    disconnected: bool = False
    cancelled: bool = False  # the watcher cancelled the request task (tells our cancel from anyone else's)
    started: bool = False
    finished: bool = False
    body_done: asyncio.Event = field(default_factory=asyncio.Event)


class _BodyAborted(Exception):
    pass


def upstream_path(base: str, raw_path: str) -> str:
    """``base`` + the request path with dot segments (also ``%2e`` forms) resolved and empty segments merged.

    Resolution happens on the request path alone, so ``..`` can at most reach ``base``. Empty segments are merged
    so ``//evil/x`` cannot be read as a network-path reference by an upstream. A segment hiding ``..`` behind an
    encoded ``/`` or ``\\`` (``..%2F..``) is refused: an upstream that decodes before resolving would climb.
    """
    out: list[str] = []
    trailing = ""
    for seg in quote(raw_path, safe=_PATH_SAFE).split("/"):
        decoded = unquote(seg) if "%" in seg else seg
        trailing = "/" if not seg or decoded in _DOT_SEGMENTS else ""
        if decoded in _DOT_SEGMENTS:
            if decoded == ".." and out:
                out.pop()
        elif "%" in seg and ".." in decoded.replace("\\", "/").split("/"):
            raise BadRequest("encoded path traversal", reason=reasons.INVALID_PATH)
        elif seg:
            out.append(seg)
    if not out:
        return base.rstrip("/") + "/"
    return f"{base.rstrip('/')}/{'/'.join(out)}{trailing}"


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """The declared body length, or None when chunked/absent; refuses the framings smugglers rely on."""
    lengths = [v for k, v in headers if k.lower() == b"content-length"]
    chunked = any(k.lower() == b"transfer-encoding" for k, _ in headers)
    if lengths and chunked:  # front and back end may pick different framings: request smuggling
        raise BadRequest("Content-Length together with Transfer-Encoding", reason=reasons.AMBIGUOUS_CONTENT_LENGTH)
    if not lengths:
        return None
    if len(lengths) > 1 or not lengths[0].strip().isdigit():
        raise BadRequest("malformed or repeated Content-Length", reason=reasons.INVALID_CONTENT_LENGTH)
    return int(lengths[0])


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
        max_body_bytes: int | None = _SERVER.max_body_bytes,
        body_read_timeout: float = _SERVER.body_read_timeout,
        public_scheme: str | None = None,
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
        self._drop = (
            HOP_BY_HOP
            | PAYMENT_HEADERS
            | FORWARDING_HEADERS
            | {b"host"}
            | {k.encode("latin-1") for k in self._inject}
            | {h.lower().encode("latin-1") for h in strip_headers}
            | {b"content-length"}  # framing is the pool's: it writes the length (or chunks) it sends
        )
        self._inject_raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in self._inject.items()]
        # connect also bounds DNS and the wait for a pooled connection: a saturated pool answers 502, not a queue.
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._max_connections = max_connections
        self._max_body = max_body_bytes
        self._body_timeout = body_read_timeout
        self._public_scheme = public_scheme
        self._pool: UpstreamPool | None = None

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

    def _request_headers(self, scope: Scope) -> list[tuple[bytes, bytes]]:
        raw: list[tuple[bytes, bytes]] = scope["headers"]
        named: set[bytes] = set()
        hosts: list[bytes] = []
        for k, v in raw:
            name = k.lower()
            if name == b"connection":  # the headers it names are hop-by-hop too (RFC 9110 7.6.1)
                named.update(t.strip().lower() for t in v.split(b","))
            elif name == b"host":
                hosts.append(v)
        drop = self._drop | named if named else self._drop
        if len(hosts) > 1:  # which one the upstream would trust in X-Forwarded-Host is anyone's guess
            raise BadRequest("repeated Host header", reason=reasons.INVALID_HOST)
        out = [(k.lower(), v) for k, v in raw if k.lower() not in drop]
        client = scope.get("client")
        if client:
            out.append((b"x-forwarded-for", str(client[0]).encode("latin-1")))
        out.append((b"x-forwarded-proto", (self._public_scheme or str(scope.get("scheme", "http"))).encode("latin-1")))
        if hosts:
            out.append((b"x-forwarded-host", hosts[0]))
        out.extend(self._inject_raw)
        return out

    def _target(self, scope: Scope) -> str:
        """The request target sent upstream: the base path plus the resolved path, and the query."""
        raw = scope.get("raw_path")
        path = raw.decode("latin-1") if raw else quote(scope["path"], safe=_PATH_SAFE)
        query = quote(scope.get("query_string", b"").decode("latin-1"), safe=_QUERY_SAFE)
        target = upstream_path(self._base, path)
        return f"{target}?{query}" if query else target

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            if scope["method"] in REFUSED_METHODS:
                raise BadRequest("method not forwarded", reason=reasons.METHOD_NOT_ALLOWED)
            length = _content_length(scope["headers"])
            if length is not None and self._max_body is not None and length > self._max_body:
                raise PayloadTooLarge("request body exceeds the limit")
            headers = self._request_headers(scope)
            target = self._target(scope)
        except GatewayError as exc:  # refused before a byte went upstream
            await send_error(send, exc)
            return
        chunked = any(k.lower() == b"transfer-encoding" for k, _ in scope["headers"])
        state = _Exchange()
        body = self._body(receive, state) if chunked or (length or 0) > 0 else None
        if body is None:
            state.body_done.set()
        task = asyncio.current_task()
        assert task is not None
        # The disconnect watcher starts only if the exchange is still going after WATCH_AFTER: most answers are
        # relayed sooner, and a task per request is a tenth of a small request's CPU. A client that left earlier
        # is noticed then (the server keeps its disconnect for the first receive that asks).
        watcher: list[asyncio.Task[None]] = []
        timer = asyncio.get_running_loop().call_later(
            WATCH_AFTER,
            lambda: watcher.append(asyncio.ensure_future(self._watch_disconnect(receive, state, task))),
        )
        try:
            await self._exchange(
                scope["method"], target, headers=headers, body=body, length=length, state=state, send=send
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
    ) -> None:
        await self.start()
        assert self._pool is not None
        try:
            resp = await self._pool.request(method, target, headers, body, content_length=length)
            try:
                drop = _RESPONSE_DROP
                for k, v in resp.headers:
                    if k.lower() == b"connection":
                        drop = drop | {t.strip().lower() for t in v.split(b",")}
                out = [(k.lower(), v) for k, v in resp.headers if k.lower() not in drop]
                state.started = True
                await send({"type": "http.response.start", "status": resp.status, "headers": out})
                chunk = b"" if method == "HEAD" else await resp.next_chunk()
                while not (method == "HEAD" or resp.at_eof):
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    chunk = await resp.next_chunk()
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
            await send_error(send, state.error or _map_error(exc))

    async def _body(self, receive: Receive, state: _Exchange) -> AsyncIterator[bytes]:
        """Stream the client's body upstream, enforcing the size cap and the per-chunk deadline."""
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
                if chunk:
                    yield chunk
                if not message.get("more_body", False):
                    return
        finally:
            state.body_done.set()

    @staticmethod
    async def _watch_disconnect(receive: Receive, state: _Exchange, task: asyncio.Task[None]) -> None:
        """Cancel the request task when the client leaves: an abandoned upstream request must not run on."""
        await state.body_done.wait()  # one reader of receive at a time: the body stream goes first
        if state.disconnected:
            return
        while (await receive())["type"] != "http.disconnect":
            pass
        if not state.finished:
            state.disconnected = state.cancelled = True
            task.cancel()


def _map_error(exc: BaseException) -> GatewayError:
    """A fixed sentence per failure class (the client's own messages never name the origin either)."""
    if isinstance(exc, ConnectFailed):
        return UpstreamUnreachable("upstream could not be reached")
    if isinstance(exc, ReadTimeout):
        return UpstreamTimeout("upstream did not answer in time")
    return BadGateway("upstream answered in a way that could not be relayed")


__all__ = ["UpstreamAborted", "UpstreamProxy", "upstream_path"]
