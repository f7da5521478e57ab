"""Real servers for tests: run any ASGI app under uvicorn on a free port, and a recording upstream.

Usage::

    upstream = RecordingUpstream()
    with serve_asgi(upstream) as base_url:          # uvicorn in a background thread
        httpx.get(base_url + "/x?y=1")
    assert upstream.requests[0].raw_path == b"/x"

    async with serve_asgi_async(app) as base_url:   # uvicorn as a task on the running loop
        ...

``raw_http(base_url, b"GET / HTTP/1.1\\r\\n...")`` sends exact bytes (for framings and paths httpx would normalise
or refuse to produce) and returns the status line's code, the headers and the body read until the server closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import uvicorn

ASGIApp = Callable[..., Any]
Lifespan = Literal["auto", "on", "off"]


class ThreadedServer(uvicorn.Server):
    """uvicorn without signal handlers: a test process owns its signals, and the server may live in any thread.
    It remembers its event loop, so that a server which will not stop can be stopped from outside
    (:func:`stop_server_thread`)."""

    loop: asyncio.AbstractEventLoop | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets=sockets)


def _cancel_everything(loop: asyncio.AbstractEventLoop) -> None:
    for task in asyncio.all_tasks(loop):
        task.cancel()


def _tasks_of(loop: asyncio.AbstractEventLoop, out: list[str], done: threading.Event) -> None:
    """Where each task of ``loop`` waits (run on the loop): a thread idle in its event loop shows nothing else."""
    for task in asyncio.all_tasks(loop):
        lines = []
        awaited: Any = task.get_coro()
        while awaited is not None and len(lines) < 30:  # down the chain of awaits, outermost first
            frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
            if frame is not None:
                lines.append(f"  {frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}\n")
            awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
        where = "".join(lines) or "(not started)\n"
        out.append(f"task {task.get_name()}:\n{where}")
    done.set()


def stop_server_thread(servers: Sequence[uvicorn.Server], thread: threading.Thread, *, grace: float = 10.0) -> None:
    """Stop ``servers`` (served by ``thread``) and make sure the thread ended.

    A server thread left running would go on using what the test gave it: a gateway on the session's Redis keeps
    its heartbeat, and after the next test's FLUSHALL it marks that store as having lost its records, so that an
    unrelated later test gets 503 ``store_identity_lost``. So a thread that outlives ``should_exit`` and then
    ``force_exit`` has every task of its loop cancelled, and the test that left it fails here, with where it hung.
    """
    for server in servers:
        server.should_exit = True
    thread.join(grace)
    if thread.is_alive():
        for server in servers:
            server.force_exit = True
        thread.join(5)
    if not thread.is_alive():
        return
    frame = sys._current_frames().get(thread.ident or -1)
    where = "".join(traceback.format_stack(frame)) if frame is not None else "(no frame)"
    tasks: list[str] = []
    for server in servers:
        loop = getattr(server, "loop", None)
        if loop is not None and not loop.is_closed():
            listed = threading.Event()
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_tasks_of, loop, tasks, listed)
                listed.wait(2)
    where += "".join(tasks)
    for server in servers:
        loop = getattr(server, "loop", None)
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_cancel_everything, loop)
    thread.join(5)
    raise AssertionError(f"a test server did not stop within {grace + 5:.0f} s; it hung at:\n{where}")


def _config(app: ASGIApp, *, lifespan: Lifespan, http: str, loop: str, **kwargs: Any) -> uvicorn.Config:
    kwargs.setdefault("log_level", "warning")
    # uvicorn trusts X-Forwarded-For from 127.0.0.1 by default and rewrites scope["client"] with it: every test
    # client is on 127.0.0.1, so that default would let a test client spoof its address. Opt in explicitly.
    kwargs.setdefault("proxy_headers", False)
    kwargs.setdefault("timeout_graceful_shutdown", 2)  # a test that leaves a stream hanging must not hang the suite
    return uvicorn.Config(app, lifespan=lifespan, http=http, loop=loop, **kwargs)


def _bound_socket() -> socket.socket:
    """Bind before starting, so the port is ours: no pick-a-free-port-then-race."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextlib.contextmanager
