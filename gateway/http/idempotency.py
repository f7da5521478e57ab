"""``IdempotencyLayer``: a retry with the same ``Idempotency-Key`` and payment gets the stored answer
(docs/threat-model.md T13).

The problem it solves: a client pays, the gateway settles and serves, the response is lost in transit; the retry
with the same payment header is refused 402 ``payment_already_used``: paid, got nothing. With an
``Idempotency-Key`` request header (draft-ietf-httpapi-idempotency-key-header-06) the retry gets the stored
answer instead. Pure ASGI, placed *outside* the payment middleware.

Scope: only a request carrying ``Idempotency-Key`` *and* a payment header (``PAYMENT-SIGNATURE`` or ``X-PAYMENT``)
on a route ``is_priced(scope)`` says is priced (the gateway asks the request context). Everything else passes
through untouched and unbuffered.

* Key: 1..255 printable ASCII characters (0x20-0x7E), exactly one header, else 400 ``invalid_idempotency_key``.
  A structured-field string (``"abc"``) is taken verbatim, quotes included: the retry sends the same bytes.
* Record key = sha256(key, every raw value of PAYMENT-SIGNATURE, X-PAYMENT, X-PAYMENT-NETWORK, X-PAYMENT-BINDING,
  X-PAYMENT-AUTH): a stored answer is bound to the payment that paid for it, so nobody can fetch someone else's
  answer without holding their payment proof. The raw bytes on purpose (unlike the receipt store's normalised
  money key, docs/threat-model.md T1): a re-encoded payment is another record and meets the payment layer's replay
  refusal.
* Fingerprint = sha256(method, raw path, query, body). The body is buffered (``max_body_bytes``, else 413
  ``payload_too_large``; a stalled upload 408) and replayed to the inner app through a new ``receive``.

Answers, from the store's atomic ``begin``:

* absent (or an in-flight record whose lease lapsed: a crashed gateway) -> IN_FLIGHT, call the inner app;
* live record with another fingerprint -> **422** ``idempotency_key_reused`` (the draft: "SHOULD reply with a
  HTTP 422" for a key reused with a different request payload), checked before the in-flight test;
* IN_FLIGHT -> **409** ``idempotency_key_in_flight`` (the draft's 409 for a concurrent retry), ``Retry-After: 1``;
* DONE -> the stored status, headers (minus hop-by-hop and Date) and body plus ``Idempotent-Replayed: true``,
  without calling the inner app: no payment verification, no upstream call, no charge.

While the inner app answers, the body streams to the client as it goes and is accumulated on the side. Stored
(DONE, ``ttl``) only when the status is < 400 and the app sent the complete body and returned normally. Deleted
instead (the retry then proceeds normally) on status >= 400, an exception, a cancellation, a truncated body, a
response with trailers, or a body over ``max_stored_body_bytes``. NOTE on the last: a 2xx body too large to
store has been paid for, so its retry meets 402 ``payment_already_used``, as without this layer.

Client disconnects: once the request is IN_FLIGHT, a client disconnect is *hidden* from the inner app while the
answer can still be stored, so a paid answer runs to completion and is stored for the retry (the point of the
feature: the response was lost in transit). The disconnect is passed on as soon as the answer cannot be stored
(status >= 400, over the size cap), so an abandoned upstream request that nobody can use is still aborted.
Bounded by the upstream timeouts; ``lease`` must exceed the longest request (default 10 min).

Fail closed (docs/threat-model.md T17): a store that cannot answer ``begin`` -> 503 ``store_unavailable``, inner app not
called. If storing or deleting fails after the answer went out, the record stays IN_FLIGHT until its lease lapses
(retries get 409 meanwhile, then proceed normally). Replays bypass the payment middleware, so its observers (metrics,
access log) do not see them; they are logged here at INFO.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from gateway.config import IdempotencyConfig, ServerConfig
from gateway.errors import BadRequest, GatewayError, PayloadTooLarge, RequestTimeout, StoreUnavailable
from gateway.http.asgi import ASGIApp, Message, Receive, Scope, Send, lifespan_hooks, send_error
from gateway.storage.idempotency import (
    Begun,
    IdempotencyStore,
    RedisIdempotencyStore,
    SQLiteIdempotencyStore,
    StoredResponse,
    open_idempotency_store,
)
from gateway.tasks import stop
from gateway.x402 import reasons

log = logging.getLogger("gateway.idempotency")

__all__ = [
    "IdempotencyInFlight",
    "IdempotencyKeyReused",
    "IdempotencyLayer",
    "IdempotencyStore",
    "InvalidIdempotencyKey",
    "RedisIdempotencyStore",
    "SQLiteIdempotencyStore",
    "StoredResponse",
    "open_idempotency_store",
]

KEY_HEADER = b"idempotency-key"
REPLAYED_HEADER = (b"idempotent-replayed", b"true")
MAX_KEY_LENGTH = 255
PAYMENT_HEADERS = (b"payment-signature", b"x-payment")
# Everything that identifies the payment (gateway/http/proxy.py PAYMENT_HEADERS): all of it goes into the record key.
PAYMENT_BINDING_HEADERS = (
    b"payment-signature",
    b"x-payment",
    b"x-payment-network",
    b"x-payment-binding",
    b"x-payment-auth",
)
# RFC 9110 7.6.1 hop-by-hop, plus Date (the server stamps a fresh one) and Content-Length (recomputed on replay).
_NOT_STORED = frozenset(
    b"connection keep-alive proxy-authenticate proxy-authorization te trailer transfer-encoding upgrade "
    b"proxy-connection date".split()
)


class InvalidIdempotencyKey(BadRequest):
    default_reason = reasons.INVALID_IDEMPOTENCY_KEY


class IdempotencyKeyReused(GatewayError):
    status = 422
    default_reason = reasons.IDEMPOTENCY_KEY_REUSED


class IdempotencyInFlight(GatewayError):
    status = 409
    default_reason = reasons.IDEMPOTENCY_KEY_IN_FLIGHT


def _digest(label: bytes, parts: Iterable[bytes]) -> str:
    h = hashlib.sha256(label)
    for part in parts:  # length-prefixed: no two different part lists hash alike
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()


def _values(scope: Scope, name: bytes) -> list[bytes]:
    return [bytes(v) for k, v in scope.get("headers", ()) if k == name]


def _valid_key(key: bytes) -> bool:
    return 1 <= len(key) <= MAX_KEY_LENGTH and all(0x20 <= c <= 0x7E for c in key)


def record_key(scope: Scope, key: bytes) -> str:
    parts: list[bytes] = [key]
    for name in PAYMENT_BINDING_HEADERS:
        values = _values(scope, name)
        parts += [name, str(len(values)).encode(), *values]
    return _digest(b"x402-idempotency-record-v1", parts)


def fingerprint(scope: Scope, body: bytes) -> str:
    raw_path: bytes = scope.get("raw_path") or scope["path"].encode("utf-8")
    return _digest(
        b"x402-idempotency-request-v1",
        [scope["method"].encode("latin-1"), raw_path, scope.get("query_string", b""), body],
    )


def _storable_headers(
    headers: Iterable[tuple[bytes, bytes]], not_stored: frozenset[bytes] = _NOT_STORED
) -> list[tuple[bytes, bytes]]:
    pairs = [(bytes(k).lower(), bytes(v)) for k, v in headers]
    listed = {t.strip() for k, v in pairs if k == b"connection" for t in v.lower().split(b",")}
    return [(k, v) for k, v in pairs if k not in not_stored and k not in listed]


class _Capture:
    """The inner app's answer as it passes: status, headers, and as much body as may be stored."""

    def __init__(self, limit: int, not_stored: frozenset[bytes] = _NOT_STORED) -> None:
        self.limit = limit
        self.not_stored = not_stored
        self.status: int | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: list[bytes] = []
        self.size = 0
        self.complete = False
        self.storable = True  # False once this answer can no longer be stored

    def see(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start" and self.status is None:
            self.status = int(message["status"])
            self.headers = _storable_headers(message.get("headers", ()), self.not_stored)
            if self.status >= 400 or message.get("trailers", False):
                self.storable = False
        elif kind == "http.response.body" and self.status is not None and not self.complete:
            chunk = bytes(message.get("body", b""))
            self.size += len(chunk)
            if self.size > self.limit:
                self.storable, self.chunks = False, []
            elif self.storable:
                self.chunks.append(chunk)
            if not message.get("more_body", False):
                self.complete = True
        else:  # a second start, an extension message (pathsend, trailers...): not something we can replay
            self.storable = False

    def response(self) -> StoredResponse | None:
        if not (self.storable and self.complete and self.status is not None):
            return None
        return StoredResponse(self.status, self.headers, b"".join(self.chunks))


# Library defaults are the configuration's defaults, written once (gateway/config/).
_IDEMPOTENCY = IdempotencyConfig()
_SERVER = ServerConfig()


class IdempotencyLayer:
    """Pure ASGI middleware; see the module docstring. ``store`` is an :class:`IdempotencyStore` or its URL."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        store: IdempotencyStore | str,
        is_priced: Callable[[Scope], bool],
        ttl: float = _IDEMPOTENCY.ttl,
        lease: float = _IDEMPOTENCY.lease,
        max_body_bytes: int = _SERVER.max_body_bytes,
        max_stored_body_bytes: int = _IDEMPOTENCY.max_stored_body_bytes,
        body_read_timeout: float = _SERVER.body_read_timeout,
        secret_headers: Iterable[str] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        if ttl <= 0 or lease <= 0 or max_body_bytes < 0 or max_stored_body_bytes < 0 or body_read_timeout <= 0:
            raise ValueError("ttl, lease and body_read_timeout must be > 0, the byte limits >= 0")
        self.app = app
        self.store: IdempotencyStore = open_idempotency_store(store) if isinstance(store, str) else store
        self.is_priced = is_priced
        self.ttl = ttl
        self.lease = lease
        self.max_body_bytes = max_body_bytes
        self.max_stored_body_bytes = max_stored_body_bytes
        self.body_read_timeout = body_read_timeout
        # Answer fields that are credentials (a job's access token): never written to the store, so a replayed
        # answer goes without them (docs/jobs.md, "Payer auth").
        self.not_stored = _NOT_STORED | {name.lower().encode("latin-1") for name in secret_headers}
        self.clock = clock

    # ---------------------------------------------------------------------------------------------- lifecycle

    async def startup(self) -> None:
        """Fail fast on a store that cannot answer (raises ``StoreUnavailable``)."""
        await self.store.ping()

    async def aclose(self) -> None:
        await self.store.aclose()

    # ----------------------------------------------------------------------------------------------- requests

    def _applies(self, scope: Scope) -> bool:
        keyed = paying = False
        for k, _ in scope.get("headers", ()):  # one pass (every request asks)
            if k == KEY_HEADER:
                keyed = True
            elif k in PAYMENT_HEADERS:
                paying = True
        return keyed and paying and self.is_priced(scope)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, lifespan_hooks(receive, self.startup, self.aclose), send)
            return
        if scope["type"] != "http" or not self._applies(scope):
            await self.app(scope, receive, send)
            return
        try:
            keys = _values(scope, KEY_HEADER)
            if len(keys) != 1 or not _valid_key(keys[0]):
                raise InvalidIdempotencyKey(
                    f"Idempotency-Key must be one header of 1 to {MAX_KEY_LENGTH} printable ASCII characters"
                )
            body = await self._read_body(scope, receive)
        except GatewayError as exc:
            close = isinstance(exc, PayloadTooLarge | RequestTimeout)  # the rest of the body was not read
            await send_error(send, exc, [(b"connection", b"close")] if close else [])
            return
        if body is None:
            return  # the client left while sending its body: nobody to answer
        rkey, fp, owner = record_key(scope, keys[0]), fingerprint(scope, body), uuid.uuid4().hex
        try:
            begun = await self.store.begin(rkey, fp, owner, now=self.clock(), lease=self.lease)
        except StoreUnavailable as exc:
            log.warning("idempotency store unavailable: refusing (fail closed)")
            await send_error(send, exc)
            return
        await self._answer(begun, scope, body, rkey, owner, receive, send)

    async def _answer(
        self, begun: Begun, scope: Scope, body: bytes, rkey: str, owner: str, receive: Receive, send: Send
    ) -> None:
        if begun.outcome == "mismatch":
            await send_error(
                send, IdempotencyKeyReused("this Idempotency-Key was already used with a different request")
            )
        elif begun.outcome == "in_flight":
            await send_error(
                send,
                IdempotencyInFlight("a request with this Idempotency-Key is still being processed"),
                [(b"retry-after", b"1")],
            )
        elif begun.outcome == "done" and begun.response is not None:
            log.info("idempotent replay", extra={"status": begun.response.status})
            await self._replay(scope, begun.response, send)
        else:
            if begun.taken_over:
                log.warning("took over an idempotency record whose lease had lapsed")
            await self._serve(scope, body, rkey, owner, receive, send)

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        for k, v in scope.get("headers", ()):
            if k == b"content-length" and v.strip().isdigit() and int(v) > self.max_body_bytes:
                raise PayloadTooLarge("request body exceeds the limit")
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                async with asyncio.timeout(self.body_read_timeout):
                    message = await receive()
            except TimeoutError:
                raise RequestTimeout("request body not received in time") from None
            if message["type"] == "http.disconnect":
                return None
            chunk = bytes(message.get("body", b""))
            size += len(chunk)
            if size > self.max_body_bytes:
                raise PayloadTooLarge("request body exceeds the limit")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _replay(self, scope: Scope, stored: StoredResponse, send: Send) -> None:
        headers = list(stored.headers)
        if scope["method"] != "HEAD":  # a HEAD answer keeps the length of the GET it describes
            headers = [(k, v) for k, v in headers if k != b"content-length"]
            headers.append((b"content-length", str(len(stored.body)).encode()))
        headers.append(REPLAYED_HEADER)
        await send({"type": "http.response.start", "status": stored.status, "headers": headers})
        await send({"type": "http.response.body", "body": stored.body, "more_body": False})

    async def _serve(self, scope: Scope, body: bytes, rkey: str, owner: str, receive: Receive, send: Send) -> None:
        capture = _Capture(self.max_stored_body_bytes, self.not_stored)
        release = asyncio.Event()  # set: tell the inner app the client is gone
        gone = False
        body_given = False

        async def inner_receive() -> Message:
            nonlocal body_given
            if not body_given:
                body_given = True
                return {"type": "http.request", "body": body, "more_body": False}
            await release.wait()
            return {"type": "http.disconnect"}

        async def watch() -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            gone = True
            if not capture.storable:
                release.set()

        async def inner_send(message: Message) -> None:
            capture.see(message)
            if gone and not capture.storable:
                release.set()
            await send(message)

        watcher = asyncio.create_task(watch())
        try:
            await self.app(scope, inner_receive, inner_send)
        except BaseException:
            await self._quietly(self.store.abandon(rkey, owner))
            raise
        finally:
            await stop(watcher)
        answer = capture.response()
        if answer is None:
            await self._quietly(self.store.abandon(rkey, owner))
            return
        try:
            stored = await self.store.complete(rkey, owner, answer, now=self.clock(), ttl=self.ttl)
        except StoreUnavailable:
            log.warning("could not store an idempotent answer; the record lapses with its lease")
            return
        if not stored:
            log.warning("lost an idempotency record before storing its answer (lease lapsed and taken over)")

    @staticmethod
    async def _quietly(coro: Any) -> None:
        try:
            await coro
        except StoreUnavailable:
            log.warning("could not delete an idempotency record; it lapses with its lease")
