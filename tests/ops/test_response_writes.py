"""The served protocol sends a response's head and the first bytes of its body in one write
(gateway/http/server.py): a head is never held past the turn of the event loop it was sent in, so a streamed
response shows its status at once, and every response still arrives whole (HEAD, large, chunked)."""

from __future__ import annotations

import asyncio
import socket
import threading
from typing import Any

from gateway.http.server import guarded_protocol
from tests.support.servers import serve_asgi

RELEASE = threading.Event()


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    path = scope["path"]
    if path == "/stream":  # the head now, the body when the test says so
        headers = [(b"content-type", b"text/plain")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        while not RELEASE.is_set():
            await asyncio.sleep(0.01)
        await send({"type": "http.response.body", "body": b"later", "more_body": False})
        return
    body = b"x" * (200_000 if path == "/large" else 5)
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _protocol() -> type[asyncio.Protocol]:
    return guarded_protocol(max_head_bytes=17 * 1024, head_timeout=10.0, drain_timeout=10.0)


def _head(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "closed before the head"
        data += chunk
    return data


def test_a_streamed_response_shows_its_head_before_its_body_exists() -> None:
    RELEASE.clear()
    with serve_asgi(app, lifespan="off", http=_protocol()) as url:  # type: ignore[arg-type]
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /stream HTTP/1.1\r\nhost: x\r\n\r\n")
            head = _head(sock)  # a head held until the body would never come: the body waits for this read
            assert head.startswith(b"HTTP/1.1 200 ")
            RELEASE.set()
            rest = head.split(b"\r\n\r\n", 1)[1]
            while not rest.endswith(b"0\r\n\r\n"):
                rest += sock.recv(65536)
            assert b"later" in rest


def test_responses_arrive_whole_on_a_kept_alive_connection() -> None:
    with serve_asgi(app, lifespan="off", http=_protocol()) as url:  # type: ignore[arg-type]
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            for path, method, size in (("/small", "GET", 5), ("/large", "GET", 200_000), ("/small", "HEAD", 0)):
                sock.sendall(f"{method} {path} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
                data = _head(sock)
                head, body = data.split(b"\r\n\r\n", 1)
                assert head.startswith(b"HTTP/1.1 200 ")
                while len(body) < size:
                    body += sock.recv(65536)
                assert body == b"x" * size