def serve_asgi(
    app: ASGIApp, *, lifespan: Lifespan = "auto", http: str = "auto", loop: str = "auto", **config: Any
) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a daemon thread; yield ``"http://127.0.0.1:PORT"``; stop it on exit.

    ``http``/``loop`` are uvicorn's (``"auto"`` picks httptools and uvloop when installed); extra keyword
    arguments go to ``uvicorn.Config``. With ``lifespan="on"`` the app's startup/shutdown run in the server's loop.
    """
    sock = _bound_socket()
    server = ThreadedServer(_config(app, lifespan=lifespan, http=http, loop=loop, **config))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="uvicorn-test")
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            try:
                stop_server_thread([server], thread, grace=2.0)  # a slow start must not go on in the background
            finally:
                sock.close()
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.005)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        try:
            stop_server_thread([server], thread)
        finally:
            sock.close()


@contextlib.asynccontextmanager
async def serve_asgi_async(
    app: ASGIApp, *, lifespan: Lifespan = "auto", http: str = "auto", **config: Any
) -> AsyncIterator[str]:
    """Like :func:`serve_asgi`, but uvicorn runs as a task on the current event loop (the test's)."""
    sock = _bound_socket()
    server = ThreadedServer(_config(app, lifespan=lifespan, http=http, loop="none", **config))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            sock.close()
            task.result()
            raise RuntimeError("uvicorn did not start")
        await asyncio.sleep(0.005)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)
        sock.close()


def raw_http(
    base_url: str, request: bytes, *, timeout: float = 5.0, pause_after: float | None = None
) -> tuple[int, dict[str, str], bytes]:
    """Send ``request`` verbatim to ``base_url``'s host and port; read until close (send ``Connection: close``).

    With ``pause_after`` the socket stays open (no more bytes) for that long before reading: a stalled upload.
    Returns ``(status, headers with lowercase names, last value wins, body)``; status 0 if the server said nothing.
    """
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(request)
        if pause_after:
            time.sleep(pause_after)
        data = b""
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while chunk := sock.recv(65536):
                data += chunk
    if not data:
        return 0, {}, b""
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


async def read_body(receive: Callable[..., Any]) -> bytes:
    """An ASGI request's whole body (what arrived before a disconnect, if the client left)."""
    body = b""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return body
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


@dataclass
class Behaviour:
    """How :class:`RecordingUpstream` answers. The default echoes the request as JSON.

    * ``status`` / ``headers``: the status line and extra response headers (``(name, value)`` strings).
    * ``body``: a fixed body instead of the echo (sent with a Content-Length unless ``headers`` set one).
    * ``delay``: seconds to wait *before* the response headers (a slow upstream); a client disconnect during the
      wait is recorded as ``RecordedRequest.aborted``.
    * ``chunks``: stream these as separate body messages, without Content-Length; with ``gate`` set, the first
      chunk goes out, then the rest only once ``gate`` (a ``threading.Event``) is set (or ``gate_timeout`` passes).
    * ``big_body``: send this many bytes of ``b"x"`` in 64 KiB chunks.
    """

    status: int = 200
    headers: Sequence[tuple[str, str]] = ()
    body: bytes | None = None
    delay: float = 0.0
    chunks: Sequence[bytes] = ()
    gate: threading.Event | None = None
    gate_timeout: float = 10.0
    big_body: int = 0


