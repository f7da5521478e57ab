"""Liveness and readiness: never priced, each dependency checked, failures named without leaking where they are."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account import Account

import gateway.ops.health
from gateway.dev.chain import DevChain, RedisServer
from gateway.http.app import build_app
from tests.ops.support import RpcRelay
from tests.support.gateway import gateway_config, running_gateway, sqlite_url
from tests.support.servers import Behaviour, RecordingUpstream, serve_asgi

EVERYTHING_PRICED = [{"route": "* /**", "price": "0.10"}]


def relayed(chain: DevChain, relay_url: str, secret_path: str = "/v2/SECRETRPCKEY") -> dict[str, Any]:
    return {"base": {"rpc_urls": [relay_url + secret_path], "receipt_poll_interval": 0.02}}


@contextlib.contextmanager
def relay_for(chain: DevChain) -> Iterator[tuple[RpcRelay, str]]:
    relay = RpcRelay(chain.url)
    with serve_asgi(relay) as url:
        yield relay, url


def wait_for_status(client: httpx.Client, path: str, status: int, timeout: float = 5.0) -> httpx.Response:
    """Poll until the expected answer shows (a stopped Redis takes a moment to be noticed)."""
    deadline = time.monotonic() + timeout
    while True:
        r = client.get(path)
        if r.status_code == status or time.monotonic() > deadline:
            return r
        time.sleep(0.1)


@pytest.fixture(autouse=True)
def _fresh_readiness(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every probe runs the checks (the 1 s result reuse is tested on its own below)."""
    monkeypatch.setattr(gateway.ops.health, "CACHE_SECONDS", 0.0)


def test_health_paths_are_answered_before_route_matching_and_never_priced(base_chain: DevChain, tmp_path: Path) -> None:
    with running_gateway(base_chain, store_url=sqlite_url(tmp_path), routes=EVERYTHING_PRICED) as gw, gw.client() as c:
        assert c.get("/anything").status_code == 402  # the catch-all route really prices everything else
        for path in ("/healthz", "/readyz", "/metrics"):
            r = c.get(path)
            assert r.status_code == 200, (path, r.text)
            assert "payment-required" not in r.headers
        assert c.get("/healthz").json() == {"status": "ok"}
        assert gw.upstream.requests == []  # nothing proxied: the gateway answered them itself


def test_health_paths_are_configurable_and_can_be_turned_off(base_chain: DevChain, tmp_path: Path) -> None:
    server = {"health_path": "/live", "ready_path": "/ready", "metrics_path": ""}
    with (
        running_gateway(base_chain, store_url=sqlite_url(tmp_path), routes=EVERYTHING_PRICED, server=server) as gw,
        gw.client() as c,
    ):
        assert c.get("/live").json() == {"status": "ok"}
        assert c.get("/ready").json()["status"] == "ready"
        assert c.get("/healthz").status_code == 402  # the defaults are ordinary (here: priced) paths now
        assert c.get("/metrics").status_code == 402


def test_readyz_reports_every_dependency_ready(base_chain: DevChain, redis_url: str) -> None:
    with running_gateway(base_chain, store_url=redis_url) as gw, gw.client() as c:
        r = c.get("/readyz")
        assert r.status_code == 200
        body = r.json()
        assert body["status"] == "ready" and body["checks"] == {"store": "ok", "rpc:base": "ok", "upstream": "ok"}
        # a Redis store's topology, without its address (where the store lives is not the prober's business)
        assert body["store"] == {
            "topology": "server",
            "min_replicas_acked": 0,
            "replicas_acked": None,
            "ack_shortfalls": 0,
            "failovers_seen": 0,
        }
        assert redis_url.rsplit(":", 1)[1].split("/", maxsplit=1)[0] not in r.text
        assert r.headers["cache-control"] == "no-store"


def test_readyz_names_a_down_store_and_recovers(
    base_chain: DevChain, redis_server: RedisServer, redis_url: str
) -> None:
    with running_gateway(base_chain, store_url=redis_url) as gw, gw.client() as c:
        assert c.get("/readyz").status_code == 200
        redis_server.stop()
        try:
            r = wait_for_status(c, "/readyz", 503)
            assert r.status_code == 503
            body = r.json()
            assert body["failing"] == ["store"]
            assert body["checks"]["rpc:base"] == "ok"
            assert str(redis_server.port) not in r.text  # where the store lives is not the prober's business
            assert c.get("/healthz").status_code == 200  # alive, just not ready: no restart loop for an outage
        finally:
            redis_server.start()
        assert wait_for_status(c, "/readyz", 200).status_code == 200


