"""A JSON-RPC pass-through to a dev chain that answers the calls a test picks with an error of its choosing, as a
faulty node (a rate limit, a lagging read) or a stricter one (geth's 128 KiB transaction cap) would, and records
what it was asked.

    proxy = RpcProxy(chain.url)
    proxy.fault = lambda call: {"code": -32005, "message": "rate limited"} if call["method"] == "eth_call" else None
    with serve_asgi(proxy) as rpc_url:
        networks = {"base": {"rpc_urls": [rpc_url], "receipt_poll_interval": 0.02}}
        with running_gateway(chain, ..., networks=networks) as gw: ...
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import httpx

from tests.support.servers import read_body

Fault = Callable[[dict[str, Any]], dict[str, Any] | None]
SEND_METHODS = ("eth_sendRawTransaction", "eth_sendRawTransactionSync")
GETH_TX_MAX_SIZE = 128 * 1024  # geth's (and op-geth's) txpool refuses a larger transaction


def no_fault(_call: dict[str, Any]) -> dict[str, Any] | None:
    return None


def raw_size(call: dict[str, Any]) -> int:
    """The size in bytes of the signed transaction a send carries."""
    return (len(str(call["params"][0])) - 2) // 2


def oversized(limit: int) -> Fault:
    """Refuse a transaction larger than ``limit`` bytes with geth's own error."""

    def fault(call: dict[str, Any]) -> dict[str, Any] | None:
        if call.get("method") in SEND_METHODS and raw_size(call) > limit:
            return {"code": -32000, "message": f"oversized data: transaction size {raw_size(call)}, limit {limit}"}
        return None

    return fault


class RpcProxy:
    def __init__(self, target: str) -> None:
        self.target = target
        self.fault: Fault = no_fault
        self._lock = threading.Lock()
        self.asked: list[dict[str, Any]] = []  # every call, in order
        self.refused: list[dict[str, Any]] = []  # the calls answered with an injected error

    def sent(self) -> list[dict[str, Any]]:
        """The transactions that reached the node (sends the proxy let through)."""
        with self._lock:
            refused = {id(c) for c in self.refused}
            return [c for c in self.asked if c.get("method") in SEND_METHODS and id(c) not in refused]

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        doc = json.loads(body)
        calls: list[dict[str, Any]] = doc if isinstance(doc, list) else [doc]
        answers: dict[int, dict[str, Any]] = {}
        forward: list[tuple[int, dict[str, Any]]] = []
        for n, call in enumerate(calls):
            with self._lock:
                self.asked.append(call)
                error = self.fault(call)
                if error is not None:
                    self.refused.append(call)
            if error is not None:
                answers[n] = {"jsonrpc": "2.0", "id": call.get("id"), "error": error}
            else:
                forward.append((n, call))
        if forward:
            async with httpx.AsyncClient(timeout=30) as client:
                upstream = (await client.post(self.target, json=[c for _, c in forward])).json()
            by_id = {a.get("id"): a for a in upstream}
            for n, call in forward:
                answers[n] = by_id[call.get("id")]
        ordered = [answers[n] for n in range(len(calls))]
        out = json.dumps(ordered if isinstance(doc, list) else ordered[0]).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(out)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": out})
