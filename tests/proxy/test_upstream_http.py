"""The upstream hop's HTTP/1.1 client against scripted raw-socket servers: the framing, reuse and failure rules
that a well-behaved test upstream never exercises (idle closes, truncation, interim answers, garbage, stalls)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from gateway.http.upstream import ClientBusy, ConnectFailed, Lease, ProtocolFailure, ReadTimeout, UpstreamPool

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]
OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


@dataclass
class Scripted:
    port: int = 0
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """One request head (and a Content-Length or chunked body), raw."""
    head = await reader.readuntil(b"\r\n\r\n")
    lower = head.lower()
    if b"content-length:" in lower:
        length = int(lower.split(b"content-length:")[1].split(b"\r\n")[0])
        return head + await reader.readexactly(length)
    if b"transfer-encoding: chunked" in lower:
        body = b""
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.strip(), 16)
            chunk = await reader.readexactly(size + 2)
            body += size_line + chunk
            if size == 0:
                return head + body
    return head


def answering(reply: bytes, *, delay: float = 0.0, seen: list[bytes] | None = None) -> Handler:
    """A server that answers every request on a connection with ``reply`` (after ``delay``), keeping each request
    in ``seen``."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        while True:
            request = await read_request(reader)
            if seen is not None:
                seen.append(request)
            if delay:
                await asyncio.sleep(delay)
            writer.write(reply)

    return handler


@contextlib.asynccontextmanager
async def scripted(handler: Handler) -> AsyncIterator[Scripted]:
    state = Scripted()
    tasks: set[asyncio.Task[None]] = set()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = state.connections
        state.connections += 1
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await handler(reader, writer, index)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    state.port = server.sockets[0].getsockname()[1]
    try:
        yield state
    finally:
        server.close()
        for task in tasks:
            task.cancel()


def pool_for(state: Scripted, **kw: float) -> UpstreamPool:
    return UpstreamPool("127.0.0.1", state.port, tls=False, authority=f"127.0.0.1:{state.port}", **kw)  # type: ignore[arg-type]


async def fetch(pool: UpstreamPool, method: str = "GET", body: AsyncIterator[bytes] | None = None, **kw: int) -> bytes:
    resp = await pool.request(method, "/x", [(b"accept", b"*/*")], body, **kw)
    try:
        out = b""
        while not resp.at_eof:
            out += await resp.next_chunk()
        return out
    finally:
        resp.close()


async def test_sequential_requests_share_one_keep_alive_connection() -> None:
    async with scripted(answering(OK)) as state:
        pool = pool_for(state)
        for _ in range(20):
            assert await fetch(pool) == b"ok"
        assert state.connections == 1
        await pool.aclose()


async def test_a_get_the_upstream_dropped_on_a_reused_connection_is_sent_once_more_on_a_fresh_one() -> None:
    # The idle-close race: the server closes a kept-alive connection just as our next request arrives on it.
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        while True:
            await read_request(reader)
            if index == 0 and state.requests:
                return  # the second request on the first connection: dropped without an answer
            state.requests.append(b"answered")
            writer.write(OK)

    async with scripted(handler) as state:
        pool = pool_for(state)
        assert await fetch(pool) == b"ok"
        assert await fetch(pool) == b"ok"
        assert state.connections == 2
        await pool.aclose()


async def test_a_post_dropped_on_a_reused_connection_is_never_sent_twice() -> None:
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        while True:
            seen.append(await read_request(reader))
            if len(seen) == 2:
                return
            writer.write(OK)

    async with scripted(handler) as state:
        pool = pool_for(state)
        assert await fetch(pool) == b"ok"
        with pytest.raises(ProtocolFailure):
            await fetch(pool, "POST", content_length=0)
        await asyncio.sleep(0.05)
        assert len(seen) == 2 and state.connections == 1  # the POST reached the upstream exactly once
        await pool.aclose()


async def test_an_answer_delimited_by_close_is_relayed_whole_and_its_connection_not_reused() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n" + b"a" * 70_000)
        await writer.drain()

    async with scripted(handler) as state:
        pool = pool_for(state)
        assert await fetch(pool) == b"a" * 70_000
        assert await fetch(pool) == b"a" * 70_000
        assert state.connections == 2
        await pool.aclose()


