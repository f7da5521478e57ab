"""Slow or hostile clients never starve paying ones (docs/threat-model.md T39), against a real gateway over raw
sockets, a real anvil and a real upstream: slow senders and slow readers on free paths cannot hold the upstream
pool a paid request needs, and one address's streaming uploads are bounded without holding up anyone else."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from gateway.dev.chain import DevChain
from tests.support.gateway import GatewayUnderTest, running_gateway, sqlite_url
from tests.support.servers import Behaviour, RecordingUpstream

# A small pool makes the starvation cheap to reach: 8 connections, 2 of them kept for paid requests.
POOL = {"max_connections": 8, "connect_timeout": 2.0}


def open_socket(gw: GatewayUnderTest, source: str = "127.0.0.1", rcvbuf: int | None = None) -> socket.socket:
    host, port = gw.url.removeprefix("http://").split(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind((source, 0))
    sock.settimeout(10)
    sock.connect((host, int(port)))
    return sock


@contextlib.contextmanager
def slow_senders(gw: GatewayUnderTest, small: int, large: int) -> Iterator[list[socket.socket]]:
    """``small`` uploads that never finish a 1 kB body, ``large`` ones that send 70 kB of 1 MB and stall."""
    socks: list[socket.socket] = []
    try:
        for i in range(small + large):
            sock = open_socket(gw)
            length = 1000 if i < small else 1_000_000
            sock.sendall(b"POST /free/%d HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n" % (i, length))
            sock.sendall(b"x" * (10 if i < small else 70_000))
            socks.append(sock)
        yield socks
    finally:
        for sock in socks:
            sock.close()


def pay_and_call(gw: GatewayUnderTest, chain: DevChain) -> httpx.Response:
    payer = chain.new_payer(1_000_000)
    with gw.client(timeout=30) as c:
        challenge = c.post("/paid")
        assert challenge.status_code == 402
        name, value = gw.sign(payer, challenge)
        return c.post("/paid", headers={name: value})


def test_slow_senders_on_free_paths_never_starve_a_paid_request(base_chain: DevChain, tmp_path: Path) -> None:
    with (
        running_gateway(base_chain, store_url=sqlite_url(tmp_path), upstream_settings=POOL) as gw,
        slow_senders(gw, small=30, large=30),
    ):
        time.sleep(0.5)  # every slow sender is in place
        r = pay_and_call(gw, base_chain)
        assert r.status_code == 200, r.text
        assert "payment-response" in r.headers
        assert gw.upstream.requests[-1].path == "/paid"
        # Small bodies are read whole before a connection is taken: none of them reached the upstream.
        assert not any(r.path.startswith("/free/") and int(r.path[6:]) < 30 for r in gw.upstream.requests)


def test_slow_readers_on_free_paths_never_starve_a_paid_request(base_chain: DevChain, tmp_path: Path) -> None:
    upstream = RecordingUpstream(Behaviour(big_body=3_000_000))  # past what the pool buffers: reading pauses
    with running_gateway(base_chain, store_url=sqlite_url(tmp_path), upstream=upstream, upstream_settings=POOL) as gw:
        socks = []
        try:
            for i in range(20):
                sock = open_socket(gw, rcvbuf=4096)
                sock.sendall(b"GET /big/%d HTTP/1.1\r\nhost: x\r\n\r\n" % i)  # and never read the answer
                socks.append(sock)
            time.sleep(0.5)
            r = pay_and_call(gw, base_chain)
            assert r.status_code == 200
            assert len(r.content) == 3_000_000
        finally:
            for sock in socks:
                sock.close()


def test_one_addresss_streaming_uploads_are_bounded_and_other_clients_are_served(
    base_chain: DevChain, tmp_path: Path
) -> None:
    settings = {**POOL, "max_uploads_per_client": 2}
    with (
        running_gateway(base_chain, store_url=sqlite_url(tmp_path), upstream_settings=settings) as gw,
        slow_senders(gw, small=0, large=4) as socks,
    ):
        time.sleep(0.5)
        assert len(gw.upstream.requests) == 2  # two of this address's uploads stream; two wait for them
        # Another address, and the same address's requests that are not uploads, are served meanwhile.
        with gw.client(transport=httpx.HTTPTransport(local_address="127.0.0.2")) as other:
            assert other.post("/free/other", content=b"x" * 100_000).status_code == 200
        with gw.client() as same:
            assert same.get("/free/plain").status_code == 200
        # The waiting uploads give up after connect_timeout with 429, not 502: it is their own client's doing.
        answers = []
        for sock in socks:
            sock.settimeout(5)
            with contextlib.suppress(TimeoutError):
                answers.append(sock.recv(65536))
        limited = [a for a in answers if a.startswith(b"HTTP/1.1 429 ")]
        assert len(limited) == 2
        assert all(b"too_many_uploads" in a and b"retry-after: 1" in a.lower() for a in limited)
