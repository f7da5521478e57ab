"""Shared pieces of the jobs end-to-end tests: a paid gateway in jobs mode, paying, polling."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
from eth_account.signers.local import LocalAccount

from gateway.client.jobauth import job_token_headers, payer_auth_headers
from gateway.dev.chain import DevChain
from tests.support.gateway import GatewayUnderTest, running_gateway
from tests.support.jobs_upstreams import API_KEY

PRICE = 20_000  # "0.02" USDC in atomic units: seed 004's price
SUBMIT = {"agent": "POST /agent/prompt", "messaging": "POST /api/messaging/jobs"}
STATUS = {"agent": "/agent/job/{}", "messaging": "/api/messaging/jobs/{}"}
TERMINAL = {"completed", "failed", "cancelled", "timeout"}


@contextlib.contextmanager
def jobs_gateway(
    chain: DevChain,
    *,
    store_url: str,
    upstream: Any,
    mode: str,
    style: str,
    settlement: str = "after",
    routes: list[dict[str, Any]] | None = None,
    **jobs: Any,
) -> Iterator[GatewayUnderTest]:
    """A real gateway (uvicorn, anvil, the store at ``store_url``) in jobs ``mode`` in front of ``upstream``,
    holding the upstream's API key; the submit route costs :data:`PRICE`."""
    if routes is None:
        submit = jobs.get("submit") or SUBMIT[style]
        routes = [{"route": submit, "price": "0.02", "settlement": settlement}]
    if mode == "runner":
        jobs.setdefault("runner_upstream_path", "/run")
        jobs.setdefault("shutdown_grace_seconds", 0)
    with running_gateway(
        chain,
        store_url=store_url,
        routes=routes,
        upstream=upstream,
        upstream_settings={"headers": {"X-API-Key": API_KEY}},
        jobs={"mode": mode, "style": style, **jobs},
    ) as gw:
        yield gw


def pay(
    gw: GatewayUnderTest, client: httpx.Client, payer: LocalAccount, method: str, path: str, **kw: Any
) -> httpx.Response:
    """The x402 dance: the request, its 402, the same request paid with ``payer``."""
    first = client.request(method, path, **kw)
    assert first.status_code == 402, first.text
    name, value = gw.sign(payer, first)
    headers = {**kw.pop("headers", {}), name: value}
    return client.request(method, path, headers=headers, **kw)


def signed(payer: LocalAccount, method: str, path: str) -> dict[str, str]:
    return payer_auth_headers(payer, method, path)


def bearer(response: httpx.Response) -> dict[str, str]:
    return job_token_headers(response.headers["x-job-token"])


def poll(
    client: httpx.Client,
    path: str,
    headers: dict[str, str],
    *,
    until: Callable[[dict[str, Any]], bool] = lambda doc: doc["status"] in TERMINAL,
    timeout: float = 15.0,
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        r = client.get(path, headers=headers)
        assert r.status_code == 200, r.text
        doc: dict[str, Any] = r.json()
        if until(doc) or time.monotonic() > deadline:
            return doc
        time.sleep(0.05)
