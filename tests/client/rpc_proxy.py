"""A JSON-RPC hop in front of anvil, on any path (an RPC URL whose path is its API key), that can lose a broadcast:
what a load balancer or a flaky provider does to ``eth_sendRawTransaction``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from tests.support.servers import read_body, serve_asgi

Broadcast = Literal["forward", "lose_answer", "lose_first_answer", "lose_request"]


@dataclass
class RpcProxy:
    """``broadcast``: ``forward``; ``lose_answer`` (the node takes the transaction, the caller gets a 502);
    ``lose_first_answer`` (the same for the first broadcast only: a resend gets the node's own answer);
    ``lose_request`` (a 502, the node never sees it). ``down_after_broadcast``: every call after a lost broadcast
    is a 502 too (the caller cannot check what became of it)."""

    upstream: str
    broadcast: Broadcast = "forward"
    down_after_broadcast: bool = False
    methods: list[str] = field(default_factory=list)  # every method asked, in order
    _down: bool = False

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        method = str(json.loads(body).get("method", "")) if body.startswith(b"{") else "batch"
        self.methods.append(method)
        forward = not self._down
        answer = True
        resent = self.methods.count("eth_sendRawTransaction") > 1
        if method == "eth_sendRawTransaction" and self.broadcast != "forward":
            forward = self.broadcast in ("lose_answer", "lose_first_answer")
            answer = self.broadcast == "lose_first_answer" and resent
            self._down = self.down_after_broadcast
        status, content = 502, b"bad gateway"
        if forward:
            async with httpx.AsyncClient() as client:
                upstream = await client.post(self.upstream, content=body, headers={"content-type": "application/json"})
            if answer:
                status, content = upstream.status_code, upstream.content
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": content})


@contextmanager
def rpc_proxy(upstream: str, **settings: Any) -> Iterator[tuple[str, RpcProxy]]:
    """The proxy's base URL (append any path) and the proxy."""
    proxy = RpcProxy(upstream, **settings)
    with serve_asgi(proxy) as url:
        yield url, proxy