async def test_a_truncated_answer_is_an_error_never_a_short_body() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n" + b"a" * 10)
        await writer.drain()

    async with scripted(handler) as state:
        pool = pool_for(state)
        with pytest.raises(ProtocolFailure):
            await fetch(pool)
        await pool.aclose()


async def test_interim_answers_are_skipped_and_the_final_one_is_returned() -> None:
    async with scripted(answering(b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>; rel=preload\r\n\r\n" + OK)) as state:
        pool = pool_for(state)
        resp = await pool.request("GET", "/x", [])
        assert resp.status == 200 and (b"link", b"</a.css>; rel=preload") not in resp.headers
        assert await resp.next_chunk() == b"ok"
        resp.close()
        assert await fetch(pool) == b"ok" and state.connections == 1
        await pool.aclose()


async def test_a_second_answer_to_one_request_spoils_the_connection() -> None:
    # An answer nobody asked for rides along with each one: it must not answer the next request.
    async with scripted(answering(OK + OK)) as state:
        pool = pool_for(state)
        assert await fetch(pool) == b"ok"
        assert await fetch(pool) == b"ok"
        assert state.connections == 2
        await pool.aclose()


@pytest.mark.parametrize(
    "answer",
    [
        b"garbage\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok",
        b"HTTP/1.1 101 X\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n",
    ],
    ids=["not-http", "two-lengths", "upgrade"],
)
async def test_an_answer_that_is_not_plain_http_is_a_protocol_failure(answer: bytes) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        await read_request(reader)
        writer.write(answer)
        await asyncio.sleep(5)

    async with scripted(handler) as state:
        pool = pool_for(state, read_timeout=3)
        with pytest.raises(ProtocolFailure):
            await fetch(pool)
        await pool.aclose()


async def test_head_answers_have_no_body_whatever_they_declare() -> None:
    async with scripted(answering(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n")) as state:
        pool = pool_for(state, read_timeout=2)
        for _ in range(3):
            resp = await pool.request("HEAD", "/x", [])
            assert resp.status == 200 and resp.at_eof
            resp.close()
        # ...and their connection is never reused: the declared body may still come, as another request's answer
        assert state.connections == 3
        await asyncio.sleep(0.05)
        assert pool.open_connections == 0
        await pool.aclose()


async def test_a_silent_upstream_is_a_read_timeout() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        await read_request(reader)
        await asyncio.sleep(10)

    async with scripted(handler) as state:
        pool = pool_for(state, read_timeout=0.3)
        with pytest.raises(ReadTimeout):
            await fetch(pool)
        await pool.aclose()


async def test_the_read_timeout_times_each_exchange_and_never_an_idle_connection() -> None:
    """A connection keeps one read timer across its exchanges (one made and cancelled per request cost more than the
    rest of the bookkeeping): a timer left pending by an earlier exchange must neither close the connection while it
    sits idle in the pool, nor cut the next exchange short, nor let it run past its own deadline."""
    delays = [0.0, 0.0, 0.2, 10.0]

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        for delay in delays:
            await read_request(reader)
            await asyncio.sleep(delay)
            writer.write(OK)

    async with scripted(handler) as state:
        pool = pool_for(state, read_timeout=0.3)
        loop = asyncio.get_running_loop()
        assert await fetch(pool) == b"ok"
        await asyncio.sleep(0.5)  # idle past the read timeout (within the pool's idle timeout): still reusable
        assert await fetch(pool) == b"ok"
        await asyncio.sleep(0.2)
        assert await fetch(pool) == b"ok"  # 0.2 s to answer, while the timer from 0.2 s before is still pending
        started = loop.time()
        with pytest.raises(ReadTimeout):
            await fetch(pool)
        assert 0.25 <= loop.time() - started < 1.0  # its own deadline, not an earlier exchange's
        assert state.connections == 1
        await pool.aclose()


async def test_a_saturated_pool_fails_as_unreachable_instead_of_queueing_for_ever() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        await read_request(reader)
        await asyncio.sleep(10)

    async with scripted(handler) as state:
        pool = pool_for(state, max_connections=1, connect_timeout=0.3, read_timeout=10)
        first = asyncio.create_task(fetch(pool))
        await asyncio.sleep(0.1)
        with pytest.raises(ConnectFailed):
            await fetch(pool)
        first.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await first
        await pool.aclose()


async def test_a_body_of_unknown_length_goes_chunked_and_a_known_one_keeps_its_length() -> None:
    seen: list[bytes] = []

    async def parts() -> AsyncIterator[bytes]:
        for part in (b"hello ", b"", b"world"):
            yield part

    async with scripted(answering(OK, seen=seen)) as state:
        pool = pool_for(state)
        assert await fetch(pool, "POST", parts()) == b"ok"
        assert await fetch(pool, "POST", parts(), content_length=11) == b"ok"
        assert await fetch(pool, "POST") == b"ok"
        chunked, sized, empty = seen
        assert b"transfer-encoding: chunked\r\n" in chunked and chunked.endswith(
            b"6\r\nhello \r\n5\r\nworld\r\n0\r\n\r\n"
        )
        assert b"content-length: 11\r\n" in sized and sized.endswith(b"\r\n\r\nhello world")
        assert b"content-length: 0\r\n" in empty
        assert all(req.count(b"host: 127.0.0.1:") == 1 for req in seen)
        await pool.aclose()


async def test_a_large_answer_arrives_intact_through_a_slow_reader() -> None:
    blob = bytes(range(256)) * 20_000  # 5 MB: reading pauses and resumes several times

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(blob) + blob)
        await writer.drain()
        await asyncio.sleep(5)

    async with scripted(handler) as state:
        pool = pool_for(state, read_timeout=2)
        resp = await pool.request("GET", "/x", [])
        got = bytearray()
        while not resp.at_eof:
            got += await resp.next_chunk()
            if len(got) < 2_000_000:
                await asyncio.sleep(0.001)
        resp.close()
        assert bytes(got) == blob
        await pool.aclose()


async def test_requests_waiting_for_a_busy_pool_are_served_first_come_first_served() -> None:
    # Starvation guard: a connection freed for the longest waiter is handed to it, never to a newcomer.
    async with scripted(answering(OK, delay=0.01)) as state:
        pool = pool_for(state, max_connections=2, connect_timeout=5)
        finished: list[int] = []

        async def one(i: int) -> None:
            await asyncio.sleep(i * 0.001)  # arrival order
            assert await fetch(pool) == b"ok"
            finished.append(i)

        await asyncio.gather(*(one(i) for i in range(30)))
        assert state.connections == 2
        assert finished[2:] == sorted(finished[2:])  # past the first two, answers come in arrival order
        await pool.aclose()


async def test_a_stalled_answer_on_a_reused_connection_is_a_timeout_and_never_a_replay() -> None:
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        while True:
            seen.append(await read_request(reader))
            if len(seen) == 1:
                writer.write(OK)
            else:
                await asyncio.sleep(10)  # the upstream is slow, not gone

    async with scripted(handler) as state:
        pool = pool_for(state, read_timeout=0.3)
        assert await fetch(pool) == b"ok"
        started = asyncio.get_running_loop().time()
        with pytest.raises(ReadTimeout):
            await fetch(pool)
        assert asyncio.get_running_loop().time() - started < 1.0  # one timeout, not a replay and a second one
        assert len(seen) == 2
        await pool.aclose()


async def test_a_reset_in_the_middle_of_an_answer_without_length_is_an_error_not_a_short_body() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\npartial")
        await writer.drain()
        await asyncio.sleep(0.1)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # RST, not FIN

    async with scripted(handler) as state:
        pool = pool_for(state, read_timeout=2)
        with pytest.raises(ProtocolFailure):
            await fetch(pool)
        await pool.aclose()


async def test_header_values_that_would_break_the_framing_are_never_written() -> None:
    seen: list[bytes] = []
    async with scripted(answering(OK, seen=seen)) as state:
        pool = pool_for(state)
        for bad in (b"x\r\nx-injected: 1", b"x\nx", b"x\0"):
            with pytest.raises(ProtocolFailure):
                await pool.request("GET", "/x", [(b"x-forwarded-host", bad)])
        assert seen == []
        await pool.aclose()


# --- slow clients never starve paying ones (docs/threat-model.md T39) ---------------------------------------------


def hanging(seen: list[bytes] | None = None) -> Handler:
    """An upstream that reads a request head and never answers (a slow upstream call in progress)."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if seen is not None:
            seen.append(head)
        await asyncio.sleep(30)

    return handler


async def stalled_body(first: bytes, gate: asyncio.Event) -> AsyncIterator[bytes]:
    """A body whose first part arrives and whose rest never does (until ``gate``)."""
    yield first
    await gate.wait()
    yield b"end"


async def test_free_requests_never_take_the_connections_reserved_for_paid_ones() -> None:
    async with scripted(hanging()) as state:
        pool = pool_for(state, max_connections=4, reserved=1, connect_timeout=0.3)  # type: ignore[arg-type]
        free = [asyncio.create_task(pool.request("GET", "/x", [])) for _ in range(3)]
        await asyncio.sleep(0.1)
        assert pool.held_by_free_requests == 3
        with pytest.raises(ConnectFailed):  # the fourth is a paid request's
            await pool.request("GET", "/x", [], lease=Lease(client="ip:10.0.0.1"))
        paid = asyncio.create_task(pool.request("GET", "/x", [], lease=Lease(paid=True, client="payer:0xabc")))
        await asyncio.sleep(0.1)
        assert state.connections == 4  # the paid request got the reserved one at once
        for task in [*free, paid]:
            task.cancel()
        await asyncio.gather(*free, paid, return_exceptions=True)
        await pool.aclose()


async def test_a_paid_request_waiting_for_a_full_pool_goes_before_free_ones_that_came_earlier() -> None:
    seen: list[bytes] = []
    async with scripted(answering(OK, delay=0.2, seen=seen)) as state:
        pool = pool_for(state, max_connections=1, connect_timeout=5)
        order: list[str] = []

        async def one(name: str, lease: Lease) -> None:
            assert await fetch_with(pool, lease, name) == b"ok"
            order.append(name)

        first = asyncio.create_task(one("first", Lease(client="ip:a")))
        await asyncio.sleep(0.05)
        frees = [asyncio.create_task(one(f"free{i}", Lease(client=f"ip:{i}"))) for i in range(3)]
        await asyncio.sleep(0.05)
        paid = asyncio.create_task(one("paid", Lease(paid=True, client="payer:0x1")))
        await asyncio.gather(first, *frees, paid)
        assert order[:2] == ["first", "paid"]
        await pool.aclose()


async def fetch_with(pool: UpstreamPool, lease: Lease, name: str = "x") -> bytes:
    resp = await pool.request("GET", "/" + name, [], lease=lease)
    try:
        out = b""
        while not resp.at_eof:
            out += await resp.next_chunk()
        return out
    finally:
        resp.close()


async def test_one_clients_streaming_uploads_are_bounded_and_never_block_another_client() -> None:
    seen: list[bytes] = []
    async with scripted(hanging(seen)) as state:
        pool = pool_for(state, max_connections=8, per_client=2, connect_timeout=0.5)  # type: ignore[arg-type]
        gate = asyncio.Event()

        def upload(client: str) -> asyncio.Task[object]:
            body = stalled_body(b"x" * 1000, gate)
            lease = Lease(client=client, uploading=True)
            return asyncio.create_task(pool.request("POST", "/up", [], body, lease=lease))

        mine = [upload("ip:a") for _ in range(2)]
        await asyncio.sleep(0.1)
        assert len(seen) == 2
        with pytest.raises(ClientBusy):  # a third upload of the same client waits for one of its own, then 429
            await upload("ip:a")
        other = upload("ip:b")  # another client is not held up by the first one's waiting upload
        plain = asyncio.create_task(pool.request("GET", "/x", [], lease=Lease(client="ip:a")))  # not an upload
        await asyncio.sleep(0.1)
        assert len(seen) == 4
        for task in [*mine, other, plain]:
            task.cancel()
        await asyncio.gather(*mine, other, plain, return_exceptions=True)
        gate.set()
        await pool.aclose()


async def test_a_waiter_its_client_bound_holds_back_never_blocks_the_queue_behind_it() -> None:
    async with scripted(hanging()) as state:
        pool = pool_for(state, max_connections=2, per_client=1, connect_timeout=1.0)  # type: ignore[arg-type]
        gate = asyncio.Event()
        first = asyncio.create_task(
            pool.request("POST", "/up", [], stalled_body(b"x", gate), lease=Lease(client="ip:a", uploading=True))
        )
        filler = asyncio.create_task(pool.request("GET", "/x", [], lease=Lease(client="ip:c")))
        await asyncio.sleep(0.1)
        blocked = asyncio.create_task(
            pool.request("POST", "/up", [], stalled_body(b"x", gate), lease=Lease(client="ip:a", uploading=True))
        )
        await asyncio.sleep(0.05)
        later = asyncio.create_task(pool.request("GET", "/y", [], lease=Lease(client="ip:b")))
        await asyncio.sleep(0.05)
        filler.cancel()  # a connection frees: it goes to the later request, not to the one held back
        await asyncio.sleep(0.2)
        assert state.connections == 3
        assert not blocked.done()
        for task in (first, blocked, later):
            task.cancel()
        await asyncio.gather(first, filler, blocked, later, return_exceptions=True)
        gate.set()
        await pool.aclose()


async def test_a_complete_answer_frees_its_connection_before_the_client_has_read_it() -> None:
    blob = b"y" * 500_000

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        while True:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(blob) + blob)

    async with scripted(handler) as state:
        pool = pool_for(state, max_connections=1, connect_timeout=1.0)
        slow_reader = await pool.request("GET", "/big", [])  # a client that does not read (yet)
        await asyncio.sleep(0.2)
        for _ in range(3):  # the one connection serves others meanwhile
            assert await fetch(pool) == blob
        got = b""
        while not slow_reader.at_eof:
            got += await slow_reader.next_chunk()
        slow_reader.close()
        assert got == blob
        assert state.connections == 1
        await pool.aclose()


async def test_every_lease_comes_back_whatever_happens_to_the_requests() -> None:
    """Answers, early closes, timeouts, cancellations and uploads mixed: afterwards nothing is counted as held."""
    import random

    rng = random.Random(7)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        while True:
            await read_request(reader)
            roll = rng.random()
            if roll < 0.15:
                return  # closes without an answer
            await asyncio.sleep(rng.random() * 0.02)
            writer.write(OK if roll < 0.9 else b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nab")  # truncated

    async def body() -> AsyncIterator[bytes]:
        for _ in range(3):
            await asyncio.sleep(rng.random() * 0.01)
            yield b"x" * 100

    async with scripted(handler) as state:
        limits = {"max_connections": 6, "reserved": 2, "per_client": 2, "connect_timeout": 0.3, "read_timeout": 0.2}
        pool = pool_for(state, **limits)

        async def one(i: int) -> None:
            lease = Lease(paid=i % 3 == 0, client=f"ip:{i % 4}", uploading=i % 2 == 0)
            up = body() if lease.uploading else None
            with contextlib.suppress(ProtocolFailure, ConnectFailed, ReadTimeout):
                resp = await pool.request("POST", "/x", [], up, lease=lease)
                try:
                    while not resp.at_eof:
                        await resp.next_chunk()
                finally:
                    resp.close()

        tasks = [asyncio.create_task(one(i)) for i in range(200)]
        await asyncio.sleep(0.05)
        for task in tasks[::7]:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(0.1)  # close callbacks
        assert pool.held_by_free_requests == 0
        assert pool._uploads == {}
        assert pool._waiters == []
        assert pool.open_connections == len(pool._live)
        for _ in range(20):  # and it still works (the scripted upstream drops some requests on purpose)
            with contextlib.suppress(ProtocolFailure, ReadTimeout):
                if await fetch(pool) == b"ok":
                    break
        else:
            raise AssertionError("the pool no longer serves")
        await pool.aclose()
