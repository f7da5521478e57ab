"""A metered session route whose charge is in the answer's JSON: the answer is held until its charge is known.

The charge must be committed before any of the answer leaves (docs/sessions.md): the response start is held and
the body buffered (up to :data:`gateway.schemes.batch.meter.MAX_METERED_BODY`), the charge read from it, and then
both go out through the payment middleware's usual path (commit, receipt header). A longer body is charged the
route's fallback and then streams on. Only 2xx answers are held; anything else passes through untouched.
"""

from __future__ import annotations

from collections.abc import Callable

from gateway.engine.sessions import SessionRequest
from gateway.http.asgi import Message, Send
from gateway.schemes.batch.meter import MAX_METERED_BODY

__all__ = ["metering_send"]


def metering_send(paid: SessionRequest, send: Send, known: Callable[[], None] = lambda: None) -> Send:
    """``known`` is called once the charge is settled by what came so far (read, the fallback, or no charge: not a
    2xx): from then on the rest of the answer changes nothing the payment layer owes or is owed."""
    held: Message | None = None
    body = bytearray()
    passing = False

    async def metered(message: Message) -> None:
        nonlocal held, passing
        if passing:
            await send(message)
            return
        if message["type"] == "http.response.start":
            if not 200 <= message["status"] < 300:
                passing = True
                known()
                await send(message)
                return
            held = message
            return
        if message["type"] != "http.response.body" or held is None:
            await send(message)
            return
        body.extend(message.get("body", b""))
        more = bool(message.get("more_body", False))
        if more and len(body) <= MAX_METERED_BODY:
            return
        paid.charge_from_body(bytes(body), complete=not more)
        passing = True
        known()
        await send(held)
        await send({"type": "http.response.body", "body": bytes(body), "more_body": more})

    return metered
