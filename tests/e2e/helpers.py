"""Shared end-to-end assertions and test doubles: refusal checks, an RPC tap, a hooked upstream, decoders."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import socket
import threading
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from eth_abi.abi import encode as abi_encode
from eth_account import Account
from eth_utils.crypto import keccak

from gateway.dev.chain import DevChain, call
from gateway.http.app import build_app
from tests.support.concurrency import fire_together  # noqa: F401 - re-exported for the e2e tests
from tests.support.gateway import GatewayUnderTest, gateway_config, network_name
from tests.support.servers import RecordingUpstream, read_body, serve_asgi

EXPOSED = {"payment-required", "payment-response", "x-payment-response"}


def b64json(value: str | bytes) -> Any:
    raw = value if isinstance(value, bytes) else value.encode("ascii")
    return json.loads(base64.b64decode(raw + b"=" * (-len(raw) % 4)))


def error_of(response: httpx.Response) -> str:
    body = response.json()
    assert isinstance(body, dict), response.text
    reason = body.get("error")
    assert isinstance(reason, str), response.text
    assert reason, response.text
    return reason


def assert_402(response: httpx.Response, reason: str) -> None:
    """A 402 refusal: the v1 body and the v2 header both name ``reason`` and still offer the payment options."""
    assert response.status_code == 402, (response.status_code, response.text)
    assert error_of(response) == reason, response.text
    assert response.json()["accepts"], response.text
    v2 = b64json(response.headers["payment-required"])
    assert v2["error"] == reason
    assert v2["accepts"]


def assert_error(response: httpx.Response, status: int, reason: str) -> None:
    assert response.status_code == status, (response.status_code, response.text)
    assert error_of(response) == reason, response.text


def receipt_of(response: httpx.Response) -> dict[str, Any]:
    value = response.headers.get("payment-response") or response.headers.get("x-payment-response")
    assert value, f"no receipt header in {dict(response.headers)}"
    doc: dict[str, Any] = b64json(value)
    return doc


def decode_payment(value: str) -> tuple[dict[str, str], str, dict[str, Any]]:
    """(authorization, signature, whole document) of a payment header value."""
    doc = b64json(value)
    return doc["payload"]["authorization"], doc["payload"]["signature"], doc


def authorization_used(chain: DevChain, payer: str, nonce: str) -> bool:
    data = keccak(text="authorizationState(address,bytes32)")[:4] + abi_encode(
        ["address", "bytes32"], [payer, bytes.fromhex(nonce[2:])]
    )
    return int.from_bytes(call(chain.anvil, chain.usdc, data), "big") != 0


@dataclass
class Balances:
    """Snapshot of the payer's and the gateway's pay-to balances, to assert exact deltas."""

    gw: GatewayUnderTest
    payer: str
    network: str | None = None
    payer_before: int = 0
    pay_to_before: int = 0

    def __post_init__(self) -> None:
        self.payer_before = self.gw.balance(self.payer, self.network)
        self.pay_to_before = self.gw.balance(self.gw.pay_to, self.network)

    def moved(self) -> tuple[int, int]:
        """(payer's loss, pay-to's gain) since the snapshot."""
        return (
            self.payer_before - self.gw.balance(self.payer, self.network),
            self.gw.balance(self.gw.pay_to, self.network) - self.pay_to_before,
        )

    def assert_unchanged(self) -> None:
        assert self.moved() == (0, 0)

    def assert_charged_once(self, price: int) -> None:
        assert self.moved() == (price, price)


def closed_port_url() -> str:
    """An http URL on 127.0.0.1 where nothing listens (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def gateway_with_upstream_url(
    chain: DevChain, *, store_url: str, upstream_url: str, **sections: Any
) -> Iterator[GatewayUnderTest]:
    """Like ``running_gateway``, but proxying to ``upstream_url`` (e.g. a closed port) instead of a recorder;
    ``.upstream`` is a recorder nobody calls."""
    pay_to = sections.pop("pay_to", None) or Account.create().address
    config = gateway_config([chain], upstream_url=upstream_url, store_url=store_url, pay_to=pay_to, **sections)
    app = build_app(config)
    with serve_asgi(app, lifespan="on") as url:
        yield GatewayUnderTest(
            url=url,
            config=config,
            upstream=RecordingUpstream(),
            chains={network_name(chain): chain},
            pay_to=pay_to,
            app=app,
        )


_BROADCASTS = frozenset({"eth_sendRawTransaction", "eth_sendRawTransactionSync"})


def _broadcast_raw(call: dict[str, Any]) -> str | None:
    """The raw transaction a call broadcasts (either method; not the gateway's empty probe for the Sync one)."""
    params = call.get("params") or []
    if call.get("method") in _BROADCASTS and params and params[0] not in ("0x", ""):
        return str(params[0])
    return None


class RpcTap:
    """An ASGI JSON-RPC pass-through to a dev chain that can fail, or act at the moment the gateway broadcasts.

    ``before_broadcast``: called once (in a worker thread) when the first broadcast arrives (``eth_sendRawTransaction``
    or ``eth_sendRawTransactionSync``), *before* it is forwarded: the window between the gateway's verification and
    its settlement. Every broadcast that arrives meanwhile (the relayer sends a transaction whose synchronous
    broadcast is slow to answer a second time, plainly) waits for it too. ``broadcasts``: the raw transactions
    broadcast, one entry per broadcast call.
    """

    def __init__(self, target: str) -> None:
        self.target = target
        self.down = False  # True: answer every call with HTTP 502, like a dead RPC provider behind a proxy
        self.before_broadcast: Callable[[], None] | None = None
        self.methods: list[str] = []
        self.broadcasts: list[str] = []
        self._lock = threading.Lock()
        self._hook_running: asyncio.Event | None = None

    def transactions_broadcast(self) -> int:
        """How many different transactions were broadcast (the same one sent twice is one)."""
        return len(set(self.broadcasts))

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        doc = json.loads(body)
        calls = doc if isinstance(doc, list) else [doc]
        names = [str(c.get("method")) for c in calls]
        raws = [raw for raw in map(_broadcast_raw, calls) if raw is not None]
        hook = None
        with self._lock:
            self.methods.extend(names)
            self.broadcasts.extend(raws)
            if raws and self.before_broadcast is not None:
                hook, self.before_broadcast = self.before_broadcast, None
        if hook is not None:
            self._hook_running = asyncio.Event()
            try:
                await asyncio.to_thread(hook)
            finally:
                self._hook_running.set()
        elif raws and self._hook_running is not None:
            await self._hook_running.wait()
        status, answer = (502, b"bad gateway") if self.down else (200, await asyncio.to_thread(self._forward, body))
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(answer)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": answer})

    def _forward(self, body: bytes) -> bytes:
        req = urllib.request.Request(self.target, data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return bytes(resp.read())


@dataclass
class HookedUpstream(RecordingUpstream):
    """A RecordingUpstream that runs ``on_request`` (once, in a worker thread) when a request arrives, before
    answering: e.g. the payer drains its balance, or the store goes down, while the upstream works."""

    on_request: Callable[[], None] | None = field(default=None)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and self.on_request is not None:
            hook, self.on_request = self.on_request, None
            await asyncio.to_thread(hook)
        await super().__call__(scope, receive, send)


def iter_chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
