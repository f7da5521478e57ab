"""Unfinished request heads against a real ``x402-gateway serve`` process, over raw sockets: the bytes a head may
grow to before it ends are capped, and a head that does not end in time is cut off (docs/threat-model.md T40)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

from gateway.dev.chain import DevChain
from tests.support.processes import ServedGateway, served_gateway
from tests.support.servers import RecordingUpstream, serve_asgi

MB = 1024 * 1024


def connect(gw: ServedGateway, timeout: float = 10.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", gw.port), timeout=timeout)


def read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    with contextlib.suppress(ConnectionResetError, TimeoutError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def flood_one_header(sock: socket.socket, total: int, outcome: list[str]) -> None:
    """A head that never ends: one header value of ``total`` bytes, no blank line."""
    try:
        sock.sendall(b"GET /free HTTP/1.1\r\nhost: x\r\nx-filler: ")
        piece = b"a" * 65536
        sent = 0
        while sent < total:
            sock.sendall(piece)
            sent += len(piece)
        outcome.append("accepted all")
    except (BrokenPipeError, ConnectionResetError, TimeoutError):
        outcome.append("cut off")


def test_heads_that_never_end_cannot_grow_the_served_process_memory(base_chain: DevChain, tmp_path: Path) -> None:
    upstream = RecordingUpstream()
    with (
        serve_asgi(upstream) as upstream_url,
        served_gateway(base_chain, tmp_path, upstream_url=upstream_url) as gw,
    ):
        before = gw.rss_bytes()
        socks = [connect(gw) for _ in range(10)]
        outcomes: list[str] = []
        threads = [threading.Thread(target=flood_one_header, args=(s, 20 * MB, outcomes)) for s in socks]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        time.sleep(0.5)  # whatever the server still had to read
        grown = gw.rss_bytes() - before
        answers = []
        for s in socks:
            answers.append(read_until_closed(s))
            s.close()
        assert outcomes == ["cut off"] * 10
        assert grown < 30 * MB, f"the server grew by {grown / MB:.0f} MB"
        # The answer, when it arrived before the reset: 431, and the connection closed.
        assert all(a == b"" or a.startswith(b"HTTP/1.1 431 ") for a in answers)
        assert upstream.requests == []


def test_a_head_trickled_past_the_deadline_is_cut_off_with_408(base_chain: DevChain, tmp_path: Path) -> None:
    upstream = RecordingUpstream()
    with (
        serve_asgi(upstream) as upstream_url,
        served_gateway(base_chain, tmp_path, upstream_url=upstream_url, server={"header_read_timeout": 1.0}) as gw,
    ):
        sock = connect(gw)
        sock.sendall(b"GET /free HTTP/1.1\r\nhost: x\r\n")
        t0 = time.monotonic()
        answer = b""
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for _ in range(40):  # a byte every 0.1 s: each one well inside any per-read timeout
                sock.sendall(b"x")
                time.sleep(0.1)
        answer = read_until_closed(sock)
        elapsed = time.monotonic() - t0
        sock.close()
        assert answer.startswith(b"HTTP/1.1 408 ")
        assert b'"request_timeout"' in answer
        assert elapsed < 3.0
        assert upstream.requests == []

        # A connection that never sends a byte is closed too, without an answer.
        silent = connect(gw)
        t0 = time.monotonic()
        assert read_until_closed(silent) == b""
        assert time.monotonic() - t0 < 3.0
        silent.close()


def test_a_kept_alive_connection_gets_a_fresh_deadline_for_each_request(base_chain: DevChain, tmp_path: Path) -> None:
    upstream = RecordingUpstream()
    with (
        serve_asgi(upstream) as upstream_url,
        served_gateway(base_chain, tmp_path, upstream_url=upstream_url, server={"header_read_timeout": 1.0}) as gw,
    ):
        sock = connect(gw)
        for i in range(3):
            if i:
                time.sleep(0.7)  # idle between requests (below the keep-alive timeout), then a head in pieces
            for part in (b"GET /free/%d HTTP/1.1\r\n" % i, b"host: x\r\n", b"x-a: 1\r\n", b"\r\n"):
                sock.sendall(part)
                time.sleep(0.1)
            head = b""
            while b"\r\n\r\n" not in head:
                head += sock.recv(65536)
            assert head.startswith(b"HTTP/1.1 200 ")
        sock.close()
        assert [r.path for r in upstream.requests] == ["/free/0", "/free/1", "/free/2"]


def test_heads_within_the_configured_cap_still_pass_and_just_above_it_get_431(
    base_chain: DevChain, tmp_path: Path
) -> None:
    upstream = RecordingUpstream()
    with (
        serve_asgi(upstream) as upstream_url,
        served_gateway(base_chain, tmp_path, upstream_url=upstream_url) as gw,
    ):
        big = b"b" * (15 * 1024)  # under the 16 KiB default
        for body in (b"", b"x" * 100_000):  # the head's cap never counts the body
            sock = connect(gw)
            sock.sendall(
                b"POST /free HTTP/1.1\r\nhost: x\r\nconnection: close\r\nx-big: "
                + big
                + b"\r\ncontent-length: %d\r\n\r\n" % len(body)
                + body
            )
            answer = read_until_closed(sock)
            sock.close()
            assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
        assert [len(r.body) for r in upstream.requests] == [0, 100_000]
        sock = connect(gw)
        sock.sendall(
            b"GET /free HTTP/1.1\r\nhost: x\r\nconnection: close\r\nx-big: " + b"b" * (17 * 1024) + b"\r\n\r\n"
        )
        assert read_until_closed(sock).startswith(b"HTTP/1.1 431 ")
        sock.close()
        assert len(upstream.requests) == 2


def test_a_trailer_block_that_never_ends_is_capped_like_a_head(base_chain: DevChain, tmp_path: Path) -> None:
    upstream = RecordingUpstream()
    with (
        serve_asgi(upstream) as upstream_url,
        served_gateway(base_chain, tmp_path, upstream_url=upstream_url) as gw,
    ):
        before = gw.rss_bytes()
        outcomes: list[str] = []

        def flood_trailer(sock: socket.socket) -> None:
            try:
                sock.sendall(b"POST /free HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n")
                sock.sendall(b"x-trailer: ")
                for _ in range(20 * MB // 65536):
                    sock.sendall(b"t" * 65536)
                outcomes.append("accepted all")
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                outcomes.append("cut off")

        socks = [connect(gw) for _ in range(5)]
        threads = [threading.Thread(target=flood_trailer, args=(s,)) for s in socks]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        time.sleep(0.5)
        grown = gw.rss_bytes() - before
        for s in socks:
            s.close()
        assert outcomes == ["cut off"] * 5
        assert grown < 30 * MB, f"the server grew by {grown / MB:.0f} MB"

        # Trailers of an ordinary size still pass.
        sock = connect(gw)
        sock.sendall(
            b"POST /free HTTP/1.1\r\nhost: x\r\nconnection: close\r\ntransfer-encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\nx-checksum: 1234\r\n\r\n"
        )
        assert read_until_closed(sock).startswith(b"HTTP/1.1 200 ")
        sock.close()


def test_a_body_left_unread_after_the_answer_must_arrive_in_time(base_chain: DevChain, tmp_path: Path) -> None:
    upstream = RecordingUpstream()
    with (
        serve_asgi(upstream) as upstream_url,
        served_gateway(base_chain, tmp_path, upstream_url=upstream_url, server={"body_read_timeout": 1.0}) as gw,
    ):
        # Answered (402) before its body was read; then the rest trickles in: the connection does not stay open.
        sock = connect(gw)
        sock.sendall(b"POST /paid HTTP/1.1\r\nhost: x\r\ncontent-length: 100000\r\n\r\n" + b"x" * 10)
        t0 = time.monotonic()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for _ in range(50):
                sock.sendall(b"y")
                time.sleep(0.1)
        answer = read_until_closed(sock)
        sock.close()
        assert answer.startswith(b"HTTP/1.1 402 ")
        assert time.monotonic() - t0 < 3.0

        # A client that finishes its upload in time keeps its connection for the next request.
        sock = connect(gw)
        sock.sendall(b"POST /paid HTTP/1.1\r\nhost: x\r\ncontent-length: 5000\r\n\r\n" + b"x" * 10)
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(65536)
        assert head.startswith(b"HTTP/1.1 402 ")
        time.sleep(0.3)
        sock.sendall(b"x" * 4990 + b"GET /free/next HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        rest = read_until_closed(sock)
        sock.close()
        assert b"HTTP/1.1 200 " in rest
        assert [r.path for r in upstream.requests] == ["/free/next"]
