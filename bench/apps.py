"""The apps the benchmark serves besides the gateway: the upstream, and the official x402 stack.

* :func:`hello_app` — the upstream: raw ASGI, drains the request body, answers a fixed small JSON. As fast as a
  Python server gets, so that whatever is measured in front of it is the layer in front.
* :func:`official_app` — what a Python user would pick today: FastAPI with the ``x402`` package's own middleware
  (``x402.http.middleware.fastapi.payment_middleware``, its documented ``@app.middleware("http")`` use) in front of
  a catch-all route that forwards to the same upstream over one pooled aiohttp session (the client our gateway
  uses too, so the proxy hop costs the same on both sides).
* :func:`floor_app` — the least a Python proxy can do: raw ASGI forwarding a GET to the upstream over kept-alive
  asyncio connections, nothing checked, nothing logged. What the gateway's free route costs beyond it is the
  gateway's own work; what it costs itself is the price of a second hop in Python on this machine.
* :func:`facilitator_app` — the ``x402`` package's facilitator (``x402FacilitatorSync`` +
  ``register_exact_evm_facilitator`` + ``FacilitatorWeb3Signer``, synchronous web3, so each call runs in a worker
  thread) behind ``POST /verify``, ``POST /settle``, ``GET /supported``: the same construction as
  ``tests/support/facilitator.py``, without its failure injection.
"""

import contextlib
import itertools
from collections.abc import AsyncIterator
from typing import Any

_HELLO = b'{"ok":true,"message":"hello from the upstream"}'
_JSON = (b"content-type", b"application/json")
_HELLO_HEADERS = [_JSON, (b"content-length", str(len(_HELLO)).encode())]
_jobs = itertools.count(1)


async def hello_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Any path: a small JSON answer. ``POST .../agent/prompt`` answers a fresh ``jobId`` (a jobs API's submit,
    for the gateway's ``[jobs] mode = "front"``); a job's status is the same hello."""
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    body, headers = _HELLO, _HELLO_HEADERS
    if scope["method"] == "POST" and scope["path"].endswith("/agent/prompt"):
        body = b'{"jobId":"job-%d","status":"pending"}' % next(_jobs)
        headers = [_JSON, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def official_app(spec: dict[str, Any]) -> Any:
    import aiohttp
    from fastapi import FastAPI, Request, Response
    from x402 import x402ResourceServer
    from x402.http import FacilitatorConfig, HTTPFacilitatorClient
    from x402.http.middleware.fastapi import payment_middleware
    from x402.mechanisms.evm.exact import register_exact_evm_server

    upstream: str = spec["upstream_url"]
    network: str = spec["network"]
    server = x402ResourceServer(HTTPFacilitatorClient(FacilitatorConfig(url=spec["facilitator_url"], timeout=60)))
    register_exact_evm_server(server, network)
    routes = {
        route: {
            "accepts": {"scheme": "exact", "payTo": spec["pay_to"], "price": spec["price"], "network": network},
            "description": "benchmark route",
            "mimeType": "application/json",
        }
        for route in spec["routes"]
    }
    session: dict[str, aiohttp.ClientSession] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        session["s"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256))
        yield
        await session["s"].close()

    app = FastAPI(lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)
    x402 = payment_middleware(routes, server)

    @app.middleware("http")
    async def x402_middleware(request: Request, call_next: Any) -> Any:
        return await x402(request, call_next)

    @app.api_route("/{path:path}", methods=["GET", "POST"])
    async def forward(request: Request, path: str) -> Response:
        body = await request.body()
        async with session["s"].request(request.method, f"{upstream}/{path}", data=body) as resp:
            content = await resp.read()
            return Response(content, status_code=resp.status, media_type=resp.content_type)

    return app


def floor_app(spec: dict[str, Any]) -> Any:
    import asyncio
    from urllib.parse import urlsplit

    parts = urlsplit(spec["upstream_url"])
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        reader, writer = idle.pop() if idle else await asyncio.open_connection(host, port)
        writer.write(b"%s %s HTTP/1.1\r\nhost: upstream\r\n\r\n" % (scope["method"].encode(), scope["raw_path"]))
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        body = await reader.readexactly(length)
        idle.append((reader, writer))
        headers = [_JSON, (b"content-length", str(length).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


def facilitator_app(spec: dict[str, Any]) -> Any:
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route
    from x402 import x402FacilitatorSync
    from x402.mechanisms.evm import FacilitatorWeb3Signer
    from x402.mechanisms.evm.exact import register_exact_evm_facilitator
    from x402.schemas.helpers import parse_payment_payload, parse_payment_requirements

    signer = FacilitatorWeb3Signer(private_key=spec["key"], rpc_url=spec["rpc_url"], confirmation_timeout_seconds=60)
    facilitator = x402FacilitatorSync()
    register_exact_evm_facilitator(facilitator, signer, networks=[spec["network"]])

    async def supported(request: Request) -> Response:
        return JSONResponse(facilitator.get_supported().model_dump(by_alias=True, exclude_none=True))

    async def operate(request: Request) -> Response:
        body = await request.json()
        payload = parse_payment_payload(body["paymentPayload"])
        requirements = parse_payment_requirements(body["x402Version"], body["paymentRequirements"])
        call = facilitator.verify if request.url.path.endswith("verify") else facilitator.settle
        result = await run_in_threadpool(call, payload, requirements)
        return JSONResponse(result.model_dump(by_alias=True, exclude_none=True))

    return Starlette(
        routes=[
            Route("/supported", supported, methods=["GET"]),
            Route("/verify", operate, methods=["POST"]),
            Route("/settle", operate, methods=["POST"]),
        ]
    )