def test_readyz_catches_an_rpc_serving_the_wrong_chain_without_leaking_its_url(
    base_chain: DevChain, tmp_path: Path
) -> None:
    with relay_for(base_chain) as (relay, relay_url):
        networks = relayed(base_chain, relay_url)
        with running_gateway(base_chain, store_url=sqlite_url(tmp_path), networks=networks) as gw, gw.client() as c:
            assert c.get("/readyz").status_code == 200
            relay.mode = "wrong_chain"
            r = wait_for_status(c, "/readyz", 503)
            assert r.json()["checks"]["rpc:base"] == "wrong_chain"
            relay.mode = "down"
            r = c.get("/readyz")
            assert r.json()["checks"]["rpc:base"] == "unavailable"
            assert "SECRETRPCKEY" not in r.text
            assert relay_url.rsplit(":", 1)[1] not in r.text  # not even the port
            relay.mode = "forward"
            assert wait_for_status(c, "/readyz", 200).status_code == 200


def test_readyz_bounds_a_hanging_rpc_with_its_short_timeout(base_chain: DevChain, tmp_path: Path) -> None:
    with relay_for(base_chain) as (relay, relay_url):
        networks = relayed(base_chain, relay_url)
        server = {"ready_timeout": 0.3}
        with (
            running_gateway(base_chain, store_url=sqlite_url(tmp_path), networks=networks, server=server) as gw,
            gw.client() as c,
        ):
            relay.mode = "hang"
            t0 = time.perf_counter()
            r = c.get("/readyz")
            elapsed = time.perf_counter() - t0
            relay.mode = "forward"
            assert r.status_code == 503
            assert r.json()["checks"] == {"store": "ok", "rpc:base": "timeout", "upstream": "ok"}
            assert elapsed < 1.5  # the checks run concurrently, each bounded by ready_timeout


def test_readyz_probes_the_upstream_by_tcp_connect_by_default(base_chain: DevChain, tmp_path: Path) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    dead_url = f"http://127.0.0.1:{closed.getsockname()[1]}"  # bound, never listening: connection refused
    config = gateway_config(
        [base_chain], upstream_url=dead_url, store_url=sqlite_url(tmp_path), pay_to=Account.create().address
    )
    try:
        with serve_asgi(build_app(config), lifespan="on") as url:
            r = httpx.get(url + "/readyz")
            assert r.status_code == 503
            assert r.json()["failing"] == ["upstream"]
            assert r.json()["checks"]["upstream"] == "unavailable"
    finally:
        closed.close()


def test_readyz_uses_the_upstream_health_path_when_configured(base_chain: DevChain, tmp_path: Path) -> None:
    upstream = RecordingUpstream(Behaviour(status=503))
    with serve_asgi(upstream) as upstream_url:
        config = gateway_config(
            [base_chain],
            upstream_url=upstream_url,
            store_url=sqlite_url(tmp_path),
            pay_to=Account.create().address,
            upstream={"health_path": "/up"},
        )
        with serve_asgi(build_app(config), lifespan="on") as url, httpx.Client(base_url=url) as c:
            r = c.get("/readyz")
            assert r.status_code == 503
            assert r.json()["checks"]["upstream"] == "http_503"
            assert [q.path for q in upstream.requests] == ["/up"]
            upstream.reset(Behaviour(status=404))  # any answer below 500 means the upstream is there
            assert c.get("/readyz").json()["checks"]["upstream"] == "ok"


def test_concurrent_readiness_probes_share_one_check(
    base_chain: DevChain, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/readyz is public: a flood of probes must not become a flood of (metered) RPC calls."""
    monkeypatch.setattr(gateway.ops.health, "CACHE_SECONDS", 1.0)
    with relay_for(base_chain) as (relay, relay_url):
        networks = relayed(base_chain, relay_url)
        with running_gateway(base_chain, store_url=sqlite_url(tmp_path), networks=networks) as gw:
            before = len(relay.paths)

            async def burst() -> list[int]:
                async with httpx.AsyncClient(base_url=gw.url) as c:
                    rs = await asyncio.gather(*(c.get("/readyz") for _ in range(50)))
                return [r.status_code for r in rs]

            assert asyncio.run(burst()) == [200] * 50
            assert len(relay.paths) - before <= 2  # one check, at most one more if the burst straddled expiry
