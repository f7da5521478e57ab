"""One priced API in three upstream frameworks that route differently, for pricing tests (docs/threat-model.md
T33, T34, T37).

* **Starlette** routes on the *decoded* path (``%2F`` is a separator);
* **aiohttp** and **Express** route on the *raw* path (``%2F`` stays inside its segment, the value is decoded).

Each honours method overrides the way apps built on it usually do (Express: the ``method-override`` package;
Starlette and aiohttp: a small middleware doing the same), and serves the same contract:

=================  ========================================================  ==========================
request            handler                                                   priced by the gateway as
=================  ========================================================  ==========================
GET /item/:id      ``item``, echoes the id                                   ``GET /item/{id}``
GET /files/:name   ``files``, echoes the name                                ``GET /files/*``
GET /report        ``report-get``                                            ``GET /report``
POST /report       ``report-post``                                           (free)
GET /moved         ``moved``: 302 to ``<its own origin>/item/1?from=moved``  ``GET /moved``
GET /free/whoami   ``free``                                                  (free)
GET /_hits         every handler run so far (name, method, X-Api-Key seen)   (test hook, called directly)
=================  ========================================================  ==========================
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import subprocess
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import httpx
import pytest
from aiohttp import web
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from tests.support import serve_asgi

ROOT = Path(__file__).resolve().parents[2]
EXPRESS_MODULES = ROOT / ".tools" / "express" / "node_modules"
EXPRESS_SCRIPT = Path(__file__).with_name("express_upstream.js")

# The gateway's price list for the contract above.
ROUTES: list[dict[str, Any]] = [
    {"route": "GET /item/{id}", "price": "0.01"},
    {"route": "GET /files/*", "price": "0.01"},
    {"route": "GET /report", "price": "0.01"},
    {"route": "GET /moved", "price": "0.01"},
]
PRICED_HANDLERS = frozenset({"item", "files", "report-get", "moved"})
OVERRIDE_HEADERS = ("x-http-method-override", "x-method-override", "x-http-method")


def hits(upstream_url: str) -> list[dict[str, Any]]:
    """Every handler the upstream ran, asked directly (not through the gateway)."""
    found: list[dict[str, Any]] = httpx.get(upstream_url + "/_hits", timeout=5).json()
    return found


def priced_hits(upstream_url: str) -> list[str]:
    return [h["handler"] for h in hits(upstream_url) if h["handler"] in PRICED_HANDLERS]


def reset_hits(upstream_url: str) -> None:
    httpx.post(upstream_url + "/_hits/reset", timeout=5)


def _override(method: str, headers: dict[str, str], query: str) -> str:
    """What Express's method-override (and Rack, Laravel) would make of a request's method: POST only."""
    if method != "POST":
        return method
    for name in OVERRIDE_HEADERS:
        if headers.get(name):
            return headers[name].upper()
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key == "_method" and value:
            return value.upper()
    return method


# ------------------------------------------------------------------------------------------------- Starlette


def starlette_upstream() -> Any:
    log: list[dict[str, Any]] = []

    def hit(handler: str, request: Request, **extra: Any) -> JSONResponse:
        log.append({"handler": handler, "method": request.method, "api_key": request.headers.get("x-api-key")})
        return JSONResponse({"handler": handler, **extra})

    async def item(request: Request) -> Response:
        return hit("item", request, id=request.path_params["id"])

    async def files(request: Request) -> Response:
        return hit("files", request, name=request.path_params["name"])

    async def report(request: Request) -> Response:
        return hit("report-get" if request.method == "GET" else "report-post", request)

    async def moved(request: Request) -> Response:
        hit("moved", request)
        return RedirectResponse(f"{request.url.scheme}://{request.headers['host']}/item/1?from=moved", 302)

    async def whoami(request: Request) -> Response:
        return hit("free", request)

    async def get_hits(request: Request) -> Response:
        return JSONResponse(log)

    async def reset(request: Request) -> Response:
        log.clear()
        return JSONResponse([])

    app = Starlette(
        routes=[
            Route("/_hits", get_hits),
            Route("/_hits/reset", reset, methods=["POST"]),
            Route("/item/{id}", item),
            Route("/files/{name}", files),
            Route("/report", report, methods=["GET", "POST"]),
            Route("/moved", moved),
            Route("/free/whoami", whoami),
        ]
    )

    async def with_method_override(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            method = _override(scope["method"], headers, scope["query_string"].decode("latin-1"))
            scope = {**scope, "method": method}
        await app(scope, receive, send)

    return with_method_override


# --------------------------------------------------------------------------------------------------- aiohttp

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def aiohttp_upstream() -> web.Application:
    log: list[dict[str, Any]] = []

    def hit(handler: str, request: web.Request, **extra: Any) -> web.Response:
        log.append({"handler": handler, "method": request.method, "api_key": request.headers.get("x-api-key")})
        return web.json_response({"handler": handler, **extra})

    @web.middleware
    async def method_override(request: web.Request, handler: Handler) -> web.StreamResponse:
        method = _override(request.method, {k.lower(): v for k, v in request.headers.items()}, request.query_string)
        if method == request.method:
            return await handler(request)
        changed = request.clone(method=method)
        match = await request.app.router.resolve(changed)
        changed._match_info = match
        return await match.handler(changed)

    async def item(request: web.Request) -> web.StreamResponse:
        return hit("item", request, id=request.match_info["id"])

    async def files(request: web.Request) -> web.StreamResponse:
        return hit("files", request, name=request.match_info["name"])

    async def report_get(request: web.Request) -> web.StreamResponse:
        return hit("report-get", request)

    async def report_post(request: web.Request) -> web.StreamResponse:
        return hit("report-post", request)

    async def moved(request: web.Request) -> web.StreamResponse:
        hit("moved", request)
        raise web.HTTPFound(f"{request.scheme}://{request.host}/item/1?from=moved")

    async def whoami(request: web.Request) -> web.StreamResponse:
        return hit("free", request)

    async def get_hits(request: web.Request) -> web.StreamResponse:
        return web.json_response(log)

    async def reset(request: web.Request) -> web.StreamResponse:
        log.clear()
        return web.json_response([])

    app = web.Application(middlewares=[method_override])
    app.router.add_get("/_hits", get_hits)
    app.router.add_post("/_hits/reset", reset)
    app.router.add_get("/item/{id}", item)
    app.router.add_get("/files/{name}", files)
    app.router.add_get("/report", report_get)
    app.router.add_post("/report", report_post)
    app.router.add_get("/moved", moved)
    app.router.add_get("/free/whoami", whoami)
    return app


@contextlib.contextmanager
def serve_aiohttp(app: web.Application) -> Iterator[str]:
    """``app`` on aiohttp's own server, in a thread with its own loop; yields its base URL."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True, name="aiohttp-upstream")
    thread.start()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    runner = web.AppRunner(app, access_log=None)

    async def start() -> None:
        await runner.setup()
        await web.SockSite(runner, sock).start()

    asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
        sock.close()


# --------------------------------------------------------------------------------------------------- Express


@contextlib.contextmanager
def serve_express() -> Iterator[str]:
    """The contract in Express 5 (node), from ``.tools/express`` (scripts/install-tools.sh puts it there)."""
    node = shutil.which("node")
    if node is None or not (EXPRESS_MODULES / "express").is_dir():
        pytest.fail("node and express are needed for the Express upstream: run scripts/install-tools.sh", pytrace=False)
    proc = subprocess.Popen(
        [node, str(EXPRESS_SCRIPT), str(EXPRESS_MODULES)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("listening "):
            raise RuntimeError(f"express did not start: {line!r} {proc.stderr.read() if proc.stderr else ''}")
        yield f"http://127.0.0.1:{int(line.split()[1])}"
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@contextlib.contextmanager
def serve_framework(name: str) -> Iterator[str]:
    if name == "starlette":
        with serve_asgi(starlette_upstream()) as url:
            yield url
    elif name == "aiohttp":
        with serve_aiohttp(aiohttp_upstream()) as url:
            yield url
    else:
        with serve_express() as url:
            yield url


FRAMEWORKS = ["starlette", "aiohttp", "express"]


def body_of(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw
