"""WebSocket handshakes through the payment flow (docs/threat-model.md T35).

The payment flow speaks HTTP: it holds ``http.response.start`` until the payment's outcome is known, answers 402
with the challenge, and counts a status as served or not. A WebSocket handshake goes through the same flow:
the app's handshake messages are read as HTTP (accept = 101, close before accept = 403, a denial response as
itself) by :func:`http_terms`, and what the flow sends is turned back into the handshake's answer by
:class:`WebSocketSend`: an accept (with the receipt header), or a denial response carrying the 402 when the
server offers the ``websocket.http.response`` extension, else a close (the server answers 403).
"""

from __future__ import annotations

from gateway.http.asgi import Message, Scope, Send
from gateway.ops.events import RequestRecord

_HANDSHAKE = "gateway.websocket"  # the app's own handshake message, carried inside the HTTP-terms start


def http_terms(scope: Scope, send: Send) -> Send:
    """``send`` for the app; for a WebSocket, its handshake answer reported in HTTP terms (see above)."""
    if scope["type"] != "websocket":
        return send
    answered = False

    async def ws_send(message: Message) -> None:
        nonlocal answered
        kind = message["type"]
        if answered:
            await send(message)
        elif kind == "websocket.accept":
            answered = True
            headers = list(message.get("headers", ()))
            await send({"type": "http.response.start", "status": 101, "headers": headers, _HANDSHAKE: message})
        elif kind == "websocket.close":
            answered = True
            await send({"type": "http.response.start", "status": 403, "headers": [], _HANDSHAKE: message})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        elif kind == "websocket.http.response.start":
            answered = True
            await send({**message, "type": "http.response.start"})
        else:
            await send(message)

    return ws_send


class WebSocketSend:
    """The server's ``send`` for a WebSocket, fed in HTTP terms by the payment flow (see above)."""

    def __init__(self, scope: Scope, send: Send, record: RequestRecord) -> None:
        self._send = send
        self._record = record
        self._denial = "websocket.http.response" in (scope.get("extensions") or {})
        self._closed = False

    async def __call__(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            own = message.get(_HANDSHAKE)
            self._record.status = message["status"]
            if own is not None and own["type"] == "websocket.accept":
                await self._send({**own, "headers": list(message.get("headers", ()))})  # with the receipt
            elif own is not None:  # the app closed before accepting
                self._closed = True
                await self._send(own)
            elif self._denial:
                start = {"type": "websocket.http.response.start", "status": message["status"]}
                await self._send({**start, "headers": list(message.get("headers", ()))})
            else:
                self._closed = True  # no denial response: the server answers the close with 403
                await self._send({"type": "websocket.close", "code": 1008})
        elif kind in ("http.response.body", "websocket.http.response.body"):
            if not self._closed:
                more = bool(message.get("more_body", False))
                body = {"type": "websocket.http.response.body", "body": message.get("body", b""), "more_body": more}
                await self._send(body)
        else:
            if kind == "websocket.accept":
                self._record.status = 101
            elif kind == "websocket.close" and not self._record.status:
                self._record.status = 403
            await self._send(message)


__all__ = ["WebSocketSend", "http_terms"]
