"""A session client that hangs up while a JSON-metered answer streams is charged the usage the answer reports
(docs/threat-model.md T11, T49): the charge is read at the answer's end, so the gateway reads the answer to its end
although nobody will receive it. Stopping at the client's exit (as for any other paid answer, whose payment is
settled on its status line) would leave the upstream's work done and nothing charged, and the same voucher base
usable again: a free request per hang-up. Once the charge is known (the usage read, or the meter's fallback past
``MAX_METERED_BODY``), the rest of the answer changes nothing, and an endless stream is let go of.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from gateway.dev.chain import DevChain
from tests.sessions.crafted import CraftedChannel, corrective, session_offer
from tests.support.gateway import SESSIONS, GatewayUnderTest, running_gateway, sqlite_url

PRICE = 1_000
TOKENS = 10  # the usage every answer reports: 10 tokens at 1 atomic unit each
ROUTES: list[dict[str, Any]] = [
    {
        "route": "GET /tokens",
        "price": "0.001",
        "schemes": ["batch-settlement"],
        "meter": {"json": "usage.total_tokens", "unit_price": "0.000001", "missing": "zero"},
    }
]
QUIET = {**SESSIONS, "min_deposit": "0.01", "claim_interval": 3600}


class StreamingUpstream:
    """Answers a JSON document in chunks (chunked on the wire: streamed, not read whole), its usage at the end;
    ``slow``: with pauses in the middle, long enough for a client to leave. ``?endless=1``: an event stream that
    ends only when the gateway lets go of it."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.finished: list[str] = []
        self.slow = False
        self.let_go = threading.Event()
        self.sent = 0

    async def endless(self, receive: Any, send: Any) -> None:
        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            self.let_go.set()

        watcher = asyncio.ensure_future(watch())
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        self.started.set()
        while not self.let_go.is_set():
            await send({"type": "http.response.body", "body": b"data: " + b"x" * 16_000 + b"\n\n", "more_body": True})
            self.sent += 16_000
            await asyncio.sleep(0.005)
        watcher.cancel()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["query_string"] == b"endless=1":
            await self.endless(receive, send)
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b'{"answer": "' + b"x" * 100, "more_body": True})
        self.started.set()
        if self.slow:
            await asyncio.sleep(1.0)
            await send({"type": "http.response.body", "body": b"y" * 100, "more_body": True})
            await asyncio.sleep(0.2)
        await send({"type": "http.response.body", "body": b'", "usage": {"total_tokens": 10}}', "more_body": False})
        self.finished.append(scope["query_string"].decode())


@pytest.fixture(scope="module")
def upstream() -> StreamingUpstream:
    return StreamingUpstream()


@pytest.fixture(scope="module")
def gw(
    base_chain: DevChain, tmp_path_factory: pytest.TempPathFactory, upstream: StreamingUpstream
) -> Iterator[GatewayUnderTest]:
    store = sqlite_url(tmp_path_factory.mktemp("metered-leave"))
    with running_gateway(base_chain, store_url=store, routes=ROUTES, sessions=QUIET, upstream=upstream) as gateway:
        yield gateway


def test_a_client_that_leaves_a_streamed_metered_answer_is_charged_its_usage(
    gw: GatewayUnderTest, base_chain: DevChain, upstream: StreamingUpstream
) -> None:
    url = f"{gw.url}/tokens"
    ch = CraftedChannel.from_offer(base_chain.new_payer(1_000_000), session_offer(httpx.get(url)))
    opened = httpx.get(url + "?n=0", headers=ch.header(ch.deposit(10 * PRICE, voucher_max=PRICE)), timeout=30)
    assert opened.status_code == 200, opened.text  # charged its usage: 10
    upstream.slow, upstream.started = True, threading.Event()
    name, value = next(iter(ch.header(ch.paying(TOKENS + PRICE)).items()))
    parts = urlsplit(gw.url)
    with socket.create_connection((str(parts.hostname), int(parts.port or 80))) as s:
        s.sendall(f"GET /tokens?n=1 HTTP/1.1\r\nHost: x\r\n{name}: {value}\r\n\r\n".encode())
        assert upstream.started.wait(10)
        time.sleep(0.3)  # the gateway's disconnect watcher is on by now; the answer is mid-stream
    deadline = time.monotonic() + 10
    while "n=1" not in upstream.finished and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "n=1" in upstream.finished
    upstream.slow = False
    # The request that was left was charged its 10: a voucher on the base before it is stale now.
    stale = httpx.get(url + "?n=2", headers=ch.header(ch.paying(TOKENS + PRICE)), timeout=30)
    assert stale.status_code == 402, stale.text
    assert corrective(stale)["channelState"]["chargedCumulativeAmount"] == str(2 * TOKENS)


def test_an_endless_metered_stream_the_client_left_is_let_go_of_once_its_charge_is_known(
    gw: GatewayUnderTest, base_chain: DevChain, upstream: StreamingUpstream
) -> None:
    """Read for no one, for ever, one pool connection per hang-up: no. The meter gives up past MAX_METERED_BODY
    (the fallback charge, here nothing), and then the gateway stops reading as for any paid stream."""
    url = f"{gw.url}/tokens"
    ch = CraftedChannel.from_offer(base_chain.new_payer(1_000_000), session_offer(httpx.get(url)))
    opened = httpx.get(url + "?n=0", headers=ch.header(ch.deposit(10 * PRICE, voucher_max=PRICE)), timeout=30)
    assert opened.status_code == 200, opened.text
    upstream.started = threading.Event()
    name, value = next(iter(ch.header(ch.paying(TOKENS + PRICE)).items()))
    parts = urlsplit(gw.url)
    with socket.create_connection((str(parts.hostname), int(parts.port or 80))) as s:
        s.sendall(f"GET /tokens?endless=1 HTTP/1.1\r\nHost: x\r\n{name}: {value}\r\n\r\n".encode())
        assert upstream.started.wait(10)
        time.sleep(0.5)
    assert upstream.let_go.wait(30), f"{upstream.sent} bytes read, and still reading, for a client that left"
