"""CORS preflights on priced routes: recognised, passed on unpriced, and answered without a body.

A browser's preflight carries no payment and cannot (the Fetch standard sends it without credentials or custom
headers), so a 402 would stop every cross-origin call before it could pay; ``PaymentMiddleware`` passes it on to
the app (which owns its CORS policy) through :func:`without_body`, so an app that answers OPTIONS with its content
cannot hand out priced content unpaid.
"""

from __future__ import annotations

from gateway.http.asgi import Message, Scope, Send


def cors_preflight(scope: Scope) -> str | None:
    """The method a CORS preflight announces (``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method``,
    no body), or None for any other request: an OPTIONS with a body is an ordinary request, priced as one."""
    if scope.get("method") != "OPTIONS":
        return None
    origin = False
    method: bytes | None = None
    for name, value in scope.get("headers", ()):
        if name == b"origin":
            origin = True
        elif name == b"access-control-request-method":
            method = value
        elif name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            return None
    if not origin or method is None or not method.strip().isalpha():
        return None
    return method.strip().decode("ascii").upper()


def without_body(send: Send) -> Send:
    """The answer to a preflight, without a body: a preflight answer is status and headers, and an app that
    answers OPTIONS with its content (a catch-all handler) must not hand out priced content unpaid."""

    async def bodiless(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != b"content-length"]
            if message["status"] not in (204, 304):  # these have no body and must not declare a length
                headers.append((b"content-length", b"0"))
            await send({**message, "headers": headers})
        elif message["type"] == "http.response.body":
            if not message.get("more_body", False):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        else:
            await send(message)

    return bodiless


__all__ = ["cors_preflight", "without_body"]
