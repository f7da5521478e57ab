"""Helpers for the operations tests: a switchable JSON-RPC relay in front of anvil, metrics parsing."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
from eth_account import Account
from prometheus_client.parser import text_string_to_metric_families

from gateway.dev.chain import DevChain
from gateway.http.app import build_app
from tests.support.gateway import GatewayUnderTest, gateway_config, network_name
from tests.support.servers import RecordingUpstream, read_body, serve_asgi

Mode = Literal["forward", "wrong_chain", "down", "hang"]


@dataclass
class RpcRelay:
    """ASGI app forwarding JSON-RPC POSTs on ANY path to ``target`` (anvil answers 404 off ``/``), so a gateway
    can be given an RPC URL with a provider-style key in its path (``/v2/<key>``). ``mode`` makes it misbehave:
    ``wrong_chain`` answers ``eth_chainId`` with another chain, ``down`` answers HTTP 503, ``hang`` never answers.
    ``paths`` records the paths it was called on, ``methods`` the JSON-RPC methods asked; ``delay`` holds every
    answer back that long (a slow endpoint)."""

    target: str
    mode: Mode = "forward"
    delay: float = 0.0

    def __post_init__(self) -> None:
        self.paths: list[str] = []
        self.methods: list[str] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = await read_body(receive)
        self.paths.append(scope["path"])
        with contextlib.suppress(ValueError):
            parsed = json.loads(body)
            self.methods += [c.get("method", "") for c in (parsed if isinstance(parsed, list) else [parsed])]
        if self.delay:
            await asyncio.sleep(self.delay)
        mode = self.mode
        if mode == "hang":
            await asyncio.sleep(30)
        if mode == "down":
            await _answer(send, 503, b'{"error":"down"}')
            return
        request = json.loads(body)
        if mode == "wrong_chain" and isinstance(request, dict) and request.get("method") == "eth_chainId":
            await _answer(send, 200, json.dumps({"jsonrpc": "2.0", "id": request["id"], "result": "0x1"}).encode())
            return
        async with (
            aiohttp.ClientSession() as session,
            session.post(self.target, data=body, headers={"content-type": "application/json"}) as resp,
        ):
            await _answer(send, resp.status, await resp.read())


async def _answer(send: Any, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus exposition -> {(sample name, sorted labels): value}."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(all_samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    """The sample ``name`` whose labels include ``labels`` (summed over the others); 0 when absent."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in all_samples.items() if n == name and wanted <= set(ls))


@contextlib.contextmanager
def serve_gateway(
    chain: DevChain, *, store_url: str, recording: RecordingUpstream | None = None, **sections: Any
) -> Iterator[GatewayUnderTest]:
    """Like ``running_gateway``, but every config section (also ``upstream=``) is free to set."""
    upstream = recording or RecordingUpstream()
    pay_to = Account.create().address
    with serve_asgi(upstream) as upstream_url:
        config = gateway_config([chain], upstream_url=upstream_url, store_url=store_url, pay_to=pay_to, **sections)
        app = build_app(config)
        with serve_asgi(app, lifespan="on") as url:
            yield GatewayUnderTest(
                url=url, config=config, upstream=upstream, chains={network_name(chain): chain}, pay_to=pay_to, app=app
            )
