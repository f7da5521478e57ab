"""Upstreams written in other frameworks, all answering one contract, and a raw HTTP/1.1 client, for
``test_foreign_peers_matrix.py``.

The contract (the last path segment names the answer; whatever comes before it is the gateway's route prefix):

===============  ==================================================================================================
``echo``         any method: 200 JSON ``{method, target (hex of the raw request target), headers ([lowercase name,
                 hex of the raw value]...), body_len, body_sha256, usage: {total_tokens: 7}}`` and
                 ``x-body-sha256`` (of this answer's own body)
``cookies``      200, the three ``Set-Cookie`` fields of :data:`COOKIES` and ``x-obs`` (obs-text bytes)
``nocontent``    204
``notmodified``  304 with an ``ETag``
``gzip``         200 ``Content-Encoding: gzip``: :data:`GZIP_BODY`, with its length
``sse``          200 ``text/event-stream``, :data:`SSE` written piece by piece (no length)
``ndjson``       200 ``application/x-ndjson``, :data:`NDJSON` piece by piece (no length)
``big-cl``       200, :data:`BIG` (3 MiB) with its length
``big-stream``   200, :data:`BIG` in 256 KiB writes, no length
``/_count``      ``{"count": n}``: requests with ``x-cell: <cell>`` that came through a proxy (an ``X-Forwarded-For``)
===============  ==================================================================================================

Every answer but ``/_count`` carries ``x-usage-cost: 250`` (what a header-metered session route charges).

Upstreams: Node's ``http`` ("node") and Express ("express") from ``foreign_node_upstream.js``; aiohttp.web;
Starlette under uvicorn; and an ``http.server`` handler speaking HTTP/1.0 ("http10"), whose answers without a
fixed length end when it closes the connection. (It reads a chunked request body, which a strict HTTP/1.0 server
would not: the gateway forwards a body that came chunked as chunked, whatever the upstream's version.)
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from aiohttp import web
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from tests.proxy.frameworks import EXPRESS_MODULES, serve_aiohttp
from tests.support import serve_asgi

NODE_SCRIPT = Path(__file__).with_name("foreign_node_upstream.js")
FRAMEWORKS = ["node", "express", "aiohttp", "starlette", "http10"]

TEXT = ("The quick brown fox jumps over the lazy dog. " * 200).encode()
GZIP_BODY = gzip.compress(TEXT, mtime=0)
BIG = bytes(range(256)) * (3 * 4096)  # 3 MiB
SSE = [b'data: {"n": 1}\n\n', b'data: {"n": 2}\n\n', b'data: {"usage": {"total_tokens": 9}}\n\n', b"data: [DONE]\n\n"]
NDJSON = [b'{"n": 1}\n', b'{"n": 2}\n', b'{"usage": {"total_tokens": 5}}\n']
COOKIES = ["a=1; Path=/", "b=2; HttpOnly", "c=3; Expires=Wed, 21 Oct 2037 07:28:00 GMT; Path=/"]
OBS = b"caf\xe9 \xff"  # obs-text (RFC 9110 5.5)
USAGE_COST = 250
ECHO_TOKENS = 7
BIG_PARTS = [BIG[i : i + 256 * 1024] for i in range(0, len(BIG), 256 * 1024)]


def write_fixtures(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "gzip.bin").write_bytes(GZIP_BODY)
    (folder / "big.bin").write_bytes(BIG)
    parts = {
        "sse": [p.decode() for p in SSE],
        "ndjson": [p.decode() for p in NDJSON],
        "cookies": COOKIES,
        "obs_hex": OBS.hex(),
    }
    (folder / "parts.json").write_text(json.dumps(parts))
    return folder


class Counter:
    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def hit(self, headers: dict[str, str]) -> None:
        cell = headers.get("x-cell")
        if cell and headers.get("x-forwarded-for"):
            with self._lock:
                self._counts[cell] = self._counts.get(cell, 0) + 1

    def doc(self, query: str) -> bytes:
        cell = (parse_qs(query).get("cell") or [""])[0]
        return json.dumps({"count": self._counts.get(cell, 0)}).encode()


def echo_doc(method: str, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
    return json.dumps(
        {
            "method": method,
            "target": target.hex(),
            "headers": [[k.decode("latin-1").lower(), v.hex()] for k, v in headers],
            "body_len": len(body),
            "body_sha256": hashlib.sha256(body).hexdigest(),
            "usage": {"total_tokens": ECHO_TOKENS},
        }
    ).encode()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------------------------- aiohttp


def aiohttp_app() -> web.Application:
    counter = Counter()

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.path == "/_count":
            return web.Response(body=counter.doc(request.query_string), content_type="application/json")
        counter.hit({k.lower(): v for k, v in request.headers.items()})
        body = await request.read()
        name = request.path.rsplit("/", 1)[-1]
        cost = {"x-usage-cost": str(USAGE_COST)}
        if name == "echo":
            doc = echo_doc(request.method, request.raw_path.encode("latin-1"), list(request.raw_headers), body)
            return web.Response(
                body=doc, headers={**cost, "content-type": "application/json", "x-body-sha256": _sha(doc)}
            )
        if name == "cookies":
            resp = web.Response(body=b"cookies\n", headers={**cost, "content-type": "text/plain"})
            for cookie in COOKIES:
                resp.headers.add("Set-Cookie", cookie)
            resp.headers["x-obs"] = OBS.decode("latin-1")
            return resp
        if name == "nocontent":
            return web.Response(status=204, headers=cost)
        if name == "notmodified":
            return web.Response(status=304, headers={**cost, "etag": '"v1"'})
        if name == "gzip":
            return web.Response(
                body=GZIP_BODY,
                headers={**cost, "content-type": "text/plain", "content-encoding": "gzip", "vary": "Accept-Encoding"},
            )
        if name == "big-cl":
            return web.Response(body=BIG, headers={**cost, "content-type": "application/octet-stream"})
        parts, kind = {
            "sse": (SSE, "text/event-stream"),
            "ndjson": (NDJSON, "application/x-ndjson"),
            "big-stream": (BIG_PARTS, "application/octet-stream"),
        }.get(name, (None, ""))
        if parts is None:
            return web.Response(status=404, body=b"not found\n", headers=cost)
        resp = web.StreamResponse(headers={**cost, "content-type": kind})
        await resp.prepare(request)
        for part in parts:
            await resp.write(part)
            await _pause()
        await resp.write_eof()
        return resp

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", handler)
    return app


async def _pause() -> None:
    import asyncio

    await asyncio.sleep(0.005)


# ------------------------------------------------------------------------------------------------- Starlette


def starlette_app() -> Any:
    counter = Counter()

    async def handler(request: Request) -> Response:
        scope = request.scope
        if request.url.path == "/_count":
            return Response(counter.doc(scope["query_string"].decode()), media_type="application/json")
        counter.hit({k.lower(): v for k, v in request.headers.items()})
        body = await request.body()
        name = request.url.path.rsplit("/", 1)[-1]
        cost = {"x-usage-cost": str(USAGE_COST)}
        if name == "echo":
            target = scope["raw_path"] + (b"?" + scope["query_string"] if scope["query_string"] else b"")
            doc = echo_doc(request.method, target, list(scope["headers"]), body)
            return Response(doc, media_type="application/json", headers={**cost, "x-body-sha256": _sha(doc)})
        if name == "cookies":
            resp = Response(b"cookies\n", media_type="text/plain", headers=cost)
            resp.raw_headers.extend((b"set-cookie", c.encode()) for c in COOKIES)
            resp.raw_headers.append((b"x-obs", OBS))
            return resp
        if name == "nocontent":
            return Response(status_code=204, headers=cost)
        if name == "notmodified":
            return Response(status_code=304, headers={**cost, "etag": '"v1"'})
        if name == "gzip":
            headers = {**cost, "content-encoding": "gzip", "vary": "Accept-Encoding"}
            return Response(GZIP_BODY, media_type="text/plain", headers=headers)
        if name == "big-cl":
            return Response(BIG, media_type="application/octet-stream", headers=cost)
        parts, kind = {
            "sse": (SSE, "text/event-stream"),
            "ndjson": (NDJSON, "application/x-ndjson"),
            "big-stream": (BIG_PARTS, "application/octet-stream"),
        }.get(name, (None, ""))
        if parts is None:
            return Response(b"not found\n", status_code=404, headers=cost)

        async def pieces(parts: list[bytes] = parts) -> AsyncIterator[bytes]:
            for part in parts:
                yield part
                await _pause()

        return StreamingResponse(pieces(), media_type=kind, headers=cost)

    methods = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
    return Starlette(routes=[Route("/{tail:path}", handler, methods=methods)])


# ---------------------------------------------------------------------------------------------- HTTP/1.0


class _Http10(BaseHTTPRequestHandler):
    """``python -m http.server`` style: HTTP/1.0, ``Server`` and ``Date`` from ``send_response``, and an answer
    without a fixed length ends when the connection closes."""

    protocol_version = "HTTP/1.0"
    counter: Counter

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _body(self) -> bytes:
        if "chunked" in (self.headers.get("transfer-encoding") or "").lower():
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("content-length") or 0))

    def _send(self, status: int, headers: list[tuple[str, str]], parts: list[bytes], length: bool = False) -> None:
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        if length:
            self.send_header("Content-Length", str(sum(map(len, parts))))
        self.end_headers()
        if self.command != "HEAD":
            for part in parts:
                self.wfile.write(part)
                self.wfile.flush()
                if len(parts) > 1:
                    time.sleep(0.005)

    def handle_any(self) -> None:
        split = urlsplit(self.path)
        if split.path == "/_count":
            self._send(200, [("content-type", "application/json")], [self.counter.doc(split.query)], length=True)
            return
        self.counter.hit({k.lower(): v for k, v in self.headers.items()})
        body = self._body()
        name = split.path.rsplit("/", 1)[-1]
        cost = [("x-usage-cost", str(USAGE_COST))]
        if name == "echo":
            raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in self.headers.items()]
            doc = echo_doc(self.command, self.path.encode("latin-1"), raw, body)
            self._send(200, [*cost, ("content-type", "application/json"), ("x-body-sha256", _sha(doc))], [doc])
        elif name == "cookies":
            headers = [*cost, ("content-type", "text/plain"), *(("Set-Cookie", c) for c in COOKIES)]
            self._send(200, [*headers, ("x-obs", OBS.decode("latin-1"))], [b"cookies\n"])
        elif name == "nocontent":
            self._send(204, cost, [])
        elif name == "notmodified":
            self._send(304, [*cost, ("etag", '"v1"')], [])
        elif name == "gzip":
            headers = [("content-type", "text/plain"), ("content-encoding", "gzip"), ("vary", "Accept-Encoding")]
            self._send(200, [*cost, *headers], [GZIP_BODY], length=True)
        elif name == "big-cl":
            self._send(200, [*cost, ("content-type", "application/octet-stream")], [BIG], length=True)
        elif name in ("sse", "ndjson", "big-stream"):
            parts, kind = {
                "sse": (SSE, "text/event-stream"),
                "ndjson": (NDJSON, "application/x-ndjson"),
                "big-stream": (BIG_PARTS, "application/octet-stream"),
            }[name]
            self._send(200, [*cost, ("content-type", kind)], parts)
        else:
            self._send(404, cost, [b"not found\n"])

    do_GET = do_HEAD = do_POST = do_PUT = do_OPTIONS = do_DELETE = handle_any  # noqa: N815 (http.server names)


@contextlib.contextmanager
def serve_http10() -> Iterator[str]:
    handler = type("Http10", (_Http10,), {"counter": Counter()})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True, name="http10-upstream")
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


# ------------------------------------------------------------------------------------------------------ Node


@contextlib.contextmanager
def serve_node(mode: str, fixtures: Path) -> Iterator[str]:
    node = shutil.which("node")
    if node is None or not (EXPRESS_MODULES / "express").is_dir():
        pytest.fail("node and express are needed: run scripts/install-tools.sh", pytrace=False)
    proc = subprocess.Popen(
        [node, str(NODE_SCRIPT), mode, str(EXPRESS_MODULES), str(fixtures)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("listening "):
            raise RuntimeError(f"node upstream did not start: {line!r} {proc.stderr.read() if proc.stderr else ''}")
        yield f"http://127.0.0.1:{int(line.split()[1])}"
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@contextlib.contextmanager
def serve_upstream(name: str, fixtures: Path) -> Iterator[str]:
    if name in ("node", "express"):
        with serve_node("raw" if name == "node" else "express", fixtures) as url:
            yield url
    elif name == "aiohttp":
        with serve_aiohttp(aiohttp_app()) as url:
            yield url
    elif name == "starlette":
        with serve_asgi(starlette_app()) as url:
            yield url
    else:
        with serve_http10() as url:
            yield url


# ------------------------------------------------------------------------------------------- a raw client


@dataclass
class Answer:
    """One answer as read off the wire (interim 1xx answers skipped): status, header fields as sent (lowercase
    names, raw values, in order), the body with its framing taken off, and the framing."""

    status: int
    headers: list[tuple[str, bytes]]
    body: bytes
    framing: str  # "length", "chunked", "close" or "none"
    interim: list[int] = field(default_factory=list)

    def values(self, name: str) -> list[bytes]:
        return [v for k, v in self.headers if k == name]

    def header(self, name: str) -> bytes | None:
        found = self.values(name)
        return found[0] if found else None


def _dechunk(data: bytes) -> bytes:
    out = b""
    while True:
        line, _, data = data.partition(b"\r\n")
        size = int(line.split(b";")[0].strip(), 16)
        if size == 0:
            return out
        out += data[:size]
        data = data[size + 2 :]


def exchange(
    url: str, head: bytes, body: bytes = b"", *, head_request: bool = False, wait_for_continue: bool = False
) -> Answer:
    """Send ``head`` (which must say ``Connection: close``) and ``body``; read until the server closes."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head)
        data = b""
        if wait_for_continue:  # Expect: 100-continue: the body only once the server asked for it
            while b"\r\n\r\n" not in data:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        if body and (not wait_for_continue or data.startswith(b"HTTP/1.1 100")):
            sock.sendall(body)
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(1 << 20):
                data += chunk
    interim: list[int] = []
    while True:
        raw_head, _, rest = data.partition(b"\r\n\r\n")
        lines = raw_head.split(b"\r\n")
        status = int(lines[0].split()[1])
        if 100 <= status < 200:
            interim.append(status)
            data = rest
            continue
        break
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.append((name.decode("latin-1").strip().lower(), value.strip(b" \t")))
    names = {k for k, _ in headers}
    if head_request or status in (204, 304):
        return Answer(status, headers, rest, "none", interim)
    if b"chunked" in b",".join(v for k, v in headers if k == "transfer-encoding").lower():
        return Answer(status, headers, _dechunk(rest), "chunked", interim)
    if "content-length" in names:
        length = int(dict(headers)["content-length"])
        return Answer(status, headers, rest[:length], "length", interim)
    return Answer(status, headers, rest, "close", interim)


def request_head(method: str, target: str | bytes, headers: Sequence[tuple[str, bytes | str]]) -> bytes:
    raw_target = target if isinstance(target, bytes) else target.encode("latin-1")
    lines = [method.encode() + b" " + raw_target + b" HTTP/1.1", b"Host: peers.test"]
    for k, v in headers:
        lines.append(k.encode("latin-1") + b": " + (v if isinstance(v, bytes) else v.encode("latin-1")))
    lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n"
