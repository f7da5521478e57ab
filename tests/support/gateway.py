"""A real gateway for tests: uvicorn serving ``build_app(config)`` over a dev chain and a recording upstream.

    with running_gateway(base_chain, store_url=...) as gw:
        r = httpx.post(gw.url + "/paid", json={...})          # 402
        name, value = gw.sign(payer, r)                        # our own signer, or the official x402 client
        r = httpx.post(gw.url + "/paid", headers={name: value})

Each gateway gets a fresh random pay-to address, so balance deltas belong to one test only.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from eth_account import Account
from eth_account.signers.local import LocalAccount

from gateway.client.exact import Option, choose_requirement, parse_challenge, sign_exact_payment
from gateway.config import GatewayConfig, parse_config
from gateway.dev.chain import DevChain
from gateway.dev.keys import DEV_KEYS
from gateway.http.app import build_app
from gateway.networks import KNOWN_NETWORKS
from tests.support.servers import RecordingUpstream, serve_asgi

# The receiver authorizer of session channels (signs claims and refunds; never sends a transaction).
AUTHORIZER_KEY = DEV_KEYS[7]
SESSIONS = {"authorizer_key_env": "TEST_AUTHORIZER_KEY", "withdraw_delay": 900}

DEFAULT_ROUTES: list[dict[str, Any]] = [
    {"route": "POST /paid", "price": "0.10", "settlement": "after", "description": "paid after success"},
    {"route": "POST /paid-before", "price": "0.10", "settlement": "before"},
    {"route": "GET /cheap", "price": "0.01"},
    {"route": "GET /dear", "price": "1.00"},
]


def network_name(chain: DevChain) -> str:
    for name, known in KNOWN_NETWORKS.items():
        if known.chain_id == chain.chain_id:
            return name
    return f"chain{chain.chain_id}"


@dataclass
class GatewayUnderTest:
    url: str
    config: GatewayConfig
    upstream: RecordingUpstream
    chains: dict[str, DevChain]
    pay_to: str
    app: Any = field(repr=False, default=None)

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 30), **kwargs)

    def options(self, response: httpx.Response) -> list[Option]:
        return parse_challenge(response.headers, response.content)

    def sign(
        self, payer: LocalAccount, response: httpx.Response, *, version: int | None = None, **kw: Any
    ) -> tuple[str, str]:
        """Pay the 402 ``response`` with ``payer``: v2 by default (the header), or v1 from the body."""
        options = [Option(1, r, None) for r in response.json()["accepts"]] if version == 1 else self.options(response)
        return sign_exact_payment(payer, choose_requirement(options), **kw)

    def balance(self, address: str, network: str | None = None) -> int:
        chain = self.chains[network] if network else next(iter(self.chains.values()))
        return chain.balance(address)


def gateway_config(
    chains: Sequence[DevChain],
    *,
    upstream_url: str,
    store_url: str,
    pay_to: str,
    routes: list[dict[str, Any]] | None = None,
    relayer_key: str | None = None,
    **sections: Any,
) -> GatewayConfig:
    networks = {network_name(c): {"rpc_urls": [c.url], "receipt_poll_interval": 0.02} for c in chains}
    for c in chains:
        if network_name(c).startswith("chain"):
            networks[network_name(c)].update({"chain_id": c.chain_id, "usdc": c.usdc, "eip712_name": c.token_name})
    doc: dict[str, Any] = {
        "upstream": {"url": upstream_url, "read_timeout": 10.0},
        "store": {"url": store_url},
        "payment": {"pay_to": pay_to, "relayer_key_env": "TEST_RELAYER_KEY", "settle_timeout": 60.0},
        "networks": networks,
        "routes": routes if routes is not None else DEFAULT_ROUTES,
    }
    # Rate limits are tested on purpose in tests/ops; elsewhere a storm or fuzz run must not trip them.
    if "rate_limits" not in sections:
        doc["rate_limits"] = {"enabled": False}
    for name, value in sections.items():
        doc.setdefault(name, {}).update(value)
    env = dict(os.environ, TEST_RELAYER_KEY=relayer_key or chains[0].relayer_key, TEST_AUTHORIZER_KEY=AUTHORIZER_KEY)
    return parse_config(doc, env=env, base_dir=Path.cwd())


@contextlib.contextmanager
def running_gateway(
    chains: DevChain | Sequence[DevChain],
    *,
    store_url: str,
    routes: list[dict[str, Any]] | None = None,
    upstream: RecordingUpstream | Any | None = None,
    wrap: Any = None,
    upstream_settings: dict[str, Any] | None = None,
    pay_to: str | None = None,
    **sections: Any,
) -> Iterator[GatewayUnderTest]:
    """``wrap``: an optional function app -> app (e.g. to strip the v2 header and force v1 clients).
    ``upstream``: any ASGI app (default a RecordingUpstream); ``upstream_settings``: merged into ``[upstream]``
    (e.g. ``{"headers": {"X-API-Key": ...}}``), since the ``upstream`` keyword names the app."""
    chain_list = [chains] if isinstance(chains, DevChain) else list(chains)
    upstream = upstream or RecordingUpstream()
    pay_to = pay_to or Account.create().address  # fresh unless a test restarts "the same" gateway
    with serve_asgi(upstream) as upstream_url:
        if upstream_settings:
            sections = {**sections, "upstream": upstream_settings}
        config = gateway_config(
            chain_list, upstream_url=upstream_url, store_url=store_url, pay_to=pay_to, routes=routes, **sections
        )
        app = build_app(config)
        served = wrap(app) if wrap else app
        with serve_asgi(served, lifespan="on") as url:
            yield GatewayUnderTest(
                url=url,
                config=config,
                upstream=upstream,
                chains={network_name(c): c for c in chain_list},
                pay_to=config.payment.pay_to,
                app=app,
            )


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'receipts.db'}"
