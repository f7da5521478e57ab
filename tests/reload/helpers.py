"""A real gateway started from a config FILE, as ``serve`` starts one, so that a reload reads that file again.

    async with reloadable_gateway(base_chain, tmp_path, routes=ROUTES) as gw:
        gw.write(routes=[{**ROUTES[0], "price": "0.02"}])
        result = await gw.app.reloader.reload()

The gateway runs on the test's event loop (uvicorn as a task), so its reloader is awaited directly; the upstream
records every request it gets.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from eth_account import Account

from gateway.client.exact import parse_challenge
from gateway.config import load_config
from gateway.dev.chain import DevChain
from gateway.http.app import Gateway, build_app
from tests.support.gateway import AUTHORIZER_KEY, GatewayUnderTest, network_name
from tests.support.processes import config_text
from tests.support.servers import RecordingUpstream, serve_asgi, serve_asgi_async

REPORT = "GET /report"
ROUTES: list[dict[str, Any]] = [
    {"route": REPORT, "price": "0.01", "description": "Today's weather report"},
    {"route": "GET /free-soon", "price": "0.05"},
]


@dataclass
class ReloadableGateway(GatewayUnderTest):
    path: Path = Path()
    sections: dict[str, dict[str, Any]] | None = None

    @property
    def gateway(self) -> Gateway:
        gateway: Gateway = self.app
        return gateway

    def write(self, *, routes: list[dict[str, Any]], **changes: dict[str, Any]) -> None:
        """Rewrite the config file: the same sections (``changes`` merged in) and these routes."""
        sections = {name: dict(table) for name, table in (self.sections or {}).items()}
        for name, table in changes.items():
            sections.setdefault(name, {}).update(table)
        self.path.write_text(config_text(sections, routes))


def sections_for(chain: DevChain, *, upstream_url: str, store_url: str, pay_to: str) -> dict[str, dict[str, Any]]:
    return {
        "upstream": {"url": upstream_url, "read_timeout": 10.0},
        "store": {"url": store_url},
        "payment": {"pay_to": pay_to, "relayer_key_env": "TEST_RELAYER_KEY", "settle_timeout": 60.0},
        "rate_limits": {"enabled": False},
        f"networks.{network_name(chain)}": {"rpc_urls": [chain.url], "receipt_poll_interval": 0.02},
    }


@contextlib.asynccontextmanager
async def reloadable_gateway(
    chain: DevChain,
    tmp_path: Path,
    *,
    routes: list[dict[str, Any]] | None = None,
    store_url: str | None = None,
    pay_to: str | None = None,
    upstream: RecordingUpstream | None = None,
    name: str = "gateway",
    **more: dict[str, Any],
) -> AsyncIterator[ReloadableGateway]:
    """``more``: further sections (``sessions={...}``), merged into the file."""
    upstream = upstream or RecordingUpstream()
    pay_to = pay_to or Account.create().address
    store_url = store_url or f"sqlite:///{tmp_path / 'receipts.db'}"
    with serve_asgi(upstream) as upstream_url:
        sections = sections_for(chain, upstream_url=upstream_url, store_url=store_url, pay_to=pay_to)
        for section, table in more.items():
            sections.setdefault(section, {}).update(table)
        path = tmp_path / f"{name}.toml"
        path.write_text(config_text(sections, routes or ROUTES))
        env = dict(os.environ, TEST_RELAYER_KEY=chain.relayer_key, TEST_AUTHORIZER_KEY=AUTHORIZER_KEY)
        config = load_config(path, env=env)
        app = build_app(config, config_path=path, env=env)
        async with serve_asgi_async(app, lifespan="on") as url:
            yield ReloadableGateway(
                url=url,
                config=config,
                upstream=upstream,
                chains={network_name(chain): chain},
                pay_to=config.payment.pay_to,
                app=app,
                path=path,
                sections=sections,
            )


def offered(response: httpx.Response) -> int:
    """The price a 402 offers (atomic units), read from its v2 header as a client reads it."""
    assert response.status_code == 402, response.text
    [amount] = {o.amount for o in parse_challenge(response.headers, response.content) if o.version == 2}
    return amount