@dataclass
class RecordedRequest:
    """One request as the upstream saw it. Header names are lowercase, values decoded as latin-1, order kept."""

    method: str
    raw_path: bytes
    path: str
    query: bytes
    headers: list[tuple[str, str]]
    client: tuple[str, int] | None
    body: bytes = b""
    complete: bool = False  # the whole body arrived (False if the sender went away mid-body)
    aborted: bool = False  # the sender disconnected before the response was sent

    def header(self, name: str) -> str | None:
        """First value of ``name`` (case-insensitive), or None."""
        values = self.header_values(name)
        return values[0] if values else None

    def header_values(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self.headers if k == name]

    @property
    def host(self) -> str | None:
        return self.header("host")


@dataclass
class RecordingUpstream:
    """An ASGI app recording every HTTP request (thread-safe) and answering per :attr:`behaviour`.

    ``requests`` is a snapshot; a request is recorded as soon as its headers arrive, so refused-before-upstream
    checks can assert ``requests == []``. ``wait_for_body_bytes(n)`` blocks until some in-flight request has
    received ``n`` body bytes: the probe for "the proxy streams the upload instead of buffering it".
    """

    behaviour: Behaviour = field(default_factory=Behaviour)
    _requests: list[RecordedRequest] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._cond:
            return list(self._requests)

    def reset(self, behaviour: Behaviour | None = None) -> None:
        with self._cond:
            self._requests.clear()
            self.behaviour = behaviour or Behaviour()

    def wait_for_body_bytes(self, n: int, timeout: float = 5.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: any(len(r.body) >= n for r in self._requests), timeout)

    def wait_for_requests(self, n: int, timeout: float = 5.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: len(self._requests) >= n, timeout)

    def _update(self, fn: Callable[[], None]) -> None:
        with self._cond:
            fn()
            self._cond.notify_all()

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        rec = RecordedRequest(
            method=scope["method"],
            raw_path=scope.get("raw_path") or scope["path"].encode(),
            path=scope["path"],
            query=scope["query_string"],
            headers=[(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope["headers"]],
            client=tuple(scope["client"]) if scope.get("client") else None,
        )
        behaviour = self.behaviour
        self._update(lambda: self._requests.append(rec))
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            more = message.get("more_body", False)

            def grow(chunk: bytes = chunk, more: bool = more) -> None:
                rec.body += chunk
                rec.complete = not more

            self._update(grow)
            if not more:
                break
        if behaviour.delay and await _disconnected_within(receive, behaviour.delay):
            self._update(lambda: setattr(rec, "aborted", True))
            return
        await self._respond(behaviour, rec, send)

    async def _respond(self, b: Behaviour, rec: RecordedRequest, send: Callable[..., Any]) -> None:
        headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in b.headers]
        streaming = bool(b.chunks) or b.big_body > 0
        body = b"" if streaming else b.body
        if body is None:
            body = json.dumps(
                {
                    "method": rec.method,
                    "path": rec.path,
                    "raw_path": rec.raw_path.decode("latin-1"),
                    "query": rec.query.decode("latin-1"),
                    "headers": rec.headers,
                    "body_length": len(rec.body),
                }
            ).encode()
            headers.append((b"content-type", b"application/json"))
        if not streaming and not any(k == b"content-length" for k, _ in headers):
            headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": b.status, "headers": headers})
        if b.chunks:
            first, *rest = b.chunks
            await send({"type": "http.response.body", "body": first, "more_body": True})
            if b.gate is not None:
                await asyncio.to_thread(b.gate.wait, b.gate_timeout)
            for chunk in rest:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        left = b.big_body
        while left > 0:
            n = min(left, 65536)
            await send({"type": "http.response.body", "body": b"x" * n, "more_body": True})
            left -= n
        await send({"type": "http.response.body", "body": body, "more_body": False})


async def _disconnected_within(receive: Callable[..., Any], seconds: float) -> bool:
    """Sleep ``seconds`` unless the client disconnects first; True if it did."""
    try:
        async with asyncio.timeout(seconds):
            while (await receive())["type"] != "http.disconnect":
                pass
            return True
    except TimeoutError:
        return False
