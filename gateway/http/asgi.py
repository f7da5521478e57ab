"""Small ASGI vocabulary shared by the middleware, the proxy and the app: types and JSON answers."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from gateway.errors import GatewayError
from gateway.x402.codec import RawHeaders, dumps

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def header(scope: Scope, name: bytes) -> bytes | None:
    """The first value of request header ``name`` (lowercase bytes), or None."""
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value)
    return None


async def send_json(send: Send, status: int, body: Any, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    payload = dumps(body)
    raw: RawHeaders = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
        *headers,
    ]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


def error_body(exc: GatewayError) -> dict[str, Any]:
    """``{"error": <machine-readable reason>, "message": <sentence>}``: the shape the seeds' APIs use."""
    return {"error": exc.reason, "message": exc.message}


async def send_error(send: Send, exc: GatewayError, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    extra = list(headers)
    if exc.status == 503:
        extra.append((b"retry-after", b"1"))
    await send_json(send, exc.status, error_body(exc), extra)


def lifespan_hooks(
    receive: Receive, startup: Callable[[], Awaitable[None]], shutdown: Callable[[], Awaitable[None]]
) -> Receive:
    """``receive`` for the app a middleware wraps, running ``startup`` / ``shutdown`` as the server announces
    them, so the middleware's own resources come up before the inner app's and go down first."""

    async def wrapped() -> Message:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await startup()
        elif message["type"] == "lifespan.shutdown":
            await shutdown()
        return message

    return wrapped
