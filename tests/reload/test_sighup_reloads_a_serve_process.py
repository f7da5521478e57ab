"""``kill -HUP`` on ``x402-gateway serve`` reloads its config file: a good file's prices are served, a bad one
changes nothing and the process keeps serving (docs/operating.md, "Prices and routes at run time")."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx

from gateway.dev.chain import DevChain
from tests.reload.helpers import offered
from tests.support.processes import served_gateway
from tests.support.servers import RecordingUpstream, serve_asgi


def price_after(url: str, expected: int, *, within: float = 15.0) -> int:
    deadline = time.monotonic() + within
    while True:
        price = offered(httpx.post(url + "/paid", timeout=5))
        if price == expected or time.monotonic() > deadline:
            return price
        time.sleep(0.05)


def test_sighup_reloads_the_file_and_a_bad_file_keeps_the_prices_in_force(base_chain: DevChain, tmp_path: Path) -> None:
    with (
        serve_asgi(RecordingUpstream()) as upstream_url,
        served_gateway(base_chain, tmp_path, upstream_url=upstream_url) as gw,
    ):
        config = tmp_path / "gateway.toml"
        text = config.read_text()
        assert offered(httpx.post(gw.url + "/paid", timeout=5)) == 100_000

        config.write_text(text.replace('price = "0.10"', 'price = "0.35"'))
        os.kill(gw.pid, signal.SIGHUP)
        assert price_after(gw.url, 350_000) == 350_000

        config.write_text(text.replace('price = "0.10"', 'price = "free"'))
        os.kill(gw.pid, signal.SIGHUP)
        deadline = time.monotonic() + 15
        while "reload refused" not in gw.log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        log = gw.log.read_text()
        assert "reload refused" in log and "routes[0].price" in log
        assert httpx.get(gw.url + "/healthz", timeout=5).status_code == 200  # still serving
        assert offered(httpx.post(gw.url + "/paid", timeout=5)) == 350_000  # the prices in force stay
